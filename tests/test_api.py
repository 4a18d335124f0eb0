"""The pull API through edgecache against a real origin registry: what a client sees, what upstream sees."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Edge, EdgeProcess, Seeded, edge_config, running_edge, tls_edge_in_process
from tests.support.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Pusher,
    build_image,
)
from tests.support.registry import Registry
from tests.support.waiting import wait_until

ALL_MANIFESTS = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])


@pytest.fixture(params=["plain-aiohttp", "tls-granian"])
async def edge(
    request: pytest.FixtureRequest, tmp_path: Path, origin: Registry, seeded: Seeded
) -> AsyncIterator[Edge]:
    """Every API test runs against both fronts: the plain aiohttp listener and the TLS (granian,
    ASGI) listener, which are adapters over the same RegistryFront and must answer alike."""
    config = edge_config(tmp_path / "cache", origin.url)
    if request.param == "tls-granian":
        async with tls_edge_in_process(config, tmp_path / "pki") as running:
            yield running
        return
    async with running_edge(config) as running:
        yield running


async def error_of(resp: aiohttp.ClientResponse) -> dict[str, str]:
    body = json.loads(await resp.read())
    assert resp.headers["Content-Type"].startswith("application/json")
    assert set(body["errors"][0]) == {"code", "message", "detail"}
    return body["errors"][0]  # type: ignore[no-any-return]


async def stored_blob(edge: Edge, digest: str) -> bytes:
    """The blob's file in the store, once its fill has been renamed in (just after the response)."""
    await edge.instance.flights.settled()
    hex_ = digest.split(":", 1)[1]
    return (edge.cache_dir / "blobs" / "sha256" / hex_[:2] / hex_).read_bytes()


async def test_base_endpoint_answers_like_a_registry(edge: Edge) -> None:
    for method in ("GET", "HEAD"):
        async with edge.http.request(method, "/v2/") as resp:
            assert resp.status == 200
            assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_manifest_by_tag_keeps_exact_bytes_and_headers(edge: Edge, seeded: Seeded) -> None:
    manifest = seeded.alpine.manifest
    async with edge.http.get(
        "/v2/library/alpine/manifests/latest", headers={"Accept": ALL_MANIFESTS}
    ) as resp:
        assert resp.status == 200
        body = await resp.read()
        assert body == manifest.data  # the origin's bytes, indentation and all
        assert resp.headers["Content-Type"] == DOCKER_MANIFEST
        assert resp.headers["Docker-Content-Digest"] == manifest.digest
        assert resp.headers["Content-Length"] == str(len(manifest.data))
        assert resp.headers["ETag"] == f'"{manifest.digest}"'


async def test_single_component_name_gets_library_prefix(
    edge: Edge, seeded: Seeded, origin: Registry
) -> None:
    async with edge.http.get("/v2/alpine/manifests/3.19", headers={"Accept": DOCKER_MANIFEST}) as resp:
        assert resp.status == 200
        assert await resp.read() == seeded.alpine.manifest.data
    assert origin.count("GET", "/v2/library/alpine/manifests/3.19") >= 1


async def test_tag_is_cached_within_ttl_then_revalidated_with_head(
    tmp_path: Path, origin: Registry, seeded: Seeded
) -> None:

    pusher = Pusher(origin.url)
    first, second = build_image("moving-a"), build_image("moving-b")
    pusher.push_image("library/moving", "stable", first)
    async with running_edge(edge_config(tmp_path / "c", origin.url, tag_ttl=3600.0)) as edge:
        path = "/v2/library/moving/manifests/stable"
        for _ in range(3):
            async with edge.http.get(path, headers={"Accept": ALL_MANIFESTS}) as resp:
                assert await resp.read() == first.manifest.data
        assert origin.count("GET", path) == 1
        assert origin.count("HEAD", path) == 0

    # TTL 0: every request revalidates with a HEAD; a moved tag is followed, an unmoved one is not refetched.
    async with running_edge(edge_config(tmp_path / "d", origin.url, tag_ttl=0.0)) as edge:
        gets_before = origin.count("GET", path)
        for _ in range(2):
            async with edge.http.get(path, headers={"Accept": ALL_MANIFESTS}) as resp:
                assert await resp.read() == first.manifest.data
        assert origin.count("GET", path) == gets_before + 1
        assert origin.count("HEAD", path) >= 1
        async with edge.http.get(path, headers={"Accept": ALL_MANIFESTS}) as resp:
            assert resp.headers["X-Cache"] == "REVALIDATED"
        pusher.push_image("library/moving", "stable", second)
        async with edge.http.get(path, headers={"Accept": ALL_MANIFESTS}) as resp:
            assert await resp.read() == second.manifest.data
            assert resp.headers["Docker-Content-Digest"] == second.manifest.digest


async def test_accept_headers_are_honoured(edge: Edge, seeded: Seeded) -> None:
    path = "/v2/library/multi/manifests/v1"
    # Several Accept headers, one of them a comma list: the index type is in there.
    headers = [("Accept", f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"), ("Accept", f"{OCI_INDEX};q=0.9")]
    async with edge.http.get(path, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == OCI_INDEX
        assert await resp.read() == seeded.multi.manifest.data
    # A client that cannot take an index is not handed one.
    async with edge.http.get(path, headers={"Accept": DOCKER_MANIFEST}) as resp:
        assert resp.status == 404
        assert (await error_of(resp))["code"] == "MANIFEST_UNKNOWN"


async def test_manifest_by_digest_is_verified_and_kept(edge: Edge, seeded: Seeded, origin: Registry) -> None:
    child = seeded.multi.images[1].manifest
    path = f"/v2/library/multi/manifests/{child.digest}"
    gets, heads = origin.count("GET", path), origin.count("HEAD", path)
    for _ in range(3):
        async with edge.http.get(path, headers={"Accept": OCI_MANIFEST}) as resp:
            assert resp.status == 200
            assert await resp.read() == child.data
            assert resp.headers["Docker-Content-Digest"] == child.digest
    assert origin.count("GET", path) == gets + 1
    async with edge.http.head(path) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(child.data))
        assert resp.headers["X-Cache"] == "HIT"
    assert origin.count("HEAD", path) == heads


async def test_head_on_a_cold_tag_does_not_download_the_body(
    edge: Edge, seeded: Seeded, origin: Registry
) -> None:
    path = "/v2/team/app/manifests/1.0"
    gets, heads = origin.count("GET", path), origin.count("HEAD", path)
    async with edge.http.head(path, headers={"Accept": ALL_MANIFESTS}) as resp:
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == seeded.app.manifest.digest
        assert resp.headers["Content-Type"] == OCI_MANIFEST
        assert resp.headers["Content-Length"] == str(len(seeded.app.manifest.data))
        assert await resp.read() == b""
    assert origin.count("GET", path) == gets
    assert origin.count("HEAD", path) == heads + 1


async def test_blob_miss_then_hit_with_one_upstream_fetch(
    edge: Edge, seeded: Seeded, origin: Registry
) -> None:
    layer = seeded.alpine.layers[-1]
    path = f"/v2/library/alpine/blobs/{layer.digest}"
    before = origin.count("GET", f"/blobs/{layer.digest}")
    results = []
    for _ in range(3):
        async with edge.http.get(path, headers={"Accept-Encoding": "gzip"}) as resp:
            assert resp.status == 200
            assert await resp.read() == layer.data
            assert resp.headers["Content-Length"] == str(len(layer.data))
            assert resp.headers["Docker-Content-Digest"] == layer.digest
            assert resp.headers["Accept-Ranges"] == "bytes"
            assert "Content-Encoding" not in resp.headers
            results.append(resp.headers["X-Cache"])
    assert results == ["MISS", "HIT", "HIT"]
    assert origin.count("GET", f"/blobs/{layer.digest}") == before + 1
    # Stored once, under its digest, intact.
    assert await stored_blob(edge, layer.digest) == layer.data
    assert f"blobs/sha256/{layer.digest[7:9]}/{layer.digest[7:]}" in edge.cached_files()


async def test_concurrent_misses_make_one_upstream_fetch(
    edge: Edge, seeded: Seeded, origin: Registry
) -> None:
    layer = seeded.big.layers[-1]
    before = origin.count("GET", f"/blobs/{layer.digest}")

    async def pull(repo: str) -> bytes:
        async with edge.http.get(f"/v2/{repo}/blobs/{layer.digest}") as resp:
            assert resp.status == 200
            return await resp.read()

    bodies = await asyncio.gather(*(pull("library/big" if i % 2 else "big") for i in range(8)))
    assert all(body == layer.data for body in bodies)
    assert origin.count("GET", f"/blobs/{layer.digest}") == before + 1
    # What was streamed to eight readers while it filled is stored intact.
    assert await stored_blob(edge, layer.digest) == layer.data


async def test_metrics_exist_from_start_and_never_name_repositories_or_digests(
    edge: Edge, seeded: Seeded
) -> None:
    assert await edge.metric("edgecache_fills_started_total", upstream="docker.io") == 0
    assert await edge.metric("edgecache_served_bytes_total", source="disk") == 0
    layer = seeded.alpine.layers[0]
    hex_ = layer.digest.split(":", 1)[1]
    async with edge.http.get(f"/v2/library/alpine/blobs/{layer.digest}") as resp:
        await resp.read()
    # the verified fill is renamed into the store just after the response
    await wait_until((edge.cache_dir / "blobs/sha256" / hex_[:2] / hex_).exists, message="blob stored")
    async with edge.http.get(f"/v2/library/alpine/blobs/{layer.digest}") as resp:
        await resp.read()
    assert await edge.metric("edgecache_served_bytes_total", source="fill") == len(layer.data)
    assert await edge.metric("edgecache_served_bytes_total", source="disk") == len(layer.data)
    async with edge.http.get("/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert "sha256" not in text and "alpine" not in text and "library" not in text


@pytest.mark.parametrize("cached", [False, True])
async def test_ranges(edge: Edge, seeded: Seeded, cached: bool) -> None:
    layer = seeded.alpine.layers[-1]
    path = f"/v2/library/alpine/blobs/{layer.digest}"
    size = len(layer.data)
    if cached:
        async with edge.http.get(path) as resp:
            await resp.read()
    cases = {
        "bytes=0-99": (0, 99),
        "bytes=1000-": (1000, size - 1),
        "bytes=-500": (size - 500, size - 1),
        f"bytes=100-{size + 5000}": (100, size - 1),
    }
    for header, (start, end) in cases.items():
        async with edge.http.get(path, headers={"Range": header}) as resp:
            assert resp.status == 206, header
            assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{size}"
            assert await resp.read() == layer.data[start : end + 1]
    async with edge.http.get(path, headers={"Range": f"bytes={size}-"}) as resp:
        assert resp.status == 416
        assert resp.headers["Content-Range"] == f"bytes */{size}"
        assert (await error_of(resp))["code"] == "RANGE_INVALID"


async def test_head_on_an_uncached_blob_asks_upstream_head_only(
    edge: Edge, seeded: Seeded, origin: Registry
) -> None:
    config = seeded.app.config
    gets, heads = (
        origin.count("GET", f"/blobs/{config.digest}"),
        origin.count("HEAD", f"/blobs/{config.digest}"),
    )
    async with edge.http.head(f"/v2/team/app/blobs/{config.digest}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(config.data))
        assert resp.headers["Docker-Content-Digest"] == config.digest
    assert origin.count("GET", f"/blobs/{config.digest}") == gets
    assert origin.count("HEAD", f"/blobs/{config.digest}") == heads + 1
    assert not any(f.startswith("blobs/") for f in edge.cached_files())


async def test_ns_parameter_routes_but_never_keys_the_cache(
    edge: Edge, seeded: Seeded, origin: Registry
) -> None:
    config = seeded.alpine.config
    async with edge.http.get(f"/v2/library/alpine/blobs/{config.digest}?ns=docker.io") as resp:
        assert resp.status == 200 and resp.headers["X-Cache"] == "MISS"
        assert await resp.read() == config.data
    async with edge.http.get(f"/v2/library/alpine/blobs/{config.digest}") as resp:
        assert resp.status == 200 and resp.headers["X-Cache"] == "HIT"
    async with edge.http.get(
        "/v2/library/alpine/manifests/3.20?ns=docker.io", headers={"Accept": ALL_MANIFESTS}
    ):
        pass
    async with edge.http.get("/v2/library/alpine/manifests/3.20", headers={"Accept": ALL_MANIFESTS}) as resp:
        assert resp.headers["X-Cache"] == "HIT"
    seen = len(origin.access_log())
    async with edge.http.get(f"/v2/library/alpine/blobs/{config.digest}?ns=evil.example.com") as resp:
        assert resp.status == 404
        assert (await error_of(resp))["code"] == "NAME_UNKNOWN"
    assert len(origin.access_log()) == seen


async def test_tags_list_is_proxied(edge: Edge, seeded: Seeded) -> None:
    async with edge.http.get("/v2/library/alpine/tags/list") as resp:
        assert resp.status == 200
        doc = json.loads(await resp.read())
    assert doc["name"] == "library/alpine"
    assert sorted(doc["tags"]) == ["3.19", "3.20", "3.21", "latest"]
    async with edge.http.get("/v2/library/alpine/tags/list?n=abc") as resp:
        assert resp.status == 400
        assert (await error_of(resp))["code"] == "PAGINATION_NUMBER_INVALID"
    async with edge.http.get("/v2/library/alpine/tags/list?last=a/../b") as resp:
        assert resp.status == 400
    async with edge.http.get("/v2/library/nothing-here/tags/list") as resp:
        assert resp.status == 404
        assert (await error_of(resp))["code"] == "NAME_UNKNOWN"


async def test_tags_list_pagination_link_points_at_the_mirror(
    tmp_path: Path, origin: Registry, seeded: Seeded
) -> None:
    # Debian's distribution 2.8 does not paginate tags (Docker Hub does): the fault proxy adds the
    # Link header Hub would send, pointing at the upstream's path and host.
    from tests.support.faults import FaultProxy

    proxy = await FaultProxy(origin.url).start()
    proxy.rules.add_headers["/tags/list"] = {
        "Link": f'<{proxy.url}/v2/library/alpine/tags/list?last=3.20&n=2&evil=1>; rel="next"'
    }
    try:
        async with running_edge(edge_config(tmp_path / "c", proxy.url)) as edge:
            async with edge.http.get("/v2/alpine/tags/list?n=2&ns=docker.io") as resp:
                assert resp.status == 200
                link = resp.headers["Link"]
            assert link == '</v2/alpine/tags/list?last=3.20&n=2&ns=docker.io>; rel="next"'
            assert proxy.count("GET", "/v2/library/alpine/tags/list?n=2") == 1
            assert all("ns=" not in s.path_qs for s in proxy.seen)
    finally:
        await proxy.stop()


async def test_referrers_without_an_upstream_api_or_fallback_tag_are_an_empty_index(
    edge: Edge, seeded: Seeded
) -> None:
    # the origin (distribution 2.8) has no referrers API (404) and there is no sha256-<hex> tag:
    # the spec's answer is 200 with an empty index, never a 404
    async with edge.http.get(f"/v2/library/alpine/referrers/{seeded.alpine.manifest.digest}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
        assert (await resp.json(content_type=None))["manifests"] == []


async def test_upstream_404s_are_404s(edge: Edge) -> None:
    async with edge.http.get("/v2/library/alpine/manifests/no-such-tag") as resp:
        assert resp.status == 404
        assert (await error_of(resp))["code"] == "MANIFEST_UNKNOWN"
    async with edge.http.get("/v2/library/alpine/blobs/sha256:" + "1" * 64) as resp:
        assert resp.status == 404
        assert (await error_of(resp))["code"] == "BLOB_UNKNOWN"


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/Library/Alpine/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/library/../etc/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/library/%2e%2e/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/a//b/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/" + "a" * 256 + "/manifests/latest", 400, "NAME_INVALID"),
        # neither a tag nor a digest: no manifest can exist under it (the spec's 404), upstream not asked
        ("GET", "/v2/library/alpine/manifests/-bad", 404, "MANIFEST_UNKNOWN"),
        ("HEAD", "/v2/library/alpine/manifests/.INVALID_MANIFEST_NAME", 404, ""),
        ("GET", "/v2/library/alpine/manifests/" + "t" * 129, 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/Library/alpine/manifests/-bad", 400, "NAME_INVALID"),
        ("GET", "/v2/library/alp%0aine/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/library/alp%00ine/tags/list", 400, "NAME_INVALID"),
        ("GET", "/v2/library/alpine/manifests/sha256:totallywrong", 400, "DIGEST_INVALID"),
        ("GET", "/v2/library/alpine/manifests/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
        ("GET", "/v2/library/alpine/manifests/sha256:abc", 400, "DIGEST_INVALID"),
        ("GET", "/v2/library/alpine/blobs/sha256:" + "G" * 64, 400, "DIGEST_INVALID"),
        ("GET", "/v2/library/alpine/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
        ("GET", "/v2/library/alpine/blobs/latest", 400, "DIGEST_INVALID"),
        ("PUT", "/v2/library/alpine/manifests/latest", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/library/alpine/manifests/latest", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/library/alpine/blobs/sha256:" + "a" * 64, 405, "UNSUPPORTED"),
        ("POST", "/v2/library/alpine/blobs/uploads/", 405, "UNSUPPORTED"),
        ("PATCH", "/v2/library/alpine/blobs/uploads/abc", 405, "UNSUPPORTED"),
        ("GET", "/v2/_catalog", 405, "UNSUPPORTED"),
        ("GET", "/v3/whatever", 404, "UNSUPPORTED"),
    ],
)
async def test_bad_requests_get_oci_errors_and_touch_nothing(
    edge: Edge, origin: Registry, method: str, path: str, status: int, code: str
) -> None:
    from yarl import URL

    seen = len(origin.access_log())
    files = edge.cached_files()
    async with edge.http.request(method, URL(edge.url + path, encoded=True), data=b"x") as resp:
        assert resp.status == status
        if method != "HEAD":  # no body to a HEAD
            assert (await error_of(resp))["code"] == code
    assert len(origin.access_log()) == seen
    assert edge.cached_files() == files


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"GARBAGE\x01 / HTTP/1.1\r\n\r\n", 400),
        (b"GET /v2/library/alpine/manifests/latest\x07 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 404),
        (b"GET http://evil.example/v2/library/alpine/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    ],
)
def test_malformed_http_gets_an_oci_error_without_echo_or_traceback(
    edge_process: EdgeProcess, raw: bytes, status: int
) -> None:
    """What the HTTP layer refuses (smuggling-shaped framing, huge headers, junk, absolute-form,
    CONNECT) is answered in the registry's JSON format too, never echoed back, and not logged as a crash."""
    import socket

    host, port = edge_process.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: (\d+)", head)
            if length and len(body) >= int(length.group(1)):
                break
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode()
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert b"aaaa" not in body and b"evil" not in body
    assert "Traceback" not in edge_process.log_path.read_text()


async def test_if_none_match_answers_304_without_a_body(edge: Edge, seeded: Seeded) -> None:
    manifest, layer = seeded.alpine.manifest, seeded.alpine.layers[0]
    for path, digest in (
        ("/v2/library/alpine/manifests/latest", manifest.digest),
        (f"/v2/library/alpine/blobs/{layer.digest}", layer.digest),
    ):
        async with edge.http.get(path, headers={"Accept": DOCKER_MANIFEST}) as resp:
            await resp.read()
        await edge.instance.flights.settled()
        async with edge.http.get(
            path, headers={"Accept": DOCKER_MANIFEST, "If-None-Match": f'"{digest}"'}
        ) as resp:
            assert resp.status == 304
            assert resp.headers["ETag"] == f'"{digest}"'
            assert await resp.read() == b""
        async with edge.http.get(
            path, headers={"Accept": DOCKER_MANIFEST, "If-None-Match": '"sha256:other"'}
        ) as resp:
            assert resp.status == 200


async def test_a_bug_is_an_oci_500_with_a_request_id_never_a_plain_text_page(
    edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception (made here by breaking the pull service) still answers in the
    registry's JSON format, names no exception text, and the next request is served normally."""

    async def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("secret internals /var/cache/edgecache")

    monkeypatch.setattr(edge.instance.front.pull, "manifest", broken)
    async with edge.http.get(
        "/v2/library/alpine/manifests/latest", headers={"Accept": ALL_MANIFESTS}
    ) as resp:
        assert resp.status == 500
        assert resp.headers["X-Request-Id"]
        body = await resp.read()
        assert json.loads(body)["errors"][0]["code"] == "UNKNOWN"
        assert b"secret" not in body and b"/var/cache" not in body
    monkeypatch.undo()
    async with edge.http.get(
        "/v2/library/alpine/manifests/latest", headers={"Accept": ALL_MANIFESTS}
    ) as resp:
        assert resp.status == 200

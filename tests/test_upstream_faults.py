"""Upstream failures, as clients see them: never "not found", never a complete wrong body, nothing stored.

Faults come from a small proxy in front of the real origin (tests/support/faults.py) or from corrupting
the origin's own storage on disk; everything else is the real registry.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Edge, Seeded, edge_config, running_edge
from tests.support.faults import FaultProxy
from tests.support.images import DOCKER_MANIFEST, OCI_MANIFEST, Pusher, build_image
from tests.support.registry import Registry
from tests.support.waiting import wait_until

ACCEPT = {"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"}


@pytest.fixture
async def edge_via_proxy(tmp_path: Path, proxy: FaultProxy) -> AsyncIterator[Edge]:
    config = edge_config(
        tmp_path / "cache", proxy.url, upstream={"stall_timeout": 1.0, "header_timeout": 1.0}, tag_ttl=0.0
    )
    async with running_edge(config) as edge:
        yield edge


async def error_code(resp: aiohttp.ClientResponse) -> str:
    return str(json.loads(await resp.read())["errors"][0]["code"])


def blob_files(edge: Edge) -> list[str]:
    return [f for f in edge.cached_files() if f.startswith(("blobs/", "manifests/", "tmp/"))]


async def test_unreachable_upstream_is_502_not_404(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: refused
        async with running_edge(edge_config(tmp_path / "c", dead)) as edge:
            async with edge.http.get("/v2/library/alpine/manifests/latest") as resp:
                assert resp.status == 502
                assert await error_code(resp) == "UNAVAILABLE"
            async with edge.http.get("/v2/library/alpine/blobs/sha256:" + "a" * 64) as resp:
                assert resp.status == 502


@pytest.mark.parametrize(
    ("status", "expected", "code"),
    [
        (500, 502, "UNAVAILABLE"),
        (503, 502, "UNAVAILABLE"),
        (429, 429, "TOOMANYREQUESTS"),
        (504, 504, "UNAVAILABLE"),
    ],
)
async def test_upstream_errors_map_to_gateway_errors(
    edge_via_proxy: Edge, proxy: FaultProxy, seeded: Seeded, status: int, expected: int, code: str
) -> None:
    proxy.rules.status["/v2/team/app/"] = status
    async with edge_via_proxy.http.get("/v2/team/app/manifests/1.0", headers=ACCEPT) as resp:
        assert resp.status == expected
        assert await error_code(resp) == code
    async with edge_via_proxy.http.get(f"/v2/team/app/blobs/{seeded.app.config.digest}") as resp:
        assert resp.status == expected
    assert blob_files(edge_via_proxy) == []


async def test_upstream_that_hangs_times_out_as_504(edge_via_proxy: Edge, proxy: FaultProxy) -> None:
    proxy.rules.hang = True
    async with edge_via_proxy.http.get("/v2/team/app/manifests/1.0", headers=ACCEPT) as resp:
        assert resp.status == 504
        assert await error_code(resp) == "UNAVAILABLE"


async def test_cached_tag_is_served_stale_while_upstream_fails(
    edge_via_proxy: Edge, proxy: FaultProxy, seeded: Seeded
) -> None:
    path = "/v2/team/app/manifests/1.0"
    async with edge_via_proxy.http.get(path, headers=ACCEPT) as resp:
        assert resp.status == 200
    proxy.rules.status["/manifests/"] = 503
    async with edge_via_proxy.http.get(path, headers=ACCEPT) as resp:
        assert resp.status == 200
        assert resp.headers["X-Cache"] == "STALE"
        assert await resp.read() == seeded.app.manifest.data
    # A 404 is an answer, not an outage: a deleted tag is not served stale.
    proxy.rules.status["/manifests/"] = 404
    async with edge_via_proxy.http.get(path, headers=ACCEPT) as resp:
        assert resp.status == 404


async def test_truncated_blob_aborts_the_response_and_stores_nothing(
    edge_via_proxy: Edge, proxy: FaultProxy, seeded: Seeded
) -> None:
    layer = seeded.alpine.layers[-1]
    proxy.rules.truncate_blobs = 100  # every attempt, resumes included
    async with edge_via_proxy.http.get(f"/v2/library/alpine/blobs/{layer.digest}") as resp:
        assert resp.status == 200  # headers went out before upstream failed
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await edge_via_proxy.instance.flights.settled()
    assert blob_files(edge_via_proxy) == []
    proxy.rules.truncate_blobs = 0
    async with edge_via_proxy.http.get(f"/v2/library/alpine/blobs/{layer.digest}") as resp:
        assert await resp.read() == layer.data


async def test_dropped_upstream_connection_is_resumed_with_a_range(
    edge_via_proxy: Edge, proxy: FaultProxy, seeded: Seeded
) -> None:
    layer = seeded.big.layers[-1]
    proxy.rules.truncate_blobs = 1  # the first body breaks off half-way
    async with edge_via_proxy.http.get(f"/v2/library/big/blobs/{layer.digest}") as resp:
        assert resp.status == 200
        assert await resp.read() == layer.data
    requests = [s for s in proxy.seen if layer.digest in s.path_qs]
    assert len(requests) == 2 and "Range" not in requests[0].headers
    resumed_at = int(requests[1].headers["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at < len(layer.data)  # continued where it broke off, not from the start
    hex_ = layer.digest.split(":", 1)[1]
    assert (edge_via_proxy.cache_dir / "blobs/sha256" / hex_[:2] / hex_).read_bytes() == layer.data
    assert await edge_via_proxy.metric("edgecache_fill_resumes_total", upstream="docker.io") == 1


def origin_blob_file(origin: Registry, digest: str) -> Path:
    hex_ = digest.split(":", 1)[1]
    return origin.root / "data/docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


async def test_blob_that_does_not_match_its_digest_is_never_delivered_whole(
    tmp_path: Path, edge: Edge, origin: Registry
) -> None:
    image = build_image("corrupt-blob", random_bytes=3 * 1024 * 1024)
    Pusher(origin.url).push_image("test/corrupt-blob", "v1", image)
    layer = image.layers[-1]
    path = f"/v2/test/corrupt-blob/blobs/{layer.digest}"
    stored = origin_blob_file(origin, layer.digest)
    good = stored.read_bytes()
    stored.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))  # same size, last byte flipped
    try:
        async with edge.http.get(path) as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        # A retry right away is refused without another upstream fetch (a brief negative entry).
        async with edge.http.get(path) as resp:
            assert resp.status == 502
            assert await error_code(resp) == "UNAVAILABLE"
        assert origin.count("GET", f"/blobs/{layer.digest}") == 1
        labels = {"upstream": "docker.io"}
        assert await edge.metric("edgecache_fills_failed_total", reason="digest_mismatch", **labels) == 1
        assert await edge.metric("edgecache_fill_negative_hits_total", **labels) == 1
        await edge.instance.flights.settled()
        assert not any(f.startswith(("blobs/", "tmp/")) for f in edge.cached_files())
    finally:
        stored.write_bytes(good)
    # Without the negative entry (negative_ttl = 0) the next ask fetches again and succeeds.
    async with (
        running_edge(edge_config(tmp_path / "other", origin.url, negative_ttl=0.0)) as other,
        other.http.get(path) as resp,
    ):
        assert await resp.read() == layer.data


async def test_manifest_that_does_not_match_its_digest_is_refused(edge: Edge, origin: Registry) -> None:
    image = build_image("corrupt-manifest")
    Pusher(origin.url).push_image("test/corrupt-manifest", "v1", image)
    stored = origin_blob_file(origin, image.manifest.digest)
    good = stored.read_bytes()
    stored.write_bytes(good.replace(b'"schemaVersion": 2', b'"schemaVersion":  2'))
    try:
        path = f"/v2/test/corrupt-manifest/manifests/{image.manifest.digest}"
        async with edge.http.get(path, headers=ACCEPT) as resp:
            assert resp.status == 502
            assert await error_code(resp) == "UNAVAILABLE"
        assert not any(f.startswith("manifests/") for f in edge.cached_files())
    finally:
        stored.write_bytes(good)


async def test_manifest_over_4_mib_is_refused(edge_via_proxy: Edge, proxy: FaultProxy) -> None:
    # distribution itself neither stores nor serves such manifests (other registries do), so the
    # fault proxy streams one, chunked, without a Content-Length to check up front.
    proxy.rules.replace_body["/manifests/"] = (
        b'{"schemaVersion": 2, "pad": "' + b"x" * (4 * 1024 * 1024) + b'"}'
    )
    async with edge_via_proxy.http.get("/v2/team/app/manifests/1.0", headers=ACCEPT) as resp:
        assert resp.status == 502
        assert await error_code(resp) == "SIZE_INVALID"
    assert blob_files(edge_via_proxy) == []


async def test_stalled_upstream_body_is_resumed(
    edge_via_proxy: Edge, proxy: FaultProxy, seeded: Seeded
) -> None:
    layer = seeded.big.layers[-1]
    proxy.rules.stall_blobs = 1  # half the body, then silence: the read timeout (1 s here) fires
    async with edge_via_proxy.http.get(f"/v2/library/big/blobs/{layer.digest}") as resp:
        assert await resp.read() == layer.data
    ranges = [s.headers.get("Range") for s in proxy.seen if layer.digest in s.path_qs]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1] is not None


async def test_upstream_connections_are_bounded(tmp_path: Path, proxy: FaultProxy, origin: Registry) -> None:
    pusher = Pusher(origin.url)
    images = [build_image(f"many-{i}", random_bytes=2 * 1024 * 1024) for i in range(8)]
    for i, image in enumerate(images):
        pusher.push_image(f"test/many-{i}", "v1", image)
    # Paced bodies stay in flight (they would fit in the socket buffers otherwise), so the proxy's
    # count of requests it is answering at once is the number of upstream connections in use.
    proxy.rules.throttle = 0.002
    config = edge_config(tmp_path / "c", proxy.url, upstream={"max_connections": 2})
    async with running_edge(config) as edge:

        async def pull(i: int) -> bytes:
            async with edge.http.get(f"/v2/test/many-{i}/blobs/{images[i].layers[-1].digest}") as resp:
                return await resp.read()

        bodies = await asyncio.gather(*(pull(i) for i in range(len(images))))
        assert bodies == [image.layers[-1].data for image in images]
        assert proxy.max_in_flight <= 2  # eight cold blobs queued for two upstream connections


async def test_credentials_stay_on_the_upstream_host_across_redirects(
    tmp_path: Path, origin: Registry, seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hub and ghcr answer blob GETs with a 307 to a CDN: the upstream's credentials must not follow."""
    registry = await FaultProxy(origin.url).start()
    cdn = await FaultProxy(origin.url).start(host="localhost")  # another host name
    registry.rules.basic_auth = ("mirror", "s3cret")
    registry.rules.redirect_blobs_to = cdn.url
    config = edge_config(
        tmp_path / "c", registry.url, upstream={"username": "mirror", "password_env": "EC_TEST_PASSWORD"}
    )
    monkeypatch.setenv("EC_TEST_PASSWORD", "s3cret")
    try:
        async with running_edge(config) as edge:
            layer = seeded.alpine.layers[0]
            async with edge.http.get(
                f"/v2/library/alpine/blobs/{layer.digest}",
                headers={"Authorization": "Basic Y2xpZW50OnNlY3JldA=="},
            ) as resp:
                assert resp.status == 200
                assert await resp.read() == layer.data
                assert "WWW-Authenticate" not in resp.headers
            async with edge.http.get(
                "/v2/library/alpine/manifests/latest",
                headers={"Authorization": "Bearer client-token", **ACCEPT},
            ) as resp:
                assert resp.status == 200
            authorizations = [s.headers.get("Authorization") for s in registry.seen]
            assert "Basic bWlycm9yOnMzY3JldA==" in authorizations  # the mirror's own credentials
            assert all(
                a in (None, "Basic bWlycm9yOnMzY3JldA==") for a in authorizations
            )  # never the client's
            assert cdn.count("GET", f"/blobs/{layer.digest}") == 1
            assert all("Authorization" not in s.headers for s in cdn.seen)
    finally:
        await registry.stop()
        await cdn.stop()


async def test_redirect_from_https_to_http_is_refused() -> None:
    from yarl import URL

    from edgecache.upstream.client import redirect_target

    assert redirect_target(URL("https://r.example/v2/x"), "https://cdn.example/b") == URL(
        "https://cdn.example/b"
    )
    with pytest.raises(Exception, match="insecure"):
        redirect_target(URL("https://r.example/v2/x"), "http://cdn.example/b")
    with pytest.raises(Exception, match="insecure"):
        redirect_target(URL("https://r.example/v2/x"), "file:///etc/passwd")


async def test_hung_blob_fetches_do_not_hold_up_cached_hits(
    tmp_path: Path, proxy: FaultProxy, origin: Registry
) -> None:
    """Blob bodies are read on the upstream's own threads: a dozen fetches hung on a black-holed
    upstream (more than Python's default thread pool on this machine) must not delay a hit, which
    opens its file on the shared pool."""
    pusher = Pusher(origin.url)
    images = [build_image(f"hung-{i}", random_bytes=64 * 1024) for i in range(13)]
    for i, image in enumerate(images):
        pusher.push_image(f"test/hung-{i}", "v1", image)
    config = edge_config(
        tmp_path / "c",
        proxy.url,
        upstream={"header_timeout": 120.0, "stall_timeout": 120.0, "down_after": 1000},
    )
    async with running_edge(config) as edge:
        cached = images[0].layers[-1]
        async with edge.http.get(f"/v2/test/hung-0/blobs/{cached.digest}") as resp:
            assert await resp.read() == cached.data
        await edge.instance.flights.settled()
        proxy.rules.hang = True
        hung = [
            asyncio.create_task(edge.http.get(f"/v2/test/hung-{i}/blobs/{images[i].layers[-1].digest}"))
            for i in range(1, len(images))
        ]
        try:
            await wait_until(lambda: proxy.in_flight >= len(hung), message="all fetches hung upstream")
            for _ in range(5):  # each a hit while every upstream fetch is stuck
                async with (
                    asyncio.timeout(10),
                    edge.http.get(f"/v2/test/hung-0/blobs/{cached.digest}") as resp,
                ):
                    assert resp.status == 200 and resp.headers["X-Cache"] == "HIT"
                    assert await resp.read() == cached.data
        finally:
            for task in hung:
                task.cancel()
            await asyncio.gather(*hung, return_exceptions=True)


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_refusing_a_repository_is_denied_not_an_outage(
    edge_via_proxy: Edge, proxy: FaultProxy, seeded: Seeded, status: int
) -> None:
    """A repository edgecache may not read upstream is the client's 403 DENIED, every time; it does
    not count as an upstream failure, so other repositories go on being served."""
    proxy.rules.status["/v2/team/app/"] = status
    for _ in range(5):  # more than down_after
        async with edge_via_proxy.http.get("/v2/team/app/manifests/1.0", headers=ACCEPT) as resp:
            assert resp.status == 403
            assert await error_code(resp) == "DENIED"
        async with edge_via_proxy.http.get(f"/v2/team/app/blobs/{seeded.app.config.digest}") as resp:
            assert resp.status == 403
    async with edge_via_proxy.http.get("/v2/library/alpine/manifests/latest", headers=ACCEPT) as resp:
        assert resp.status == 200
    assert await edge_via_proxy.metric("edgecache_upstream_health", upstream="docker.io", state="up") == 1.0
    failures = await edge_via_proxy.metric(
        "edgecache_upstream_requests_total", upstream="docker.io", kind="manifest", status_class="error"
    )
    assert failures == 0


async def test_upstream_is_asked_for_identity_encoding_and_an_encoded_answer_is_refused(
    edge_via_proxy: Edge, proxy: FaultProxy, seeded: Seeded
) -> None:
    layer = seeded.alpine.layers[-1]
    proxy.rules.gzip = ("/blobs/", "/manifests/")  # compressed although the request said identity
    async with edge_via_proxy.http.get(f"/v2/library/alpine/blobs/{layer.digest}") as resp:
        assert resp.status == 502
        assert await error_code(resp) == "UNAVAILABLE"
    async with edge_via_proxy.http.get("/v2/team/app/manifests/1.0", headers=ACCEPT) as resp:
        assert resp.status == 502
    await edge_via_proxy.instance.flights.settled()
    assert blob_files(edge_via_proxy) == []
    asked = [s for s in proxy.seen if "/blobs/" in s.path_qs or "/manifests/" in s.path_qs]
    assert asked and all(s.headers.get("Accept-Encoding") == "identity" for s in asked)
    proxy.rules.gzip = ()
    async with edge_via_proxy.http.get(f"/v2/library/alpine/blobs/{layer.digest}") as resp:
        assert resp.status == 200 and await resp.read() == layer.data


async def test_manifest_whose_content_type_contradicts_its_media_type_is_refused(
    edge_via_proxy: Edge, proxy: FaultProxy, seeded: Seeded
) -> None:
    # The OCI manifest's body says image.manifest; the answer's Content-Type says index.
    proxy.rules.add_headers["/manifests/"] = {"Content-Type": "application/vnd.oci.image.index.v1+json"}
    for reference in ("1.0", seeded.app.manifest.digest):
        async with edge_via_proxy.http.get(f"/v2/team/app/manifests/{reference}", headers=ACCEPT) as resp:
            assert resp.status == 502
            assert await error_code(resp) == "MANIFEST_INVALID"
    assert blob_files(edge_via_proxy) == []
    proxy.rules.add_headers.clear()
    async with edge_via_proxy.http.get("/v2/team/app/manifests/1.0", headers=ACCEPT) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == OCI_MANIFEST

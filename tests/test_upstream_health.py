"""Outages and rate limits upstream never reach the nodes: back-off, fail fast, serve what is cached.

The upstream is the real registry behind the fault proxy (which injects refusals, 5xx, 429 with
Retry-After, Docker Hub's rate-limit headers and 404s), or a real registry with basic auth.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import Edge, Seeded, edge_config, running_edge
from tests.support.faults import FaultProxy
from tests.support.images import DOCKER_MANIFEST, OCI_MANIFEST, Pusher, build_image
from tests.support.registry import Registry, start_registry
from tests.support.waiting import wait_until

ACCEPT = {"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"}
TAG = "/v2/team/app/manifests/1.0"


def open_edge(
    tmp_path: Path, url: str, upstream: dict[str, object], **cache: object
) -> contextlib.AbstractAsyncContextManager[Edge]:
    return running_edge(edge_config(tmp_path / "cache", url, upstream=upstream, **cache))


async def code_of(resp: aiohttp.ClientResponse) -> str:
    return str(json.loads(await resp.read())["errors"][0]["code"])


async def test_failing_upstream_is_marked_down_and_cached_tags_served_stale(
    tmp_path: Path, proxy: FaultProxy, seeded: Seeded
) -> None:
    async with open_edge(tmp_path, proxy.url, {"down_after": 2, "down_for": 600.0}, tag_ttl=0.0) as edge:
        async with edge.http.get(TAG, headers=ACCEPT) as resp:
            assert resp.status == 200
        proxy.rules.status["/v2/"] = 503
        for _ in range(2):  # two failures in a row: down
            async with edge.http.get(TAG, headers=ACCEPT) as resp:
                assert resp.status == 200 and resp.headers["X-Cache"] == "STALE"
                assert resp.headers["Warning"] == '110 - "Response is Stale"'
        reached = len(proxy.seen)
        async with edge.http.get(TAG, headers=ACCEPT) as resp:  # served without asking upstream
            assert resp.status == 200 and resp.headers["X-Cache"] == "STALE"
            assert await resp.read() == seeded.app.manifest.data
        async with edge.http.get(f"/v2/team/app/blobs/{seeded.app.layers[0].digest}") as resp:
            assert resp.status == 503  # a miss fails fast, never a hang and never a 404
            assert await code_of(resp) == "UNAVAILABLE"
        assert len(proxy.seen) == reached
        assert await edge.metric("edgecache_upstream_health", upstream="docker.io", state="down") == 1
        assert await edge.metric("edgecache_stale_served_total", upstream="docker.io", reason="down") == 1
        assert await edge.metric("edgecache_stale_served_total", upstream="docker.io", reason="error") == 2


async def test_429_with_retry_after_backs_off_that_upstream(
    tmp_path: Path, proxy: FaultProxy, seeded: Seeded
) -> None:
    async with open_edge(tmp_path, proxy.url, {}, tag_ttl=0.0) as edge:
        async with edge.http.get(TAG, headers=ACCEPT) as resp:
            assert resp.status == 200
        proxy.rules.status["/v2/"] = 429
        proxy.rules.status_headers = {"Retry-After": "120"}
        blob = f"/v2/team/app/blobs/{seeded.app.layers[0].digest}"
        async with edge.http.get(blob) as resp:
            assert resp.status == 429
            assert await code_of(resp) == "TOOMANYREQUESTS"
            assert 100 <= int(resp.headers["Retry-After"]) <= 120
        reached = len(proxy.seen)
        async with edge.http.get(blob) as resp:  # no second try upstream until Retry-After passes
            assert resp.status == 429 and int(resp.headers["Retry-After"]) <= 120
        async with edge.http.get(TAG, headers=ACCEPT) as resp:  # what is cached keeps being served
            assert resp.status == 200 and resp.headers["X-Cache"] == "STALE"
        assert len(proxy.seen) == reached
        assert await edge.metric("edgecache_upstream_health", upstream="docker.io", state="rate_limited") == 1


async def test_docker_hub_rate_limit_headers_become_metrics(tmp_path: Path, proxy: FaultProxy) -> None:
    proxy.rules.add_headers["/manifests/"] = {
        "ratelimit-limit": "100;w=21600",
        "ratelimit-remaining": "76;w=21600",
    }
    async with open_edge(tmp_path, proxy.url, {}) as edge:
        assert await edge.metric("edgecache_upstream_ratelimit_remaining", upstream="docker.io") != 76
        async with edge.http.get(TAG, headers=ACCEPT) as resp:
            assert resp.status == 200
        assert await edge.metric("edgecache_upstream_ratelimit_remaining", upstream="docker.io") == 76
        assert await edge.metric("edgecache_upstream_ratelimit_limit", upstream="docker.io") == 100


async def test_upstream_404_on_a_tag_is_authoritative(
    tmp_path: Path, proxy: FaultProxy, seeded: Seeded
) -> None:
    async with open_edge(tmp_path, proxy.url, {}, tag_ttl=0.0) as edge:
        async with edge.http.get(TAG, headers=ACCEPT) as resp:
            assert resp.status == 200
        proxy.rules.status[TAG] = 404  # the tag was deleted upstream
        async with edge.http.get(TAG, headers=ACCEPT) as resp:
            assert resp.status == 404
        reached = len(proxy.seen)
        async with edge.http.get(TAG, headers=ACCEPT) as resp:  # briefly negative-cached
            assert resp.status == 404
            assert await code_of(resp) == "MANIFEST_UNKNOWN"
        assert len(proxy.seen) == reached


async def test_tag_ttl_rules_by_pattern(tmp_path: Path, origin: Registry, seeded: Seeded) -> None:
    rules = (("latest", 0.0), ("3.*", 3600.0))
    async with open_edge(tmp_path, origin.url, {"tag_ttls": rules}, tag_ttl=3600.0) as edge:
        latest, pinned = "/v2/library/alpine/manifests/latest", "/v2/library/alpine/manifests/3.21"
        heads = {p: origin.count("HEAD", p) for p in (latest, pinned)}
        for _ in range(3):
            for path in (latest, pinned):
                async with edge.http.get(path, headers=ACCEPT) as resp:
                    assert resp.status == 200
        assert origin.count("HEAD", latest) == heads[latest] + 2  # revalidated every time after the first
        assert origin.count("HEAD", pinned) == heads[pinned]  # fresh for an hour


async def test_token_realm_on_another_host_gets_no_request(tmp_path: Path) -> None:
    """A challenge pointing at a host that is neither the upstream's nor allowed is not followed."""
    realm_hits: list[str] = []

    async def token(request: aiohttp.web.Request) -> aiohttp.web.Response:
        realm_hits.append(request.path_qs)
        return aiohttp.web.json_response({"token": "t"})

    async def registry(request: aiohttp.web.Request) -> aiohttp.web.Response:
        # A hostile or hijacked upstream steering its token flow to another host.
        return aiohttp.web.Response(
            status=401,
            headers={"WWW-Authenticate": f'Bearer realm="http://localhost:{token_port}/token",service="x"'},
        )

    token_app, registry_app = aiohttp.web.Application(), aiohttp.web.Application()
    token_app.router.add_get("/token", token)
    registry_app.router.add_route("*", "/{tail:.*}", registry)
    token_server = TestServer(token_app, host="127.0.0.1")
    await token_server.start_server()
    token_port = token_server.port
    registry_server = TestServer(registry_app, host="127.0.0.1")
    await registry_server.start_server()
    try:
        async with open_edge(tmp_path, f"http://127.0.0.1:{registry_server.port}", {}) as edge:
            async with edge.http.get(TAG, headers=ACCEPT) as resp:
                assert resp.status == 403
                assert await code_of(resp) == "DENIED"
            assert realm_hits == []
    finally:
        await token_server.close()
        await registry_server.close()


@pytest.fixture(scope="module")
def basic_origin(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("basic-origin")
    htpasswd = root / "htpasswd"
    htpasswd.write_text("mirror:" + bcrypt.hashpw(b"mirror-pw", bcrypt.gensalt(rounds=4)).decode() + "\n")
    registry = start_registry(root, f"auth:\n  htpasswd:\n    realm: test\n    path: {htpasswd}\n")
    yield registry
    registry.stop()


async def test_basic_auth_upstream(
    tmp_path: Path, basic_origin: Registry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    image = build_image("basic-app")
    Pusher(basic_origin.url, "Basic " + base64.b64encode(b"mirror:mirror-pw").decode()).push_image(
        "corp/app", "v1", image
    )

    monkeypatch.setenv("EC_BASIC_PW", "mirror-pw")
    credentials = {"username": "mirror", "password_env": "EC_BASIC_PW"}
    async with open_edge(tmp_path / "a", basic_origin.url, credentials) as edge:
        async with edge.http.get("/v2/corp/app/manifests/v1", headers=ACCEPT) as resp:
            assert resp.status == 200
            assert await resp.read() == image.manifest.data
        async with edge.http.get(f"/v2/corp/app/blobs/{image.layers[0].digest}") as resp:
            assert await resp.read() == image.layers[0].data
    secret = base64.b64encode(b"mirror:mirror-pw").decode()
    assert "mirror-pw" not in caplog.text and secret not in caplog.text  # never in logs
    async with (
        open_edge(tmp_path / "b", basic_origin.url, {}) as anonymous,
        anonymous.http.get("/v2/corp/app/manifests/v1", headers=ACCEPT) as resp,
    ):
        assert resp.status == 403


async def test_stale_while_revalidate_answers_at_once_and_follows_the_tag(
    tmp_path: Path, origin: Registry, seeded: Seeded
) -> None:
    first, second = build_image("swr-a"), build_image("swr-b")
    pusher = Pusher(origin.url)
    pusher.push_image("library/swr", "latest", first)
    path = "/v2/library/swr/manifests/latest"
    async with open_edge(tmp_path, origin.url, {}, tag_ttl=0.0, stale_while_revalidate=3600.0) as edge:
        async with edge.http.get(path, headers=ACCEPT) as resp:
            assert resp.headers["X-Cache"] == "MISS"
        pusher.push_image("library/swr", "latest", second)
        heads, gets = origin.count("HEAD", path), origin.count("GET", path)
        async with edge.http.get(path, headers=ACCEPT) as resp:  # answered from cache at once...
            assert resp.headers["X-Cache"] == "STALE"
            assert await resp.read() == first.manifest.data

        # ...while one HEAD goes upstream in the background, which finds the tag has moved.
        async def followed() -> bytes | None:
            async with edge.http.get(path, headers=ACCEPT) as resp:
                body = await resp.read()
            return body if resp.headers["Docker-Content-Digest"] == second.manifest.digest else None

        body = await wait_until(followed, message="the stale tag was never revalidated")
        assert body == second.manifest.data
        assert origin.count("HEAD", path) > heads
        assert origin.count("GET", path) == gets + 1  # only the body of the new manifest was fetched


async def test_a_restarted_edgecache_serves_its_cache_while_upstream_is_down(
    tmp_path: Path, proxy: FaultProxy, seeded: Seeded
) -> None:
    config = edge_config(tmp_path / "cache", proxy.url, tag_ttl=0.0)
    image = seeded.app
    async with running_edge(config) as edge:
        async with edge.http.get(TAG, headers=ACCEPT) as resp:
            assert resp.status == 200
        for blob in image.blobs:
            async with edge.http.get(f"/v2/team/app/blobs/{blob.digest}") as resp:
                assert await resp.read() == blob.data
    proxy.rules.status["/v2/"] = 503  # upstream goes down; edgecache restarts on the same cache
    async with running_edge(config) as edge:
        async with edge.http.get(TAG, headers=ACCEPT) as resp:
            assert resp.status == 200 and resp.headers["X-Cache"] == "STALE"
            assert await resp.read() == image.manifest.data
        for blob in image.blobs:
            async with edge.http.get(f"/v2/team/app/blobs/{blob.digest}") as resp:
                assert resp.headers["X-Cache"] == "HIT"
                assert await resp.read() == blob.data

"""Docker Hub's bearer-token flow against a real registry that verifies the tokens.

The token issuer is a fake (tests/support/tokenauth.py) because Docker Hub's cannot run here; the
registry checking every token's signature, audience, expiry and access is the real one.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import Edge, edge_config, running_edge
from tests.support.images import DOCKER_MANIFEST, Image, build_image
from tests.support.registry import Registry, start_registry
from tests.support.tokenauth import TokenPusher, TokenServer, registry_auth_config

USERS = {"admin": "admin-pw", "alice": "alice-pw"}


@pytest.fixture(scope="module")
def token_server() -> Iterator[TokenServer]:
    with TokenServer(users=USERS, private_repos={"corp/secret"}, expires_in=300) as server:
        yield server


@pytest.fixture(scope="module")
def auth_origin(tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer) -> Iterator[Registry]:
    registry = start_registry(tmp_path_factory.mktemp("auth-origin"), registry_auth_config(token_server))
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def images(auth_origin: Registry) -> dict[str, Image]:
    pusher = TokenPusher(auth_origin.url, "admin", USERS["admin"])
    public, secret = build_image("public-alpine"), build_image("secret-app")
    pusher.push_image("library/alpine", "latest", public)
    pusher.push_image("corp/secret", "v1", secret)
    return {"public": public, "secret": secret}


def open_edge(
    tmp_path: Path, origin: Registry, **upstream: object
) -> contextlib.AbstractAsyncContextManager[Edge]:
    return running_edge(edge_config(tmp_path / "cache", origin.url, upstream=dict(upstream)))


@pytest.fixture
async def anonymous_edge(
    tmp_path: Path, auth_origin: Registry, images: dict[str, Image]
) -> AsyncIterator[Edge]:
    async with running_edge(edge_config(tmp_path / "cache", auth_origin.url)) as edge:
        yield edge


async def test_anonymous_pull_gets_a_token_once_and_reuses_it(
    anonymous_edge: Edge, token_server: TokenServer, images: dict[str, Image]
) -> None:
    token_server.clear()
    image = images["public"]
    async with anonymous_edge.http.get(
        "/v2/library/alpine/manifests/latest", headers={"Accept": DOCKER_MANIFEST}
    ) as resp:
        assert resp.status == 200
        assert await resp.read() == image.manifest.data
        assert "WWW-Authenticate" not in resp.headers
    for blob in image.blobs:
        async with anonymous_edge.http.get(f"/v2/library/alpine/blobs/{blob.digest}") as resp:
            assert resp.status == 200
            assert await resp.read() == blob.data
    fetched = token_server.token_requests(scope_contains="library/alpine")
    assert len(fetched) == 1  # cached for the scope until shortly before it expires
    assert fetched[0].authorization_present is False
    assert fetched[0].scopes == ["repository:library/alpine:pull"]


async def test_private_repository_is_denied_without_credentials(anonymous_edge: Edge) -> None:
    async with anonymous_edge.http.get(
        "/v2/corp/secret/manifests/v1", headers={"Authorization": "Basic YWxpY2U6YWxpY2UtcHc="}
    ) as resp:
        # The client's own credentials (alice's, here) are never passed upstream.
        assert resp.status == 403
        body = json.loads(await resp.read())
        assert body["errors"][0]["code"] == "DENIED"
        assert "WWW-Authenticate" not in resp.headers


async def test_configured_credentials_open_private_repositories(
    tmp_path: Path,
    auth_origin: Registry,
    token_server: TokenServer,
    images: dict[str, Image],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(USERS["alice"] + "\n")
    async with open_edge(tmp_path, auth_origin, username="alice", password_file=str(password_file)) as edge:
        token_server.clear()
        image = images["secret"]
        async with edge.http.get("/v2/corp/secret/manifests/v1", headers={"Accept": DOCKER_MANIFEST}) as resp:
            assert resp.status == 200
            assert await resp.read() == image.manifest.data
            assert "Authorization" not in resp.headers and "WWW-Authenticate" not in resp.headers
        async with edge.http.get(f"/v2/corp/secret/blobs/{image.layers[0].digest}") as resp:
            assert await resp.read() == image.layers[0].data
        requests = token_server.token_requests(scope_contains="corp/secret")
        assert [r.user for r in requests] == ["alice"]
        assert requests[0].authenticated


async def test_wrong_credentials_are_denied_not_retried_forever(
    tmp_path: Path, auth_origin: Registry, token_server: TokenServer, images: dict[str, Image]
) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("not-the-password")
    async with open_edge(tmp_path, auth_origin, username="alice", password_file=str(password_file)) as edge:
        token_server.clear()
        async with edge.http.get("/v2/corp/secret/manifests/v1") as resp:
            assert resp.status == 403
        assert len(token_server.token_requests(scope_contains="corp/secret")) == 1


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b"<html>not json</html>"),
        (200, b"[]"),
        (200, b'{"token": ""}'),
        (200, b'{"token": 5, "expires_in": 300}'),
        (200, b'{"token": "a\\r\\nX-Injected: 1"}'),
        (200, b'{"token": "' + b"x" * (50 * 1024 * 1024) + b'"}'),  # 50 MiB: refused by its length
        (500, b"internal error"),
        (404, b"no such page"),
    ],
    ids=["html", "list", "empty", "number", "crlf", "50MiB", "500", "404"],
)
async def test_broken_token_service_is_a_502_in_oci_json(
    anonymous_edge: Edge, token_server: TokenServer, status: int, body: bytes
) -> None:
    """Whatever a token service answers, the client gets a registry error (502 UNAVAILABLE), never a
    404 that says the image does not exist, never a framework's 500 page."""
    token_server.raw_answer = (status, body)
    try:
        async with anonymous_edge.http.get(
            "/v2/library/alpine/manifests/latest", headers={"Accept": DOCKER_MANIFEST}
        ) as resp:
            assert resp.status == 502
            assert resp.headers["Content-Type"] == "application/json"
            assert json.loads(await resp.read())["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        token_server.raw_answer = None
    async with anonymous_edge.http.get(
        "/v2/library/alpine/manifests/latest", headers={"Accept": DOCKER_MANIFEST}
    ) as resp:
        assert resp.status == 200  # nothing broken was remembered


@pytest.mark.parametrize("expires_in", ["1e400", "-30", '"never"', "true", "0", str(10**30)])
async def test_absurd_token_lifetimes_are_clamped_and_pulls_go_on(
    anonymous_edge: Edge, token_server: TokenServer, images: dict[str, Image], expires_in: str
) -> None:
    token, _ = token_server.issue(None, ["repository:library/alpine:pull"])
    token_server.raw_answer = (200, f'{{"token": "{token}", "expires_in": {expires_in}}}'.encode())
    try:
        async with anonymous_edge.http.get(
            "/v2/library/alpine/manifests/latest", headers={"Accept": DOCKER_MANIFEST}
        ) as resp:
            assert resp.status == 200
            assert await resp.read() == images["public"].manifest.data
    finally:
        token_server.raw_answer = None

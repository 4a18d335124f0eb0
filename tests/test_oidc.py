"""Bearer tokens from an outside OIDC issuer: the issuer here is a FAKE (a small aiohttp server on
127.0.0.1 serving discovery and JWKS for keys it generates, signing with PyJWT), because a real
external identity provider cannot run in this sandbox. edgecache is the real app, in-process on a real
socket; a pure test checks the refetch rate limit with an injected clock."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from edgecache import errors
from edgecache.access.oidc import OidcVerifier
from edgecache.config import Config, OidcConfig, load_config
from edgecache.upstream.documents import MAX_DOCUMENT, DocumentFetcher
from tests.conftest import Edge, Seeded, running_edge
from tests.support.clock import Clock
from tests.support.registry import Registry, free_port
from tests.test_access import write_htpasswd
from tests.test_pure_identity import write_key

ALPINE = "/v2/library/alpine/manifests/latest"
APP = "/v2/team/app/manifests/1.0"
ACCEPT = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class FakeIssuer:
    """Discovery at /.well-known/openid-configuration, keys at /jwks (only the `published` ones)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.keys: dict[str, PrivateKey] = {}
        self.published: list[str] = []
        self.jwks_fetches = 0
        self._runner: web.AppRunner | None = None

    def add_key(self, kid: str, kind: str = "rsa", publish: bool = True) -> None:
        self.keys[kid] = (
            rsa.generate_private_key(65537, 2048)
            if kind == "rsa"
            else ec.generate_private_key(ec.SECP256R1())
        )
        if publish:
            self.published.append(kid)

    def jwks(self) -> dict[str, Any]:
        entries = []
        for kid in self.published:
            key = self.keys[kid]
            if isinstance(key, rsa.RSAPrivateKey):
                entry = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            else:
                entry = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
            entries.append({**entry, "kid": kid, "use": "sig"})
        return {"keys": entries}

    def sign(self, kid: str, alg: str | None = None, **claims: Any) -> str:
        key = self.keys[kid]
        alg = alg or ("RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256")
        now = int(time.time())
        body = {"iss": self.url, "aud": "edgecache", "sub": "ci-bot", "iat": now, "exp": now + 300, **claims}
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})

    async def start(self) -> FakeIssuer:
        async def discovery(_request: web.Request) -> web.Response:
            return web.json_response({"issuer": self.url, "jwks_uri": f"{self.url}/jwks"})

        async def keys(_request: web.Request) -> web.Response:
            self.jwks_fetches += 1
            return web.json_response(self.jwks())

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", keys)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def issuer() -> AsyncIterator[FakeIssuer]:
    running = FakeIssuer()
    running.add_key("k1")
    await running.start()
    yield running
    await running.stop()


def oidc_config(tmp_path: Path, origin: Registry, issuer: FakeIssuer, extra: str = "") -> Config:
    (tmp_path / "edgecache.toml").write_text(
        f"""
[access]
mode = "htpasswd"
htpasswd = "{write_htpasswd(tmp_path / "htpasswd")}"
{extra}

[access.oidc]
issuer = "{issuer.url}"
audience = "edgecache"
allow_plain = true
refresh_interval = 0
fetch_timeout = 2

[[access.rules]]
identity = "group:ops"
allow = ["docker.io/*"]

[[access.rules]]
identity = "group:devs"
allow = ["docker.io/library/*"]
"""
    )
    config = load_config(
        str(tmp_path / "edgecache.toml"), env={}, cache_dir=str(tmp_path / "cache"), upstreams=[origin.url]
    )
    return dataclasses.replace(config, prefetch=dataclasses.replace(config.prefetch, enabled=False))


async def status(edge: Edge, path: str, token: str) -> int:
    async with edge.http.get(path, headers={"Accept": ACCEPT, "Authorization": f"Bearer {token}"}) as resp:
        await resp.read()
        return resp.status


def hmac_with_public_key(issuer: FakeIssuer, kid: str) -> str:
    """HS256 keyed with the issuer's public key PEM: the classic algorithm-confusion forgery."""
    pem = (
        issuer.keys[kid]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    claims = {"iss": issuer.url, "aud": "edgecache", "sub": "ci-bot", "exp": now + 300, "groups": ["ops"]}
    signing_input = (
        f"{b64(json.dumps({'alg': 'HS256', 'kid': kid}).encode())}.{b64(json.dumps(claims).encode())}"
    )
    return f"{signing_input}.{b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())}"


async def test_issuer_tokens_map_to_identities_and_forgeries_are_refused(
    tmp_path: Path, origin: Registry, seeded: Seeded, issuer: FakeIssuer
) -> None:
    async with running_edge(oidc_config(tmp_path, origin, issuer)) as edge:
        # The groups claim feeds the group rules: ops may pull team/app, devs only library/*.
        assert await status(edge, APP, issuer.sign("k1", groups=["ops"])) == 200
        assert issuer.jwks_fetches == 1  # discovery, then the keys, once; cached from now on
        assert await status(edge, APP, issuer.sign("k1", groups=["devs"])) == 403
        assert await status(edge, ALPINE, issuer.sign("k1", groups=["devs"])) == 200
        assert issuer.jwks_fetches == 1
        now = int(time.time())
        other = rsa.generate_private_key(65537, 2048)
        forged = {
            "wrong audience": issuer.sign("k1", aud="someone-else", groups=["ops"]),
            "expired": issuer.sign("k1", iat=now - 900, exp=now - 600, groups=["ops"]),
            "alg none": jwt.encode(
                {"iss": issuer.url, "aud": "edgecache", "sub": "x", "exp": now + 60, "groups": ["ops"]},
                None,
                algorithm="none",
                headers={"kid": "k1"},
            ),
            "hmac with the public key": hmac_with_public_key(issuer, "k1"),
            "another key, same kid": jwt.encode(
                {"iss": issuer.url, "aud": "edgecache", "sub": "x", "exp": now + 60, "groups": ["ops"]},
                other,
                algorithm="RS256",
                headers={"kid": "k1"},
            ),
            "RS384 not allowed": issuer.sign("k1", alg="RS384", groups=["ops"]),
        }
        for what, token in forged.items():
            assert await status(edge, APP, token) == 401, what

        # The issuer rotates: a new key k2 (EC) appears in its JWKS; the first token naming it makes
        # one fetch, and is accepted.
        issuer.add_key("k2", kind="ec")
        assert await status(edge, APP, issuer.sign("k2", groups=["ops"])) == 200
        assert issuer.jwks_fetches == 2
        assert await status(edge, APP, issuer.sign("k1", groups=["ops"])) == 200  # both published
        assert issuer.jwks_fetches == 2

        # The issuer goes away: cached keys still verify; a key never seen cannot, and nobody is let
        # in on a doubt (503, the issuer cannot be asked).
        await issuer.stop()
        assert await status(edge, APP, issuer.sign("k2", groups=["ops"])) == 200
        issuer.add_key("k3", kind="rsa")
        assert await status(edge, APP, issuer.sign("k3", groups=["ops"])) == 503


async def test_token_service_exchanges_an_oidc_token_given_as_the_password(
    tmp_path: Path, origin: Registry, seeded: Seeded, issuer: FakeIssuer
) -> None:
    """Clients that speak only Basic to /token (`docker login -u oidc -p "$JWT"`) exchange the
    issuer's token for one of ours, carrying its identity and groups."""
    key = write_key(tmp_path / "token.pem")
    extra = f'token = true\ntoken_key = "{key}"'
    async with running_edge(oidc_config(tmp_path, origin, issuer, extra)) as edge:
        outside = issuer.sign("k1", groups=["ops"])
        login = "Basic " + base64.b64encode(f"oidc:{outside}".encode()).decode()
        async with edge.http.get(
            "/token?service=edgecache&scope=repository:team/app:pull", headers={"Authorization": login}
        ) as resp:
            assert resp.status == 200
            token = (await resp.json())["token"]
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["sub"] == "ci-bot" and claims["groups"] == ["ops"]
        assert await status(edge, APP, token) == 200
        expired = issuer.sign("k1", groups=["ops"], iat=int(time.time()) - 900, exp=int(time.time()) - 600)
        login = "Basic " + base64.b64encode(f"oidc:{expired}".encode()).decode()
        async with edge.http.get(
            "/token?scope=repository:team/app:pull", headers={"Authorization": login}
        ) as resp:
            assert resp.status == 401


async def test_unknown_key_ids_refetch_at_most_once_per_interval() -> None:
    clock = Clock()
    issuer = FakeIssuer()
    issuer.add_key("k1")
    fetches: list[str] = []

    async def fetch(url: str, *, deadline: float, ca_file: str) -> bytes:
        fetches.append(url)
        return json.dumps(issuer.jwks()).encode()

    config = OidcConfig(
        issuer=issuer.url, audience="edgecache", jwks_url=f"{issuer.url}/jwks", refresh_interval=60
    )
    verifier = OidcVerifier(config, fetch, clock)
    assert (await verifier.verify(issuer.sign("k1"))).name == "ci-bot"
    assert len(fetches) == 1
    issuer.add_key("made-up", publish=False)
    for _ in range(20):  # a flood of tokens naming key ids the issuer never published
        with pytest.raises(errors.Unauthorized):
            await verifier.verify(issuer.sign("made-up"))
    assert len(fetches) == 1
    clock.advance(61)
    with pytest.raises(errors.Unauthorized):
        await verifier.verify(issuer.sign("made-up"))
    assert len(fetches) == 2
    # The identity claim and the groups claim are configurable.
    named = dataclasses.replace(config, identity_claim="email", groups_claim="roles")
    verifier.reconfigure(named)
    identity = await verifier.verify(issuer.sign("k1", email="ci@corp.example", roles=["ops", 7]))
    assert identity.name == "ci@corp.example" and identity.groups == frozenset({"ops"})
    with pytest.raises(errors.Unauthorized):  # no such claim: no identity
        await verifier.verify(issuer.sign("k1"))


async def test_a_key_set_that_arrives_in_pieces_is_read_whole_and_an_oversized_one_refused() -> None:
    """The issuer's documents come over real sockets in several writes (a fake issuer, as above):
    the fetch reads to the end, and a document over the cap is refused, not cut short."""
    document = json.dumps({"keys": [{"kid": f"k{i}", "pad": "x" * 4000} for i in range(20)]}).encode()

    async def pieces(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        size = int(request.query.get("size", len(document)))
        body = document if size <= len(document) else document + b" " * (size - len(document))
        for start in range(0, len(body), 16 * 1024):
            await resp.write(body[start : start + 16 * 1024])
            await asyncio.sleep(0.01)  # the next piece arrives later, as over a real network
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/jwks", pieces)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    fetch = DocumentFetcher()
    try:
        body = await fetch(f"http://127.0.0.1:{port}/jwks", deadline=10, ca_file="")
        assert body == document
        with pytest.raises(ValueError, match="too large"):
            await fetch(f"http://127.0.0.1:{port}/jwks?size={MAX_DOCUMENT + 1}", deadline=10, ca_file="")
    finally:
        await fetch.close()
        await runner.cleanup()

"""Bearer tokens from an outside OpenID Connect issuer, mapped to the same identity as a login: one claim
names it, another lists its groups, and the access rules decide as for anyone else.

Only the issuer's published keys verify (JWKS, from `jwks_url` or the discovery document), with an
allow-list of asymmetric algorithms: `none` and HMAC are refused whatever a token's header says, and
a key is used only with an algorithm of its own kind. Keys are cached; a token naming an unknown key
id makes one fetch (the issuer rotated), at most once per `refresh_interval`, so tokens with made-up
key ids cannot make us hammer the issuer. Fetching is done by a callable the wiring passes in (the
upstream package's HTTP client): this layer opens no connection itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import jwt

from edgecache import errors
from edgecache.access.identity import Identity
from edgecache.config import OidcConfig

log = logging.getLogger(__name__)
KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
LEEWAY = 30.0


class Fetch(Protocol):
    """GET a small JSON document within `deadline` seconds (TLS checked against `ca_file`, or the
    system's CAs); raises on any failure."""

    async def __call__(self, url: str, *, deadline: float, ca_file: str) -> bytes: ...


async def no_fetch(url: str, *, deadline: float, ca_file: str) -> bytes:
    raise RuntimeError("no HTTP client given for OIDC key fetches")


class OidcVerifier:
    def __init__(self, config: OidcConfig, fetch: Fetch, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._fetch = fetch
        self._clock = clock
        self._keys: dict[str, tuple[jwt.PyJWK, str]] = {}
        self._fetched_at: float | None = None
        self._failed = False  # the last fetch failed (the keys kept are the ones before it)
        self._jwks_url = config.jwks_url
        self._lock = asyncio.Lock()
        self.fetches = 0  # JWKS fetches made (for the status of a rotation, and tests)

    @property
    def issuer(self) -> str:
        return self._config.issuer

    def reconfigure(self, config: OidcConfig) -> None:
        """SIGHUP: new settings; keys are fetched again when the issuer or its JWKS URL changed."""
        if (config.issuer, config.jwks_url) != (self._config.issuer, self._config.jwks_url):
            self._keys, self._fetched_at, self._jwks_url = {}, None, config.jwks_url
        self._config = config

    async def verify(self, token: str) -> Identity:
        """The identity a token of the issuer speaks for; Unauthorized for anything else, and
        DirectoryUnavailable when the keys it needs cannot be fetched."""
        config = self._config
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise errors.Unauthorized("invalid token") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in config.algorithms:
            raise errors.Unauthorized("token algorithm not allowed")
        found = await self._key(kid if isinstance(kid, str) else "")
        if found is None:
            raise errors.Unauthorized("token signed by an unknown key")
        key, pinned = found
        if KEY_TYPES.get(algorithm[:2]) != key.key_type or pinned not in ("", algorithm):
            raise errors.Unauthorized("token algorithm does not match its key")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=config.audience,
                issuer=config.issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise errors.Unauthorized("token expired") from None
        except jwt.PyJWTError:
            raise errors.Unauthorized("invalid token") from None
        name = claims.get(config.identity_claim)
        if not isinstance(name, str) or not name or len(name) > 256:
            raise errors.Unauthorized(f"token has no {config.identity_claim} claim")
        groups = claims.get(config.groups_claim, [])
        if isinstance(groups, str):
            groups = [groups]
        if not isinstance(groups, list):
            groups = []
        return Identity(name, True, frozenset(g for g in groups if isinstance(g, str)))

    async def _key(self, kid: str) -> tuple[jwt.PyJWK, str] | None:
        """The key `kid` names (with the `alg` its JWK pins, or ""), fetching the JWKS when never
        fetched, expired, or `kid` is unknown and the last fetch is older than refresh_interval."""
        config = self._config
        fetched_at = self._fetched_at
        age = None if fetched_at is None else self._clock() - fetched_at
        fresh = age is not None and age < config.keys_ttl
        if fresh and kid in self._keys:
            return self._keys[kid]
        if fresh and age is not None and age < config.refresh_interval:
            if self._failed:  # the issuer could not be reached a moment ago: still cannot tell
                raise errors.DirectoryUnavailable("the OIDC issuer's keys cannot be fetched", retry_after=5)
            return None  # an unknown key id, and the keys were fetched a moment ago: no new fetch
        async with self._lock:
            if self._fetched_at == fetched_at:  # nobody fetched them while this one waited
                await self._refresh(keep_on_failure=kid in self._keys)
        return self._keys.get(kid)

    async def _refresh(self, *, keep_on_failure: bool) -> None:
        """Fetch the JWKS (and first the discovery document when no jwks_url is set)."""
        config = self._config
        now = self._clock()
        try:
            if not self._jwks_url:
                discovery_url = config.issuer.rstrip("/") + "/.well-known/openid-configuration"
                discovery = await self._json(discovery_url)
                if discovery.get("issuer") != config.issuer or not isinstance(discovery.get("jwks_uri"), str):
                    raise ValueError("discovery document names another issuer or no jwks_uri")
                jwks_uri: str = discovery["jwks_uri"]
                if not (jwks_uri.startswith("https://") or config.allow_plain):
                    # the keys decide whose tokens are accepted: never over plain HTTP unless allowed
                    raise ValueError("discovery document names a jwks_uri that is not https")
                self._jwks_url = jwks_uri
            document = await self._json(self._jwks_url)
            keys: dict[str, tuple[jwt.PyJWK, str]] = {}
            for entry in document.get("keys", []):
                if not isinstance(entry, dict) or entry.get("kty") not in KEY_TYPES.values():
                    continue  # symmetric ("oct") keys are never taken from a published set
                if entry.get("use", "sig") != "sig" or not isinstance(entry.get("kid"), str):
                    continue
                try:
                    keys[entry["kid"]] = (jwt.PyJWK(entry), str(entry.get("alg", "")))
                except jwt.PyJWTError:
                    continue  # a curve we do not take: skip it, keep the others
        except Exception as exc:  # network, TLS, JSON: the keys we have stay; without them, 503
            log.warning("OIDC keys of %s not fetched: %s", config.issuer, type(exc).__name__)
            self._fetched_at, self._failed = now, True  # a failure counts for the rate limit too
            if not keep_on_failure:
                raise errors.DirectoryUnavailable(
                    "the OIDC issuer's keys cannot be fetched", retry_after=5
                ) from None
            return
        self.fetches += 1
        self._keys, self._fetched_at, self._failed = keys, now, False
        log.info("OIDC keys of %s fetched: %d key(s)", config.issuer, len(keys))

    async def _json(self, url: str) -> dict[str, Any]:
        body = await self._fetch(url, deadline=self._config.fetch_timeout, ca_file=self._config.ca_file)
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        return document

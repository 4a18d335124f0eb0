"""The token service's keys and tokens: one login at `/token` becomes a short-lived signed JWT listing
the repositories it may pull (the `access` claim of the distribution token spec); every later request
checks signature, expiry, audience and scope locally, without bcrypt or the directory.

PyJWT (with `cryptography`, already a dependency) signs and verifies: it is the most used JOSE library
for Python, takes an explicit algorithm allow-list on every decode, and never accepts `none` unless
asked to. Each key verifies only with its own algorithm (ES256 for EC P-256, RS256 for RSA), chosen by
the key, never by the token's header. On reload the previous key keeps verifying until the tokens it
signed have expired.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from edgecache import errors
from edgecache.access.identity import Identity
from edgecache.config import AccessConfig
from edgecache.errors import ConfigError

ISSUER = "edgecache"
LEEWAY = 5.0  # seconds of clock skew between nodes sharing a key
MAX_SCOPES = 16  # repositories one /token request may ask for (a pull asks for one or two)


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str
    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey  # derived once: every request verifies with it
    retired_at: float | None = None  # when a reload replaced it
    valid_until: float | None = None  # a retired key verifies until the last token it signed expires


@dataclass(frozen=True)
class Scope:
    """One `repository:NAME:ACTIONS` asked for at /token; only `pull` is ever granted (read-only)."""

    name: str
    actions: tuple[str, ...]


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """`scope` query values (repeated or space-separated); other resource types are ignored. NAME may
    hold a colon (a registry prefix with a port), so the actions are split off the right."""
    scopes = []
    items = [item for value in values for item in value.split()]
    if len(items) > MAX_SCOPES:
        raise errors.ScopeInvalid(f"at most {MAX_SCOPES} scopes per token request")
    for item in items:
        kind, _, rest = item.partition(":")
        name, sep, actions = rest.rpartition(":")
        if kind == "repository" and sep and name and len(name) <= 512:
            scopes.append(Scope(name, tuple(a for a in actions.split(",") if a)))
    return scopes


def load_key(path: str) -> SigningKey:
    try:
        private = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"access.token_key: cannot load a PEM private key from {path} ({exc})") from None
    if isinstance(private, ec.EllipticCurvePrivateKey):
        curves = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        algorithm = curves.get(private.curve.name)
        if algorithm is None:
            raise ConfigError(f"access.token_key: EC curve {private.curve.name} is not P-256/384/521")
    elif isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < 2048:
            raise ConfigError("access.token_key: RSA keys need at least 2048 bits")
        algorithm = "RS256"
    else:
        raise ConfigError("access.token_key: expected an EC or RSA private key")
    public = private.public_key()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    kid = base64.urlsafe_b64encode(hashlib.sha256(der).digest()[:15]).decode()
    return SigningKey(kid, algorithm, private, public)


class TokenService:
    def __init__(self, config: AccessConfig, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._ttl = config.token_ttl
        self._audience = config.token_service
        self._current = load_key(config.token_key)
        self._retired: list[SigningKey] = []

    @property
    def ttl(self) -> float:
        return self._ttl

    @property
    def service(self) -> str:
        return self._audience

    def reconfigure(self, config: AccessConfig) -> None:
        """SIGHUP: re-read the key file. A new key signs from now on; the old one still verifies until
        every token it signed has expired (one TTL, the longer of old and new)."""
        key = load_key(config.token_key)
        now = self._clock()
        self._retired = [k for k in self._retired if k.valid_until is not None and now < k.valid_until]
        if key.kid != self._current.kid:
            # Its last token was signed now, with the TTL in force until now.
            until = now + self._ttl + LEEWAY
            self._retired.append(dataclasses.replace(self._current, retired_at=now, valid_until=until))
            self._current = key
        self._ttl, self._audience = config.token_ttl, config.token_service

    def issue(self, identity: Identity, names: Iterable[str]) -> tuple[str, int, float]:
        """A token for `identity` granting pull of `names`: (token, lifetime in seconds, issued at)."""
        now = self._clock()
        key = self._current
        claims = {
            "iss": ISSUER,
            "sub": identity.name,
            "aud": self._audience,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + self._ttl),
            "jti": secrets.token_urlsafe(12),
            "access": [{"type": "repository", "name": n, "actions": ["pull"]} for n in sorted(set(names))],
            "groups": sorted(identity.groups),
            "authenticated": identity.authenticated,
        }
        token = jwt.encode(claims, key.private, algorithm=key.algorithm, headers={"kid": key.kid})
        return token, int(self._ttl), now

    def verify(self, token: str) -> Identity:
        """The identity a token speaks for, with the repositories it grants; raises Unauthorized for
        anything short of a token of ours, unexpired, for this service."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise errors.Unauthorized("invalid token") from None
        key = self._key(header.get("kid"))
        if key is None or header.get("alg") != key.algorithm:
            raise errors.Unauthorized("invalid token")
        try:
            claims = jwt.decode(
                token,
                key.public,
                algorithms=[key.algorithm],
                audience=self._audience,
                issuer=ISSUER,
                leeway=LEEWAY,
                options={"require": ["exp", "iat", "aud", "iss", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise errors.Unauthorized("token expired") from None
        except jwt.PyJWTError:
            raise errors.Unauthorized("invalid token") from None
        if key.retired_at is not None and claims["iat"] > key.retired_at + LEEWAY:
            raise errors.Unauthorized("invalid token")  # signed by a key after it was replaced
        names = frozenset(
            str(entry.get("name"))
            for entry in claims.get("access", [])
            if isinstance(entry, dict)
            and entry.get("type") == "repository"
            and "pull" in entry.get("actions", [])
        )
        groups = frozenset(str(g) for g in claims.get("groups", []) if isinstance(g, str))
        return Identity(str(claims["sub"]), claims.get("authenticated") is True, groups, names)

    def _key(self, kid: object) -> SigningKey | None:
        if kid == self._current.kid:
            return self._current
        now = self._clock()
        for key in self._retired:
            if key.kid == kid and key.valid_until is not None and now < key.valid_until:
                return key
        return None

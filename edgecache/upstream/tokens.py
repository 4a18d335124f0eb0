"""Upstream authentication policy, kept pure: challenges parsed, token lifetimes, where credentials may go.

No I/O here; `upstream` does the requests. The rule that matters: credentials and tokens go only to the
upstream's own host, or to a token realm on https within the upstream's registrable domain (Docker Hub:
registry-1.docker.io → auth.docker.io), or to a realm on the upstream's own host. A challenge cannot steer
them anywhere else.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_PARAM = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
DEFAULT_TOKEN_LIFETIME = 60.0
MAX_TOKEN_LIFETIME = 3600.0  # an answer saying "for a year" is kept an hour at most
EXPIRY_MARGIN = 10.0
MAX_TOKEN_BYTES = 64 * 1024  # Docker Hub's tokens are a few KiB; anything near this is not a token
MAX_CACHED_TOKENS = 4096


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic", lowercased
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


def parse_challenge(header: str) -> Challenge | None:
    """Parse one WWW-Authenticate value (`Bearer realm="...",service="...",scope="..."`)."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {m[1].lower(): (m[2] if m[2] is not None else m[3]) for m in _PARAM.finditer(rest)}
    params = {k: v.replace('\\"', '"') for k, v in params.items()}
    return Challenge(scheme.lower(), params)


def token_from(doc: object) -> tuple[str, float | None]:
    """The bearer token and its lifetime from a token service's JSON answer (`token`, or OAuth2's
    `access_token`; `expires_in` in seconds). Raises ValueError for an answer with no usable token;
    a lifetime that is not a positive finite number is ignored (the default applies)."""
    if not isinstance(doc, dict):
        raise ValueError("the answer is not a JSON object")
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token.strip():
        raise ValueError("the answer has no token")
    if len(token) > MAX_TOKEN_BYTES or any(c in token for c in "\r\n\0"):
        raise ValueError("the token cannot be sent in a header")
    return token.strip(), _lifetime(doc.get("expires_in"))


def _lifetime(expires_in: object) -> float | None:
    """Seconds from `expires_in`, clamped to MAX_TOKEN_LIFETIME; None when absent or absurd."""
    if not isinstance(expires_in, int | float) or isinstance(expires_in, bool):
        return None
    try:
        seconds = float(expires_in)
    except OverflowError:  # an integer too large for a float: "for ever"
        seconds = math.inf
    if math.isnan(seconds) or seconds <= 0:
        return None
    return min(seconds, MAX_TOKEN_LIFETIME)


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def _registrable_domain(host: str) -> str:
    """Last two labels: enough for the hosts registries use (docker.io, ghcr.io, quay.io)."""
    labels = host.lower().rstrip(".").split(".")
    return ".".join(labels[-2:])


def _is_ip_or_local(host: str) -> bool:
    if host in ("localhost",) or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def realm_allowed(realm: str, upstream_url: str, allowed_hosts: Iterable[str] = ()) -> bool:
    """May this token realm receive our credentials for this upstream?

    Its own host (never downgraded to http), an https host in its registrable domain (not an IP
    literal or localhost), or an https host the operator allowed explicitly (`token_hosts`).
    """
    realm_parts = urlsplit(realm)
    upstream_parts = urlsplit(upstream_url)
    realm_host = (realm_parts.hostname or "").lower()
    upstream_host = (upstream_parts.hostname or "").lower()
    if realm_parts.scheme not in ("http", "https") or not realm_host:
        return False
    if realm_parts.scheme == "https" and realm_host in {h.lower() for h in allowed_hosts}:
        return True
    if realm_host == upstream_host:
        # Same host: as safe as the upstream itself, but never downgraded to http from https.
        return realm_parts.scheme == "https" or upstream_parts.scheme == "http"
    if realm_parts.scheme != "https" or _is_ip_or_local(realm_host) or _is_ip_or_local(upstream_host):
        return False
    return _registrable_domain(realm_host) == _registrable_domain(upstream_host)


def same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


@dataclass
class CachedToken:
    token: str
    expires_at: float


class TokenCache:
    """Bearer tokens per scope, kept until shortly before they expire."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[str, CachedToken] = {}

    def get(self, scope: str) -> str | None:
        entry = self._tokens.get(scope)
        if entry is None or entry.expires_at <= self._clock():
            self._tokens.pop(scope, None)
            return None
        return entry.token

    def put(self, scope: str, token: str, expires_in: float | None) -> None:
        if len(self._tokens) >= MAX_CACHED_TOKENS:
            now = self._clock()
            self._tokens = {k: v for k, v in self._tokens.items() if v.expires_at > now}
            if len(self._tokens) >= MAX_CACHED_TOKENS:
                self._tokens.clear()
        lifetime = expires_in if expires_in and expires_in > 0 else DEFAULT_TOKEN_LIFETIME
        lifetime = min(lifetime, MAX_TOKEN_LIFETIME)
        self._tokens[scope] = CachedToken(token, self._clock() + max(lifetime - EXPIRY_MARGIN, 1.0))

    def drop(self, scope: str) -> None:
        self._tokens.pop(scope, None)

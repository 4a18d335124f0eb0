"""Who may pull what: client identities (htpasswd, mutual TLS, anonymous) and per-repository rules.

Passwords are bcrypt only and are checked in a worker thread; unknown users cost the same bcrypt work
as wrong passwords, so timing does not tell which names exist. Successful checks are remembered
briefly (keyed by a hash, never the password), and failures are counted per client address: past the
limit, the client gets 429 without any check for a minute. What a client sends in Authorization is
never logged, forwarded upstream or stored (dockerd sends users' Docker Hub passwords to mirrors).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from cachetools import TTLCache

from edgecache import errors
from edgecache.config import AccessConfig, AccessRule
from edgecache.errors import ConfigError
from edgecache.oci import RepoName

log = logging.getLogger(__name__)
FAILURE_WINDOW = 60.0
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Identity:
    name: str
    authenticated: bool


ANONYMOUS_IDENTITY = Identity(ANONYMOUS, False)


def load_htpasswd(path: str) -> dict[str, bytes]:
    """user → bcrypt hash. Other hash kinds (MD5, SHA1, crypt, plain) are refused, naming the line."""
    users: dict[str, bytes] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"access.htpasswd: cannot read {path} ({exc})") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed.startswith(("$2y$", "$2b$", "$2a$")):
            raise ConfigError(
                f"access.htpasswd: {path} line {number}: expected user:bcrypt-hash "
                "(htpasswd -B); other hash kinds are not accepted"
            )
        users[user] = hashed.encode()
    return users


class AccessPolicy:
    def __init__(self, config: AccessConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._mode = config.mode
        self._rules = config.rules
        self._users: Mapping[str, bytes] = load_htpasswd(config.htpasswd) if config.mode == "htpasswd" else {}
        self._unknown_cost = _highest_cost(self._users)
        ttl = config.login_cache
        self._clock = clock
        self._good: TTLCache[bytes, str] | None = TTLCache(10_000, ttl, timer=clock) if ttl > 0 else None
        self._failures: TTLCache[str, list[float]] = TTLCache(100_000, FAILURE_WINDOW, timer=clock)
        self._max_failures = config.max_failures

    def reconfigure(self, config: AccessConfig) -> None:
        """SIGHUP: new rules and a re-read htpasswd file; remembered logins are forgotten."""
        users = load_htpasswd(config.htpasswd) if config.mode == "htpasswd" else {}
        self._mode, self._rules, self._users = config.mode, config.rules, users
        self._unknown_cost = _highest_cost(users)
        self._max_failures = config.max_failures
        if self._good is not None:
            self._good.clear()

    async def authenticate(self, header: str | None, peer: str, cert_subject: str | None) -> Identity:
        """The identity of a request (its Authorization header, client address and verified client
        certificate subject). Wrong credentials are refused even where anonymous may pull."""
        if self._mode == "mtls":
            return Identity(cert_subject, True) if cert_subject else ANONYMOUS_IDENTITY
        if self._mode != "htpasswd":
            return ANONYMOUS_IDENTITY
        if not header:
            return ANONYMOUS_IDENTITY
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            # dockerd may send a bearer token it got elsewhere: not ours, so treat it as absent.
            return ANONYMOUS_IDENTITY
        user, password = _basic_credentials(encoded.strip())
        return Identity(await self._check_password(peer, user, password), True)

    async def _check_password(self, peer: str, user: str, password: str) -> str:
        key = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        if self._good is not None and self._good.get(key) == user:
            return user
        now = self._clock()
        recent = [t for t in self._failures.get(peer, []) if now - t < FAILURE_WINDOW]
        if len(recent) >= self._max_failures:
            raise errors.TooManyAttempts(retry_after=FAILURE_WINDOW - (now - recent[0]))
        hashed = self._users.get(user)
        ok = await asyncio.to_thread(_check, password.encode(), hashed, self._unknown_cost)
        if not ok or hashed is None:
            self._failures[peer] = [*recent, now]
            log.info("failed login from %s", peer)  # neither the user name nor the password
            raise errors.Unauthorized("wrong user name or password")
        if self._good is not None:
            self._good[key] = user
        return user

    def check_base(self, identity: Identity) -> None:
        """The `/v2/` ping: with a login mode it asks anonymous clients to authenticate, which is
        how dockerd learns to send the credentials it has (anonymous pulls still go on after it)."""
        if self._mode == "htpasswd" and not identity.authenticated:
            raise errors.Unauthorized()

    def check(self, identity: Identity, upstream: str, repo: RepoName) -> None:
        """Raise unless `identity` may pull `upstream/repo`: deny wins over allow, and with rules
        configured nothing is allowed that no rule allows."""
        if self._allowed(identity, f"{upstream}/{repo}"):
            return
        if not identity.authenticated and self._mode == "htpasswd":
            raise errors.Unauthorized()
        raise errors.AccessDenied(f"{identity.name} may not pull {upstream}/{repo}")

    def _allowed(self, identity: Identity, target: str) -> bool:
        if self._mode != "anonymous" and not identity.authenticated:
            rules = [r for r in self._rules if r.identity == ANONYMOUS]
            return _decide(rules, target)
        if not self._rules:
            return True
        rules = [r for r in self._rules if _applies(r, identity)]
        return _decide(rules, target)


def _check(password: bytes, hashed: bytes | None, unknown_cost: int) -> bool:
    """bcrypt, in a worker thread. An unknown user is checked against a dummy hash of the file's
    highest cost, so an unknown name takes as long as a known one with a wrong password."""
    if hashed is None:
        bcrypt.checkpw(password, _dummy_hash(unknown_cost))
        return False
    return bcrypt.checkpw(password, hashed)


def _highest_cost(users: Mapping[str, bytes]) -> int:
    """bcrypt hashes start `$2b$NN$`: NN is the cost (log2 of the rounds)."""
    return max((int(h[4:6]) for h in users.values() if h[4:6].isdigit()), default=10)


@functools.cache
def _dummy_hash(rounds: int) -> bytes:
    return bcrypt.hashpw(b"edgecache-no-such-user", bcrypt.gensalt(rounds=min(max(rounds, 4), 16)))


def _applies(rule: AccessRule, identity: Identity) -> bool:
    if rule.identity == identity.name:
        return True
    return rule.identity == "*" and identity.authenticated


def _decide(rules: list[AccessRule], target: str) -> bool:
    if any(fnmatch.fnmatchcase(target, pattern) for rule in rules for pattern in rule.deny):
        return False
    return any(fnmatch.fnmatchcase(target, pattern) for rule in rules for pattern in rule.allow)


def _basic_credentials(encoded: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(encoded, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise errors.Unauthorized("malformed Basic credentials") from None
    user, sep, password = decoded.partition(":")
    if not sep or not user or len(decoded) > 1024:
        raise errors.Unauthorized("malformed Basic credentials")
    return user, password

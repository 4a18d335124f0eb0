"""Who may pull what: client identities (htpasswd, LDAP, mutual TLS, tokens, anonymous) and
per-repository rules.

Passwords are checked in a worker thread (bcrypt) or by the directory (ldap.py); unknown users cost
the same bcrypt work as wrong passwords, so timing does not tell which names exist. Login modes are
tried in the configured order: the first that accepts the credentials wins. Successful checks are
remembered briefly (keyed by a hash, never the password), with the identity's groups, and failures
are counted per client address: past the limit, the client gets 429 without any check for a minute.
With the token service on, a Bearer token of ours is checked locally (tokens.py). A token that passed
is remembered (keyed by its hash) until its own expiry, at most REMEMBER_TOKENS_FOR: a signature check
costs 150-250 us, several times a whole manifest hit, and a client sends its token with every request.
Refused tokens are never remembered, and a reload forgets them all. What a client
sends in Authorization is never logged, forwarded upstream or stored (dockerd sends users' Docker
Hub passwords to mirrors).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fnmatch
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import bcrypt
import jwt
from cachetools import LRUCache, TTLCache

from edgecache import errors
from edgecache.access.identity import ANONYMOUS, ANONYMOUS_IDENTITY, Identity, applies
from edgecache.access.ldap import LdapDirectory
from edgecache.access.oidc import Fetch, OidcVerifier, no_fetch
from edgecache.access.tokens import TokenService
from edgecache.config import AccessConfig, AccessRule
from edgecache.errors import ConfigError
from edgecache.metrics import Metrics
from edgecache.oci import RepoName

log = logging.getLogger(__name__)
FAILURE_WINDOW = 60.0
REMEMBER_TOKENS_FOR = 60.0  # an outside issuer's key withdrawn from its JWKS still counts this long
MAX_REMEMBERED_TOKENS = 4096
VERDICTS_KEPT = 4096  # (identity, upstream/repository) → the rules' verdict, until a reload
__all__ = ["ANONYMOUS", "ANONYMOUS_IDENTITY", "AccessPolicy", "Identity", "load_htpasswd"]


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
    def __init__(
        self,
        config: AccessConfig,
        clock: Callable[[], float] = time.monotonic,
        fetch: Fetch = no_fetch,
        metrics: Metrics | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock  # what a token's `exp` is compared with
        self._metrics = metrics
        self._fetch = fetch
        self.oidc: OidcVerifier | None = None
        self._failures: TTLCache[str, list[float]] = TTLCache(100_000, FAILURE_WINDOW, timer=clock)
        self._good: TTLCache[bytes, Identity] | None = None
        self._ldap: LdapDirectory | None = None
        self.tokens: TokenService | None = None
        self._apply(config)

    def _apply(self, config: AccessConfig) -> None:
        """Build everything a configuration needs first, then swap it in (a bad file changes nothing)."""
        users = load_htpasswd(config.htpasswd) if config.uses("htpasswd") else {}
        ldap = LdapDirectory(config.ldap) if config.uses("ldap") else None
        tokens = self.tokens
        if config.token and tokens is not None:
            tokens.reconfigure(config)
        elif config.token:
            tokens = TokenService(config)
        else:
            tokens = None
        oidc = self.oidc
        if config.oidc.issuer and oidc is not None:
            oidc.reconfigure(config.oidc)
        elif config.oidc.issuer:
            oidc = OidcVerifier(config.oidc, self._fetch, self._clock)
        else:
            oidc = None
        old_ldap = self._ldap
        self._config = config
        self._modes = config.modes
        self._rules = config.rules
        # Every request asks the rules (globs, deny before allow: 4-5 us with ten rules); they only
        # change on reload, so their verdicts are kept, the new configuration starting afresh.
        self._verdicts: LRUCache[tuple[str, bool, frozenset[str], str], bool] = LRUCache(VERDICTS_KEPT)
        self._users: Mapping[str, bytes] = users
        self._unknown_cost = _highest_cost(users)
        self._max_failures = config.max_failures
        self._ldap, self.tokens, self.oidc = ldap, tokens, oidc
        ttl = config.login_cache
        # New objects, not cleared ones: a check still waiting (bcrypt, the directory, the issuer's
        # keys) under the old settings stores its result in the old object, which nobody reads.
        self._good = TTLCache(10_000, ttl, timer=self._clock) if ttl > 0 else None
        # token hash → (identity, kind of check, its `exp`)
        self._tokens_seen: TTLCache[bytes, tuple[Identity, str, float]] = TTLCache(
            MAX_REMEMBERED_TOKENS, REMEMBER_TOKENS_FOR, timer=self._clock
        )
        if old_ldap is not None:
            old_ldap.close()

    def reconfigure(self, config: AccessConfig) -> None:
        """SIGHUP: new rules, a re-read htpasswd file, LDAP settings and token key; remembered logins
        and tokens are forgotten."""
        self._apply(config)

    def close(self) -> None:
        if self._ldap is not None:
            self._ldap.close()

    @property
    def token_realm(self) -> str:
        return self._config.token_realm

    async def authenticate(
        self, header: str | None, peer: str, cert_subject: str | None, *, exchange: bool = False
    ) -> Identity:
        """The identity of a request (its Authorization header, client address and verified client
        certificate subject). Wrong credentials are refused even where anonymous may pull.

        `exchange` (at /token): a Basic password that is a token of the OIDC issuer is verified as
        one, so clients that only speak Basic to /token (`docker login -u oidc -p "$JWT"`) can use
        it."""
        if "mtls" in self._modes and cert_subject:
            self._count("certificate", "ok")
            return Identity(cert_subject, True)
        if not header:
            return ANONYMOUS_IDENTITY
        scheme, _, encoded = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            return await self._bearer(encoded.strip())
        if scheme != "basic":
            return ANONYMOUS_IDENTITY
        if exchange and self.oidc is not None:
            user, password = _basic_credentials(encoded.strip(), limit=8192)  # a JWT can be long
            if _unverified_issuer(password) == self.oidc.issuer:
                return await self._counted("oidc", self.oidc.verify(password))
        if not ("htpasswd" in self._modes or "ldap" in self._modes):
            # No password mode: dockerd sends users' Docker Hub logins to mirrors; not ours, ignored.
            return ANONYMOUS_IDENTITY
        user, password = _basic_credentials(encoded.strip())
        key = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        good = self._good
        remembered = good.get(key) if good is not None else None
        if remembered is not None and remembered.name == user:
            self._count("password", "remembered")
            return remembered
        identity = await self._counted("password", self._check_password(peer, user, password))
        if good is not None:
            good[key] = identity  # (a reload meanwhile replaced `good`: this one is forgotten)
        return identity

    async def _counted(self, kind: str, check: Awaitable[Identity]) -> Identity:
        """Await a credential check, counting its outcome (never who or with what)."""
        try:
            identity = await check
        except errors.TooManyAttempts:
            self._count(kind, "limited")
            raise
        except errors.Unauthorized:
            self._count(kind, "refused")
            raise
        except errors.DirectoryUnavailable:
            self._count(kind, "unavailable")
            raise
        self._count(kind, "ok")
        return identity

    def _count(self, kind: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.credential_checks.labels(kind, result).inc()

    async def _bearer(self, token: str) -> Identity:
        """An outside issuer's token (by its unverified `iss`: only to choose who verifies it), or
        one of ours. dockerd may send a bearer token it got elsewhere: with neither on, it is ignored.
        A token verified a moment ago is not verified again (see the module docstring)."""
        if self.oidc is None and self.tokens is None:
            return ANONYMOUS_IDENTITY
        key = hashlib.sha256(token.encode()).digest()
        seen = self._tokens_seen  # a reload during the check below replaces it: see _apply
        remembered = seen.get(key)
        if remembered is not None:
            identity, kind, expires_at = remembered
            if self._wall_clock() < expires_at:
                self._count(kind, "remembered")
                return identity
            with contextlib.suppress(KeyError):  # (TTLCache raises if its own TTL ran out meanwhile)
                del seen[key]  # past `exp`: the verifier says so (or grants its leeway)
        if self.oidc is not None and _unverified_issuer(token) == self.oidc.issuer:
            kind, identity = "oidc", await self._counted("oidc", self.oidc.verify(token))
        elif self.tokens is not None:
            kind, identity = "token", await self._counted("token", self._verify_ours(token))
        else:
            return ANONYMOUS_IDENTITY
        try:  # verified, so `exp` is there and a number PyJWT took as an integer
            expires_at = float(jwt.decode(token, options={"verify_signature": False})["exp"])
        except (jwt.PyJWTError, KeyError, TypeError, ValueError, OverflowError):
            return identity  # an `exp` beyond a float's range: checked every time, never remembered
        seen[key] = (identity, kind, expires_at)
        return identity

    async def _verify_ours(self, token: str) -> Identity:
        assert self.tokens is not None
        return self.tokens.verify(token)

    async def _check_password(self, peer: str, user: str, password: str) -> Identity:
        """A password not remembered: checked (within the failure limit)."""
        now = self._clock()
        recent = [t for t in self._failures.get(peer, []) if now - t < FAILURE_WINDOW]
        if len(recent) >= self._max_failures:
            raise errors.TooManyAttempts(retry_after=FAILURE_WINDOW - (now - recent[0]))
        identity = await self._first_accepting(user, password)
        if identity is None:
            self._failures[peer] = [*recent, now]
            log.info("failed login from %s", peer)  # neither the user name nor the password
            raise errors.Unauthorized("wrong user name or password")
        return identity

    async def _first_accepting(self, user: str, password: str) -> Identity | None:
        """Each login mode in order; None when every one refuses. A directory that cannot answer does
        not stop the modes after it (a local robot account still logs in during an outage), but if
        none accepts, the answer is DirectoryUnavailable (503): the directory might have said yes."""
        unavailable: errors.DirectoryUnavailable | None = None
        for mode in self._modes:
            if mode == "htpasswd":
                hashed = self._users.get(user)
                # Checked even for a name the file lacks (against a dummy hash), also when a later
                # mode follows: skipping it would make a known name slower than an unknown one, and
                # timing would tell which names the file holds.
                ok = await asyncio.to_thread(_check, password.encode(), hashed, self._unknown_cost)
                if ok and hashed is not None:
                    return Identity(user, True)
            elif mode == "ldap" and self._ldap is not None:
                try:
                    groups = await self._ldap.check(user, password)
                except errors.DirectoryUnavailable as exc:
                    unavailable = exc
                    continue
                if groups is not None:
                    return Identity(user, True, groups)
        if unavailable is not None:
            raise unavailable
        return None

    def check_base(self, identity: Identity) -> None:
        """The `/v2/` ping: with a login mode it asks anonymous clients to authenticate, which is
        how dockerd learns to send the credentials it has (anonymous pulls still go on after it)."""
        if self._asks_login() and not identity.authenticated:
            raise errors.Unauthorized()

    def _asks_login(self) -> bool:
        return "htpasswd" in self._modes or "ldap" in self._modes or self.tokens is not None

    def check(self, identity: Identity, upstream: str, repo: RepoName) -> None:
        """Raise unless `identity` may pull `upstream/repo`: deny wins over allow, and with rules
        configured nothing is allowed that no rule allows."""
        if self.allowed(identity, upstream, repo):
            return
        if not identity.authenticated and self._asks_login():
            raise errors.Unauthorized()
        raise errors.AccessDenied(f"{identity.name} may not pull {upstream}/{repo}")

    def allowed(self, identity: Identity, upstream: str, repo: RepoName) -> bool:
        """The rules' verdict alone (the token service asks it for each scope it may grant)."""
        target = f"{upstream}/{repo}"
        # What _decide reads of the identity, and no more: a token's scopes would split one user's
        # verdicts into an entry per token.
        key = (identity.name, identity.authenticated, identity.groups, target)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._verdicts[key] = self._decide(identity, target)
        return verdict

    def _decide(self, identity: Identity, target: str) -> bool:
        if self._modes != ("anonymous",) and not identity.authenticated:
            rules = [r for r in self._rules if r.identity == ANONYMOUS]
            return _decide(rules, target)
        if not self._rules:
            return True
        rules = [r for r in self._rules if applies(r, identity)]
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


def _decide(rules: list[AccessRule], target: str) -> bool:
    if any(fnmatch.fnmatchcase(target, pattern) for rule in rules for pattern in rule.deny):
        return False
    return any(fnmatch.fnmatchcase(target, pattern) for rule in rules for pattern in rule.allow)


def _unverified_issuer(token: str) -> object:
    try:
        return jwt.decode(token, options={"verify_signature": False}).get("iss")
    except jwt.PyJWTError:
        return None


def _basic_credentials(encoded: str, limit: int = 1024) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(encoded, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise errors.Unauthorized("malformed Basic credentials") from None
    user, sep, password = decoded.partition(":")
    if not sep or not user or len(decoded) > limit:
        raise errors.Unauthorized("malformed Basic credentials")
    return user, password

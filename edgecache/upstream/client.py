"""Requests to one upstream registry: token auth, redirects, error mapping, health and metrics.

Two transports carry them: an aiohttp session (manifests, HEADs, tokens, listings) and, for blob
bodies, blocking connections read on the upstream's own threads (upstream.blocking). Library errors
are mapped to the domain error tree here, at the boundary, so nothing above this module
knows aiohttp's client exceptions. Client credentials never arrive here: requests carry only what this
module adds (the upstream's own credentials or tokens), and those never follow a redirect to another host.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from edgecache import __version__, errors
from edgecache.config import UpstreamConfig
from edgecache.metrics import Metrics
from edgecache.oci import MANIFEST_MEDIA_TYPES, MAX_MANIFEST_BYTES, Digest, RepoName
from edgecache.trace import note_upstream_status
from edgecache.upstream.blocking import Answer, ConnectionPool
from edgecache.upstream.health import UpstreamHealth, parse_ratelimit, parse_retry_after, probe_until_up
from edgecache.upstream.pace import BodyPace, Deadlines
from edgecache.upstream.tokens import (
    MAX_TOKEN_BYTES,
    TokenCache,
    parse_challenge,
    pull_scope,
    realm_allowed,
    same_origin,
    token_from,
)

log = logging.getLogger(__name__)
MAX_REDIRECTS = 5
PROBE_TIMEOUT = 3.0  # seconds a probe of a down upstream may take (GET /v2/ is trivial for a registry)
USER_AGENT = f"edgecache/{__version__}"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MANIFEST_ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)


@dataclass(frozen=True)
class ManifestHead:
    digest: Digest | None
    media_type: str
    size: int | None


@dataclass(frozen=True)
class FetchedManifest:
    body: bytes
    media_type: str | None
    digest: Digest | None  # what upstream claimed in Docker-Content-Digest


class UpstreamAnswer(Protocol):
    """What the request plumbing needs of an answer, from aiohttp or from the blocking transport."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    def release(self) -> Any: ...


@dataclass(frozen=True)
class Passthrough:
    """An upstream answer relayed as it is (tags/list, referrers): JSON bodies, small."""

    status: int
    content_type: str
    body: bytes
    link: str | None
    filters: str | None = None  # OCI-Filters-Applied: what a referrers API filtered already


async def read_capped(
    resp: aiohttp.ClientResponse, limit: int, each: Callable[[int], None] | None = None
) -> bytes | None:
    """A whole small body, read as it arrives (`each` told every chunk's size: a pace check); None
    when it is over `limit`. (`content.read(n)` would return only what has arrived so far.)"""
    chunks: list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_any():
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
        if each is not None:
            each(len(chunk))
    return b"".join(chunks)


class UpstreamClient:
    """Talks to one configured upstream registry; built and closed by the app."""

    def __init__(self, config: UpstreamConfig, metrics: Metrics) -> None:
        self.config = config
        self.name = config.name
        self._metrics = metrics
        self.health = UpstreamHealth(config.down_after, config.down_for)
        self.base_url = config.url.rstrip("/")
        self._tokens = TokenCache()
        self._token_fetches: dict[str, asyncio.Future[str | None]] = {}
        self._basic: str | None = None
        self._uses_basic = False  # set once upstream has asked for Basic: then sent up front
        self._session: aiohttp.ClientSession | None = None
        self._blocking: ConnectionPool | None = None
        self._blocking_slots = asyncio.Semaphore(config.max_connections)
        self._deadlines = Deadlines.of(config)
        self._timeout = _aiohttp_timeout(self._deadlines)
        self._probe: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ssl_context = ssl.create_default_context(cafile=self.config.ca_bundle or None)
        self._blocking = ConnectionPool(self.name, ssl_context, self._deadlines)
        connector = aiohttp.TCPConnector(limit=self.config.max_connections, ttl_dns_cache=60, ssl=ssl_context)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            # identity: a compressed answer would not be the bytes its digest names
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            auto_decompress=False,  # manifests must reach the digest check byte for byte
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,  # only configured upstreams are contacted: no proxy from the environment
        )
        self._basic = self._basic_credentials()

    def reconfigure(self, config: UpstreamConfig) -> None:
        """Apply a reloaded configuration of this upstream (same URL): credentials are read again and
        cached tokens dropped; TTL rules, timeouts and health thresholds apply to the next request."""
        self.config = config
        self._deadlines = Deadlines.of(config)
        self._timeout = _aiohttp_timeout(self._deadlines)
        self._basic = self._basic_credentials()
        self._uses_basic = False
        self._tokens = TokenCache()
        self.health.reconfigure(config.down_after, config.down_for)
        if self._blocking is not None:  # new deadlines for the next request; reads in flight finish
            self._blocking.reconfigure(self._deadlines)
        self._blocking_slots = asyncio.Semaphore(config.max_connections)  # holders release the old one

    def _basic_credentials(self) -> str | None:
        if not self.config.username:
            return None
        creds = f"{self.config.username}:{self.config.password()}".encode()
        return "Basic " + base64.b64encode(creds).decode()

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        if self._session is not None:
            await self._session.close()
        if self._blocking is not None:
            self._blocking.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "UpstreamClient.start() was not awaited"
        return self._session

    def upstream_name(self, repo: RepoName) -> RepoName:
        """The repository as this upstream names it (Docker Hub: `alpine` is `library/alpine`).

        Converted once, when the upstream of a request is chosen; every operation below takes the
        upstream's name."""
        return repo.with_library_prefix() if self.config.adds_library_prefix else repo

    def tag_ttl(self, tag: str, default: float) -> float:
        """How long a tag of this upstream is fresh (per-tag rules from the config, else `default`)."""
        return self.config.tag_ttl(tag, default)

    # -- registry operations (repositories as the upstream names them) -------------------------

    async def head_manifest(self, repo: RepoName, reference: str) -> ManifestHead:
        async with self._request("HEAD", repo, f"manifests/{reference}", kind="manifest") as resp:
            return ManifestHead(
                digest=_header_digest(resp.headers),
                media_type=resp.headers.get("Content-Type", ""),
                size=resp.content_length,
            )

    async def get_manifest(self, repo: RepoName, reference: str) -> FetchedManifest:
        async with self._request("GET", repo, f"manifests/{reference}", kind="manifest") as resp:
            body = await self._read_small(resp, MAX_MANIFEST_BYTES)
            return FetchedManifest(body, resp.headers.get("Content-Type"), _header_digest(resp.headers))

    async def head_blob(self, repo: RepoName, digest: Digest) -> int | None:
        async with self._request("HEAD", repo, f"blobs/{digest}", kind="blob") as resp:
            return resp.content_length

    @contextlib.asynccontextmanager
    async def open_blob(self, repo: RepoName, digest: Digest, start: int = 0) -> AsyncIterator[Answer]:
        """A blob GET (from `start` with a Range request when resuming); status already checked. The
        body is read with blocking calls on this upstream's threads (upstream.blocking)."""
        headers = {"Range": f"bytes={start}-"} if start else {}
        async with self._exchange(
            "GET", repo, f"blobs/{digest}", kind="blob", headers=headers, blocking=True
        ) as resp:
            if start and (
                resp.status != 206 or not resp.headers.get("Content-Range", "").startswith(f"bytes {start}-")
            ):
                raise errors.UpstreamUnavailable("upstream cannot resume at the requested offset")
            assert isinstance(resp, Answer)
            _refuse_encoded(resp.headers)
            yield resp

    async def passthrough(self, repo: RepoName, path: str, query: Mapping[str, str]) -> Passthrough:
        """GET a small JSON listing (tags/list, referrers) and relay it; 404 passes through."""
        kind = "tags" if path.startswith("tags") else "referrers"
        async with self._request("GET", repo, path, kind=kind, params=query, allow_404=True) as resp:
            body = await self._read_small(resp, MAX_MANIFEST_BYTES)
            return Passthrough(
                status=resp.status,
                content_type=resp.headers.get("Content-Type", "application/json"),
                body=body,
                link=resp.headers.get("Link"),
                filters=resp.headers.get("OCI-Filters-Applied"),
            )

    # -- plumbing ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _request(
        self,
        method: str,
        repo: RepoName,
        path: str,
        *,
        kind: str,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        allow_404: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One registry request on the event loop (aiohttp); see `_exchange`."""
        async with self._exchange(
            method, repo, path, kind=kind, headers=headers, params=params, allow_404=allow_404
        ) as resp:
            assert isinstance(resp, aiohttp.ClientResponse)
            yield resp

    @contextlib.asynccontextmanager
    async def _exchange(
        self,
        method: str,
        repo: RepoName,
        path: str,
        *,
        kind: str,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        allow_404: bool = False,
        blocking: bool = False,
    ) -> AsyncIterator[UpstreamAnswer]:
        """One registry request with auth and redirects; yields a 2xx response (or 404 if allowed):
        aiohttp's, or with `blocking` an upstream.blocking.Answer whose body a worker thread reads."""
        url = URL(f"{self.base_url}/v2/{repo}/{path}", encoded=True)
        query = dict(params or {})
        if self.config.parent:
            # A parent edgecache tier: tell it which registry we mean, as containerd tells us.
            query["ns"] = self.name
        if query:
            url = url.with_query(query)
        base_headers = dict(headers or {})
        if kind == "manifest":
            base_headers["Accept"] = MANIFEST_ACCEPT
        scope = pull_scope(str(repo))
        self.health.check(self.name)
        # aiohttp's connector bounds its own connections; blocking ones hold a slot from before the
        # request until their body is read, so both transports keep to max_connections each.
        slots = self._blocking_slots if blocking else None
        if slots is not None:
            await slots.acquire()
        try:
            started = time.perf_counter()
            resp = await self._answer(method, url, base_headers, scope, kind, allow_404, blocking)
            timing = self._metrics.upstream_duration
            timing.labels(self.name, kind, "first_byte").observe(time.perf_counter() - started)
            try:
                yield resp
                timing.labels(self.name, kind, "total").observe(time.perf_counter() - started)
            except (aiohttp.ClientError, TimeoutError) as exc:  # not OSError: that is the caller's disk
                # The answer started and then broke off: a caller may resume it with a Range.
                log.warning("upstream %s %s body interrupted: %s", self.name, kind, type(exc).__name__)
                self._health_changed(self.health.failed)
                raise errors.UpstreamInterrupted(f"upstream {self.name} stopped mid-body") from None
            except errors.UpstreamInterrupted as exc:  # the blocking transport's body broke off
                log.warning("upstream %s %s body interrupted: %s", self.name, kind, exc.detail)
                self._health_changed(self.health.failed)
                raise
            finally:
                resp.release()
        finally:
            if slots is not None:
                slots.release()

    async def _answer(
        self,
        method: str,
        url: URL,
        headers: dict[str, str],
        scope: str,
        kind: str,
        allow_404: bool,
        blocking: bool = False,
    ) -> UpstreamAnswer:
        """Send with auth and redirects until an answer we can use; library errors mapped here."""
        try:
            resp = await self._send(method, url, headers, scope, kind, blocking)
            if resp.status == 401:
                challenge_header = resp.headers.get("WWW-Authenticate", "")
                resp.release()
                if await self._authenticate(challenge_header, scope):
                    resp = await self._send(method, url, headers, scope, kind, blocking)
            try:
                self._check_status(resp, kind, allow_404)
            except BaseException:
                resp.release()
                raise
            return resp
        except errors.EdgecacheError:
            raise
        except TimeoutError:
            log.warning("upstream %s %s %s: no answer within the deadline", self.name, method, kind)
            self._no_answer(kind, deadline=True)
            raise errors.UpstreamTimeout(f"upstream {self.name} did not answer in time") from None
        except (aiohttp.ClientError, OSError, http.client.HTTPException) as exc:
            log.warning("upstream %s %s %s failed: %s", self.name, method, kind, type(exc).__name__)
            self._no_answer(kind)
            raise errors.UpstreamUnavailable(f"upstream {self.name} is unreachable") from None

    def _observe(self, resp: UpstreamAnswer, kind: str) -> None:
        """Account for one upstream answer: metrics, rate-limit headers, health."""
        status = resp.status
        note_upstream_status(status)
        self._metrics.upstream_requests.labels(self.name, kind, f"{status // 100}xx").inc()
        remaining = parse_ratelimit(resp.headers.get("ratelimit-remaining"))
        if remaining is not None:
            self._metrics.ratelimit_remaining.labels(self.name).set(remaining)
        limit = parse_ratelimit(resp.headers.get("ratelimit-limit"))
        if limit is not None:
            self._metrics.ratelimit_limit.labels(self.name).set(limit)
        if status == 429:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            log.warning("upstream %s rate limits us; backing off %.0fs", self.name, retry_after)
            self._health_changed(lambda: self.health.rate_limited(retry_after))
        elif status >= 500 or status == 408:
            self._health_changed(self.health.failed)
        else:
            self._health_changed(self.health.succeeded)

    def _no_answer(self, kind: str, *, deadline: bool = False) -> None:
        self._metrics.upstream_requests.labels(self.name, kind, "error").inc()
        self._health_changed(lambda: self.health.failed(deadline=deadline))

    def _health_changed(self, event: Callable[[], None]) -> None:
        before = self.health.state
        event()
        after = self.health.state
        if after != before:
            log.warning("upstream %s is now %s", self.name, after)
            self._metrics.set_health(self.name, after)
        if after == "down" and (self._probe is None or self._probe.done()):
            self._probe = asyncio.get_running_loop().create_task(
                self._probe_until_up(), name=f"probe {self.name}"
            )

    async def _probe_until_up(self) -> None:
        """While the upstream is down, one probe at a time asks whether it is back (growing waits);
        the first answer brings it up for every request."""

        def back() -> None:
            log.warning("upstream %s answers again", self.name)
            self._health_changed(self.health.succeeded)

        await probe_until_up(self.health, self._answers, back)

    async def _answers(self) -> bool:
        """Does the upstream answer its API root within the deadlines? Any status below 500 counts
        (401 too: it is alive, and asking for credentials is its normal answer)."""
        deadlines = self._deadlines
        url = URL(f"{self.base_url}/v2/")
        try:
            # A short cap: a probe stuck on a black hole would otherwise delay noticing the recovery.
            async with asyncio.timeout(min(deadlines.connect + deadlines.headers, PROBE_TIMEOUT)):
                async with self.session.get(url, allow_redirects=False, timeout=self._timeout) as resp:
                    status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError):
            status = 0
        outcome = f"{status // 100}xx" if status else "error"
        self._metrics.upstream_requests.labels(self.name, "probe", outcome).inc()
        return 0 < status < 500 and status != 429

    async def _send(
        self, method: str, url: URL, headers: dict[str, str], scope: str, kind: str, blocking: bool = False
    ) -> UpstreamAnswer:
        """Send, following redirects ourselves: Authorization only ever goes to the upstream's origin."""
        origin = self.base_url
        for _hop in range(MAX_REDIRECTS + 1):
            request_headers = dict(headers)
            if same_origin(str(url), origin):
                auth = self._authorization(scope)
                if auth:
                    request_headers["Authorization"] = auth
            resp: UpstreamAnswer
            if blocking:
                assert self._blocking is not None, "UpstreamClient.start() was not awaited"
                request_headers["User-Agent"] = USER_AGENT
                resp = await self._blocking.open(method, url, request_headers)
            else:
                # sock_read bounds each wait; this bounds the whole, so headers that trickle in a
                # byte at a time cannot hold the request either.
                deadlines = self._deadlines
                async with asyncio.timeout(deadlines.connect + deadlines.headers):
                    resp = await self.session.request(
                        method, url, headers=request_headers, allow_redirects=False, timeout=self._timeout
                    )
            self._observe(resp, kind)
            if resp.status not in REDIRECT_STATUSES:
                return resp
            location = resp.headers.get("Location")
            resp.release()
            if not location:
                raise errors.UpstreamUnavailable("upstream redirect without a Location")
            url = redirect_target(url, location)
        raise errors.UpstreamUnavailable("too many upstream redirects")

    def _authorization(self, scope: str) -> str | None:
        token = self._tokens.get(scope)
        if token:
            return f"Bearer {token}"
        return self._basic if self._basic and self._uses_basic else None

    async def _authenticate(self, header: str, scope: str) -> bool:
        """Answer a 401 challenge once; True when a retry may succeed."""
        challenge = parse_challenge(header)
        if challenge is None:
            return False
        if challenge.scheme == "basic":
            if self._basic is None or self._uses_basic:
                return False
            self._uses_basic = True
            return True
        if challenge.scheme != "bearer" or not challenge.realm:
            return False
        self._tokens.drop(scope)
        token = await self._fetch_token_once(challenge.realm, challenge.params, scope)
        return token is not None

    async def _fetch_token_once(self, realm: str, params: dict[str, str], scope: str) -> str | None:
        """Concurrent 401s for one scope share a single token request."""
        pending = self._token_fetches.get(scope)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._token_fetches[scope] = future
        try:
            token = await self._fetch_token(realm, params, scope)
            future.set_result(token)
            return token
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._token_fetches[scope]

    async def _fetch_token(self, realm: str, params: dict[str, str], scope: str) -> str | None:
        query = {"scope": scope}
        if params.get("service"):
            query["service"] = params["service"]
        if not realm_allowed(realm, self.base_url, self.config.token_hosts):
            log.warning("upstream %s: token realm outside the upstream's domain refused", self.name)
            raise errors.UpstreamDenied("upstream token realm is not trusted")
        headers = {"Authorization": self._basic} if self._basic else {}
        deadlines = self._deadlines
        # A timeout or a network error here is mapped by `_answer`, whose challenge led here.
        async with asyncio.timeout(deadlines.connect + deadlines.headers):
            resp = await self.session.get(
                URL(realm).update_query(query), headers=headers, allow_redirects=False, timeout=self._timeout
            )
        async with resp:
            self._observe(resp, "token")
            if resp.status in (401, 403):
                raise errors.UpstreamDenied(f"upstream {self.name} token service refused the credentials")
            if resp.status != 200:
                raise errors.UpstreamUnavailable(f"upstream {self.name} token service answered {resp.status}")
            body = await self._read_small(resp, MAX_TOKEN_BYTES, what="token answer")
        try:
            token, expires_in = token_from(json.loads(body))
        except (ValueError, RecursionError) as exc:  # not JSON, no token, a token of the wrong shape
            log.warning("upstream %s: token service sent an unusable answer: %s", self.name, exc)
            raise errors.UpstreamUnavailable(
                f"upstream {self.name} token service sent no usable token"
            ) from None
        self._tokens.put(scope, token, expires_in)
        return token

    async def _read_small(self, resp: aiohttp.ClientResponse, limit: int, what: str = "manifest") -> bytes:
        """A small answer's body (manifest, listing, token): refused over `limit`, when encoded, or
        when it trickles below the minimum rate (a silence is bounded by the header deadline)."""
        _refuse_encoded(resp.headers)
        too_large = errors.ManifestTooLarge if what == "manifest" else errors.UpstreamUnavailable
        if resp.content_length is not None and resp.content_length > limit:
            raise too_large(f"upstream {what} is larger than {limit // 1024} KiB")
        body = await read_capped(resp, limit, BodyPace(self._deadlines).note)
        if body is None:
            raise too_large(f"upstream {what} is larger than {limit // 1024} KiB")
        return body

    def _check_status(self, resp: UpstreamAnswer, kind: str, allow_404: bool) -> None:
        status = resp.status
        if 200 <= status < 300 or (status == 404 and allow_404):
            return
        if status == 404:
            raise {
                "manifest": errors.ManifestUnknown,
                "blob": errors.BlobUnknown,
            }.get(kind, errors.NameUnknown)(f"upstream {self.name} has no such {kind}")
        if status in (401, 403):
            raise errors.UpstreamDenied(f"upstream {self.name} denied access ({status})")
        if status == 429:
            raise errors.UpstreamRateLimited(
                f"upstream {self.name} is rate limiting",
                retry_after=parse_retry_after(resp.headers.get("Retry-After")),
            )
        if status in (408, 504):
            raise errors.UpstreamTimeout(f"upstream {self.name} timed out ({status})")
        raise errors.UpstreamUnavailable(f"upstream {self.name} answered {status}")


def redirect_target(current: URL, location: str) -> URL:
    """Where a redirect may take us: http(s) only, and never from https down to http."""
    target = current.join(URL(location, encoded=True))
    if target.scheme not in ("http", "https") or (current.scheme == "https" and target.scheme != "https"):
        raise errors.UpstreamUnavailable("upstream redirect to an insecure location refused")
    return target


def _header_digest(headers: CIMultiDictProxy[str]) -> Digest | None:
    value = headers.get("Docker-Content-Digest")
    if not value:
        return None
    try:
        return Digest.parse(value.strip())
    except errors.DigestInvalid:
        return None


def _refuse_encoded(headers: Mapping[str, str]) -> None:
    """An answer in a content coding (gzip despite `Accept-Encoding: identity`) is not the bytes its
    digest names: refused before anything is stored or sent."""
    coding = headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise errors.UpstreamUnavailable("upstream sent an encoded body despite Accept-Encoding: identity")


def _aiohttp_timeout(deadlines: Deadlines) -> aiohttp.ClientTimeout:
    """aiohttp's timeouts for small answers: sock_read bounds the wait for the headers and any silence
    in the body after them (the stall deadline is for blob bodies, read elsewhere).

    sock_connect, not connect: `connect` would also count the wait for a free pooled connection, and
    requests queued behind max_connections must wait their turn, not time out."""
    return aiohttp.ClientTimeout(total=None, sock_connect=deadlines.connect, sock_read=deadlines.headers)

"""The registry front, free of any HTTP server: a ClientRequest in, a Reply out.

Both listeners are thin adapters over it: aiohttp for plain HTTP (and mutual-TLS HTTP/1.1), granian
for TLS with HTTP/2 and HTTP/1.1. Routing, access control, validation and the pull service's answer
happen here once; only the framing differs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST

from edgecache import errors
from edgecache.access.policy import AccessPolicy
from edgecache.access.tokens import parse_scopes
from edgecache.http import status_page
from edgecache.http.routes import Kind, Route, parse_route
from edgecache.http.status import StatusBoard, document
from edgecache.metrics import Metrics
from edgecache.oci import REGISTRY_HOST, Digest, RepoName, Tag, accepted_media_types
from edgecache.pull import BlobQuery, BytesBody, ManifestQuery, PullService, Reply, Target
from edgecache.trace import RequestTrace
from edgecache.upstream.client import UpstreamClient
from edgecache.usage import Usage

API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}
READ_METHODS = frozenset({"GET", "HEAD"})
Readiness = Callable[[], Awaitable[tuple[bool, dict[str, object]]]]
STATUS_PATHS = frozenset({"/_edgecache/status", "/_edgecache/status.json"})
# Served where /metrics is: on the registry listener (`admin`), or on server.metrics_listen.
ADMIN_PATHS = frozenset({"/metrics", "/stats", *STATUS_PATHS})
CHOSEN_KEPT = 4096  # upstream choices remembered (Upstreams.choose)


class HeaderLookup(Protocol):
    """Case-insensitive request headers (multidict's CIMultiDict and CIMultiDictProxy)."""

    def get(self, key: str, /) -> str | None: ...
    def getall(self, key: str, default: list[str], /) -> list[str]: ...


@dataclass(frozen=True)
class ClientRequest:
    """What the front needs of a request. `raw_path` is exactly as sent (no percent-decoding), so
    validation sees what the client wrote; `peer` is the client's address (X-Forwarded-For applied
    only for trusted proxies); `cert_subject` is set by a mutual-TLS listener."""

    method: str
    raw_path: str
    query: Mapping[str, str]
    headers: HeaderLookup
    host: str
    peer: str
    cert_subject: str | None = None
    secure: bool = False  # arrived over TLS (the token realm this node names is then https)


class Upstreams:
    """Chooses the upstream of a request, in order: containerd's `ns=`, a registry prefix in the path
    (`/v2/ghcr.io/owner/app/...`, from CRI-O/podman mirrors with a path or containerd's override_path),
    the Host header when it is one of an upstream's aliases, and the default upstream (dockerd).

    A registry that is not configured is refused: a request can never make edgecache contact it.
    """

    def __init__(self, clients: dict[str, UpstreamClient], default: str) -> None:
        self._clients = clients
        self._default = clients[default]
        self._aliases = {alias.lower(): c for c in clients.values() for alias in c.config.aliases}
        self._chosen: dict[tuple[str, str | None, str], Target] = {}

    def choose(self, name: str, ns: str | None, host: str) -> Target:
        """The upstream of a request for repository path `name`, and the repository as both sides
        name it (converted here, once). The last CHOSEN_KEPT answers are remembered (they depend only
        on the request's values and this configuration; a refusal raises and is not kept)."""
        key = (name, ns, host)
        target = self._chosen.get(key)
        if target is None:
            client, repo = self._client_and_name(name, ns, host)
            target = Target(client, repo, client.upstream_name(repo))
            if len(self._chosen) >= CHOSEN_KEPT:
                self._chosen.clear()  # hostile variety only costs the matching again
            if len(name) + len(ns or "") + len(host) <= 1024:
                self._chosen[key] = target
        return target

    def _client_and_name(self, name: str, ns: str | None, host: str) -> tuple[UpstreamClient, RepoName]:
        first, _, rest = name.partition("/")
        if ns is not None:
            client = self._clients.get(ns)
            if client is None:
                raise errors.UpstreamUnknown(f"this mirror has no upstream named {ns[:100]!r}")
            return client, RepoName.parse(rest if rest and first == ns else name)
        if rest:
            client = self._clients.get(first)
            if client is not None:
                return client, RepoName.parse(rest)
            if self._names_a_registry(first):
                raise errors.UpstreamUnknown(f"this mirror has no upstream named {first[:100]!r}")
        host = host.lower()
        client = self._aliases.get(host) or self._aliases.get(host.rsplit(":", 1)[0])
        return client or self._default, RepoName.parse(name)

    def _names_a_registry(self, component: str) -> bool:
        """Could this first path component only be a registry host, not part of a repository name?

        A port or `localhost` always; a dot only when the default upstream is Docker Hub, whose
        namespaces never contain one (other registries' may).
        """
        if not REGISTRY_HOST.fullmatch(component):
            return False
        if ":" in component or component == "localhost":
            return True
        return "." in component and self._default.config.adds_library_prefix


class RegistryFront:
    def __init__(
        self,
        pull: PullService,
        upstreams: Upstreams,
        metrics: Metrics,
        usage: Usage,
        readiness: Readiness,
        access: AccessPolicy,
        status: StatusBoard | None = None,
    ) -> None:
        self.pull = pull
        self.access = access
        self.status = status
        self._upstreams = upstreams
        self._metrics = metrics
        self._usage = usage
        self._readiness = readiness

    async def respond(self, request: ClientRequest, trace: RequestTrace, *, admin: bool = True) -> Reply:
        """Answer one request; raises EdgecacheError for what `error_reply` turns into OCI JSON.

        `admin` serves /metrics, /stats and the status page too (else they have their own listener)."""
        raw_path = request.raw_path
        if raw_path in ("/healthz", "/readyz") or (admin and raw_path in ADMIN_PATHS):
            return await self.operational(request, trace)
        route = parse_route(raw_path)
        trace.route = route.kind.value
        if request.method not in READ_METHODS:
            raise errors.Unsupported("this mirror is read-only: push and delete are not supported")
        if route.kind is Kind.UPLOAD:
            raise errors.Unsupported("this mirror is read-only: uploads are not supported")
        if route.kind is Kind.CATALOG:
            raise errors.Unsupported("the catalog is not served by this mirror")
        if route.kind is Kind.TOKEN:
            return await self._token(request, trace)
        try:
            identity = await self.access.authenticate(
                request.headers.get("Authorization"), request.peer, request.cert_subject
            )
            trace.identity = identity.name
            if route.kind is Kind.BASE:
                self.access.check_base(identity)
                return Reply(
                    200, {**API_VERSION_HEADER, "Content-Type": "application/json"}, BytesBody(b"{}")
                )
            target = self._upstreams.choose(route.name, request.query.get("ns"), request.host)
            trace.upstream = target.upstream_name
            if identity.token_scope is not None and route.name not in identity.token_scope:
                raise errors.Unauthorized("the token does not grant this repository")
            # Rules see the repository as the upstream names it (`alpine` is docker.io's library/alpine),
            # so a short name cannot slip past a rule written for the full one. A token's identity is
            # checked again: its scopes were granted for a name, the rules decide on the upstream's.
            self.access.check(identity, target.upstream_name, target.repo)
        except errors.Unauthorized as exc:
            if self.access.tokens is None:
                raise
            scope = None if route.kind is Kind.BASE else route.name
            raise errors.Unauthorized(exc.detail, challenge=self._bearer_challenge(request, scope)) from None
        reply = await self._dispatch(request, route, target)
        if request.method == "GET" and route.kind in (Kind.MANIFEST, Kind.BLOB):
            pull = route.kind is Kind.MANIFEST and not isinstance(route.reference, Digest)
            length = int(reply.headers.get("Content-Length", "0") or 0)
            self._usage.record(target.upstream_name, str(target.repo), pull=pull, bytes_served=length)
        return reply

    def _bearer_challenge(self, request: ClientRequest, repository: str | None) -> str:
        """Where the client gets a token, for which service and scope (the distribution token spec)."""
        tokens = self.access.tokens
        assert tokens is not None
        realm = self.access.token_realm
        if not realm:
            if not _HOST.fullmatch(request.host):
                raise errors.BadRequest("the Host header is not a host name")
            realm = f"{'https' if request.secure else 'http'}://{request.host}/token"
        challenge = f'Bearer realm="{_quoted(realm)}",service="{_quoted(tokens.service)}"'
        # The name is still raw here (a login may fail before it is checked): named only when plain.
        if repository is not None and _SCOPE_NAME.fullmatch(repository):
            challenge += f',scope="repository:{repository}:pull"'
        return challenge

    async def _token(self, request: ClientRequest, trace: RequestTrace) -> Reply:
        """GET /token: check the login once (Basic, or the client certificate), grant `pull` on each
        asked repository the rules allow, and sign a token listing only those."""
        trace.route = "token"
        tokens = self.access.tokens
        if tokens is None:
            raise errors.RouteUnknown("the token service is turned off")
        header = request.headers.get("Authorization")
        if header and not header.lower().startswith("basic "):
            header = None  # a token is not a login: /token takes credentials or a certificate
        identity = await self.access.authenticate(header, request.peer, request.cert_subject, exchange=True)
        trace.identity = identity.name
        granted = []
        getall = getattr(request.query, "getall", None)  # aiohttp's MultiDict; granian's adapter joins
        for scope in parse_scopes(getall("scope", []) if getall else [request.query.get("scope", "")]):
            if "pull" not in scope.actions:
                continue
            try:
                target = self._upstreams.choose(scope.name, request.query.get("ns"), request.host)
            except errors.ClientError:
                continue  # a name that is not valid, or a registry not served: nothing to grant
            if self.access.allowed(identity, target.upstream_name, target.repo):
                granted.append(scope.name)
        # Signing (RSA: milliseconds of CPU), for anyone who asks: off the event loop.
        token, expires_in, issued = await asyncio.to_thread(tokens.issue, identity, granted)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(issued))
        document = {"token": token, "access_token": token, "expires_in": expires_in, "issued_at": stamp}
        return Reply(
            200,
            {"Content-Type": "application/json", "Cache-Control": "no-store"},
            BytesBody(json.dumps(document).encode()),
        )

    async def operational(self, request: ClientRequest, trace: RequestTrace) -> Reply:
        """Health checks, metrics, usage statistics and the status page (GET and HEAD only)."""
        if request.method not in READ_METHODS:
            raise errors.Unsupported("only GET and HEAD are served here")
        path = request.raw_path
        if path == "/metrics":
            trace.route = "metrics"
            body = await asyncio.to_thread(self._metrics.render)  # a few ms of CPU: off the event loop
            return Reply(200, {"Content-Type": CONTENT_TYPE_LATEST}, BytesBody(body))
        if path == "/stats":
            trace.route = "stats"
            return json_reply(200, {"top_repositories": [vars(entry) for entry in self._usage.top(20)]})
        if path in STATUS_PATHS:
            trace.route = "status"
            return await self._status_reply(path)
        trace.route = "health"
        if path == "/healthz":  # alive: the process answers; nothing else is checked
            return json_reply(200, {"status": "ok"})
        # Ready while the cache can be served (even with an upstream down); the body says more.
        ready, detail = await self._readiness()
        return json_reply(200 if ready else 503, {"ready": ready, **detail})

    async def _status_reply(self, path: str) -> Reply:
        """The status page (HTML) or its data (JSON); 404 when `[status] enabled = false`."""
        board = self.status
        if board is None or not board.enabled:
            raise errors.RouteUnknown("the status page is turned off")
        status = await board.status()
        headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
        if path.endswith(".json"):
            body = await asyncio.to_thread(lambda: json.dumps(document(status)).encode())
            return Reply(200, {**headers, "Content-Type": "application/json"}, BytesBody(body))
        page = await asyncio.to_thread(lambda: status_page.render(status).encode())  # off the loop
        headers["Content-Security-Policy"] = status_page.CONTENT_SECURITY_POLICY
        return Reply(200, {**headers, "Content-Type": "text/html; charset=utf-8"}, BytesBody(page))

    async def _dispatch(self, request: ClientRequest, route: Route, target: Target) -> Reply:
        head = request.method == "HEAD"
        headers = request.headers
        if route.kind is Kind.MANIFEST:
            if route.reference is None:
                raise errors.ReferenceUnknown("the reference is neither a tag nor a digest")
            query = ManifestQuery(
                route.reference,
                accepted_media_types(headers.getall("Accept", [])),
                head,
                headers.get("If-None-Match"),
            )
            return await self.pull.manifest(target, query)
        if route.kind is Kind.BLOB:
            assert route.digest is not None
            blob_query = BlobQuery(
                route.digest, head, tuple(headers.getall("Range", [])), headers.get("If-None-Match")
            )
            return await self.pull.blob(target, blob_query)
        if route.kind is Kind.TAGS:
            # The pagination Link keeps the name as the client wrote it (registry prefix included).
            requested = str(target.requested)
            link_name = route.name if route.name.endswith(requested) else requested
            return await self.pull.tags_list(
                target, listing_params(request.query), link_name, request.query.get("ns")
            )
        assert route.digest is not None
        params = {k: v for k, v in request.query.items() if k == "artifactType"}
        return await self.pull.referrers(target, route.digest, params)


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def trusted_networks(specs: Sequence[str]) -> Networks:
    return tuple(ipaddress.ip_network(spec, strict=False) for spec in specs)


def client_address(peer: str, forwarded_for: str | None, trusted: Networks) -> str:
    """The client's address: the socket peer, unless that peer is a trusted proxy, in which case the
    nearest X-Forwarded-For entry that is not itself a trusted proxy. From anyone else the header is
    ignored, so a client cannot choose the address its failed logins are counted under."""
    if not forwarded_for or not _in(peer, trusted):
        return peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        try:
            address = str(ipaddress.ip_address(hop))
        except ValueError:
            return peer  # a malformed chain: believe only the socket
        if not _in(address, trusted):
            return address
    return peer


def _in(address: str, networks: Networks) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def listing_params(query: Mapping[str, str]) -> dict[str, str]:
    """The tags/list query, checked: `n` a non-negative integer (ASCII digits: `²` is a digit to
    str.isdigit, not to int), `last` a tag."""
    params: dict[str, str] = {}
    n = query.get("n")
    if n is not None:
        if not (n.isascii() and n.isdigit()) or len(n) > 6:
            raise errors.ParameterInvalid("n must be a non-negative integer")
        params["n"] = n
    last = query.get("last")
    if last is not None:
        try:
            params["last"] = str(Tag.parse(last))
        except errors.TagInvalid:
            raise errors.ParameterInvalid("last must be a tag") from None
    return params


_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")
_SCOPE_NAME = re.compile(r"[a-z0-9._\-]+(?::[0-9]{1,5})?(?:/[a-z0-9._\-]+)*", re.ASCII)


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def json_reply(status: int, document: object) -> Reply:
    return Reply(status, {"Content-Type": "application/json"}, BytesBody(json.dumps(document).encode()))


def error_reply(exc: errors.EdgecacheError) -> Reply:
    """An error in the registry's JSON format, with the headers its kind calls for."""
    headers = {**API_VERSION_HEADER, "Content-Type": "application/json"}
    if isinstance(exc, errors.RangeInvalid) and exc.size is not None:
        headers["Content-Range"] = f"bytes */{exc.size}"
    if isinstance(exc, errors.Unsupported):
        headers["Allow"] = "GET, HEAD"
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if isinstance(exc, errors.Unauthorized):
        headers["WWW-Authenticate"] = exc.challenge
    return Reply(exc.status, headers, BytesBody(json.dumps(exc.body()).encode()), exc.cache_result)

"""The plain-HTTP front on aiohttp's server: routes, validation, errors as OCI JSON, sending replies.

Thin on purpose: the pull service decides what to send; this module only parses the request and sends
the Reply. Blob hits go out with the kernel's sendfile; fill streams are written as they arrive and
aborted before their last byte if the fill fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_request import BaseRequest
from prometheus_client import CONTENT_TYPE_LATEST

from edgecache import errors
from edgecache.accesslog import FORMAT_KEY, METRICS_KEY, TRACE_KEY
from edgecache.metrics import Metrics
from edgecache.oci import REGISTRY_HOST, Digest, RepoName, Tag, accepted_media_types
from edgecache.pull import (
    BlobQuery,
    BytesBody,
    FileBody,
    ManifestQuery,
    PullService,
    Reply,
    SpoolBody,
)
from edgecache.routes import Kind, Route, parse_route
from edgecache.trace import CURRENT, RequestTrace, request_id
from edgecache.upstream import UpstreamClient
from edgecache.usage import Usage

log = logging.getLogger(__name__)
API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}
READ_METHODS = frozenset({"GET", "HEAD"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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

    def choose(self, request: web.Request, name: str) -> tuple[UpstreamClient, RepoName]:
        first, _, rest = name.partition("/")
        ns = request.query.get("ns")
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
        host = (request.host or "").lower()
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


Readiness = Callable[[], Awaitable[tuple[bool, dict[str, object]]]]


class RegistryFront:
    def __init__(
        self, pull: PullService, upstreams: Upstreams, metrics: Metrics, usage: Usage, readiness: Readiness
    ) -> None:
        self.pull = pull
        self._upstreams = upstreams
        self._metrics = metrics
        self._usage = usage
        self._readiness = readiness

    def build_app(self, *, admin: bool = True, log_format: str = "text") -> web.Application:
        """The registry API; with `admin`, /metrics and /stats too (else they have their own listener)."""
        app = self._new_app(log_format)
        if admin:
            self._add_admin_routes(app)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def build_admin_app(self, log_format: str = "text") -> web.Application:
        """The separate metrics listener: /metrics, /stats and the health checks only."""
        app = self._new_app(log_format)
        self._add_admin_routes(app)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    def _new_app(self, log_format: str) -> web.Application:
        app = web.Application(
            middlewares=[trace_middleware, error_middleware], handler_args={"max_field_size": 8190}
        )
        app[METRICS_KEY] = self._metrics
        app[FORMAT_KEY] = log_format
        app.on_response_prepare.append(_stamp_response)
        return app

    def _add_admin_routes(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/stats", self.stats)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        request[TRACE_KEY].route = "metrics"
        body = await asyncio.to_thread(self._metrics.render)  # a few ms of CPU: off the event loop
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stats(self, request: web.Request) -> web.StreamResponse:
        request[TRACE_KEY].route = "stats"
        top = [vars(entry) for entry in self._usage.top(20)]
        return web.json_response({"top_repositories": top})

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        """Alive: the process answers. Nothing else is checked."""
        request[TRACE_KEY].route = "health"
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        """Ready while the cache can be served (even with an upstream down); the body says more."""
        request[TRACE_KEY].route = "health"
        ready, detail = await self._readiness()
        return web.json_response({"ready": ready, **detail}, status=200 if ready else 503)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.raw_path.split("?", 1)[0]
        route = parse_route(raw_path)
        trace: RequestTrace = request[TRACE_KEY]
        trace.route = route.kind.value
        if request.method not in READ_METHODS:
            raise errors.Unsupported("this mirror is read-only: push and delete are not supported")
        if route.kind is Kind.UPLOAD:
            raise errors.Unsupported("this mirror is read-only: uploads are not supported")
        if route.kind is Kind.CATALOG:
            raise errors.Unsupported("the catalog is not served by this mirror")
        if route.kind is Kind.BASE:
            return web.Response(
                status=200, body=b"{}", content_type="application/json", headers=API_VERSION_HEADER
            )
        client, repo = self._upstreams.choose(request, route.name)
        trace.upstream = client.name
        reply = await self._dispatch(request, route, client, repo)
        response = await send_reply(request, reply, self._metrics)
        if request.method == "GET" and route.kind in (Kind.MANIFEST, Kind.BLOB):
            pull = route.kind is Kind.MANIFEST and not isinstance(route.reference, Digest)
            self._usage.record(
                client.name, str(client.upstream_name(repo)), pull=pull, bytes_served=trace.bytes_sent
            )
        return response

    async def _dispatch(
        self, request: web.Request, route: Route, client: UpstreamClient, repo: RepoName
    ) -> Reply:
        head = request.method == "HEAD"
        if route.kind is Kind.MANIFEST:
            assert route.reference is not None
            query = ManifestQuery(
                repo,
                route.reference,
                accepted_media_types(request.headers.getall("Accept", [])),
                head,
                request.headers.get("If-None-Match"),
            )
            return await self.pull.manifest(client, query)
        if route.kind is Kind.BLOB:
            assert route.digest is not None
            blob_query = BlobQuery(
                repo,
                route.digest,
                head,
                request.headers.get("Range"),
                request.headers.get("If-None-Match"),
            )
            return await self.pull.blob(client, blob_query)
        if route.kind is Kind.TAGS:
            # The pagination Link keeps the name as the client wrote it (registry prefix included).
            link_name = route.name if route.name.endswith(str(repo)) else str(repo)
            return await self.pull.tags_list(
                client, repo, _listing_params(request), link_name, request.query.get("ns")
            )
        assert route.digest is not None
        params = {k: v for k, v in request.query.items() if k == "artifactType"}
        return await self.pull.referrers(client, repo, route.digest, params)


def _listing_params(request: web.Request) -> dict[str, str]:
    params: dict[str, str] = {}
    n = request.query.get("n")
    if n is not None:
        if not n.isdigit() or len(n) > 6:
            raise errors.ParameterInvalid("n must be a non-negative integer")
        params["n"] = n
    last = request.query.get("last")
    if last is not None:
        try:
            params["last"] = str(Tag.parse(last))
        except errors.TagInvalid:
            raise errors.ParameterInvalid("last must be a tag") from None
    return params


async def send_reply(request: web.Request, reply: Reply, metrics: Metrics) -> web.StreamResponse:
    """Send a Reply: bytes, a file range with sendfile, or a fill's spool (aborted on failure)."""
    headers = {**API_VERSION_HEADER, **reply.headers, "X-Cache": reply.cache}
    trace: RequestTrace = request[TRACE_KEY]
    trace.cache = reply.cache
    body = reply.body
    if isinstance(body, BytesBody):
        headers.pop("Content-Length", None)
        metrics.served_bytes.labels("memory").inc(len(body.data))
        trace.bytes_sent = len(body.data)
        return web.Response(status=reply.status, body=body.data, headers=headers)
    response = web.StreamResponse(status=reply.status, headers=headers)
    try:
        await response.prepare(request)
        if isinstance(body, FileBody):
            await _sendfile(request, body)
            metrics.served_bytes.labels("disk").inc(body.length)
            trace.bytes_sent = body.length
        elif isinstance(body, SpoolBody):
            await _send_spool(request, body, metrics)
        await response.write_eof()
    except ConnectionError:
        pass  # the client went away, or we cut the connection on purpose: nothing more to send
    finally:
        reply.close()
    return response


async def _sendfile(request: web.Request, body: FileBody) -> None:
    # The kernel copies file → socket; no blob bytes pass through Python.
    await asyncio.get_running_loop().sendfile(_transport(request), body.blob.file, body.offset, body.length)


async def _send_spool(request: web.Request, body: SpoolBody, metrics: Metrics) -> None:
    """Send a fill's bytes with sendfile as they land in the spool, cutting the connection if it fails."""
    loop = asyncio.get_running_loop()
    served = metrics.served_bytes.labels("fill")
    metrics.fill_readers.inc()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(metrics.fill_readers.dec)
        spool = cleanup.enter_context(body.flight.open_file())
        try:
            async for offset, length in body.flight.segments(body.start, body.end):
                sent = await loop.sendfile(_transport(request), spool, offset, length)
                served.inc(sent)
                request[TRACE_KEY].bytes_sent += sent
                if sent != length:
                    raise errors.UpstreamUnavailable("spool shorter than its fill said")
        except errors.EdgecacheError as exc:
            # Headers are out; the only honest signal left is to cut the connection before the last
            # byte, so the client sees a short body and retries instead of keeping wrong bytes.
            log.warning("aborting response for %s: %s", request.path, exc.detail or exc.message)
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("fill failed; response aborted") from None


def _transport(request: web.Request) -> asyncio.Transport:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    return transport


@web.middleware
async def trace_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Start this request's trace; the access logger reads it when the response is done."""
    trace = RequestTrace(request_id(request.headers.get("X-Request-Id")))
    request[TRACE_KEY] = trace
    token = CURRENT.set(trace)
    try:
        return await handler(request)
    finally:
        CURRENT.reset(token)


async def _stamp_response(request: web.Request, response: web.StreamResponse) -> None:
    """Every response says which request it was and where its answer came from."""
    trace: RequestTrace | None = request.get(TRACE_KEY)
    if trace is not None:
        response.headers["X-Request-Id"] = trace.request_id
        response.headers.setdefault("X-Cache", trace.cache)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.EdgecacheError as exc:
        trace: RequestTrace | None = request.get(TRACE_KEY)
        if trace is not None:
            trace.cache = exc.cache_result
        return error_response(exc)
    except web.HTTPException as exc:
        # aiohttp's own refusals inside the app (e.g. CONNECT) in the registry's format.
        wrapped = errors.RouteUnknown() if exc.status == 404 else errors.BadRequest(exc.reason)
        if exc.status not in (404, 400):
            wrapped.status = exc.status
        return error_response(wrapped)


def error_response(exc: errors.EdgecacheError) -> web.Response:
    headers = dict(API_VERSION_HEADER)
    if isinstance(exc, errors.RangeInvalid) and exc.size is not None:
        headers["Content-Range"] = f"bytes */{exc.size}"
    if isinstance(exc, errors.Unsupported):
        headers["Allow"] = "GET, HEAD"
    if isinstance(exc, errors.UpstreamRateLimited) and exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return web.Response(
        status=exc.status,
        body=json.dumps(exc.body()).encode(),
        content_type="application/json",
        headers=headers,
    )


class OciRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, with its own refusals (a malformed request line, headers too
    large, a body that contradicts its framing) answered in the registry's JSON error format, without
    echoing the client's bytes and without a traceback in the log for what is only bad input."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        too_large = isinstance(exc, LineTooLong) or "Got more than" in str(message or "")
        error = errors.HeadersTooLarge() if too_large else errors.BadRequest()
        log.info("refused a malformed request from %s (%d)", request.remote, error.status)
        response = error_response(error)
        response.force_close()
        return response


class OciServer(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return OciRequestHandler(self, loop=self._loop, **self._kwargs)


class OciAppRunner(web.AppRunner):
    """An AppRunner whose connections use OciRequestHandler (aiohttp has no option for that)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = OciServer  # same state; only the per-connection handler class differs
        return server

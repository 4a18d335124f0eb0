"""The aiohttp front: plain HTTP/1.1 listeners (and the mutual-TLS HTTP/1.1 listener).

An adapter over front.RegistryFront, which decides what to answer: this module turns an aiohttp
request into a ClientRequest and sends the Reply. Blob hits go out with the kernel's sendfile (in
1 MiB writes on TLS); fill streams are sent as they land and cut before their last byte if the fill
fails. It also hardens aiohttp's connection handling: OCI JSON for malformed requests, a deadline for
request headers (408), a connection cap (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_request import BaseRequest

from edgecache import errors
from edgecache.http.accesslog import FORMAT_KEY, METRICS_KEY, TRACE_KEY
from edgecache.http.chunks import read_chunks
from edgecache.http.front import (
    API_VERSION_HEADER,
    ClientRequest,
    RegistryFront,
    client_address,
    error_reply,
    trusted_networks,
)
from edgecache.metrics import Metrics
from edgecache.pull import BytesBody, FileBody, Reply, SpoolBody
from edgecache.trace import CURRENT, RequestTrace, request_id

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TLS_CHUNK = 1024 * 1024


class AiohttpFront:
    """The registry front on aiohttp's server: plain HTTP, and mutual-TLS HTTP/1.1 listeners."""

    def __init__(self, front: RegistryFront, metrics: Metrics, trusted_proxies: Sequence[str] = ()) -> None:
        self._front = front
        self._metrics = metrics
        self._trusted = trusted_networks(trusted_proxies)

    def build_app(self, *, admin: bool = True, log_format: str = "text") -> web.Application:
        """The registry API; with `admin`, /metrics and /stats too (else they have their own listener)."""
        app = self._new_app(log_format)

        async def handle(request: web.Request) -> web.StreamResponse:
            reply = await self._front.respond(self._client_request(request), request[TRACE_KEY], admin=admin)
            return await send_reply(request, reply, self._metrics)

        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    def build_admin_app(self, log_format: str = "text") -> web.Application:
        """The separate metrics listener: /metrics, /stats and the health checks only."""
        app = self._new_app(log_format)

        async def handle(request: web.Request) -> web.StreamResponse:
            client_request = self._client_request(request)
            if client_request.raw_path not in ("/metrics", "/stats", "/healthz", "/readyz"):
                raise errors.RouteUnknown("this listener serves /metrics, /stats, /healthz and /readyz")
            reply = await self._front.operational(client_request, request[TRACE_KEY])
            return await send_reply(request, reply, self._metrics)

        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    def _new_app(self, log_format: str) -> web.Application:
        app = web.Application(
            middlewares=[trace_middleware, error_middleware], handler_args={"max_field_size": 8190}
        )
        app[METRICS_KEY] = self._metrics
        app[FORMAT_KEY] = log_format
        app.on_response_prepare.append(_stamp_response)
        return app

    def _client_request(self, request: web.Request) -> ClientRequest:
        peer = client_address(request.remote or "", request.headers.get("X-Forwarded-For"), self._trusted)
        request[TRACE_KEY].peer = peer
        return ClientRequest(
            method=request.method,
            raw_path=request.raw_path.split("?", 1)[0],
            query=request.query,
            headers=request.headers,
            host=request.host or "",
            peer=peer,
            cert_subject=_cert_subject(request),
        )


def _cert_subject(request: web.Request) -> str | None:
    """The verified client certificate's subject on a mutual-TLS listener, as `CN=...,O=...`."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return None
    parts = [
        f"{_SUBJECT_KEYS.get(key, key)}={value}" for rdn in cert.get("subject", ()) for key, value in rdn
    ]
    return ",".join(parts) or None


_SUBJECT_KEYS = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
}


async def send_reply(request: web.Request, reply: Reply, metrics: Metrics) -> web.StreamResponse:
    """Send a Reply: bytes, a file range with sendfile, or a fill's spool (aborted on failure).

    On a TLS connection the kernel cannot encrypt, so file bytes go out in large chunks read in a
    worker thread (asyncio's own sendfile fallback there is several times slower)."""
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
            await _send_file(request, response, body)
            metrics.served_bytes.labels("disk").inc(body.length)
            trace.bytes_sent = body.length
        elif isinstance(body, SpoolBody):
            await _send_spool(request, response, body, metrics)
        await response.write_eof()
    except ConnectionError:
        pass  # the client went away, or we cut the connection on purpose: nothing more to send
    finally:
        reply.close()
    return response


async def _send_file(request: web.Request, response: web.StreamResponse, body: FileBody) -> None:
    transport = _transport(request)
    if transport.get_extra_info("sslcontext") is None:
        # The kernel copies file → socket; no blob bytes pass through Python.
        await asyncio.get_running_loop().sendfile(transport, body.blob.file, body.offset, body.length)
        return
    async for chunk in read_chunks(body.blob.file.fileno(), body.offset, body.length):
        await response.write(chunk)


async def _send_spool(
    request: web.Request, response: web.StreamResponse, body: SpoolBody, metrics: Metrics
) -> None:
    """Send a fill's bytes as they land in the spool, cutting the connection if the fill fails."""
    loop = asyncio.get_running_loop()
    served = metrics.served_bytes.labels("fill")
    metrics.fill_readers.inc()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(metrics.fill_readers.dec)
        spool = cleanup.enter_context(body.flight.open_file())
        tls = _transport(request).get_extra_info("sslcontext") is not None
        try:
            async for offset, length in body.flight.segments(body.start, body.end):
                if tls:
                    sent = 0
                    async for chunk in read_chunks(spool.fileno(), offset, length):
                        await response.write(chunk)
                        sent += len(chunk)
                else:
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
    reply = error_reply(exc)
    assert isinstance(reply.body, BytesBody)
    return web.Response(status=reply.status, body=reply.body.data, headers=reply.headers)


class OciRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, hardened: its own refusals (a malformed request line, headers too
    large, a body that contradicts its framing) answered in the registry's JSON error format, without
    echoing the client's bytes or logging a traceback for what is only bad input; a connection cap;
    and a deadline for a request's headers (aiohttp has none), so slow-header clients cannot hold
    connections open."""

    def __init__(self, manager: OciServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = manager.limits
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if len(self._manager.connections) > self._limits.max_connections:  # type: ignore[union-attr]
            log.warning("connection cap (%d) reached: refusing a connection", self._limits.max_connections)
            self._refuse(transport, errors.TooManyConnections(retry_after=1))
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count > before:
            self._disarm_header_timer()  # a whole request head arrived
        elif data:
            self._arm_header_timer()  # part of a request head: it has header_timeout to complete

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            loop = asyncio.get_running_loop()
            self._header_timer = loop.call_later(self._limits.header_timeout, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport is not None and not self.transport.is_closing():
            log.info("closing a connection whose request headers did not arrive in time")
            self._refuse(self.transport, errors.RequestTimeout())

    def _refuse(self, transport: asyncio.BaseTransport, error: errors.EdgecacheError) -> None:
        """Answer outside any request (none was read) with a raw HTTP/1.1 error, then close."""
        reply = error_reply(error)
        assert isinstance(reply.body, BytesBody)
        head = [f"HTTP/1.1 {error.status} {error.code}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in reply.headers.items()]
        head.append(f"Content-Length: {len(reply.body.data)}")
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + reply.body.data)
        transport.close()

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
        text = f"{message or ''} {exc or ''}"
        too_large = isinstance(exc, LineTooLong) or "Got more than" in text or "Too many headers" in text
        error = errors.HeadersTooLarge() if too_large else errors.BadRequest()
        log.info("refused a malformed request from %s (%d)", request.remote, error.status)
        response = error_response(error)
        response.force_close()
        return response


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1024
    header_timeout: float = 10.0


class OciServer(web.Server):
    limits = ConnectionLimits()

    def __call__(self) -> web_protocol.RequestHandler:
        return OciRequestHandler(self, loop=self._loop, **self._kwargs)


class OciAppRunner(web.AppRunner):
    """An AppRunner whose connections use OciRequestHandler (aiohttp has no option for that)."""

    def __init__(
        self, app: web.Application, *, limits: ConnectionLimits | None = None, **kwargs: Any
    ) -> None:
        self._limits = limits or ConnectionLimits()
        # An idle keep-alive connection is closed (silently: an unsolicited 408 would confuse the
        # client) a little after header_timeout, so a silent new connection gets its 408 first.
        # aiohttp's default wait is an hour, which would let idle clients hold the connection cap.
        kwargs.setdefault("keepalive_timeout", self._limits.header_timeout * 1.5)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = OciServer  # same state; only the per-connection handler class differs
        assert isinstance(server, OciServer)
        server.limits = self._limits
        return server


class OciSite(web.TCPSite):
    """A TCP site with a TLS handshake deadline (aiohttp's TCPSite does not pass one on)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, reuse_address=True, backlog=1024)
        self._handshake_timeout = handshake_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._handshake_timeout if self._ssl_context else None,
            backlog=self._backlog,
            reuse_address=True,
        )

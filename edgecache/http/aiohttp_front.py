"""The aiohttp front: plain HTTP/1.1 listeners (and the mutual-TLS HTTP/1.1 listener).

An adapter over front.RegistryFront, which decides what to answer: this module turns an aiohttp
request into a ClientRequest and hands the Reply to send.send_reply over an AiohttpWire, whose file
bytes go out with the kernel's sendfile on plain connections (the TLS fallback is send's 1 MiB chunks
read off the loop). The hardened connection handling (OCI JSON for malformed requests, a header
deadline, a connection cap) lives in aiohttp_server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import IO

from aiohttp import web

from edgecache import errors
from edgecache.http.accesslog import AccessLog
from edgecache.http.front import (
    ADMIN_PATHS,
    ClientRequest,
    RegistryFront,
    client_address,
    error_reply,
    trusted_networks,
)
from edgecache.http.send import send_reply
from edgecache.metrics import Metrics
from edgecache.pull import Reply
from edgecache.trace import CURRENT, RequestTrace, request_id

log = logging.getLogger(__name__)
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Responder = Callable[[web.BaseRequest, RequestTrace], Awaitable[Reply]]
ADMIN_LISTENER_PATHS = ADMIN_PATHS | {"/healthz", "/readyz"}


class AiohttpFront:
    """The registry front on aiohttp's low-level server: plain HTTP, and mutual-TLS HTTP/1.1 listeners.

    A handler of aiohttp's `web.Server`, with no application, router or middleware between the
    connection and the front: each of those costs a coroutine layer or a lookup on every request,
    and the front routes, refuses and renders errors itself. Every request target reaches it, even
    one that is no path at all (CONNECT's `host:port`)."""

    def __init__(self, front: RegistryFront, metrics: Metrics, trusted_proxies: Sequence[str] = ()) -> None:
        self._front = front
        self._metrics = metrics
        self._trusted = trusted_networks(trusted_proxies)

    def handler(self, access_log: AccessLog, *, admin: bool = True) -> Handler:
        """The registry API; with `admin`, /metrics, /stats and the status page too (else they have
        their own listener)."""

        async def respond(request: web.BaseRequest, trace: RequestTrace) -> Reply:
            return await self._front.respond(self._client_request(request, trace), trace, admin=admin)

        return functools.partial(self._answer, respond=respond, access_log=access_log)

    def admin_handler(self, access_log: AccessLog) -> Handler:
        """The separate metrics listener: /metrics, /stats, the status page and the health checks only."""

        async def respond(request: web.BaseRequest, trace: RequestTrace) -> Reply:
            client_request = self._client_request(request, trace)
            if client_request.raw_path not in ADMIN_LISTENER_PATHS:
                raise errors.RouteUnknown("this listener serves /metrics, /stats, the status page and health")
            return await self._front.operational(client_request, trace)

        return functools.partial(self._answer, respond=respond, access_log=access_log)

    async def _answer(
        self, request: web.BaseRequest, *, respond: Responder, access_log: AccessLog
    ) -> web.StreamResponse:
        """Every request: its trace, the front's reply sent through the one send path, and every
        error answered in the registry's JSON format, so even a bug is an OCI 500 with a request id,
        never aiohttp's plain-text page; then the request counted and logged."""
        trace = RequestTrace(request_id(request.headers.get("X-Request-Id")))
        token = CURRENT.set(trace)
        status = 500
        try:
            try:
                reply = await respond(request, trace)
            except errors.EdgecacheError as exc:
                reply = error_reply(exc)
            except Exception:
                log.exception("unexpected error answering %s %s", request.method, request.path)
                reply = error_reply(errors.EdgecacheError("unexpected error"))
            status = reply.status
            wire = AiohttpWire(request)
            try:
                await send_reply(
                    reply, wire, trace, self._metrics, head=request.method == "HEAD", path=request.path
                )
            except Exception:
                log.exception("unexpected error sending %s %s", request.method, request.path)
                if request.writer.output_size > 0:
                    raise  # the response had started: aiohttp cuts the connection
                status = 500
                return await self._send_error(request, trace)
            return wire.response
        finally:
            CURRENT.reset(token)
            access_log.record(
                trace,
                request.method,
                request.raw_path.split("?", 1)[0],
                status,
                trace.bytes_sent,
                peer=trace.peer or request.remote or "",
                protocol=f"HTTP/{request.version.major}.{request.version.minor}",
            )

    async def _send_error(self, request: web.BaseRequest, trace: RequestTrace) -> web.StreamResponse:
        wire = AiohttpWire(request)
        error = error_reply(errors.EdgecacheError("unexpected error"))
        await send_reply(error, wire, trace, self._metrics, head=request.method == "HEAD", path=request.path)
        return wire.response

    def _client_request(self, request: web.BaseRequest, trace: RequestTrace) -> ClientRequest:
        peer = client_address(request.remote or "", request.headers.get("X-Forwarded-For"), self._trusted)
        trace.peer = peer
        return ClientRequest(
            method=request.method,
            raw_path=request.raw_path.split("?", 1)[0],
            query=request.query,
            headers=request.headers,
            host=request.host or "",
            peer=peer,
            cert_subject=_cert_subject(request),
            secure=request.secure,
        )


def _cert_subject(request: web.BaseRequest) -> str | None:
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


class AiohttpWire:
    """send.Wire over an aiohttp request. The head is held back until the body starts, so a reply
    from memory goes out with its head in one write; file bytes go by the kernel's sendfile except on
    TLS, where the kernel cannot encrypt (asyncio's own fallback there is several times slower than
    send's chunks read off the loop)."""

    def __init__(self, request: web.BaseRequest) -> None:
        self._request = request
        self._status = 500
        self._headers: dict[str, str] = {}
        self._response: web.StreamResponse | None = None

    @property
    def response(self) -> web.StreamResponse:
        """What the handler returns to aiohttp (already sent, unless the client left first)."""
        if self._response is None:
            self._response = web.StreamResponse(status=self._status, headers=self._headers)
        return self._response

    async def start(self, status: int, headers: dict[str, str]) -> None:
        self._status, self._headers = status, headers

    async def write(self, data: bytes) -> None:
        await (await self._streaming()).write(data)

    async def sendfile(self, file: IO[bytes], offset: int, length: int, *, whole_file: bool) -> int | None:
        if self._transport().get_extra_info("sslcontext") is not None:
            return None
        await self._streaming()  # the head goes first
        # The kernel copies file → socket; no blob bytes pass through Python.
        return await asyncio.get_running_loop().sendfile(self._transport(), file, offset, length)

    async def end(self, data: bytes = b"") -> None:
        if self._response is None:  # the whole body is `data`: aiohttp sends it with the head
            whole = web.Response(status=self._status, headers=self._headers, body=data or None)
            self._response = whole
            await whole.prepare(self._request)
            await whole.write_eof()
            return
        await (await self._streaming()).write_eof(data)

    def abort(self) -> None:
        if self._request.transport is not None:
            self._request.transport.abort()

    async def _streaming(self) -> web.StreamResponse:
        response = self.response
        if not response.prepared:
            await response.prepare(self._request)
        return response

    def _transport(self) -> asyncio.Transport:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        return transport

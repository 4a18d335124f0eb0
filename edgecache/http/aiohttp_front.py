"""The aiohttp front: plain HTTP/1.1 listeners (and the mutual-TLS HTTP/1.1 listener).

An adapter over front.RegistryFront, which decides what to answer: this module turns an aiohttp
request into a ClientRequest and hands the Reply to send.send_reply over an AiohttpWire, whose file
bytes go out with the kernel's sendfile on plain connections (the TLS fallback is send's 1 MiB chunks
read off the loop). The hardened connection handling (OCI JSON for malformed requests, a header
deadline, a connection cap) lives in aiohttp_server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import IO

from aiohttp import web

from edgecache import errors
from edgecache.http.accesslog import FORMAT_KEY, METRICS_KEY, TRACE_KEY
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
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Every path, to the front. aiohttp matches routes on the percent-decoded path and `.` stops at a
# decoded line feed (`%0a`), which would be its own 404 instead of the front's NAME_INVALID.
EVERY_PATH = r"/{tail:[\s\S]*}"
ADMIN_LISTENER_PATHS = ADMIN_PATHS | {"/healthz", "/readyz"}


class AiohttpFront:
    """The registry front on aiohttp's server: plain HTTP, and mutual-TLS HTTP/1.1 listeners."""

    def __init__(self, front: RegistryFront, metrics: Metrics, trusted_proxies: Sequence[str] = ()) -> None:
        self._front = front
        self._metrics = metrics
        self._trusted = trusted_networks(trusted_proxies)

    def build_app(self, *, admin: bool = True, log_format: str = "text") -> web.Application:
        """The registry API; with `admin`, /metrics, /stats and the status page too (else they have
        their own listener)."""
        app = self._new_app(log_format)

        async def handle(request: web.Request) -> web.StreamResponse:
            reply = await self._front.respond(self._client_request(request), request[TRACE_KEY], admin=admin)
            return await send(request, reply)

        app.router.add_route("*", EVERY_PATH, handle)
        return app

    def build_admin_app(self, log_format: str = "text") -> web.Application:
        """The separate metrics listener: /metrics, /stats, the status page and the health checks only."""
        app = self._new_app(log_format)

        async def handle(request: web.Request) -> web.StreamResponse:
            client_request = self._client_request(request)
            if client_request.raw_path not in ADMIN_LISTENER_PATHS:
                raise errors.RouteUnknown("this listener serves /metrics, /stats, the status page and health")
            reply = await self._front.operational(client_request, request[TRACE_KEY])
            return await send(request, reply)

        app.router.add_route("*", EVERY_PATH, handle)
        return app

    def _new_app(self, log_format: str) -> web.Application:
        app = web.Application(middlewares=[registry_middleware], handler_args={"max_field_size": 8190})
        app[METRICS_KEY] = self._metrics
        app[FORMAT_KEY] = log_format
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
            secure=request.secure,
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


async def send(request: web.Request, reply: Reply) -> web.StreamResponse:
    """Send a Reply on this request's connection through the one send path."""
    wire = AiohttpWire(request)
    metrics = request.app[METRICS_KEY]
    await send_reply(
        reply, wire, request[TRACE_KEY], metrics, head=request.method == "HEAD", path=request.path
    )
    return wire.response


class AiohttpWire:
    """send.Wire over an aiohttp request. The head is held back until the body starts, so a reply
    from memory goes out with its head in one write; file bytes go by the kernel's sendfile except on
    TLS, where the kernel cannot encrypt (asyncio's own fallback there is several times slower than
    send's chunks read off the loop)."""

    def __init__(self, request: web.Request) -> None:
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


@web.middleware
async def registry_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request: start its trace (the access logger reads it when the response is done), and
    answer every error in the registry's JSON format through the one send path, so even a bug is an
    OCI 500 with a request id, never aiohttp's plain-text page. One middleware, not two: each costs a
    coroutine layer on every request."""
    trace = RequestTrace(request_id(request.headers.get("X-Request-Id")))
    request[TRACE_KEY] = trace
    token = CURRENT.set(trace)
    try:
        return await handler(request)
    except errors.EdgecacheError as exc:
        return await send(request, error_reply(exc))
    except web.HTTPException as exc:
        # aiohttp's own refusals inside the app (e.g. CONNECT) in the registry's format.
        return await send(request, error_reply(refusal(exc.status, exc.reason)))
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        if request.writer is not None and request.writer.output_size > 0:
            raise  # the response had started: aiohttp cuts the connection
        return await send(request, error_reply(errors.EdgecacheError("unexpected error")))
    finally:
        CURRENT.reset(token)


class HttpRefusal(errors.BadRequest):
    """A refusal of aiohttp's inside the app with a status of its own (405, 413, ...)."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(detail)
        self.status = status


def refusal(status: int, reason: str) -> errors.EdgecacheError:
    """aiohttp's HTTPException as one of our errors: 404 an unknown route, else a bad request."""
    if status == 404:
        return errors.RouteUnknown()
    return errors.BadRequest(reason) if status == 400 else HttpRefusal(status, reason)

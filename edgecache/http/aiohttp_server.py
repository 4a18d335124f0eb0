"""The aiohttp internals we subclass, in one place: aiohttp offers no option for any of this.

aiohttp's connection handler hardened: its own refusals (a malformed request line, headers too large,
a body that contradicts its framing) in the registry's JSON error format, a connection cap (503) and a
deadline for request headers (408); and a TCP site with a TLS handshake deadline. These use private
parts of aiohttp (RequestHandler's `_manager` and `_request_count`, `handle_error`'s signature,
Server's `_loop` and `_kwargs`); tests/test_send_path.py checks they are
still there, so an aiohttp upgrade that changes them fails loudly in CI, not in production.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_request import BaseRequest

from edgecache import errors
from edgecache.http.front import error_reply
from edgecache.pull import BytesBody

log = logging.getLogger(__name__)


def error_response(exc: errors.EdgecacheError) -> web.Response:
    """An error answered outside the app (no request trace, no send path): the registry's JSON."""
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


MAX_FIELD_SIZE = 8190  # bytes of one request header line (a longer one is a 431)


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1024
    header_timeout: float = 10.0


class OciServer(web.Server):
    limits = ConnectionLimits()

    def __call__(self) -> web_protocol.RequestHandler:
        return OciRequestHandler(self, loop=self._loop, **self._kwargs)


class OciServerRunner(web.ServerRunner):
    """A runner of aiohttp's low-level server (a handler, no application) whose connections use
    OciRequestHandler, with the connection limits and a bounded keep-alive."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        limits: ConnectionLimits | None = None,
        shutdown_timeout: float = 10.0,
    ) -> None:
        limits = limits or ConnectionLimits()
        server = OciServer(
            handler,
            # Our handler logs and counts each request itself (AccessLog.record).
            access_log=None,
            max_field_size=MAX_FIELD_SIZE,
            # An idle keep-alive connection is closed (silently: an unsolicited 408 would confuse
            # the client) a little after header_timeout, so a silent new connection gets its 408
            # first. aiohttp's default wait is an hour, which would let idle clients hold the cap.
            keepalive_timeout=limits.header_timeout * 1.5,
        )
        server.limits = limits
        super().__init__(server, shutdown_timeout=shutdown_timeout)


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

"""The TLS listener: granian (Rust HTTP/1.1 + HTTP/2 over rustls) embedded in our event loop, calling
the registry front through ASGI.

ASGI rather than granian's faster RSGI because RSGI hands the app only a percent-decoded path, and
validation must see the path as sent (`%2F` is not `/`); the app's own work dominates either way.
Replies are sent by send.send_reply over an AsgiWire: whole blobs go out with
`http.response.pathsend` (granian reads the file in Rust); ranges and fills in progress in 1 MiB
chunks read off the loop, so memory per stream stays bounded by HTTP/2 flow control and granian's
send buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl

from granian.constants import HTTPModes, Interfaces, SSLProtocols
from granian.http import HTTP1Settings, HTTP2Settings
from granian.log import LogLevels
from granian.server.embed import Server
from multidict import CIMultiDict

from edgecache import errors
from edgecache.config import ServerConfig
from edgecache.http.accesslog import AccessLog
from edgecache.http.front import (
    ClientRequest,
    Networks,
    RegistryFront,
    client_address,
    error_reply,
)
from edgecache.http.send import send_reply
from edgecache.metrics import Metrics
from edgecache.trace import CURRENT, RequestTrace, request_id

log = logging.getLogger(__name__)
Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
MAX_HEADER_BYTES = 16 * 1024
MAX_STREAMS = 128


class ResponseAborted(Exception):
    """Raised into granian to cut a response before its last byte (a fill failed)."""


class ClientGone(ConnectionError):
    """The client closed the stream or connection: stop reading and sending its body."""


class AsgiWire:
    """send.Wire over ASGI. Whole blobs go out with `http.response.pathsend` (granian reads the file
    in Rust); other file bytes are written in chunks. Chunked writes notice when the client leaves:
    granian then reports `http.disconnect` on receive() but accepts (and drops) further sends, so
    without this a departed client's whole blob would still be read from disk and handed over."""

    def __init__(self, send: Send, receive: Receive) -> None:
        self._send = send
        self._receive = receive
        self._gone: asyncio.Task[None] | None = None
        self._ended = False

    async def start(self, status: int, headers: dict[str, str]) -> None:
        await self._send({"type": "http.response.start", "status": status, "headers": _encode(headers)})

    async def write(self, data: bytes) -> None:
        if self._gone is None:  # watched only for chunked bodies: bytes and pathsend need no task
            self._gone = asyncio.create_task(self._wait_for_disconnect())
        elif self._gone.done():
            raise ClientGone()
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def sendfile(self, file: IO[bytes], offset: int, length: int, *, whole_file: bool) -> int | None:
        if not (whole_file and isinstance(file.name, str)):
            return None
        # granian opens the path and sends it from Rust; the blob is immutable and held open
        # (protected from eviction) by the reply until send_reply returns.
        await self._send({"type": "http.response.pathsend", "path": file.name})
        self._ended = True
        return length

    async def end(self, data: bytes = b"") -> None:
        if not self._ended:
            self._ended = True
            await self._send({"type": "http.response.body", "body": data})

    def abort(self) -> None:
        raise ResponseAborted("fill failed; response aborted")

    def close(self) -> None:
        """Stop watching for the client's departure (the response is over)."""
        if self._gone is not None:
            self._gone.cancel()

    async def _wait_for_disconnect(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass  # the request (GET/HEAD: empty), then nothing until the client leaves


class AsgiFront:
    def __init__(
        self, front: RegistryFront, metrics: Metrics, trusted: Networks, access_log: AccessLog, admin: bool
    ) -> None:
        self._front = front
        self._metrics = metrics
        self._trusted = trusted
        self._access_log = access_log
        self._admin = admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"])
        trace = RequestTrace(request_id(headers.get("X-Request-Id")))
        token = CURRENT.set(trace)
        status = 500
        raw_path = scope.get("raw_path") or b""
        method = scope.get("method", "")
        wire = AsgiWire(send, receive)
        try:
            try:
                request = self._client_request(scope, headers, trace)
                reply = await self._front.respond(request, trace, admin=self._admin)
            except errors.EdgecacheError as exc:
                reply = error_reply(exc)
            except Exception:  # a bug: still an OCI 500 with a request id, never granian's own page
                log.exception("unexpected error answering %s %s", method, scope.get("path", ""))
                reply = error_reply(errors.EdgecacheError("unexpected error"))
            status = reply.status
            await send_reply(
                reply, wire, trace, self._metrics, head=method == "HEAD", path=scope.get("path", "")
            )
        finally:
            wire.close()
            CURRENT.reset(token)
            self._access_log.record(
                trace,
                method,
                raw_path.decode("latin-1"),
                status,
                trace.bytes_sent,
                peer=trace.peer or _peer(scope),
                protocol=f"HTTP/{scope.get('http_version', '1.1')}",
            )

    def _client_request(self, scope: Scope, headers: CIMultiDict[str], trace: RequestTrace) -> ClientRequest:
        try:
            raw_path = bytes(scope["raw_path"]).decode("ascii")
            query_string = bytes(scope["query_string"]).decode("ascii")
        except (KeyError, UnicodeDecodeError):
            raise errors.BadRequest("request target must be ASCII") from None
        query: dict[str, str] = {}
        for key, value in parse_qsl(query_string, keep_blank_values=True):
            if key == "scope" and key in query:  # /token may be asked several scopes: keep them all
                query[key] += " " + value
            query.setdefault(key, value)
        peer = client_address(_peer(scope), headers.get("X-Forwarded-For"), self._trusted)
        trace.peer = peer
        host = headers.get("Host") or ""
        secure = scope.get("scheme") == "https"
        return ClientRequest(scope["method"], raw_path, query, headers, host, peer, secure=secure)


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


def _encode(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


class _QuietGranian(logging.Filter):
    """Drop granian's notes that are not news to an operator: its 'experimental' banner, the
    traceback it prints when we cut a failed fill's response on purpose (already logged by us), and
    its note for every send after a client left (AsgiWire stops sending then)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ResponseAborted):
            return False
        message = record.getMessage()
        return "experimental" not in message and "ASGI transport error" not in message


class _GranianToEdgecache(logging.Handler):
    """granian's records (from `_granian` and its children, such as `_granian.asgi.io`) handed to
    edgecache's own handlers after `_QuietGranian`. A filter on the `_granian` logger would not do:
    logging applies a logger's filters only to records logged on that very logger, not to those
    that propagate up from its children; a handler's filters see them all."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(_QuietGranian())

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


_GRANIAN_LEVELS = {
    logging.DEBUG: LogLevels.debug,
    logging.INFO: LogLevels.info,
    logging.WARNING: LogLevels.warning,
    logging.ERROR: LogLevels.error,
    logging.CRITICAL: LogLevels.critical,
}


class TlsListener:
    """One embedded granian server on HOST:PORT, TLS with ALPN h2 and http/1.1."""

    def __init__(self, app: AsgiFront, host: str, port: int, server: ServerConfig) -> None:
        self._where = f"{host}:{port}"
        self._server = Server(
            app,
            address=host,
            port=port,
            interface=Interfaces.ASGINL,
            http=HTTPModes.auto,
            websockets=False,
            backlog=1024,
            # granian accepts no more connections than this (it waits with the rest in the kernel's
            # backlog); twice the cap, so that the guard (connguard) sees a flood and closes the
            # connections idle the longest, instead of silent ones locking everyone out.
            backpressure=server.max_connections * 2,
            http1_settings=HTTP1Settings(
                header_read_timeout=int(server.header_timeout * 1000),
                keep_alive=True,
                max_buffer_size=MAX_HEADER_BYTES + 4096,
            ),
            http2_settings=HTTP2Settings(
                max_concurrent_streams=MAX_STREAMS,
                max_headers_size=MAX_HEADER_BYTES,
                initial_stream_window_size=1024 * 1024,
                initial_connection_window_size=4 * 1024 * 1024,
                max_send_buffer_size=1024 * 1024,
                keep_alive_interval=int(server.header_timeout * 1000),
                keep_alive_timeout=int(server.header_timeout),
            ),
            # granian's records go to edgecache's handlers, filtered, at edgecache's level
            # (--log-level); granian applies this configuration itself, so the handler is named here.
            log_level=_GRANIAN_LEVELS.get(logging.getLogger().getEffectiveLevel(), LogLevels.info),
            log_dictconfig={
                "version": 1,
                "disable_existing_loggers": False,
                "handlers": {"edgecache": {"()": _GranianToEdgecache}},
                "formatters": {},
                "loggers": {"_granian": {"propagate": False, "handlers": ["edgecache"]}},
            },
            ssl_cert=Path(server.tls_cert),
            ssl_key=Path(server.tls_key),
            ssl_protocol_min=SSLProtocols.tls12,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        for _ in range(3):  # granian binds in its first steps; a failure ends the task at once
            await asyncio.sleep(0)
        if self._task.done():
            failure = self._task.exception()  # granian raises a Rust panic (a BaseException)
            reason = str(failure).strip().splitlines()[0] if str(failure).strip() else repr(failure)
            raise OSError(f"cannot listen on {self._where}: {reason}")

    def reload(self) -> None:
        """Start a new worker that reads the certificate and key files again, then stop the old one
        gracefully: new connections get the new certificate, connections in flight finish."""
        self._server.reload()  # type: ignore[no-untyped-call]

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; responses in flight get `grace` seconds (as on the aiohttp listeners),
        then the worker is cancelled."""
        if self._task is None or self._task.done():
            return
        self._server.stop()  # type: ignore[no-untyped-call]
        with contextlib.suppress(Exception):  # TimeoutError: the worker was cancelled
            await asyncio.wait_for(self._task, grace)

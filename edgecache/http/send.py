"""The one send path: a Reply turned into a response on the wire, the same way on every listener.

The final header set (Content-Length decided here once, for GET and HEAD alike), the body from memory,
disk or a fill's spool, the bytes-served accounting, cutting a response before its last byte when its
fill fails, and releasing the reply all happen here. An adapter (aiohttp, granian) supplies only a
`Wire`: how to start a response, write bytes, hand a file range to the kernel (or decline), end and
abort. Framework-free: this module imports neither aiohttp's server nor granian.
"""

from __future__ import annotations

import contextlib
import logging
from typing import IO, Protocol

from prometheus_client import Counter

from edgecache import errors
from edgecache.fill.window import Cursor
from edgecache.http.chunks import read_chunks
from edgecache.http.front import API_VERSION_HEADER
from edgecache.metrics import Metrics
from edgecache.pull import BytesBody, FileBody, Reply, SpoolBody
from edgecache.trace import RequestTrace

log = logging.getLogger(__name__)
# Statuses whose responses never have a body, nor a Content-Length (aiohttp strips it; so do we,
# so that every listener answers alike).
NO_BODY_STATUSES = frozenset({204, 304, *range(100, 200)})
# The operators' own endpoints and /token send no content: their bodies are not "bytes served" (else every
# scrape, and every refresh of the status page, would count as traffic the cache saved).
OPERATIONAL_ROUTES = frozenset({"metrics", "stats", "status", "health", "token"})


class Wire(Protocol):
    """One response of one listener: what an adapter supplies to `send_reply`.

    Raising ConnectionError from any method means the client went away: nothing more is sent."""

    async def start(self, status: int, headers: dict[str, str]) -> None:
        """Begin the response (an adapter may hold the head back to send it with the first bytes)."""

    async def write(self, data: bytes) -> None:
        """Send body bytes; more follow."""

    async def sendfile(self, file: IO[bytes], offset: int, length: int, *, whole_file: bool) -> int | None:
        """Send [offset, offset+length) of `file` without passing it through Python, returning the bytes
        sent; or None, sending nothing, when this transport cannot (TLS: the caller reads chunks).
        `whole_file` says the span is a whole stored blob and the entire body, so an adapter may send
        the file by its path and end the response with it."""

    async def end(self, data: bytes = b"") -> None:
        """Send the last body bytes (if any) and finish the response; once only, a no-op after a
        `sendfile` that ended it."""

    def abort(self) -> None:
        """Cut the response before its last byte, so the client sees a short body and retries. May
        raise, when that is how its server must be told (granian)."""


async def send_reply(
    reply: Reply, wire: Wire, trace: RequestTrace, metrics: Metrics, *, head: bool, path: str
) -> None:
    """Send `reply` on `wire` and release it, whatever happens. `head` sends the headers a GET would
    have and no body; `path` names the request in the log line of a cut response."""
    trace.cache = reply.cache
    cut: str | None = None
    try:
        await wire.start(reply.status, response_headers(reply, trace, head=head))
        body = reply.body
        if head or body is None or reply.status in NO_BODY_STATUSES:
            await wire.end()
        elif isinstance(body, BytesBody):
            await wire.end(body.data)
            if trace.route in OPERATIONAL_ROUTES:
                trace.bytes_sent += len(body.data)
            else:
                _count(metrics.served["memory"], trace, len(body.data))
        else:
            try:
                if isinstance(body, FileBody):
                    await _send_file(wire, body, metrics, trace)
                else:
                    await _send_spool(wire, body, metrics, trace)
            except errors.EdgecacheError as exc:
                cut = exc.detail or exc.message
    except ConnectionError:
        pass  # the client went away, or the adapter cut the connection: nothing more to send
    finally:
        reply.close()
    if cut is not None:
        # Headers are out; the only honest signal left is to cut the response before the last byte,
        # so the client sees a short body and retries instead of keeping wrong bytes.
        log.warning("aborting response for %s: %s", path, cut)
        wire.abort()


def response_headers(reply: Reply, trace: RequestTrace, *, head: bool) -> dict[str, str]:
    """The headers sent: the reply's, the API version, X-Cache, X-Request-Id and Content-Length."""
    headers = {**API_VERSION_HEADER, **reply.headers}
    for name in [name for name in reply.headers if name.lower() == "content-length"]:
        del headers[name]  # decided below, from the body
    headers["X-Cache"] = str(reply.cache)
    headers["X-Request-Id"] = trace.request_id
    length = content_length(reply, head=head)
    if length is not None:
        headers["Content-Length"] = str(length)
    return headers


def content_length(reply: Reply, *, head: bool) -> int | None:
    """The body's length (a HEAD's: the length a GET would send), or None where none is sent: no-body
    statuses, a fill whose upstream announced no length (sent chunked), a HEAD of unknown size."""
    body = reply.body
    if reply.status in NO_BODY_STATUSES:
        return None
    if isinstance(body, BytesBody):
        return len(body.data)
    if isinstance(body, FileBody | SpoolBody):
        return body.length
    declared = reply.headers.get("Content-Length", "")
    if declared.isdigit():
        return int(declared)  # a HEAD answered without a body: the size its GET would send
    return None if head else 0


async def _send_file(wire: Wire, body: FileBody, metrics: Metrics, trace: RequestTrace) -> None:
    """A verified blob, or a range of it, from disk."""
    served = metrics.served["disk"]
    whole = body.offset == 0 and body.length == body.blob.size
    sent = await _send_span(wire, body.blob.file, body.offset, body.length, served, trace, whole_file=whole)
    if sent != body.length:
        raise errors.EdgecacheError("blob file shorter than its size")
    await wire.end()


async def _send_spool(wire: Wire, body: SpoolBody, metrics: Metrics, trace: RequestTrace) -> None:
    """A fill's bytes as they land in its spool (or its window, passed through); raises the fill's
    error if it fails."""
    served = metrics.served["fill"]
    metrics.fill_readers.inc()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(metrics.fill_readers.dec)
        if body.cursor is not None:
            await _send_window(wire, body, body.cursor, served, trace)
        else:
            spool = cleanup.enter_context(body.flight.open_file())
            async for offset, length in body.flight.segments(body.start, body.end):
                sent = await _send_span(wire, spool, offset, length, served, trace, whole_file=False)
                if sent != length:
                    raise errors.UpstreamUnavailable("spool shorter than its fill said")
    await wire.end()


async def _send_window(
    wire: Wire, body: SpoolBody, cursor: Cursor, served: Counter, trace: RequestTrace
) -> None:
    """A pass-through fill's bytes from its memory window, a chunk at a time: each sent chunk lets
    the fill reuse that room (the window keeps only what its slowest reader still needs)."""
    async for offset, length in body.flight.segments(body.start, body.end):
        end = offset + length
        while offset < end:
            chunk = cursor.read(offset, end - offset)
            await wire.write(chunk)
            offset += len(chunk)
            cursor.advance(offset)
            _count(served, trace, len(chunk))


async def _send_span(
    wire: Wire,
    file: IO[bytes],
    offset: int,
    length: int,
    served: Counter,
    trace: RequestTrace,
    *,
    whole_file: bool,
) -> int:
    """Bytes [offset, offset+length) of `file`: by the kernel where the wire can, else in 1 MiB
    chunks read off the event loop. Returns the bytes sent (fewer only if the file is short)."""
    sent = await wire.sendfile(file, offset, length, whole_file=whole_file)
    if sent is not None:
        _count(served, trace, sent)
        return sent
    sent = 0
    async for chunk in read_chunks(file.fileno(), offset, length):
        await wire.write(chunk)
        sent += len(chunk)
        _count(served, trace, len(chunk))
    return sent


def _count(served: Counter, trace: RequestTrace, sent: int) -> None:
    served.inc(sent)
    trace.bytes_sent += sent

"""Blob bodies over blocking sockets, read in a worker thread (stdlib http.client).

Why not aiohttp for these: on the event loop every upstream byte costs a receive, a buffer and a
task wake-up (and on TLS the decryption), which made the loop the bottleneck of a cold fill. Here the
fill's worker thread receives (and decrypts) straight into a reused buffer, hashes and writes it,
all with the GIL released; the loop only hears "another MiB has landed". The request itself (auth,
redirects, status mapping, health, metrics) stays with UpstreamClient, which drives this transport
exactly as it drives aiohttp: `open_answer` returns an `Answer` with a status and headers, and the
body is read with `read_some` (one receive at a time, so a trickle is noticed).

Connections are kept alive in a small pool per origin when a body was read to its end, so a run of
small blobs does not pay a handshake each. Each upstream has threads of its own (bounded by
UpstreamClient's max_connections slots), so a black-holed upstream can never take the threads the
rest of edgecache uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from multidict import CIMultiDict
from yarl import URL

from edgecache import errors
from edgecache.upstream.pace import BodyPace, Deadlines

log = logging.getLogger(__name__)
POOL_PER_ORIGIN = 8
# Threads are started only as reads need them; UpstreamClient's slots (max_connections) bound how many
# run at once, so this is only a ceiling that a reload raising max_connections never meets.
MAX_THREADS = 512
BLOCK = 1 << 20  # the most a fill's readers are told about at once: a MiB (fast bodies) ...
FLUSH_INTERVAL = 0.1  # ... or what arrived in a tenth of a second (slow ones)
Origin = tuple[str, str, int]


class Answer:
    """One upstream answer whose body is read with blocking calls, from a worker thread."""

    def __init__(
        self,
        pool: ConnectionPool,
        origin: Origin,
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        deadlines: Deadlines,
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._conn: http.client.HTTPConnection | None = conn
        self._resp = resp
        self._deadlines = deadlines
        self.status = resp.status
        self.headers: CIMultiDict[str] = CIMultiDict(resp.getheaders())
        length = self.headers.get("Content-Length", "")
        self.content_length = int(length) if length.isdigit() else None
        self._finished = False

    @property
    def length(self) -> int | None:
        return self.content_length

    def read_some(self, buffer: memoryview) -> int:
        """Read what has arrived into `buffer`, at most one receive (blocking); 0 at the body's end.

        One receive, not a full buffer: a trickling body must come back to the pace check after every
        read, and a slow one must reach readers as it arrives. A body that breaks off (reset, silent
        past the stall deadline, closed early) raises UpstreamInterrupted: a fill resumes it."""
        try:
            n = self._receive(buffer)
        except TimeoutError:
            raise errors.UpstreamStalled("upstream body went silent") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # ValueError: the connection was closed under us by `abort`
            raise errors.UpstreamInterrupted(f"upstream body interrupted ({type(exc).__name__})") from None
        if n == 0:
            self._finished = True
        return n

    def _receive(self, buffer: memoryview) -> int:
        resp = self._resp
        if resp.chunked or resp.length is None or resp.fp is None:
            data = resp.read1(len(buffer))  # rare for blobs: chunked or delimited by the close
            buffer[: len(data)] = data
            return len(data)
        if resp.length == 0:
            resp.read()  # marks the response complete, so the connection can be kept
            return 0
        # The body straight into the caller's buffer, one receive, no copy (http.client's own
        # readinto would loop until the buffer is full, however slowly the bytes come).
        n = resp.fp.readinto1(buffer[: min(len(buffer), resp.length)])
        if n == 0:
            raise errors.UpstreamInterrupted("upstream body ended early")
        resp.length -= n
        return n

    async def drain(self, consume: Callable[[memoryview], None]) -> None:
        """Read the body to its end on this upstream's threads, calling consume(block) there for
        each block read (the block's memory is reused: consume must be done with it when it returns).
        A block is handed on when full or FLUSH_INTERVAL after the last one, so slow bodies reach
        readers as they come. What was read before the body broke off is handed on before the
        error, so a resume continues after it. Cancelling the await stops the reading: the thread is
        told, the socket shut, and the thread awaited, so nothing is written after this returns."""
        stop = threading.Event()
        deadlines = self._deadlines

        def run() -> None:
            buffer = memoryview(bytearray(BLOCK))
            pace = BodyPace(deadlines)
            filled = 0
            flushed_at = time.monotonic()
            while not stop.is_set():
                try:
                    n = self.read_some(buffer[filled:])
                    filled += n
                    pace.note(n)
                except errors.UpstreamInterrupted:
                    if filled and not stop.is_set():
                        consume(buffer[:filled])
                    raise
                if n == 0:
                    break
                now = time.monotonic()
                if filled == BLOCK or now - flushed_at >= FLUSH_INTERVAL:
                    consume(buffer[:filled])
                    filled, flushed_at = 0, time.monotonic()
                    pace.exclude(flushed_at - now)  # a pass-through fill may wait for its readers
            if filled and not stop.is_set():
                consume(buffer[:filled])

        future = asyncio.get_running_loop().run_in_executor(self._pool.executor, run)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            self.abort()
            with contextlib.suppress(Exception):
                await future
            raise

    def abort(self) -> None:
        """Make a blocked read return now (from any thread): the fill is being cancelled."""
        conn = self._conn
        if conn is not None:
            _shut(conn)

    def release(self) -> None:
        """Done with the answer: a body read to its end keeps its connection for the next request."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._finished and not self._resp.will_close:
            self._pool.put(self._origin, conn)
        else:
            conn.close()


class ConnectionPool:
    """Blocking connections to one upstream's origins (the registry, a CDN it redirects to)."""

    def __init__(self, name: str, ssl_context: ssl.SSLContext, deadlines: Deadlines) -> None:
        self.executor = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix=f"upstream-{name}")
        self._ssl = ssl_context
        self.deadlines = deadlines
        self._idle: dict[Origin, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def reconfigure(self, deadlines: Deadlines) -> None:
        """Reloaded deadlines apply to the next request; idle connections are closed."""
        self.deadlines = deadlines
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def put(self, origin: Origin, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < POOL_PER_ORIGIN:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close idle connections; reads still running end with their fills (shut down without waiting)."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
        self.executor.shutdown(wait=False)

    async def open(self, method: str, url: URL, headers: Mapping[str, str]) -> Answer:
        """`open_answer` on this upstream's threads, within the connect and header deadlines.

        The socket's own timeouts bound each wait; this bounds the whole, so response headers that
        trickle in a byte at a time cannot hold the request either. Raises TimeoutError then."""
        deadlines = self.deadlines
        attempt = _Attempt()
        future = asyncio.get_running_loop().run_in_executor(
            self.executor, self.open_answer, method, url, headers, deadlines, attempt
        )
        try:
            done, _ = await asyncio.wait([future], timeout=deadlines.connect + deadlines.headers)
        except asyncio.CancelledError:
            future.add_done_callback(_release_unwanted)  # the request was sent: free its connection
            raise
        if not done:
            attempt.abort()
            future.add_done_callback(_release_unwanted)
            raise TimeoutError("no response headers within the deadline")
        return future.result()

    def open_answer(
        self,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        deadlines: Deadlines,
        attempt: _Attempt | None = None,
    ) -> Answer:
        """Send one request and read the answer's status and headers (blocking: a worker thread).

        Raises TimeoutError, OSError or http.client.HTTPException as the network fails, like the
        aiohttp path raises its own; UpstreamClient maps both."""
        attempt = attempt or _Attempt()
        scheme, host, port = (
            url.scheme,
            url.raw_host or "",
            url.port or (443 if url.scheme == "https" else 80),
        )
        origin = (scheme, host, port)
        target = url.raw_path_qs
        reused = self._take(origin)
        if reused is not None:
            try:
                return self._exchange(origin, reused, method, target, headers, deadlines, attempt)
            except (OSError, http.client.HTTPException):
                reused.close()  # the server closed the idle connection: try a fresh one
                if attempt.aborted:
                    raise TimeoutError("no response headers within the deadline") from None
        conn = self._connect(scheme, host, port, deadlines.connect)
        try:
            return self._exchange(origin, conn, method, target, headers, deadlines, attempt)
        except BaseException:
            conn.close()
            raise

    def _take(self, origin: Origin) -> http.client.HTTPConnection | None:
        with self._lock:
            idle = self._idle.get(origin)
            return idle.pop() if idle else None

    def _connect(self, scheme: str, host: str, port: int, timeout: float) -> http.client.HTTPConnection:
        if scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=self._ssl
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.connect()
        return conn

    def _exchange(
        self,
        origin: Origin,
        conn: http.client.HTTPConnection,
        method: str,
        target: str,
        headers: Mapping[str, str],
        deadlines: Deadlines,
        attempt: _Attempt,
    ) -> Answer:
        assert conn.sock is not None
        attempt.using(conn)
        conn.sock.settimeout(deadlines.headers)
        conn.request(method, target, headers=dict(headers))
        resp = conn.getresponse()
        conn.sock.settimeout(deadlines.stall)  # a body silent this long raises instead of hanging
        return Answer(self, origin, conn, resp, deadlines)


class _Attempt:
    """The connection a request is using, so the loop can cut it off when a deadline passes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self.aborted = False

    def using(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._conn = conn
            aborted = self.aborted
        if aborted:
            _shut(conn)

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            conn = self._conn
        if conn is not None:
            _shut(conn)


def _shut(conn: http.client.HTTPConnection) -> None:
    """Make a blocked read or write on the connection return now, from any thread."""
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _release_unwanted(future: asyncio.Future[Answer]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().release()
    # an exception (the connection cut off by the deadline) is retrieved here, and dropped

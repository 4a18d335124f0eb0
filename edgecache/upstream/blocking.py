"""Blob bodies over blocking sockets, read in a worker thread (stdlib http.client).

Why not aiohttp for these: on the event loop every upstream byte costs a receive, a buffer and a
task wake-up (and on TLS the decryption), which made the loop the bottleneck of a cold fill. Here the
fill's worker thread receives (and decrypts) straight into a reused buffer, hashes and writes it,
all with the GIL released; the loop only hears "another MiB has landed". The request itself (auth,
redirects, status mapping, health, metrics) stays with UpstreamClient, which drives this transport
exactly as it drives aiohttp: `open_answer` returns an `Answer` with a status and headers, and the
body is read with `readinto`.

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
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from multidict import CIMultiDict
from yarl import URL

from edgecache import errors

log = logging.getLogger(__name__)
POOL_PER_ORIGIN = 8
# Threads are started only as reads need them; UpstreamClient's slots (max_connections) bound how many
# run at once, so this is only a ceiling that a reload raising max_connections never meets.
MAX_THREADS = 512
BLOCK = 1 << 20  # bytes per blocking read: the fill's readers hear about the body once per block
Origin = tuple[str, str, int]


class Answer:
    """One upstream answer whose body is read with blocking calls, from a worker thread."""

    def __init__(
        self,
        pool: ConnectionPool,
        origin: Origin,
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._conn: http.client.HTTPConnection | None = conn
        self._resp = resp
        self.status = resp.status
        self.headers: CIMultiDict[str] = CIMultiDict(resp.getheaders())
        length = self.headers.get("Content-Length", "")
        self.content_length = int(length) if length.isdigit() else None
        self._finished = False

    @property
    def length(self) -> int | None:
        return self.content_length

    def readinto(self, buffer: memoryview) -> int:
        """Fill `buffer` from the body (blocking); 0 at its end. A body that breaks off (reset,
        stall past the read timeout, closed early) raises UpstreamInterrupted: a fill resumes it."""
        try:
            n = self._resp.readinto(buffer)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # ValueError: the connection was closed under us by `abort`
            raise errors.UpstreamInterrupted(f"upstream body interrupted ({type(exc).__name__})") from None
        if n == 0:
            if self.content_length is not None and self._resp.length not in (None, 0):
                raise errors.UpstreamInterrupted("upstream body ended early")
            self._finished = True
        return n

    async def drain(self, consume: Callable[[memoryview], None]) -> None:
        """Read the body to its end on this upstream's threads, calling consume(block) there for
        each block read (the block's memory is reused: consume must be done with it when it returns).
        Cancelling the await stops the reading: the thread is told, the socket shut, and the thread
        awaited, so nothing is written after this returns."""
        stop = threading.Event()

        def run() -> None:
            buffer = memoryview(bytearray(BLOCK))
            while not stop.is_set():
                n = self.readinto(buffer)
                if n == 0:
                    return
                consume(buffer[:n])

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
        """Make a blocked `readinto` return now (from any thread): the fill is being cancelled."""
        conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

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

    def __init__(
        self,
        name: str,
        ssl_context: ssl.SSLContext,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self.executor = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix=f"upstream-{name}")
        self._ssl = ssl_context
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: dict[Origin, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def reconfigure(self, connect_timeout: float, read_timeout: float) -> None:
        """Reloaded timeouts apply to new connections; idle ones are closed so none keeps the old."""
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
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
        """`open_answer` on this upstream's threads."""
        future = asyncio.get_running_loop().run_in_executor(
            self.executor, self.open_answer, method, url, headers
        )
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_release_unwanted)  # the request was sent: free its connection
            raise

    def open_answer(self, method: str, url: URL, headers: Mapping[str, str]) -> Answer:
        """Send one request and read the answer's status and headers (blocking: a worker thread).

        Raises TimeoutError, OSError or http.client.HTTPException as the network fails, like the
        aiohttp path raises its own; UpstreamClient maps both."""
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
                return self._exchange(origin, reused, method, target, headers)
            except (OSError, http.client.HTTPException):
                reused.close()  # the server closed the idle connection: try a fresh one
        conn = self._connect(scheme, host, port)
        try:
            return self._exchange(origin, conn, method, target, headers)
        except BaseException:
            conn.close()
            raise

    def _take(self, origin: Origin) -> http.client.HTTPConnection | None:
        with self._lock:
            idle = self._idle.get(origin)
            return idle.pop() if idle else None

    def _connect(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        if scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=self._connect_timeout, context=self._ssl
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._connect_timeout)
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(self._read_timeout)  # a stalled body raises instead of hanging
        return conn

    def _exchange(
        self,
        origin: Origin,
        conn: http.client.HTTPConnection,
        method: str,
        target: str,
        headers: Mapping[str, str],
    ) -> Answer:
        conn.request(method, target, headers=dict(headers))
        return Answer(self, origin, conn, conn.getresponse())


def _release_unwanted(future: asyncio.Future[Answer]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().release()

"""Bounds for the TLS listener's connections, which granian (2.8.9) does not bound itself.

granian never closes a connection that finishes the TLS handshake and then sends nothing, and it
accepts only so many connections (`backpressure`, set to twice max_connections): silent ones would
lock everyone else out in the kernel's backlog. Its sockets are file descriptors of this process,
so a sweep in a worker thread (every second at most) can look at them: for each TCP socket on the
TLS port, the kernel's TCP_INFO says how long ago data last went either way. A connection silent
both ways for `idle_timeout` is shut down (downloads in progress always have bytes going out;
granian pings idle HTTP/2 connections, so those stay), and above `max_connections` the connections
silent the longest are shut down first, so a flood of idle connections cannot crowd out working
ones. `shutdown()` on a duplicate descriptor ends the connection for granian too (it reads
end-of-file and closes its own).

Linux only (TCP_INFO's layout); elsewhere the guard does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import sys
from dataclasses import dataclass

from edgecache.metrics import Metrics

log = logging.getLogger(__name__)
TCP_ESTABLISHED = 1
# struct tcp_info: u8 state at 0; u32 last_data_sent at 44 and last_data_recv at 52 (milliseconds).
_TCP_INFO = struct.Struct("=B43xI4xI")
_TCP_INFO_BYTES = 64


@dataclass(frozen=True)
class Sweep:
    connections: int
    closed_idle: int
    closed_over_cap: int


class ConnectionGuard:
    def __init__(self, port: int, *, idle_timeout: float, max_connections: int, metrics: Metrics) -> None:
        self._port = port
        self._idle_ms = int(idle_timeout * 1000)
        self._max = max_connections
        self._metrics = metrics
        self._interval = min(max(idle_timeout / 4, 0.25), 1.0)
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def supported() -> bool:
        return sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd")

    def start(self) -> None:
        if self.supported():
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                swept = await asyncio.to_thread(self.sweep)
            except OSError as exc:  # e.g. out of file descriptors for the duplicates: next time
                log.warning("connection sweep failed: %s", exc)
                continue
            except Exception:  # a bug here must not end the guard for the rest of the run
                log.exception("connection sweep failed")
                continue
            if swept.closed_over_cap:
                log.warning(
                    "TLS listener over its cap of %d connections: closed the %d idle the longest",
                    self._max,
                    swept.closed_over_cap,
                )

    def sweep(self) -> Sweep:
        """One pass over this process's sockets (blocking: run it in a thread)."""
        found: list[tuple[int, socket.socket]] = []  # (idle ms, duplicate of the connection)
        try:
            for name in os.listdir("/proc/self/fd"):
                connection = self._tls_connection(int(name))
                if connection is not None:
                    found.append(connection)
            found.sort(key=lambda item: item[0], reverse=True)  # idle the longest first
            idle = [sock for idle_ms, sock in found if idle_ms >= self._idle_ms]
            excess = max(0, len(found) - len(idle) - self._max)
            over_cap = [sock for idle_ms, sock in found if idle_ms < self._idle_ms][:excess]
            for sock in (*idle, *over_cap):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        finally:
            for _idle_ms, sock in found:
                sock.close()  # our duplicate only
        if idle:
            self._metrics.connections_closed.labels("idle").inc(len(idle))
        if over_cap:
            self._metrics.connections_closed.labels("over_cap").inc(len(over_cap))
        return Sweep(len(found), len(idle), len(over_cap))

    def _tls_connection(self, fd: int) -> tuple[int, socket.socket] | None:
        """A duplicate of `fd` with its idle time, if it is an established TCP connection on the
        TLS port (the decision is taken on the duplicate, so a reused descriptor number is harmless)."""
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                return None
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            return None
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                raise OSError
            if sock.getsockname()[1] != self._port:
                raise OSError
            state, last_sent, last_received = _TCP_INFO.unpack_from(
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
            )
            if state != TCP_ESTABLISHED:
                raise OSError
        except OSError:
            sock.close()
            return None
        return min(last_sent, last_received), sock

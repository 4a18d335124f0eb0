"""A raw TCP forwarder that can turn into a black hole or stall a response half-way: for an endpoint
whose requests are signed with the Host they name (S3's SigV4), which an HTTP proxy rewriting headers
would break. Bytes pass unchanged; `hang` accepts and never answers new connections; `stall_after`
stops sending a response after that many bytes (the connection left open)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class TcpFault:
    target_host: str
    target_port: int
    hang: bool = False
    stall_after: int | None = None
    connections: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    port: int = 0

    async def start(self) -> TcpFault:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        writers = [writer]
        try:
            if self.hang:
                await asyncio.Event().wait()  # a black hole: read nothing, answer nothing
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
            writers.append(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer, False), self._pipe(up_reader, writer, True))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            for each in writers:  # closed and waited for: no socket is left to the garbage collector
                each.close()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await each.wait_closed()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: bool) -> None:
        """Copy one direction; responses stop after `stall_after` bytes from when it was set (read at
        every chunk: a pooled connection opened before is stalled too)."""
        sent = 0
        while data := await reader.read(65536):
            limit = self.stall_after if response else None
            if limit is None:
                sent = 0
            elif sent + len(data) > limit:
                writer.write(data[: max(limit - sent, 0)])
                await writer.drain()
                await asyncio.Event().wait()  # stalled: the connection stays open, silent
            writer.write(data)
            await writer.drain()
            sent += len(data)
        with contextlib.suppress(OSError):
            writer.write_eof()

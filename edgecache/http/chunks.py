"""File ranges read in large chunks off the event loop, for connections the kernel cannot sendfile to
(TLS, HTTP/2 streams): one thread hop per MiB, and at most one chunk in memory per response."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

CHUNK = 1024 * 1024


async def read_chunks(fd: int, offset: int, length: int, chunk: int = CHUNK) -> AsyncIterator[bytes]:
    """Yield bytes [offset, offset+length) of the open file `fd`; stops early only at end of file."""
    end = offset + length
    while offset < end:
        data = await asyncio.to_thread(os.pread, fd, min(chunk, end - offset), offset)
        if not data:
            return
        offset += len(data)
        yield data

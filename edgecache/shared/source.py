"""The bucket in front of an upstream, behind the fill's `BlobSource` seam: a fill asks the bucket
first and falls back to the upstream within the same fill, so single flight, the spool, pass-through,
reservations and the upstream's deadlines are all reused as they are.

A blob from the bucket is verified before any reader sees a byte of it: it is read into a temp file
under the store's tmp/ while hashed (the bucket is in the datacenter: hundreds of MB/s), and only a
body that hashes to the digest is handed to the fill. So an object corrupted in the bucket is never
served, not even in part, and its fill goes on from the upstream as if the bucket had not held it:
no client sees an error. The price is the first byte of a bucket hit waiting for the whole object
(measured in bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

from edgecache.fill.source import BlobBody, BlobSource
from edgecache.oci import Digest, RepoName

BLOCK = 1024 * 1024


class BlobFetcher(Protocol):
    """What the source needs of the tier (shared.tier.SharedTier in service)."""

    async def fetch_blob(self, digest: Digest) -> tuple[Path, int] | None:
        """A verified copy of the blob in a temp file (the caller removes it), or None: not held,
        corrupt (deleted), or the tier failing or down."""
        ...


class ReplayBody:
    """A verified blob in a local temp file, drained block by block on a worker thread like an
    upstream body. Its bytes are not upstream bytes (`counts_as_upstream`)."""

    counts_as_upstream = False

    def __init__(self, path: Path, size: int) -> None:
        self._path = path
        self._size = size

    @property
    def length(self) -> int | None:
        return self._size

    async def drain(self, consume: Callable[[memoryview], None]) -> None:
        stop = threading.Event()

        def run() -> None:
            buffer = memoryview(bytearray(BLOCK))
            with open(self._path, "rb", buffering=0) as fh:
                while not stop.is_set():
                    n = fh.readinto(buffer)
                    if not n:
                        return
                    consume(buffer[:n])

        future = asyncio.get_running_loop().run_in_executor(None, run)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()  # the thread stops after the block it is on; nothing is consumed later
            with contextlib.suppress(Exception):
                await future
            raise


class TieredSource:
    """The bucket, then `upstream`; named as the upstream (flights of both share one key). A resume
    (`start` > 0) continues an upstream body and goes to the upstream."""

    def __init__(self, tier: BlobFetcher, upstream: BlobSource) -> None:
        self._tier = tier
        self._upstream = upstream

    @property
    def name(self) -> str:
        return self._upstream.name

    @property
    def upstream(self) -> BlobSource:
        return self._upstream

    @contextlib.asynccontextmanager
    async def open_blob(self, repo: RepoName, digest: Digest, start: int = 0) -> AsyncIterator[BlobBody]:
        fetched = await self._tier.fetch_blob(digest) if start == 0 else None
        if fetched is None:
            async with self._upstream.open_blob(repo, digest, start) as body:
                yield body
            return
        path, size = fetched
        try:
            yield ReplayBody(path, size)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

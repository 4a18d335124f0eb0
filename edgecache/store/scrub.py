"""The background scrubber: re-hashes stored files at a bounded rate and quarantines what fails.

A hit's stat check catches accidental writes (they change the size, mtime or inode); bytes that rot
in place, or a write that restores the mtime, change none of these. The scrubber finds those: it
walks the index's entries least recently verified first (never verified ones first of all; an
admission counts as a verification), hashes each file in 1 MiB chunks on its own thread, and keeps
the average at `cache.scrub_rate` MB/s by sleeping between chunks (`Pacer`), so it never competes
with hits for the disk more than the operator allows. A file that does not hash to its digest is
quarantined like a changed one (`CacheKeeper.quarantine`), and the next request fetches it again.

Only stored files are in the index, so spools of fills in progress are never read. A file evicted or
quarantined while it is being hashed is read to the end through its open descriptor and then left
alone: the verdict is only acted on for the file still stored under that identity. `edgecache
verify` remains the full pass an operator runs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from edgecache.errors import DigestInvalid
from edgecache.metrics import Metrics
from edgecache.oci import Digest
from edgecache.store.blobs import BlobStore
from edgecache.store.identity import FileIdentity, judge
from edgecache.store.index import Entry
from edgecache.store.keeper import CacheKeeper

log = logging.getLogger(__name__)
T = TypeVar("T")
MB = 1_000_000
CHUNK = 1024 * 1024
BATCH = 64
# Every file costs at least this much of the rate, so a store of tiny manifests is not opened
# thousands of times a second (20 MB/s: at most ~300 files a second).
MIN_FILE_COST = 64 * 1024
IDLE_SECONDS = 30.0  # an empty store: look again after this long


class Pacer:
    """Keeps the average at `rate` bytes per second: after each chunk, how long to wait before the
    next. Time spent idle or hashing slower than the rate is not saved up, so there is no burst after
    a pause. Pure (the clock is passed in), so it is tested without waiting."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._due = clock()

    def delay(self, nbytes: int) -> float:
        """`nbytes` were just processed: seconds to wait before processing more."""
        now = self._clock()
        if self.rate <= 0:
            return 0.0
        self._due = max(self._due, now) + nbytes / self.rate
        return self._due - now


class Scrubber:
    """One background task while `rate` (MB/s) is above 0; `reconfigure` starts or stops it."""

    def __init__(self, store: BlobStore, keeper: CacheKeeper, metrics: Metrics, *, rate: float) -> None:
        self._store = store
        self._keeper = keeper
        self._metrics = metrics
        self._rate = rate
        self._pacer = Pacer(rate * MB)
        self._pool: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._rate <= 0 or self.running:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgecache-scrub")
        self._task = asyncio.create_task(self._loop(), name="store scrubber")
        log.info("store scrubber on: re-hashing stored files at %g MB/s", self._rate)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def close(self) -> None:
        await self.stop()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, wait=True)  # a chunk being read: not on the loop

    def reconfigure(self, rate: float) -> None:
        """A reloaded `cache.scrub_rate`: applies from the next chunk; 0 stops the scrubber (it is
        cancelled at its next wait; a chunk being hashed on its thread finishes, unused)."""
        if rate == self._rate:
            return
        self._rate = rate
        self._pacer.rate = rate * MB
        if rate <= 0:
            if self._task is not None:
                self._task.cancel()
                self._task = None
            log.info("store scrubber off")
        else:
            self.start()

    async def _loop(self) -> None:
        while True:
            try:
                batch = await self._keeper.least_recently_verified(BATCH)
                if not batch:
                    await asyncio.sleep(IDLE_SECONDS)
                    continue
                verified: list[tuple[Digest, FileIdentity | None, float]] = []
                for entry in batch:
                    verified.extend(await self._scrub(entry))
                await self._keeper.verified(verified)
            except asyncio.CancelledError:
                raise
            except Exception:  # keep scrubbing; the next round retries
                log.exception("store scrubber failed; trying again")
                await asyncio.sleep(IDLE_SECONDS)

    async def _scrub(self, entry: Entry) -> list[tuple[Digest, FileIdentity | None, float]]:
        """Hash one stored file and act on the verdict; [(digest, identity, when)] when it is intact
        (or could not be judged, so the queue moves on), else []."""
        try:
            digest = Digest.parse(entry.digest)
        except DigestInvalid:
            return []
        held = self._keeper.held(digest)
        if held is None:  # evicted or quarantined since the batch was read
            self._metrics.scrub_files.labels("gone").inc()
            return []
        kind, size = held
        try:
            result = await self._hash(kind, digest)
        except OSError as exc:  # unreadable (EIO, EACCES): left to the hit path; the queue moves on
            log.warning("store scrubber could not read %s: %s", digest, exc.strerror)
            return [(digest, None, time.time())]
        finally:
            await asyncio.sleep(self._pacer.delay(MIN_FILE_COST))
        if result is None:
            self._metrics.scrub_files.labels("gone").inc()
            await self._keeper.missing(digest, kind)
            return []
        before, after, intact = result
        if kind == "blob":
            verdict = judge(size, await self._keeper.identity_of(digest), before, after, intact)
        else:  # manifests: hashed on every read from disk, no identity kept (the index's size is
            verdict = judge(before.size, None, before, after, intact)  # the body's, not the file's)
        self._metrics.scrub_files.labels(verdict).inc()
        if verdict != "ok":
            await self._keeper.quarantine(digest, kind, before, verdict)
            return []
        return [(digest, before if kind == "blob" else None, time.time())]

    async def _hash(self, kind: str, digest: Digest) -> tuple[FileIdentity, FileIdentity, bool] | None:
        """(identity when opened, identity when read to the end, bytes hash to the digest), or None
        when there is no file. Chunks are read and hashed on the scrubber's thread; the waits between
        them are on the event loop, so stopping is a cancellation."""
        opened = await self._in_thread(_open, self._store.path(kind, digest))
        if opened is None:
            return None
        fd, before = opened
        try:
            hasher = digest.hasher()
            offset = 0
            if kind == "manifest":  # "<media type>\n" + the manifest bytes
                offset = await self._in_thread(_header_length, fd)
            while True:
                n = await self._in_thread(_hash_chunk, fd, hasher, offset)
                if not n:
                    break
                offset += n
                self._metrics.scrub_bytes.inc(n)
                await asyncio.sleep(self._pacer.delay(n))
            after = FileIdentity.of(await self._in_thread(os.fstat, fd))
        finally:
            # Closed on the scrubber's one thread, after any chunk still being read there (a
            # cancellation does not wait for it): the descriptor is never closed under a read.
            assert self._pool is not None
            self._pool.submit(os.close, fd)
        return before, after, hasher.hexdigest() == digest.hex

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


def _open(path: os.PathLike[str]) -> tuple[int, FileIdentity] | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    return fd, FileIdentity.of(os.fstat(fd))


def _header_length(fd: int) -> int:
    head = os.pread(fd, 4096, 0)
    end = head.find(b"\n")
    return end + 1 if end >= 0 else 0


def _hash_chunk(fd: int, hasher: Any, offset: int) -> int:
    data = os.pread(fd, CHUNK, offset)
    hasher.update(data)
    return len(data)

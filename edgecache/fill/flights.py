"""Single-flight fills: one upstream fetch per object, every waiting client streaming from its spool.

A blob fill is a task owned by `Flights`, not by any request: the first asker starting it and then
disconnecting does not stop it. Readers send the spool from their own offset and wait for more; the
last byte is held back until the digest is verified, so no reader ever gets a complete body that is wrong.
Memory per flight is one read block (on the source's reading thread); per reader, one read chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO

from cachetools import TTLCache

from edgecache import errors
from edgecache.fill.source import BlobBody, BlobSource
from edgecache.metrics import Metrics
from edgecache.oci import Digest, RepoName
from edgecache.outcomes import ObjectKind
from edgecache.store.blobs import BlobStore, Spool
from edgecache.store.keeper import CacheKeeper

log = logging.getLogger(__name__)
SEGMENT_MAX = 8 * 1024 * 1024
MAX_RESUMES = 3  # a dropped connection is resumed at once, so a few tries cost little ...
MAX_STALL_RESUMES = 1  # ... but a stall or a trickle has already cost its readers a deadline


class BlobFlight:
    """One blob being fetched from upstream into a spool; readers follow its `visible` mark."""

    def __init__(self, key: tuple[str, Digest], repo: RepoName, spool: Spool) -> None:
        self.key = key
        self.repo = repo  # the repository the fill asks under, as its source names it
        self.digest = key[1]
        self.spool = spool
        self.size: int | None = None
        self.done = False
        self.error: errors.EdgecacheError | None = None
        self.started: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Event()
        self.readers = 0
        self.finished = False  # the fill task has ended: nothing will write or persist any more
        self.on_abandoned: Callable[[], object] | None = None  # the policy when every reader has gone

    @property
    def visible(self) -> int:
        """Bytes readers may have: everything once verified, all but the last byte before."""
        written = self.spool.written
        return written if self.done else max(written - 1, 0)

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self) -> None:
        await self._changed.wait()

    def fail(self, error: errors.EdgecacheError) -> None:
        self.error = error
        if not self.started.done():
            self.started.set_exception(error)
            self.started.exception()  # retrieved: readers re-raise it themselves
        self.notify()

    async def segments(self, start: int, end: int) -> AsyncIterator[tuple[int, int]]:
        """(offset, length) spans of [start, end] as they become readable in the spool.

        Raises the fill's error instead of ending early, so a caller never finishes a short body.
        """
        self.readers += 1
        try:
            offset = start
            while offset <= end:
                visible = self.visible
                if visible > offset:
                    length = min(visible, end + 1, offset + SEGMENT_MAX) - offset
                    yield offset, length
                    offset += length
                elif self.error is not None:
                    raise self.error
                elif self.done:
                    raise errors.UpstreamUnavailable("blob shorter than announced")
                else:
                    await self.wait_change()
        finally:
            self.readers -= 1
            if self.readers == 0 and not self.done and self.on_abandoned is not None:
                self.on_abandoned()
            self._maybe_close()

    def open_file(self) -> BinaryIO:
        """A file object on the spool for sendfile; valid after the rename into the store too."""
        return os.fdopen(os.dup(self.spool.fd), "rb")

    def _maybe_close(self) -> None:
        """Close the spool once the fill task has ended (persisted or failed) and no reader is left."""
        if self.finished and self.readers == 0:
            self.spool.close()


class Flights:
    """The registry of fills in progress, keyed by (upstream, digest) whatever the repository name."""

    def __init__(
        self,
        store: BlobStore,
        metrics: Metrics,
        keeper: CacheKeeper,
        *,
        negative_ttl: float = 30.0,
        cancel_abandoned: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._keeper = keeper
        self._blobs: dict[tuple[str, Digest], BlobFlight] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Digests that just failed verification: refused for a moment instead of refetched by every retry.
        self._mismatched: TTLCache[tuple[str, Digest], bool] = TTLCache(
            maxsize=10_000, ttl=max(negative_ttl, 1e-9), timer=clock
        )
        self._negative_ttl = negative_ttl
        self._cancel_abandoned = cancel_abandoned

    def running(self, upstream: str, digest: Digest) -> BlobFlight | None:
        return self._blobs.get((upstream, digest))

    def blob(self, source: BlobSource, repo: RepoName, digest: Digest) -> tuple[BlobFlight, bool]:
        """Join the fill of this blob from `source`, or lead a new one asking under `repo`;
        True when this call started it."""
        key = (source.name, digest)
        flight = self._blobs.get(key)
        if flight is not None:
            self._metrics.fill_joins.labels(source.name).inc()
            return flight, False
        if self._negative_ttl > 0 and key in self._mismatched:
            self._metrics.negative_hits.labels(source.name).inc()
            raise errors.UpstreamDigestMismatch(
                "this blob failed verification moments ago; retry later", negative=True
            )
        self._metrics.fills_started.labels(source.name).inc()
        self._metrics.fills_in_flight.labels(source.name).inc()
        flight = BlobFlight(key, repo, self._store.new_spool(digest))
        self._blobs[key] = flight
        task = asyncio.create_task(self._fill(flight, source), name=f"fill {digest}")
        if self._cancel_abandoned:
            flight.on_abandoned = task.cancel
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return flight, True

    async def _fill(self, flight: BlobFlight, source: BlobSource) -> None:
        spool = flight.spool
        try:
            resumes = stalls = 0
            while True:
                try:
                    await self._copy(flight, source)
                    break
                except errors.UpstreamInterrupted as exc:
                    resumes += 1
                    stalls += isinstance(exc, errors.UpstreamStalled)
                    if resumes > MAX_RESUMES or stalls > MAX_STALL_RESUMES or flight.size is None:
                        raise
                    self._metrics.fill_resumes.labels(source.name).inc()
                    log.info(
                        "resuming fill of %s at byte %d (%d/%d)",
                        flight.digest,
                        spool.written,
                        resumes,
                        MAX_RESUMES,
                    )
            if flight.size is not None and spool.written != flight.size:
                raise errors.UpstreamUnavailable("upstream body was truncated")
            spool.verify()
            self._metrics.fills_completed.labels(source.name).inc()
            # Verified bytes are correct bytes: readers get the last one now, and the fsync and
            # rename into the store happen off their path (joiners still read the spool meanwhile).
            flight.done = True
            flight.notify()
            if await self._keeper.admit(flight.digest, ObjectKind.BLOB, spool.written):
                identity = await asyncio.to_thread(spool.persist)
                await self._keeper.stored(
                    flight.digest, ObjectKind.BLOB, spool.written, source.name, str(flight.repo), identity
                )
            else:
                spool.discard()  # served through: the readers keep their open descriptors
        except errors.EdgecacheError as exc:
            self._fail(
                flight,
                exc,
                "digest_mismatch" if isinstance(exc, errors.UpstreamDigestMismatch) else "upstream",
            )
        except asyncio.CancelledError:
            reason = "every reader went away" if flight.readers == 0 else "shutting down"
            self._fail(flight, errors.UpstreamUnavailable(f"fill cancelled: {reason}"), "cancelled")
            raise
        except OSError as exc:  # the spool's disk (ENOSPC, EIO): never a half-visible blob
            log.error("fill of %s failed on disk: %s", flight.digest, exc.strerror)
            self._fail(flight, errors.UpstreamUnavailable("blob fill failed"), "disk")
        except Exception:  # a bug must still end the readers' wait, never hang them
            log.exception("fill of %s failed unexpectedly", flight.digest)
            self._fail(flight, errors.UpstreamUnavailable("blob fill failed"), "upstream")
        finally:
            self._metrics.fills_in_flight.labels(source.name).dec()
            self._blobs.pop(flight.key, None)
            flight.finished = True
            flight._maybe_close()

    async def _copy(self, flight: BlobFlight, source: BlobSource) -> None:
        """Source body → spool, from wherever the spool ends (a Range request when resuming)."""
        spool = flight.spool
        async with source.open_blob(flight.repo, flight.digest, start=spool.written) as body:
            if not flight.started.done():
                flight.size = body.length
                flight.started.set_result(flight.size)
            await self._drain(flight, body, source.name)

    async def _drain(self, flight: BlobFlight, body: BlobBody, upstream: str) -> None:
        """Each block is written and hashed on the source's reading thread, and the loop only hears
        that the spool has grown (readers wake once per block, about a MiB). Whatever was written
        before the body broke off is kept, so a resume continues it."""
        spool = flight.spool
        upstream_bytes = self._metrics.upstream_bytes.labels(upstream)
        notify = functools.partial(asyncio.get_running_loop().call_soon_threadsafe, flight.notify)

        def consume(block: memoryview) -> None:
            if flight.size is not None and spool.written + len(block) > flight.size:
                raise errors.UpstreamUnavailable("upstream sent more than it announced")
            spool.append(block)
            upstream_bytes.inc(len(block))
            notify()

        try:
            await body.drain(consume)
        finally:
            flight.notify()

    def _fail(self, flight: BlobFlight, error: errors.EdgecacheError, reason: str) -> None:
        self._metrics.fills_failed.labels(flight.key[0], reason).inc()
        if isinstance(error, errors.UpstreamDigestMismatch):
            log.error("digest mismatch from upstream for %s; nothing stored", flight.digest)
            self._metrics.digest_mismatches.labels(flight.key[0], "blob").inc()
            if self._negative_ttl > 0:
                self._mismatched[flight.key] = True
        flight.spool.discard()
        flight.fail(error)

    async def settled(self) -> None:
        """Wait until every fill started so far has ended (stored or failed)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def close(self, grace: float = 10.0) -> None:
        """Let fills finish (a verified one only has its rename left) for `grace` seconds, then cancel."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

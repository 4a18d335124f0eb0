"""Single-flight fills: one upstream fetch per object, every waiting client streaming from its spool.

A blob fill is a task owned by `Flights`, not by any request: the first asker starting it and then
disconnecting does not stop it. Readers send the spool from their own offset and wait for more; the
last byte is held back until the digest is verified, so no reader ever gets a complete body that is wrong.
Memory per flight is one read block (on the source's reading thread); per reader, one read chunk.

Once upstream announces the size, the keeper reserves room for it (evicting ahead), so the spool's
bytes count against the size limit while it fills. A blob the cache cannot make room for, or whose
last fill ran out of disk, passes through instead: its fill writes into a bounded memory window
(fill.window) that its readers send from, and nothing is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO

from cachetools import TTLCache

from edgecache import errors
from edgecache.fill.source import BlobBody, BlobSource
from edgecache.fill.window import Cursor, StreamWindow
from edgecache.metrics import Metrics
from edgecache.oci import Digest, RepoName
from edgecache.outcomes import ObjectKind
from edgecache.store.blobs import BlobStore, Spool
from edgecache.store.keeper import CacheKeeper

log = logging.getLogger(__name__)
SEGMENT_MAX = 8 * 1024 * 1024
PASS_AFTER_DISK_FULL = 600.0  # seconds a digest whose fill ran out of disk is passed through
MAX_RESUMES = 3  # a dropped connection is resumed at once, so a few tries cost little ...
MAX_STALL_RESUMES = 1  # ... but a stall or a trickle has already cost its readers a deadline


class BlobFlight:
    """One blob being fetched from upstream into a spool; readers follow its `visible` mark."""

    def __init__(self, key: tuple[str, Digest], repo: RepoName) -> None:
        self.key = key
        self.repo = repo  # the repository the fill asks under, as its source names it
        self.digest = key[1]
        # Where the bytes go, chosen once the size is known (before `started` resolves): a spool
        # file in the store's tmp/, or, for a blob that is passed through, a memory window.
        self.spool: Spool | None = None
        self.window: StreamWindow | None = None
        self.reserved = 0  # bytes the keeper holds for this fill until it is stored or fails
        self.waiting = 0  # readers waiting for `started`: a pass-through window keeps their place
        self.size: int | None = None
        self.done = False
        self.error: errors.EdgecacheError | None = None
        self.started: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Event()
        self.readers = 0  # sending from it now (in `segments`)
        self.replies = 0  # replies made to read it, sent or not yet (`add_reply`)
        self.finished = False  # the fill task has ended: nothing will write or persist any more
        self.prefetched = False  # started ahead of any client (fill.prefetch), not by a request
        self.ended = asyncio.Event()  # set with `finished`
        self.kept = False  # verified and stored (not discarded for want of room)
        self.on_abandoned: Callable[[], object] | None = None  # the policy when every reader has gone
        # Released with the sink: keeps the stored file from eviction while readers still send it
        # from the spool's descriptor.
        self.guards = contextlib.ExitStack()

    @property
    def sink(self) -> Spool | StreamWindow | None:
        """Where the bytes go (None until the size is known and the sink chosen)."""
        return self.window or self.spool

    @property
    def written(self) -> int:
        sink = self.sink
        return sink.written if sink is not None else 0

    @property
    def passing(self) -> bool:
        """Passed through: readers claim a `Cursor` on the window instead of opening the spool."""
        return self.window is not None

    @property
    def visible(self) -> int:
        """Bytes readers may have: everything once verified, all but the last byte before."""
        written = self.written
        return written if self.done else max(written - 1, 0)

    def stop(self) -> None:
        """Before cancelling the fill: a reading thread waiting for room in the window gives up
        (cancelling awaits that thread, which would otherwise wait for readers that are gone)."""
        if self.window is not None:
            self.window.close()

    def claim(self, start: int, *, waited: bool = False) -> Cursor | None:
        """A pass-through reader's place from `start`; None when those bytes have left the window.
        `waited`: the reader was counted in `waiting` when the window was made."""
        return self.window.claim(start, pending=waited) if self.window is not None else None

    async def wait_started(self) -> tuple[int | None, bool]:
        """Wait for the fill to start (its size); True when this reader was counted in `waiting`
        (then it must `claim(..., waited=True)` or `unwait()` a pass-through window)."""
        if self.started.done():
            return self.started.result(), False
        self.waiting += 1
        try:
            size = await self.started
        except BaseException:
            self.waiting -= 1  # failed or cancelled before a window could count it
            raise
        self.waiting -= 1
        return size, True

    def unwait(self) -> None:
        """A reader counted when the window was made will not read after all."""
        if self.window is not None:
            self.window.release_pending()

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
            self._reader_left()

    def add_reply(self) -> None:
        """A reply that will read this fill was made: the sink stays open for it until `drop_reply`,
        even if the fill ends and every other reader leaves before its sending starts."""
        self.replies += 1

    def drop_reply(self) -> None:
        self.replies -= 1
        self._reader_left()

    def _reader_left(self) -> None:
        if self.readers == 0 and self.replies == 0 and not self.done and self.on_abandoned is not None:
            self.on_abandoned()
        self._maybe_close()

    def open_file(self) -> BinaryIO:
        """A file object on the spool for sendfile; valid after the rename into the store too."""
        assert self.spool is not None, "a pass-through fill has no spool file"
        return os.fdopen(os.dup(self.spool.fd), "rb")

    def _maybe_close(self) -> None:
        """Close the sink once the fill task has ended (persisted or failed) and no reader is left."""
        if self.finished and self.readers == 0 and self.replies == 0:
            if self.spool is not None:
                self.spool.close()
            if self.window is not None:
                self.window.close()
            self.guards.close()


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
        self._live: set[BlobFlight] = set()  # every flight whose task runs (a replaced one too)
        # Digests that just failed verification: refused for a moment instead of refetched by every retry.
        self._mismatched: TTLCache[tuple[str, Digest], bool] = TTLCache(
            maxsize=10_000, ttl=max(negative_ttl, 1e-9), timer=clock
        )
        self._negative_ttl = negative_ttl
        self._cancel_abandoned = cancel_abandoned
        # Digests whose last fill ran out of disk: passed through for a while instead of failing again.
        self._pass_through: TTLCache[Digest, bool] = TTLCache(
            maxsize=10_000, ttl=PASS_AFTER_DISK_FULL, timer=clock
        )
        # Told of each verified blob once it is in the store, with its size (the shared tier uploads
        # it from there, off the readers' path); must not wait.
        self.on_kept: Callable[[Digest, int], None] | None = None

    def running(self, upstream: str, digest: Digest) -> BlobFlight | None:
        return self._blobs.get((upstream, digest))

    def in_flight(self) -> list[BlobFlight]:
        """The fills joinable now (one per upstream and digest), for the status page."""
        return list(self._blobs.values())

    def blob(
        self, source: BlobSource, repo: RepoName, digest: Digest, *, fresh: bool = False
    ) -> tuple[BlobFlight, bool]:
        """Join the fill of this blob from `source`, or lead a new one asking under `repo`;
        True when this call started it. `fresh` starts a new one even while one runs (a reader
        too late for a pass-through fill's window); later joiners join the newest."""
        key = (source.name, digest)
        flight = self._blobs.get(key)
        if flight is not None and not fresh:
            self._metrics.fill_joins.labels(source.name).inc()
            return flight, False
        if self._negative_ttl > 0 and key in self._mismatched:
            self._metrics.negative_hits.labels(source.name).inc()
            raise errors.UpstreamDigestMismatch(
                "this blob failed verification moments ago; retry later", negative=True
            )
        self._metrics.fills_started.labels(source.name).inc()
        self._metrics.fills_in_flight.labels(source.name).inc()
        flight = BlobFlight(key, repo)
        self._blobs[key] = flight
        self._live.add(flight)
        task = asyncio.create_task(self._fill(flight, source), name=f"fill {digest}")
        cancel_abandoned = self._cancel_abandoned

        def abandoned() -> None:
            # Nobody left to read it: a pass-through fill has nothing to keep, so it always stops.
            if cancel_abandoned or flight.passing:
                flight.stop()
                task.cancel()

        flight.on_abandoned = abandoned
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return flight, True

    async def _fill(self, flight: BlobFlight, source: BlobSource) -> None:
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
                        flight.written,
                        resumes,
                        MAX_RESUMES,
                    )
            if flight.size is not None and flight.written != flight.size:
                raise errors.UpstreamUnavailable("upstream body was truncated")
            sink = flight.sink
            assert sink is not None
            sink.verify()
            self._metrics.fills_completed.labels(source.name).inc()
            # Verified bytes are correct bytes: readers get the last one now, and the fsync and
            # rename into the store happen off their path (joiners still read the spool meanwhile).
            flight.done = True
            flight.notify()
            if flight.spool is not None:
                await self._keep(flight, source)
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
            if exc.errno == errno.ENOSPC:
                self._pass_through[flight.digest] = True  # the next request passes through
            self._fail(flight, errors.UpstreamUnavailable("blob fill failed"), "disk")
        except Exception:  # a bug must still end the readers' wait, never hang them
            log.exception("fill of %s failed unexpectedly", flight.digest)
            self._fail(flight, errors.UpstreamUnavailable("blob fill failed"), "upstream")
        finally:
            self._metrics.fills_in_flight.labels(source.name).dec()
            if self._blobs.get(flight.key) is flight:
                del self._blobs[flight.key]
            self._live.discard(flight)
            flight.finished = True
            flight.ended.set()
            flight._maybe_close()

    async def _keep(self, flight: BlobFlight, source: BlobSource) -> None:
        """Store a verified spool: within its reservation, or if the keeper still makes room."""
        spool = flight.spool
        assert spool is not None
        size = spool.written
        if not flight.reserved and not await self._keeper.admit(flight.digest, ObjectKind.BLOB, size):
            spool.discard()  # served through: the readers keep their open descriptors
            return
        if flight.readers or flight.replies:  # they read the stored file through the spool's descriptor
            flight.guards.enter_context(self._keeper.reading(flight.digest))
        identity = await asyncio.to_thread(spool.persist)
        await self._keeper.stored(
            flight.digest, ObjectKind.BLOB, size, source.name, str(flight.repo), identity
        )
        # Only now, or another fill could take the room between the rename and the accounting.
        self._keeper.release(flight.reserved)
        flight.reserved = 0
        flight.kept = True
        if self.on_kept is not None:
            self.on_kept(flight.digest, size)

    async def _open_sink(self, flight: BlobFlight, size: int | None) -> None:
        """Choose where the fill's bytes go, once upstream has said how many there are."""
        digest = flight.digest
        passing = digest in self._pass_through
        if not passing and size is not None:
            passing = not await self._keeper.reserve(size, ObjectKind.BLOB)
            flight.reserved = 0 if passing else size
        if passing and flight.prefetched and not (flight.waiting or flight.replies or flight.readers):
            # Nobody to pass it to: a prefetch that cannot be stored is not worth an upstream read.
            raise errors.UpstreamUnavailable("no room in the cache to prefetch this blob")
        if passing:
            log.info("%s passes through without being stored (%s bytes)", digest, size)
            self._metrics.passthrough.labels(ObjectKind.BLOB).inc()
            flight.window = StreamWindow(digest, pending=flight.waiting)
        else:
            flight.spool = await asyncio.to_thread(self._store.new_spool, digest)

    async def _copy(self, flight: BlobFlight, source: BlobSource) -> None:
        """Source body → sink, from wherever it ends (a Range request when resuming)."""
        async with source.open_blob(flight.repo, flight.digest, start=flight.written) as body:
            if not flight.started.done():
                flight.size = body.length
                await self._open_sink(flight, flight.size)
                flight.started.set_result(flight.size)
            await self._drain(flight, body, source.name)

    async def _drain(self, flight: BlobFlight, body: BlobBody, upstream: str) -> None:
        """Each block is written and hashed on the source's reading thread, and the loop only hears
        that the sink has grown (readers wake once per block, about a MiB). Whatever was written
        before the body broke off is kept, so a resume continues it."""
        sink = flight.sink
        assert sink is not None
        # A body from another tier (the shared bucket) says so: its bytes are not upstream bytes.
        counted = getattr(body, "counts_as_upstream", True)
        upstream_bytes = self._metrics.upstream_bytes.labels(upstream)
        notify = functools.partial(asyncio.get_running_loop().call_soon_threadsafe, flight.notify)
        size = flight.size

        def consume(block: memoryview) -> None:
            if size is not None and sink.written + len(block) > size:
                raise errors.UpstreamUnavailable("upstream sent more than it announced")
            sink.append(block)
            if counted:
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
        if flight.reserved:
            self._keeper.release(flight.reserved)
            flight.reserved = 0
        if flight.spool is not None:
            flight.spool.discard()
        if flight.window is not None:
            flight.window.close()  # wakes a reading thread waiting for room
        flight.fail(error)

    async def settled(self) -> None:
        """Wait until every fill started so far has ended (stored or failed)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def close(self, grace: float = 10.0) -> None:
        """Let fills finish (a verified one only has its rename left) for `grace` seconds, then cancel."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for flight in list(self._live):
            flight.stop()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

"""Prefetch: blobs fetched ahead of the client, by the same flights, at the lowest priority.

The pull use case decides what to prefetch (the config and layers of an image manifest it served,
`PullService`); this carries it out. One queue per upstream, at most `concurrency` prefetch fills
of that upstream at once, in the order the manifest lists them (the order clients ask in). A
client's own requests never wait for it: asking for a queued blob starts that blob's fill at once
(the queue then skips it), and asking for one being prefetched joins its fill. A blob stored,
filling or queued is never fetched twice, and a blob the cache has no room for is not fetched at
all (nobody is waiting to have it passed through).

It also keeps the tally that says whether prefetching pays: prefetched blobs that a client asked
for afterwards (`used`) against those evicted before anyone did (`evicted_unused`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cachetools import LRUCache

from edgecache import errors
from edgecache.fill.flights import BlobFlight, Flights
from edgecache.fill.source import BlobSource
from edgecache.metrics import Metrics
from edgecache.oci import Descriptor, Digest, RepoName
from edgecache.store.keeper import CacheKeeper
from edgecache.store.manifests import TagKey

log = logging.getLogger(__name__)
TALLIED = 100_000  # prefetched blobs remembered until a client asks for them or they are evicted
WATCHED_TAGS = 10_000  # tags pulled recently, the most recent kept
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PrefetchJob:
    source: BlobSource
    repo: RepoName  # as the source names it: the repository whose manifest listed the blob
    digest: Digest
    size: int


@dataclass
class _Lane:
    """One upstream's prefetches: waiting in order, and filling now."""

    upstream: str
    waiting: deque[PrefetchJob] = field(default_factory=deque)
    queued: set[Digest] = field(default_factory=set)
    filling: set[Digest] = field(default_factory=set)


class Prefetcher:
    def __init__(
        self,
        flights: Flights,
        keeper: CacheKeeper,
        metrics: Metrics,
        *,
        concurrency: int,
        queue_limit: int,
        max_bytes: int,
        usable: Callable[[str], bool] = lambda upstream: True,
    ) -> None:
        self._flights = flights
        self._usable = usable  # the upstream may be asked now: not down, not rate limited
        self._keeper = keeper
        self._metrics = metrics
        self.concurrency = concurrency
        self.queue_limit = queue_limit
        self.max_bytes = max_bytes
        self._lanes: dict[str, _Lane] = {}
        self._followers: set[asyncio.Task[None]] = set()
        # Prefetched (or being prefetched) and not asked for yet: digest -> upstream name.
        self._unasked: LRUCache[Digest, str] = LRUCache(TALLIED)
        self._closed = False

    def reconfigure(self, *, concurrency: int, queue_limit: int, max_bytes: int) -> None:
        self.concurrency, self.queue_limit, self.max_bytes = concurrency, queue_limit, max_bytes
        for lane in self._lanes.values():
            self._pump(lane)

    def offer(self, source: BlobSource, repo: RepoName, blobs: Sequence[Descriptor]) -> int:
        """Queue the blobs of one manifest that are neither stored nor on their way, within the
        per-manifest byte cap; returns how many were queued. Never raises, never waits."""
        if self._closed:
            return 0
        name = source.name
        skipped = self._metrics.prefetch_skipped
        if not self._usable(name):
            skipped.labels(name, "unavailable").inc(len(blobs))
            return 0
        lane = self._lanes.get(name) or self._lanes.setdefault(name, _Lane(name))
        budget, queued = self.max_bytes, 0
        for blob in blobs:
            reason = self._skip_reason(name, lane, blob.digest)
            if reason == "queued":
                continue
            if reason is not None:
                skipped.labels(name, reason).inc()
                continue
            if blob.size > budget:
                skipped.labels(name, "cap").inc()
                continue
            if len(lane.waiting) >= self.queue_limit:
                skipped.labels(name, "queue_full").inc()
                continue
            budget -= blob.size
            lane.waiting.append(PrefetchJob(source, repo, blob.digest, blob.size))
            lane.queued.add(blob.digest)
            queued += 1
        self._pump(lane)
        return queued

    def _skip_reason(self, upstream: str, lane: _Lane, digest: Digest) -> str | None:
        if digest in lane.queued or digest in lane.filling:
            return "queued"
        if self._keeper.held(digest) is not None:
            return "cached"
        if self._flights.running(upstream, digest) is not None:
            return "filling"
        return None

    def _pump(self, lane: _Lane) -> None:
        """Start waiting prefetches while the lane has free slots; the ones a client got to first
        (stored or filling by now) are dropped on the way."""
        while lane.waiting and len(lane.filling) < self.concurrency and not self._closed:
            job = lane.waiting.popleft()
            lane.queued.discard(job.digest)
            name = lane.upstream
            reason = self._skip_reason(name, lane, job.digest)
            if reason is None and not self._keeper.could_hold(job.size):
                reason = "no_room"
            if reason is None and not self._usable(name):
                reason = "unavailable"
            if reason is not None:
                self._metrics.prefetch_skipped.labels(name, reason).inc()
                continue
            try:
                flight, led = self._flights.blob(job.source, job.repo, job.digest)
            except errors.EdgecacheError as exc:  # failed verification moments ago: not again now
                log.info("not prefetching %s: %s", job.digest, exc.message)
                continue
            if not led:  # (cannot happen after the check above; never count a client's fill)
                continue
            flight.prefetched = True
            lane.filling.add(job.digest)
            self._unasked[job.digest] = name
            self._metrics.prefetch_started.labels(name).inc()
            follower = asyncio.create_task(self._follow(lane, flight, job), name=f"prefetch {job.digest}")
            self._followers.add(follower)
            follower.add_done_callback(self._followers.discard)
        self._metrics.prefetch_queued.labels(lane.upstream).set(len(lane.waiting))

    async def _follow(self, lane: _Lane, flight: BlobFlight, job: PrefetchJob) -> None:
        """Free the slot when the fill ends, count what it stored, and start the next one."""
        try:
            await flight.ended.wait()
        finally:
            lane.filling.discard(job.digest)
            if flight.kept:
                self._metrics.prefetch_bytes.labels(job.source.name).inc(flight.written)
            else:
                self._unasked.pop(job.digest, None)
            if not self._closed:
                self._pump(lane)

    def asked(self, upstream: str, digest: Digest) -> None:
        """A client asked for the blob (GET): a prefetched one counts as used, once."""
        if digest in self._unasked and self._unasked.pop(digest, None) is not None:
            self._metrics.prefetch_used.labels(upstream).inc()

    def evicted(self, digests: Sequence[Digest]) -> None:
        """The keeper evicted these: a prefetched one nobody asked for was wasted."""
        for digest in digests:
            if self._unasked.pop(digest, None) is not None:
                self._metrics.prefetch_evicted_unused.inc()

    async def close(self) -> None:
        """Forget what waits; the fills themselves are the flights' to finish or cancel."""
        self._closed = True
        for lane in self._lanes.values():
            lane.waiting.clear()
            lane.queued.clear()
        for task in list(self._followers):
            task.cancel()
        if self._followers:
            await asyncio.wait(list(self._followers))


@dataclass
class PulledTag(Generic[T]):
    """A tag a client pulled recently: where it lives (`target`, the use case's), when it was last
    pulled, and which platforms of its index clients then took (so a move prefetches those)."""

    target: T
    pulled_at: float
    digest: Digest | None = None  # what it pointed at when last pulled
    platforms: set[str] = field(default_factory=set)


class PulledTags(Generic[T]):
    """Which tags were pulled within `window` seconds, bounded: the watch list for tags that move.

    A platform counts as pulled when a client takes, by digest, a child of an index that one of
    these tags pointed at. Pure bookkeeping: no I/O, an injected clock."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._tags: OrderedDict[TagKey, PulledTag[T]] = OrderedDict()
        # Plain dicts, bounded by dropping the oldest: they are read on every manifest hit.
        self._tag_of: dict[tuple[str, RepoName, Digest], TagKey] = {}
        self._child_of: dict[tuple[str, RepoName, Digest], tuple[TagKey, str]] = {}

    def pulled(self, key: TagKey, target: T, digest: Digest) -> None:
        """A client pulled the tag (GET or HEAD) and got `digest`. Cheap when nothing changed within
        the last second (a hot tag's hits)."""
        if self.window <= 0:
            return
        now = self._clock()
        entry = self._tags.get(key)
        if entry is not None and entry.digest == digest and now - entry.pulled_at < 1.0:
            return
        if entry is None:
            entry = self._tags[key] = PulledTag(target, now)
            if len(self._tags) > WATCHED_TAGS:
                self._tags.popitem(last=False)
        entry.target, entry.pulled_at, entry.digest = target, now, digest
        self._tags.move_to_end(key)
        _bounded_put(self._tag_of, (key[0], key[1], digest), key, WATCHED_TAGS)

    def served(self, upstream: str, repo: RepoName, digest: Digest, children: Sequence[Descriptor]) -> None:
        """A manifest was served: an index a watched tag points at lists its platforms' children;
        a child of such an index marks its platform as pulled."""
        where = (upstream, repo, digest)
        key = self._tag_of.get(where)
        if key is not None:
            for child in children:
                if child.platform:
                    where_child = (upstream, repo, child.digest)
                    _bounded_put(self._child_of, where_child, (key, child.platform), 4 * WATCHED_TAGS)
        parent = self._child_of.get(where)
        if parent is not None and (entry := self._tags.get(parent[0])) is not None:
            entry.platforms.add(parent[1])

    def recent(self, key: TagKey) -> PulledTag[T] | None:
        """The tag's record if it was pulled within the window."""
        entry = self._tags.get(key)
        if entry is None or self._clock() - entry.pulled_at > self.window:
            return None
        return entry

    def due(self) -> list[tuple[TagKey, PulledTag[T]]]:
        """Every tag pulled within the window, least recently pulled first; older ones are forgotten."""
        horizon = self._clock() - self.window
        while self._tags:
            key, oldest = next(iter(self._tags.items()))
            if oldest.pulled_at >= horizon:
                break
            del self._tags[key]
        return list(self._tags.items())


K = TypeVar("K")
V = TypeVar("V")


def _bounded_put(table: dict[K, V], key: K, value: V, limit: int) -> None:
    """Set `key`, dropping the oldest entries past `limit` (insertion order: a cheap FIFO bound)."""
    table.pop(key, None)
    table[key] = value
    while len(table) > limit:
        del table[next(iter(table))]

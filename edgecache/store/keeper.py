"""Keeping the cache within its size: LRU accounting, eviction, pins, and the index kept in step.

Hits are counted in memory and written to the index in batches every few seconds (no SQLite write
per request). Before a verified blob or manifest is renamed into the store, `admit` makes room for
it by evicting the least recently used unpinned entries that nobody is reading; when even that is
not enough (pinned content fills the limit), the content is served through without being stored.
A fill of announced size reserves its room before its first byte (`reserve`), evicting ahead of the
high watermark, so stored content plus the spools of fills in flight stay at or below `max_size` at
every instant; a fill that cannot get room passes through without being stored.

Each stored file's identity (size, mtime, inode: `store.identity`) is kept in memory beside what is
held, so a hit compares it with its own fstat and makes no SQLite call. A file that changed is
quarantined (moved to quarantine/, its entry dropped) and the request becomes a miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from cachetools import LRUCache

from edgecache.metrics import Metrics
from edgecache.oci import Digest, referenced_digests
from edgecache.outcomes import ObjectKind
from edgecache.store.blobs import BlobStore
from edgecache.store.identity import FileIdentity
from edgecache.store.index import CacheIndex, Entry, IndexWorker, Pin
from edgecache.store.recovery import recover_members

log = logging.getLogger(__name__)
T = TypeVar("T")
FLUSH_SECONDS = 2.0
IDENTITIES_IN_MEMORY = 100_000  # about 20 MiB: the hot entries of any store
EVICT_BATCH = 256


class Holdings:
    """What is stored, digest → (kind, size), with running totals per kind, so the size checks made
    for every admission cost O(1) instead of a sum over every cached entry."""

    def __init__(self, entries: dict[str, tuple[str, int]] | None = None) -> None:
        self._entries: dict[str, tuple[str, int]] = {}
        self.count = {"blob": 0, "manifest": 0}
        self.bytes = {"blob": 0, "manifest": 0}
        if entries:  # a million at start-up: the dict is handed over, one pass for the totals
            self._entries = entries
            for kind, size in self._entries.values():
                self.count[kind] = self.count.get(kind, 0) + 1
                self.bytes[kind] = self.bytes.get(kind, 0) + size

    @property
    def used(self) -> int:
        return sum(self.bytes.values())

    def __contains__(self, digest: str) -> bool:
        return digest in self._entries

    def get(self, digest: str) -> tuple[str, int] | None:
        return self._entries.get(digest)

    def add(self, digest: str, kind: str, size: int) -> None:
        self.remove(digest)
        self._entries[digest] = (kind, size)
        self.count[kind] = self.count.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + size

    def remove(self, digest: str) -> tuple[str, int] | None:
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self.count[entry[0]] -= 1
            self.bytes[entry[0]] -= entry[1]
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, tuple[str, int]]]:
        return list(self._entries.items())

    def differences(self, names: dict[str, str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(on disk but not held, held but not on disk) as (digest, kind), against a walk's
        {digest: kind}. Runs in a thread while the loop adds and removes entries: it iterates a
        copy of the keys (taken at once, under the GIL) and only looks entries up otherwise."""
        held = self._entries
        unlisted = [(d, k) for d, k in names.items() if d not in held]
        vanished = []
        for digest in list(held):
            if digest not in names:
                entry = held.get(digest)
                if entry is not None:
                    vanished.append((digest, entry[0]))
        return unlisted, vanished

    def bytes_of(self, digests: set[str]) -> int:
        """Bytes of those of `digests` that are stored (a walk over `digests`, not every entry)."""
        entries = self._entries
        return sum(entries[d][1] for d in digests if d in entries)


class CacheKeeper:
    def __init__(
        self,
        store: BlobStore,
        metrics: Metrics,
        *,
        max_size: int,
        high_watermark: float = 0.95,
        low_watermark: float = 0.90,
        min_free: int = 0,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self.max_size = max_size
        self._high = high_watermark
        self._low = low_watermark
        self._min_free = min_free
        self.worker = IndexWorker(store.root / "index.db")
        self._held = Holdings()
        # Identities recorded for stored files, read from the index on a first hit and kept for the
        # hot ones (a million of them would be hundreds of MiB, and seconds to load at start).
        self._identities: LRUCache[str, FileIdentity] = LRUCache(IDENTITIES_IN_MEMORY)
        self._first_seen: dict[str, FileIdentity] = {}  # seen by hits where none was known: to write
        self._reported: LRUCache[str, bool] = LRUCache(10_000)  # quarantines logged, once per digest
        self._reserved = 0  # bytes reserved for fills in flight (their spools)
        self._touched: dict[str, tuple[float, int]] = {}
        self._in_use: dict[str, int] = {}
        self._pins: list[Pin] = []
        self._pinned: set[str] = set()
        self._lock = asyncio.Lock()  # one admission or eviction at a time
        self._task: asyncio.Task[None] | None = None
        self._background: asyncio.Task[None] | None = None  # loading the index, walking the disk
        self._loaded = False  # `_held` lists everything the index does
        self._gone_while_loading: set[str] = set()
        self._reconciled = False  # ...and the index agrees with the disk
        self._seen_version = -1
        # Told which digests an eviction removed (the prefetcher counts the ones nobody asked for).
        self.on_evicted: Callable[[list[Digest]], None] | None = None
        # Told when another process changed the index (`edgecache import` wrote tags beside it).
        self.on_outside_changes: Callable[[], None] | None = None
        metrics.cache_limit_bytes.set(max_size)

    def reconfigure(
        self, *, max_size: int, high_watermark: float, low_watermark: float, min_free: int
    ) -> None:
        """New limits apply from the next admission or housekeeping round (every few seconds)."""
        self.max_size = max_size
        self._high, self._low, self._min_free = high_watermark, low_watermark, min_free
        self._metrics.cache_limit_bytes.set(max_size)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.worker.run(fn, *args)

    @property
    def index(self) -> CacheIndex:
        return self.worker.index

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (or rebuild) the index and serve what it vouches for; check it against the disk.

        A normal restart serves at once: what is stored is read from the index (a million rows take
        a second), then the disk is walked (a million files take seconds), both in the background.
        Until the index is read, a hit asks it for its one digest; until the walk is done, a file
        the index does not list is not served (`vouched`); a listed one is opened and its size
        checked on every hit. An index that starts empty (lost or corrupt) vouches for nothing, so
        it is rebuilt from the disk before serving, with the repository facts the disk still tells.
        """
        started = time.perf_counter()
        await self.worker.open()
        await self._reload_pins()  # before anything could be evicted
        self._seen_version = await self._run(self.index.data_version)
        rebuilt = self.index.rebuilt
        if rebuilt is None:
            self._background = asyncio.create_task(self._load_and_reconcile(), name="cache index load")
            log.info(
                "cache index open in %.2fs: serving, loading it in the background",
                time.perf_counter() - started,
            )
            return
        await self._reconcile()
        if len(self._held):
            await self._recover(rebuilt)
        await self._loaded_now(started)

    async def _load_and_reconcile(self) -> None:
        started = time.perf_counter()
        try:
            # built off the loop too: a million entries are a few hundred ms of Python
            loaded = await asyncio.to_thread(_holdings, self.index.held_separately)
        except Exception:  # the index itself still answers, digest by digest (`vouched`)
            log.exception("loading the cache index failed; serving what it lists, digest by digest")
            self._task = asyncio.create_task(self._housekeeping(), name="cache housekeeping")
            return
        for digest, (kind, size) in self._held.items():  # stored while it loaded
            loaded.add(digest, kind, size)
        for digest in self._gone_while_loading:
            loaded.remove(digest)
        self._held = loaded
        await self._loaded_now(started)
        await self._reconcile()

    async def _loaded_now(self, started: float) -> None:
        """Everything the index lists is held in memory: account, evict if over, keep house."""
        self._loaded = True
        self._gone_while_loading.clear()
        self._seen_version = await self._run(self.index.data_version)
        self._metrics.pinned_bytes.set(self._held.bytes_of(self._pinned))
        self._publish()
        log.info("cache index ready: %d entries in %.2fs", len(self._held), time.perf_counter() - started)
        await self._evict_if_needed()
        self._task = asyncio.create_task(self._housekeeping(), name="cache housekeeping")

    async def _reconcile(self) -> None:
        """Walk the disk and make the index (and what is held in memory) agree with it.

        With the index read (a normal restart) the walk lists names only and compares them with
        what is held; a stat is spent only on what differs. Else every file is measured."""
        started = time.perf_counter()
        try:
            if self._loaded:
                names = await asyncio.to_thread(self._store.names)
                unlisted, vanished = await asyncio.to_thread(self._held.differences, names)
                changed, dropped = await self._run(
                    self.index.apply_walk, unlisted, vanished, self._store.size_of
                )
            else:
                on_disk = await asyncio.to_thread(self._store.inventory)
                changed, dropped = await self._run(self.index.reconcile, on_disk)
        except Exception:  # the index stays as it was: what it lists is still checked on every hit
            log.exception("checking the cache index against the disk failed")
            return
        for digest, kind, size in changed:
            self._held.add(digest, kind, size)
        for digest in dropped:
            self._held.remove(digest)
        self._reconciled = True
        seconds = time.perf_counter() - started
        self._metrics.reconcile_seconds.set(seconds)
        log.info(
            "cache index checked against the disk in %.2fs: %d added, %d dropped",
            seconds,
            len(changed),
            len(dropped),
        )
        if changed or dropped:
            self._publish()

    async def _recover(self, reason: str) -> None:
        """After a rebuild: the repository facts tags and stored manifests still tell; the rest is
        counted and said once."""
        facts, tags = await asyncio.to_thread(recover_members, self._store)
        await self._run(self.index.add_members, facts)
        unheld = await self._run(self.index.unheld_count)
        self._metrics.index_rebuilds.labels(reason).inc()
        self._metrics.unheld_digests.set(unheld)
        log.warning(
            "cache index was %s: rebuilt from the store (%d entries); %d repository facts recovered "
            "from %d tags; %d stored digests are held by no known repository (their facts were lost): "
            "where repository checks protect something they are confirmed upstream before being "
            "served, elsewhere served under any name",
            "lost" if reason == "missing" else "corrupt",
            len(self._held),
            len(facts),
            tags,
            unheld,
        )

    async def vouched(self, digest: Digest) -> tuple[bool, int | None]:
        """(may a stored file of `digest` be served, the size the index gives it).

        Only what the index lists, until the disk walk has made the index agree with the disk; while
        the index is still being loaded, the index itself is asked about this one digest."""
        key = str(digest)
        entry = self._held.get(key)
        if entry is not None:
            return True, entry[1]
        if self._reconciled:
            return True, None  # (stored a moment ago: between its rename and `stored`)
        if self._loaded:
            return False, None
        row = await self._run(self.index.get, key)
        return (True, row.size) if row is not None else (False, None)

    async def may_serve(self, digest: Digest) -> bool:
        return (await self.vouched(digest))[0]

    async def close(self) -> None:
        for name in ("_background", "_task"):  # the load starts housekeeping: stop it first
            task = getattr(self, name)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.worker.is_open:
            await self._flush()
        await self.worker.close()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self._flush()
                await self._pick_up_outside_changes()
                await self._evict_if_needed()
            except Exception:  # keep housekeeping alive; the next round retries
                log.exception("cache housekeeping failed")

    async def _flush(self) -> None:
        if self._first_seen:
            seen, self._first_seen = self._first_seen, {}
            await self._run(self.index.record_identities, list(seen.items()))
        if not self._touched:
            return
        batch, self._touched = self._touched, {}
        await self._run(self.index.touch, [(d, when, n) for d, (when, n) in batch.items()])

    async def _pick_up_outside_changes(self) -> None:
        """`edgecache prune`, `pin` and `import` may run beside the server: when another process
        changed the index (SQLite's data_version tells, for free), re-read pins and what is stored,
        and tell `on_outside_changes` (tag entries held in memory are read again from disk)."""
        version = await self._run(self.index.data_version)
        if version == self._seen_version:
            return
        self._seen_version = version
        if self.on_outside_changes is not None:
            self.on_outside_changes()
        await self._reload_pins()
        if not self._loaded:
            return  # the load in progress reads what is stored
        # Read and built off the loop, as at start-up: a million entries are a second of Python.
        self._held = await asyncio.to_thread(_holdings, self.index.held_separately)
        self._identities.clear()  # read again from the index as hits need them
        self._first_seen = {d: i for d, i in self._first_seen.items() if d in self._held}
        self._publish()

    async def _reload_pins(self) -> None:
        self._pins = await self._run(self.index.pins)
        pinned = await self._run(self.index.pinned_digests)
        self._pinned = pinned
        self._metrics.pinned_bytes.set(self._held.bytes_of(pinned))

    # -- per request ---------------------------------------------------------------------------

    def touch(self, digest: Digest) -> None:
        key = str(digest)
        _, count = self._touched.get(key, (0.0, 0))
        self._touched[key] = (time.time(), count + 1)

    async def unchanged(self, digest: Digest, seen: FileIdentity | None) -> bool:
        """Whether an opened stored file is the one admitted (the hit path).

        Its size must be the one admitted; its mtime and inode the ones recorded (kept in memory for
        the hot entries, else one look-up of the index). Where none were recorded (an index from
        before them, a file found on disk at start), what this hit sees is recorded now, so a later
        change is caught; the scrubber still hashes it first in its queue. A file the keeper does not
        hold (stored a moment ago, not yet indexed) is not judged.
        """
        key = str(digest)
        held = self._held.get(key)
        if held is None or seen is None:
            return True
        if seen.size != held[1]:
            return False
        recorded = await self.identity_of(digest)
        if recorded is None:
            self._identities[key] = self._first_seen[key] = seen
            return True
        return recorded == seen

    async def identity_of(self, digest: Digest) -> FileIdentity | None:
        """The identity recorded for a stored file: from memory, else from the index (then kept)."""
        key = str(digest)
        known = self._identities.get(key) or self._first_seen.get(key)
        if known is not None:
            return known
        entry = await self._run(self.index.get, key)
        identity = entry.identity if entry is not None else None
        if identity is not None and key in self._held:
            self._identities[key] = identity
        return identity

    def held(self, digest: Digest) -> tuple[str, int] | None:
        """(kind, size) of a stored entry, or None."""
        return self._held.get(str(digest))

    @contextlib.contextmanager
    def reading(self, digest: Digest) -> Iterator[None]:
        """While a response reads a stored file, eviction leaves it alone."""
        key = str(digest)
        self._in_use[key] = self._in_use.get(key, 0) + 1
        try:
            yield
        finally:
            self._in_use[key] -= 1
            if not self._in_use[key]:
                del self._in_use[key]

    # -- admission and eviction ----------------------------------------------------------------

    @property
    def used(self) -> int:
        """Bytes stored, plus the bytes reserved for fills in flight (their spools are on disk too)."""
        return self._held.used + self._reserved

    def could_hold(self, size: int) -> bool:
        """Whether a fill of `size` bytes is worth starting for nobody yet (a prefetch): it fits below
        the low watermark beside the fills already reserved. No eviction, no promise."""
        return not self.max_size or size + self._reserved <= int(self.max_size * self._low)

    async def reserve(self, size: int, kind: ObjectKind) -> bool:
        """Make room for a fill of `size` bytes before its first byte is written; False: it cannot
        be stored (pinned or in-use content fills the limit, or the disk has not that much room
        left), so it passes through. The reservation counts against max_size until the fill is
        stored or fails (`release`), so disk use stays within max_size at every instant.

        Evicts ahead: when the reservation would cross the high watermark, down to the low one."""
        async with self._lock:
            if self.max_size:
                need = self.used + size - self.max_size
                ahead = self.used + size - int(self.max_size * self._high)
                if ahead > 0:
                    target = self.used + size - int(self.max_size * self._low)
                    await self._evict(max(need, target), reason="size")
                if self.used + size > self.max_size:
                    log.warning("no room for %d bytes (pinned or in-use content): passing it through", size)
                    return False
            free = await asyncio.to_thread(self._free_bytes)
            # Reserved spools may not be written yet: count them as if they were (never too little).
            short = self._min_free + self._reserved + size - free
            if short > 0:
                await self._evict(short, reason="free_space")
                free = await asyncio.to_thread(self._free_bytes)
                if self._min_free + self._reserved + size > free:
                    log.warning("the disk has no room for %d bytes: passing it through", size)
                    return False
            self._reserved += size
            self._metrics.cache_reserved_bytes.set(self._reserved)
            return True

    def release(self, size: int) -> None:
        """A reserved fill is stored (its entry now counts instead) or failed: its room goes back."""
        self._reserved = max(self._reserved - size, 0)
        self._metrics.cache_reserved_bytes.set(self._reserved)

    async def admit(self, digest: Digest, kind: ObjectKind, size: int) -> bool:
        """Make room for `size` bytes about to be stored without a reservation (manifests, blobs of
        unannounced size); False: store nothing, serve it through.

        Room means both: within max_size, and min_free left on the file system afterwards. (The
        bytes are already on that file system in the spool; the rename adds nothing to it.)
        """
        if not self.max_size and not self._min_free:
            return True
        async with self._lock:
            need = self.used + size - self.max_size if self.max_size else 0
            short = self._min_free - await asyncio.to_thread(self._free_bytes) if self._min_free else 0
            if need > 0 or short > 0:
                await self._evict(max(need, short), reason="size" if need >= short else "free_space")
            over = self.max_size and self.used + size > self.max_size
            if over or (self._min_free and await asyncio.to_thread(self._free_bytes) < self._min_free):
                self._metrics.passthrough.labels(kind).inc()
                log.warning("cache full of pinned or in-use content: serving %s without storing it", digest)
                return False
            return True

    async def stored(
        self,
        digest: Digest,
        kind: ObjectKind,
        size: int,
        upstream: str,
        repository: str,
        identity: FileIdentity | None = None,
    ) -> None:
        """A verified file was renamed into the store; `identity` is what its rename left on disk."""
        key = str(digest)
        if key in self._held and (identity is None or await self.identity_of(digest) == identity):
            return
        self._held.add(key, kind, size)
        self._first_seen.pop(key, None)
        if identity is not None:
            self._identities[key] = identity
        else:
            self._identities.pop(key, None)
        await self._run(self.index.add, key, kind, size, upstream, repository, identity)
        self._publish()

    async def quarantine(self, digest: Digest, kind: str, seen: FileIdentity | None, reason: str) -> None:
        """Move a stored file that is not what was admitted to quarantine/ and drop its entry, so the
        next request refetches it. `reason` is "changed" (its identity) or "corrupt" (its bytes).

        With `seen` (the identity the caller judged), a file that is no longer that one (a refetch
        stored a good one meanwhile) is left alone.
        """
        key = str(digest)
        moved = await asyncio.to_thread(self._store.quarantine, kind, digest, seen)
        if moved is False:
            return
        await self._drop(key)
        if moved:
            self._metrics.store_quarantined.labels(reason).inc()
            if key not in self._reported:
                self._reported[key] = True
                what = "changed on disk" if reason == "changed" else "does not match its digest"
                log.error("stored %s %s %s: moved to quarantine/, fetching it again", kind, digest, what)

    async def missing(self, digest: Digest, kind: str) -> None:
        """A held entry has no file (removed behind edgecache's back): drop the entry."""
        if not await asyncio.to_thread(self._store.path(kind, digest).exists):
            await self._drop(str(digest))

    async def _drop(self, key: str) -> None:
        if self._held.remove(key) is None:
            if self._loaded:
                return
            # Not read from the index yet: it may still be listed there, and the load in progress
            # must not bring it back.
            self._gone_while_loading.add(key)
        self._identities.pop(key, None)
        self._first_seen.pop(key, None)
        await self._run(self.index.remove, [key])
        self._publish()

    async def manifest_corrupt(self, digest: Digest) -> None:
        """A stored manifest read from disk did not hash to its digest (ManifestCache's callback)."""
        await self.quarantine(digest, ObjectKind.MANIFEST, None, "corrupt")

    # -- for the scrubber ----------------------------------------------------------------------

    async def least_recently_verified(self, limit: int) -> list[Entry]:
        return await self._run(self.index.least_recently_verified, limit)

    async def verified(self, rows: list[tuple[Digest, FileIdentity | None, float]]) -> None:
        """The scrubber hashed these and found them intact: record when, and the identity it saw where
        none was known (it is trusted now: the bytes behind it hashed to the digest)."""
        recorded = []
        for digest, identity, when in rows:
            key = str(digest)
            current = await self.identity_of(digest)
            if current is None and identity is not None and key in self._held:
                self._identities[key] = current = identity
            # A file stored again since it was hashed keeps the identity its admission recorded.
            known = current == identity
            recorded.append((key, identity if known else None, when))
        await self._run(self.index.mark_verified, recorded)

    async def _evict_if_needed(self) -> None:
        over = self.used - int(self.max_size * self._high) if self.max_size else 0
        short = self._min_free - await asyncio.to_thread(self._free_bytes) if self._min_free else 0
        if over > 0 or short > 0:
            target = self.used - int(self.max_size * self._low) if self.max_size else 0
            async with self._lock:
                await self._evict(max(target, short), reason="size" if over > 0 else "free_space")

    def _free_bytes(self) -> int:
        return shutil.disk_usage(self._store.root).free

    async def _evict(self, amount: int, reason: str = "size") -> int:
        """Evict at least `amount` bytes, coldest first, skipping pinned and in-use entries."""
        freed = 0
        await self._pick_up_outside_changes()  # pins or prunes made beside the server count now
        while freed < amount:
            started = time.perf_counter()
            await self._flush()  # the latest hits count before choosing victims
            candidates = await self._run(self.index.coldest, EVICT_BATCH + len(self._in_use))
            victims = [e for e in candidates if e.digest not in self._in_use and e.digest not in self._pinned]
            if not victims:
                break
            chosen = []
            for entry in victims:
                if freed >= amount:
                    break
                chosen.append(entry)
                freed += entry.size
            await asyncio.to_thread(self._delete, [(e.kind, e.digest) for e in chosen])
            await self._run(self.index.remove, [e.digest for e in chosen])
            if self.on_evicted is not None:
                self.on_evicted([Digest.parse(e.digest) for e in chosen])
            for entry in chosen:
                if self._held.remove(entry.digest) is None and not self._loaded:
                    self._gone_while_loading.add(entry.digest)
                self._identities.pop(entry.digest, None)
                self._first_seen.pop(entry.digest, None)
                self._metrics.evictions.labels(reason).inc()
            log.info(
                "evicted %d entries (%d bytes, %s) in %.3fs",
                len(chosen),
                sum(e.size for e in chosen),
                reason,
                time.perf_counter() - started,
            )
        self._publish()
        return freed

    def _delete(self, items: list[tuple[str, str]]) -> None:
        for kind, digest in items:
            self._store.remove(kind, Digest.parse(digest))

    def _publish(self) -> None:
        for kind in ObjectKind:
            self._metrics.cache_entries.labels(kind).set(self._held.count[kind])
            self._metrics.cache_bytes.labels(kind).set(self._held.bytes[kind])

    # -- pins ----------------------------------------------------------------------------------

    async def is_pinned_tag(self, upstream: str, repository: str, tag: str) -> bool:
        """Asked when a tag was just confirmed upstream, so a pin added a moment ago counts."""
        await self._pick_up_outside_changes()
        return any(pin.matches(upstream, repository, tag) for pin in self._pins)

    def is_pinned(self, digest: Digest) -> bool:
        return str(digest) in self._pinned

    @property
    def pins(self) -> list[Pin]:
        """The pin patterns as last read from the index (for the status page)."""
        return list(self._pins)

    @property
    def watermarks(self) -> tuple[float, float]:
        """(high, low) fractions of max_size: eviction starts above the first, stops at the second."""
        return self._high, self._low

    async def pin_manifest(self, digest: Digest, body: bytes) -> None:
        """Pin a manifest and everything it references (index children, config, layers)."""
        digests = {str(digest), *referenced_digests(body)}
        new = digests - self._pinned
        if new:
            self._pinned |= new
            await self._run(self.index.pin_digests, sorted(new))


def _holdings(read: Callable[[], dict[str, tuple[str, int]]]) -> Holdings:
    """Holdings of what `read` returns, built in the calling (worker) thread."""
    return Holdings(read())

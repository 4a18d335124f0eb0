"""The pull use case: decide hit / join / lead / revalidate / stale, and say what to send.

The service returns a `Reply` (status, headers, and a body source: bytes, an open file range, or a spool
stream); the fronts only send it. A request walks forward: the front chooses the upstream and converts
the repository name once (`Target`); the service decides the answer once (`ManifestAnswer` for
manifests), confirms and records repository membership in one place, and hands each part one job
(store, manifest cache, coalescing, flights, the upstream). It talks to the upstream only through the
`Upstream` Protocol, so it runs against an in-memory upstream in pure tests, and never to an HTTP server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

from cachetools import TTLCache

from edgecache import errors
from edgecache.config import CacheConfig
from edgecache.fill.coalesce import Coalescer
from edgecache.fill.flights import BlobFlight, Flights
from edgecache.fill.prefetch import Prefetcher, PulledTags
from edgecache.fill.source import BlobSource
from edgecache.fill.window import Cursor
from edgecache.metrics import Metrics
from edgecache.oci import (
    ATTACHMENT_TAG,
    INLINE_HASH_LIMIT,
    OCI_INDEX,
    OCI_MANIFEST,
    ByteRange,
    Digest,
    ManifestParts,
    Reference,
    RepoName,
    Tag,
    TagPage,
    declared_media_type,
    manifest_media_type_async,
    manifest_parts,
    manifest_parts_async,
    page_tag_list,
    parse_range,
)
from edgecache.outcomes import CacheResult, ObjectKind
from edgecache.store.blobs import BlobStore, OpenBlob
from edgecache.store.keeper import CacheKeeper
from edgecache.store.manifests import CachedManifest, ManifestCache, TagEntry, TagKey
from edgecache.store.membership import Membership
from edgecache.upstream.client import FetchedManifest, ManifestHead, Passthrough

log = logging.getLogger(__name__)
BLOB_CONTENT_TYPE = "application/octet-stream"
STALE_WARNING = '110 - "Response is Stale"'
# A tag list up to this size is paged on the event loop (well under a millisecond); a larger one, up
# to 4 MiB of JSON to parse and sort, on a worker thread.
INLINE_TAG_LIST_BYTES = 64 * 1024
WATCH_BATCH = 100  # watched tags revalidated per sweep, at most
SETTLED_FOR = 60.0  # seconds a manifest with nothing to prefetch is not parsed again
SETTLED_KEPT = 10_000
PREPARED_KEPT = 4096  # manifest reply header sets kept (PullService._manifest_headers)


class Upstream(BlobSource, Protocol):
    """What the use case needs of an upstream registry (upstream.client.UpstreamClient in service).

    Repositories are passed as the upstream names them (`Target.repo`)."""

    def tag_ttl(self, tag: str, default: float) -> float: ...
    async def head_manifest(self, repo: RepoName, reference: str) -> ManifestHead: ...
    async def get_manifest(self, repo: RepoName, reference: str) -> FetchedManifest: ...
    async def head_blob(self, repo: RepoName, digest: Digest) -> int | None: ...
    async def passthrough(self, repo: RepoName, path: str, query: Mapping[str, str]) -> Passthrough: ...


class SharedTier(Protocol):
    """The shared object-storage tier between the local disk and the upstream (issue 16;
    shared.tier.SharedTier in service): blob fills ask it before the upstream, manifests by digest
    come from it when it holds them (verified), and manifests verified from the upstream go up."""

    def source(self, upstream: BlobSource) -> BlobSource: ...
    async def manifest(self, digest: Digest) -> tuple[str | None, bytes] | None: ...
    def manifest_fetched(self, digest: Digest, media_type: str, body: bytes) -> None: ...


# Referrers listings (issue 18): (upstream, repo, digest, artifactType) → (headers, body).
ReferrersCache = TTLCache[tuple[str, RepoName, Digest, str], tuple[dict[str, str], bytes]]


class TrustGate(Protocol):
    """The signature policy's say on a manifest answer (issue 18; `trust.SignatureGate` in service):
    returns to serve it, raises SignatureRefused / SignatureUnavailable to refuse it."""

    async def check(self, target: Target, query: ManifestQuery, answer: ManifestAnswer) -> None: ...


class _AcceptAll:
    async def check(self, target: Target, query: ManifestQuery, answer: ManifestAnswer) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Target:
    """The repository a request is about, on the upstream chosen for it: the name as the client wrote
    it (`alpine`) and as that upstream names it (`library/alpine`), converted once by the front."""

    upstream: Upstream
    requested: RepoName
    repo: RepoName

    @property
    def upstream_name(self) -> str:
        return self.upstream.name


@dataclass
class BytesBody:
    data: bytes


@dataclass
class FileBody:
    """A verified blob on disk: the front sends [offset, offset+length) with the kernel, then closes."""

    blob: OpenBlob
    offset: int
    length: int


@dataclass
class SpoolBody:
    """Bytes [start, start+length) of a fill in progress, sent as they land in its spool.

    The flight raises if the fill fails; the front then aborts the response before its last byte.
    A length of None means upstream announced none: the front sends until the fill ends.
    """

    flight: BlobFlight
    start: int
    length: int | None
    cursor: Cursor | None = None  # a pass-through fill's: this reader's bytes, held in its window

    @property
    def end(self) -> int:
        return self.start + self.length - 1 if self.length is not None else 2**62


Body = BytesBody | FileBody | SpoolBody


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)  # shared: never changed once made
    body: Body | None = None
    cache: CacheResult = CacheResult.PASS
    closed: bool = False

    def close(self) -> None:
        """Release what a body holds once sent, or unsent (an open file, a fill, a place in a window)."""
        if self.closed:
            return
        self.closed = True
        body = self.body
        if isinstance(body, FileBody):
            body.blob.close()
        elif isinstance(body, SpoolBody):
            if body.cursor is not None:
                body.cursor.release()
            body.flight.drop_reply()


@dataclass(frozen=True)
class ManifestQuery:
    reference: Reference
    accept: frozenset[str] | None
    head: bool
    if_none_match: str | None = None


@dataclass(frozen=True)
class BlobQuery:
    digest: Digest
    head: bool
    range_headers: tuple[str, ...] = ()
    if_none_match: str | None = None


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    """The decision for a manifest request, made once: which manifest, from where, and whether stale.

    `manifest` is None only for a HEAD answered from what a tag entry or upstream's HEAD knows."""

    digest: Digest
    media_type: str
    manifest: CachedManifest | None
    size: int | None
    result: CacheResult
    stale: bool = False


class PullService:
    def __init__(
        self,
        store: BlobStore,
        manifests: ManifestCache,
        flights: Flights,
        coalescer: Coalescer,
        metrics: Metrics,
        keeper: CacheKeeper,
        members: Membership,
        *,
        tag_ttl: float,
        max_stale: float,
        stale_while_revalidate: float = 0.0,
        negative_ttl: float = 30.0,
        prefetcher: Prefetcher | None = None,
        watch_window: float = 0.0,
        referrers_ttl: float = 30.0,
    ) -> None:
        self._store = store
        self._manifests = manifests
        self._flights = flights
        self._coalesce = coalescer
        self._metrics = metrics
        self._keeper = keeper
        self._members = members
        self._tag_ttl = tag_ttl
        self._max_stale = max_stale
        self._swr = stale_while_revalidate
        self._background: set[asyncio.Task[object]] = set()
        # Upstreams whose stored digests are served under any repository name (`set_unchecked`).
        self._unchecked: frozenset[str] = frozenset()
        # Tags upstream just said do not exist: answered 404 for a moment without asking again.
        self._missing_tags: TTLCache[TagKey, bool] | None = (
            TTLCache(maxsize=10_000, ttl=negative_ttl) if negative_ttl > 0 else None
        )
        self._prefetch = prefetcher
        # Tags clients pulled lately: revalidated in the background, and prefetched when they move.
        self.pulled_tags: PulledTags[Target] = PulledTags(watch_window if prefetcher else 0.0)
        # Manifests with nothing to prefetch at their last serve (indexes, or every blob stored): not
        # parsed again for a minute, so a hot manifest's hits stay cheap.
        self._settled: dict[Digest, float] = {}  # -> until when (a plain dict: cheap)
        self._prepared_headers: dict[tuple[Digest, str, int | None, bool], Mapping[str, str]] = {}
        self._trust: TrustGate = _AcceptAll()
        self._shared: SharedTier | None = None
        # Referrers listings (issue 18): (upstream, repo, digest, artifactType) → (headers, body).
        self._referrers_ttl = referrers_ttl
        self._referrers = self._referrers_cache(referrers_ttl)

    def reconfigure(self, cache: CacheConfig) -> None:
        """Reloaded TTLs apply to the next request; entries already cached keep their confirmation time."""
        self._tag_ttl = cache.tag_ttl
        self._max_stale = cache.max_stale
        self._swr = cache.stale_while_revalidate
        if cache.referrers_ttl != self._referrers_ttl:
            self._referrers_ttl = cache.referrers_ttl
            self._referrers = self._referrers_cache(cache.referrers_ttl)

    def set_unchecked(self, upstreams: frozenset[str]) -> None:
        """The upstreams for which knowing which repository holds a digest protects nothing (the
        wiring decides: `app.unchecked_upstreams`); their stored digests are served under any
        repository name without asking upstream, even with their facts lost and upstream down."""
        self._unchecked = upstreams

    @staticmethod
    def _referrers_cache(ttl: float) -> ReferrersCache | None:
        return TTLCache(maxsize=10_000, ttl=ttl) if ttl > 0 else None

    def set_shared(self, tier: SharedTier | None) -> None:
        """Fills and manifests by digest ask the shared tier before the upstream."""
        self._shared = tier

    def _source(self, target: Target) -> BlobSource:
        """Where this target's fills read from: the shared tier (then the upstream), or the upstream."""
        return target.upstream if self._shared is None else self._shared.source(target.upstream)

    def set_trust(self, gate: TrustGate) -> None:
        """The signature policy asked about every manifest answer before it is recorded or served."""
        self._trust = gate

    async def settled(self) -> None:
        """Wait for background revalidations started so far (shutdown, tests)."""
        while self._background:
            await asyncio.wait(list(self._background))

    async def close(self) -> None:
        """Stop background revalidations and prefetches of moved tags (shutdown)."""
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(list(self._background))

    # -- manifests -----------------------------------------------------------------------------

    async def manifest(self, target: Target, query: ManifestQuery) -> Reply:
        answer = await self._manifest_answer(target, query)
        # trust (issue 18): the signature policy decides on the answer before it is recorded or
        # served; a refusal raises here, so nothing of a refused manifest is served or prefetched.
        await self._trust.check(target, query, answer)
        await self._remember(target, answer)
        reply = self._manifest_reply(query, answer)
        if self._prefetch is not None:
            self._ahead(target, query, answer)
        return reply

    async def signature_manifest(self, target: Target, query: ManifestQuery) -> Reply:
        """A signature manifest the signature policy reads to decide on an image: cached and
        revalidated like any manifest, but not a client's pull, so nothing is prefetched or watched
        for it (its payloads would count as prefetches, and then as prefetches used)."""
        answer = await self._manifest_answer(target, query)
        await self._remember(target, answer)
        return self._manifest_reply(query, answer)

    async def _manifest_answer(self, target: Target, query: ManifestQuery) -> ManifestAnswer:
        if isinstance(query.reference, Digest):
            return await self._manifest_by_digest(target, query.reference)
        return await self._manifest_by_tag(target, query, query.reference)

    async def _manifest_by_digest(self, target: Target, digest: Digest) -> ManifestAnswer:
        cached = await self._manifests.get(digest)
        if cached is None:
            fetched = await self._fetch_manifest(target, digest)
            return ManifestAnswer(digest, fetched.media_type, fetched, None, CacheResult.MISS)
        await self._confirm_manifest(target, digest)
        self._keeper.touch(digest)
        return ManifestAnswer(digest, cached.media_type, cached, None, CacheResult.HIT)

    async def _manifest_by_tag(self, target: Target, query: ManifestQuery, tag: Tag) -> ManifestAnswer:
        key = (target.upstream_name, target.repo, tag)
        if self._missing_tags is not None and key in self._missing_tags:
            raise errors.ManifestUnknown(
                f"upstream {target.upstream_name} has no such manifest", negative=True
            )
        known = await self._manifests.tag(key)
        if known is not None:
            fresh = await self._fresh_answer(target, query, key, known)
            if fresh is not None:
                return fresh
        try:
            entry, cached, result = await self._coalesce.run(
                ("tag", key, query.head),
                lambda: self._resolve_tag(target, key, known, want_body=not query.head),
            )
            stale = False
        except errors.ManifestUnknown:
            # Authoritative: upstream says the tag is gone, so it is not served stale either.
            await self._manifests.drop_tag(key)
            if self._missing_tags is not None:
                self._missing_tags[key] = True
            raise
        except (errors.UpstreamError, errors.UpstreamRateLimited) as exc:
            held = await self._stale(known)
            if held is None:
                raise
            self._count_stale(target, tag, exc)
            (entry, cached), result, stale = held, CacheResult.STALE, True
        if cached is None and (not query.head or entry.size is None):
            cached = await self._manifests.get(entry.digest) or await self._fetch_manifest(
                target, entry.digest
            )
        if cached is not None and await self._keeper.is_pinned_tag(
            target.upstream_name, str(target.repo), str(tag)
        ):
            await self._keeper.pin_manifest(cached.digest, cached.body)
        return ManifestAnswer(entry.digest, entry.media_type, cached, entry.size, result, stale)

    async def _fresh_answer(
        self, target: Target, query: ManifestQuery, key: TagKey, known: TagEntry
    ) -> ManifestAnswer | None:
        """A tag entry within its TTL answers at once (HIT); within stale-while-revalidate too
        (STALE, with one background revalidation). None when upstream must be asked."""
        age = self._manifests.age(known)
        ttl = target.upstream.tag_ttl(str(key[2]), self._tag_ttl)
        if age >= ttl + self._swr:
            return None
        cached = await self._manifests.get(known.digest)
        if cached is None and not (query.head and known.size is not None):
            return None
        if age < ttl:
            self._keeper.touch(known.digest)
            return ManifestAnswer(known.digest, known.media_type, cached, known.size, CacheResult.HIT)
        self._revalidate_later(target, key, known)
        return ManifestAnswer(known.digest, known.media_type, cached, known.size, CacheResult.STALE, True)

    def _count_stale(self, target: Target, tag: Tag, exc: errors.EdgecacheError) -> None:
        reason = (
            "rate_limited"
            if isinstance(exc, errors.UpstreamRateLimited)
            else "down"
            if isinstance(exc, errors.UpstreamDown)
            else "error"
        )
        log.warning("upstream %s failing (%s); serving tag %s stale", target.upstream_name, reason, tag)
        self._metrics.stale_served.labels(target.upstream_name, reason).inc()

    def _revalidate_later(self, target: Target, key: TagKey, known: TagEntry) -> None:
        async def revalidate() -> object:
            try:
                return await self._coalesce.run(
                    ("tag", key, True), lambda: self._resolve_tag(target, key, known, want_body=False)
                )
            except errors.EdgecacheError as exc:  # the next request sees the outcome; nobody waits here
                log.info("background revalidation of %s failed: %s", key[2], exc.message)
                return None

        task = asyncio.create_task(revalidate())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resolve_tag(
        self, target: Target, key: TagKey, known: TagEntry | None, *, want_body: bool
    ) -> tuple[TagEntry, CachedManifest | None, CacheResult]:
        """Ask upstream what the tag points at (`_ask_tag`); a tag pulled lately that moved has the
        new image prefetched."""
        entry, cached, result = await self._ask_tag(target, key, known, want_body=want_body)
        if known is not None and entry.digest != known.digest:
            self._tag_moved(target, key, entry.digest)
        return entry, cached, result

    async def _ask_tag(
        self, target: Target, key: TagKey, known: TagEntry | None, *, want_body: bool
    ) -> tuple[TagEntry, CachedManifest | None, CacheResult]:
        """Ask upstream what the tag points at.

        A HEAD when it may be enough (revalidating what we hold, or a HEAD from the client): it is
        cheap and Docker Hub does not count it against the pull limit. A cold GET goes straight to GET.
        """
        upstream, tag = target.upstream, str(key[2])
        if known is not None or not want_body:
            head = await upstream.head_manifest(target.repo, tag)
            if head.digest is not None:
                cached = await self._manifests.get(head.digest)
                if cached is not None or not want_body:
                    media_type = (
                        cached.media_type if cached else declared_media_type(head.media_type) or OCI_MANIFEST
                    )
                    entry = await self._manifests.set_tag(key, head.digest, media_type, head.size)
                    return entry, cached, CacheResult.REVALIDATED if cached else CacheResult.MISS
        fetched = await upstream.get_manifest(target.repo, tag)
        claimed = fetched.digest
        if claimed is not None and await Digest.of_async(fetched.body, claimed.algorithm) != claimed:
            self._metrics.digest_mismatches.labels(upstream.name, "manifest").inc()
            raise errors.UpstreamDigestMismatch("manifest content does not match its digest")
        digest = claimed or await Digest.of_async(fetched.body)
        media_type = await manifest_media_type_async(fetched.body, fetched.media_type)
        manifest = CachedManifest(digest, media_type, fetched.body)
        await self._store_manifest(target, manifest)
        if self._shared is not None:  # by its digest: tags never go to the shared tier
            self._shared.manifest_fetched(digest, media_type, fetched.body)
        entry = await self._manifests.set_tag(key, digest, manifest.media_type, len(fetched.body))
        return entry, manifest, CacheResult.MISS

    async def _fetch_manifest(self, target: Target, digest: Digest) -> CachedManifest:
        """The manifest `digest` from upstream under `target.repo`, verified and stored; concurrent
        askers of the same repository share one GET (another repository's fetch is not shared, so
        it cannot stand in for that repository holding it)."""

        async def fetch() -> CachedManifest:
            shared = await self._shared_manifest(target, digest)
            if shared is not None:
                await self._store_manifest(target, shared)
                return shared
            fetched = await target.upstream.get_manifest(target.repo, str(digest))
            if await Digest.of_async(fetched.body, digest.algorithm) != digest:
                log.error("upstream %s sent a manifest that does not match %s", target.upstream_name, digest)
                self._metrics.digest_mismatches.labels(target.upstream_name, "manifest").inc()
                raise errors.UpstreamDigestMismatch("manifest content does not match its digest")
            media_type = await manifest_media_type_async(fetched.body, fetched.media_type)
            manifest = CachedManifest(digest, media_type, fetched.body)
            await self._store_manifest(target, manifest)
            if self._shared is not None:
                self._shared.manifest_fetched(digest, media_type, fetched.body)
            return manifest

        return await self._coalesce.run(("manifest", target.upstream_name, target.repo, digest), fetch)

    async def _shared_manifest(self, target: Target, digest: Digest) -> CachedManifest | None:
        """The manifest from the shared tier (verified there), once the repository is known to hold
        it (asked of the upstream with a HEAD otherwise: the bucket knows no repositories)."""
        if self._shared is None:
            return None
        await self._confirm_manifest(target, digest)
        got = await self._shared.manifest(digest)
        if got is None:
            return None
        declared, body = got
        try:
            media_type = await manifest_media_type_async(body, declared)
        except errors.EdgecacheError:
            return None  # verified bytes that are no manifest: the upstream's answer decides
        return CachedManifest(digest, media_type, body)

    async def _store_manifest(self, target: Target, manifest: CachedManifest) -> None:
        """Keep a verified manifest (when the cache has room) and extend pins to what it references."""
        size = len(manifest.body)
        stored = await self._keeper.admit(manifest.digest, ObjectKind.MANIFEST, size)
        await self._manifests.put(manifest, persist=stored)
        if stored:
            await self._keeper.stored(
                manifest.digest, ObjectKind.MANIFEST, size, target.upstream_name, str(target.repo)
            )
        if self._keeper.is_pinned(manifest.digest):
            await self._keeper.pin_manifest(manifest.digest, manifest.body)

    async def _stale(self, entry: TagEntry | None) -> tuple[TagEntry, CachedManifest] | None:
        if entry is None or self._manifests.age(entry) > self._max_stale:
            return None
        cached = await self._manifests.get(entry.digest)
        return (entry, cached) if cached is not None else None

    async def _remember(self, target: Target, answer: ManifestAnswer) -> None:
        """The one place a manifest answer is recorded: the repository holds the manifest and,
        when its body is known, everything it references."""
        if answer.manifest is not None:
            await self._members.record_manifest(
                target.upstream_name, target.repo, answer.digest, answer.manifest.body
            )
        else:
            self._members.record(target.upstream_name, target.repo, [answer.digest])

    def _manifest_reply(self, query: ManifestQuery, answer: ManifestAnswer) -> Reply:
        """Headers for a manifest; a HEAD answered from upstream's HEAD has `size` but no body."""
        if query.accept is not None and answer.media_type not in query.accept:
            raise errors.NotAcceptable(f"manifest is {answer.media_type}, not in the request's Accept")
        manifest = answer.manifest
        length = len(manifest.body) if manifest is not None else answer.size
        headers = self._manifest_headers(answer.digest, answer.media_type, length, answer.stale)
        if query.if_none_match is not None and _etag_matches(query.if_none_match, headers["ETag"]):
            return Reply(304, headers, None, answer.result)
        if query.head or manifest is None:
            return Reply(200, headers, None, answer.result)
        return Reply(200, headers, BytesBody(manifest.body), answer.result)

    def _manifest_headers(
        self, digest: Digest, media_type: str, length: int | None, stale: bool
    ) -> Mapping[str, str]:
        """A manifest reply's headers, built once per (digest, type, length, staleness) and shared
        by every reply of it (nothing changes a Reply's headers after it is made): a hot tag's hit
        then builds no strings."""
        key = (digest, media_type, length, stale)
        headers = self._prepared_headers.get(key)
        if headers is None:
            built = {"Content-Type": media_type, "Docker-Content-Digest": str(digest), "ETag": f'"{digest}"'}
            if length is not None:
                built["Content-Length"] = str(length)
            if stale:
                built["Warning"] = STALE_WARNING
            if len(self._prepared_headers) >= PREPARED_KEPT:
                self._prepared_headers.clear()
            headers = self._prepared_headers[key] = built
        return headers

    # -- prefetch: what a served manifest says the client asks for next --------------------------

    def _ahead(self, target: Target, query: ManifestQuery, answer: ManifestAnswer) -> None:
        """After serving a manifest: note a pulled tag (and a platform taken from its index), and
        start fills for the blobs of an image manifest (GET only) that are not stored yet. An index
        starts nothing: only the platforms clients then ask for count.

        On every manifest hit, so the usual case is two dict lookups: a manifest with nothing to do
        (an index, or every blob stored) is `_settled` for a minute, its platform mark included."""
        upstream, repo, digest = target.upstream_name, target.repo, answer.digest
        # Attachment tags (`sha256-<hex>.sig`, the referrers fallback) are not watched: a signature
        # is fetched with its image, and the image's own tag is what moves.
        if not isinstance(query.reference, Digest) and not ATTACHMENT_TAG.fullmatch(str(query.reference)):
            self.pulled_tags.pulled((upstream, repo, query.reference), target, digest)
        manifest = answer.manifest
        if manifest is None or query.head:
            return
        now = time.monotonic()
        if self._settled.get(digest, 0.0) > now:
            return
        if len(manifest.body) <= INLINE_HASH_LIMIT:  # tens of microseconds: done before replying
            self._prefetch_from(target, digest, manifest_parts(manifest.body))
            return

        async def parse_then_prefetch() -> object:  # a large one is parsed off the request's path
            self._prefetch_from(target, digest, await manifest_parts_async(manifest.body))
            return None

        task = asyncio.create_task(parse_then_prefetch())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _prefetch_from(self, target: Target, digest: Digest, parts: ManifestParts) -> None:
        now = time.monotonic()
        self.pulled_tags.served(target.upstream_name, target.repo, digest, parts.children)
        if self._offer(target, parts):
            if len(self._settled) >= SETTLED_KEPT:
                # Cleared, not swept: a sweep kept every entry (and ran on every insert) when more
                # than SETTLED_KEPT manifests settled within a minute. A cleared one is parsed again.
                self._settled.clear()
            self._settled[digest] = now + SETTLED_FOR

    def _offer(self, target: Target, parts: ManifestParts) -> bool:
        """Prefetch the blobs not stored yet; True when there is nothing to do (all of them stored,
        or an index): the manifest is then not parsed again for a minute."""
        assert self._prefetch is not None
        if not parts.blobs:
            return True
        queued = self._prefetch.offer(self._source(target), target.repo, parts.blobs)
        return queued == 0 and all(self._keeper.held(blob.digest) is not None for blob in parts.blobs)

    def _tag_moved(self, target: Target, key: TagKey, digest: Digest) -> None:
        """A revalidation found the tag at a new digest: when clients pulled it lately, fetch the new
        manifest (for an index, the platforms they took) and prefetch its blobs, in the background."""
        pulled = self.pulled_tags.recent(key)
        if pulled is None:
            return
        self._metrics.prefetch_tags_moved.labels(target.upstream_name).inc()
        log.info("tag %s of %s moved to %s: prefetching it", key[2], key[1], digest)
        platforms = set(pulled.platforms)

        async def prefetch_moved() -> object:
            try:
                await self._prefetch_image(target, digest, platforms)
            except errors.EdgecacheError as exc:  # the next pull fetches it itself
                log.info("prefetch of moved tag %s failed: %s", key[2], exc.message)
            return None

        task = asyncio.create_task(prefetch_moved())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _prefetch_image(self, target: Target, digest: Digest, platforms: set[str]) -> None:
        """Fetch a moved tag's manifest and prefetch its blobs (an index: those of `platforms`), each
        manifest first passing the signature policy as a client's GET would: a refused one raises,
        and none of its blobs are fetched."""
        manifest = await self._manifests.get(digest) or await self._fetch_manifest(target, digest)
        answer = ManifestAnswer(digest, manifest.media_type, manifest, None, CacheResult.MISS)
        await self._trust.check(target, ManifestQuery(digest, None, head=False), answer)
        await self._members.record_manifest(target.upstream_name, target.repo, digest, manifest.body)
        parts = await manifest_parts_async(manifest.body)
        for child in parts.children:
            if child.platform in platforms:
                await self._prefetch_image(target, child.digest, set())
        self._offer(target, parts)

    async def watch_pulled_tags(self) -> None:
        """Forever: revalidate the tags clients pulled within the watch window as their TTLs run out,
        so a tag that moved is prefetched before the next rollout asks for it (`_tag_moved`)."""
        while True:
            await asyncio.sleep(min(max(self._tag_ttl, 1.0), 60.0))
            await self.revalidate_pulled_tags()

    async def revalidate_pulled_tags(self) -> int:
        """One sweep of `watch_pulled_tags`; returns how many revalidations it started."""
        started = 0
        for key, pulled in reversed(self.pulled_tags.due()):
            if started >= WATCH_BATCH:
                break
            known = await self._manifests.tag(key)
            if known is None:
                continue
            if self._manifests.age(known) < pulled.target.upstream.tag_ttl(str(key[2]), self._tag_ttl):
                continue
            self._revalidate_later(pulled.target, key, known)
            started += 1
        return started

    # -- membership: a digest is served for a repository only once it is known to hold it ----------

    async def _holds(self, target: Target, digest: Digest) -> bool:
        """Known (or not worth knowing) that the repository holds the digest: no upstream asked."""
        if target.upstream_name in self._unchecked:
            return True
        return await self._members.known(target.upstream_name, target.repo, digest)

    async def _confirm_blob(self, target: Target, digest: Digest) -> int | None:
        """Confirm the repository holds the blob, asking upstream (HEAD) if we do not know; raises
        BlobUnknown when upstream says it does not. Returns upstream's size when it was asked."""
        if await self._holds(target, digest):
            return None
        size = await target.upstream.head_blob(target.repo, digest)
        self._members.record(target.upstream_name, target.repo, [digest])
        return size

    async def _confirm_manifest(self, target: Target, digest: Digest) -> None:
        """Confirm the repository holds the manifest, asking upstream (HEAD) if we do not know."""
        if await self._holds(target, digest):
            return
        head = await target.upstream.head_manifest(target.repo, str(digest))
        if head.digest is not None and head.digest != digest:
            raise errors.UpstreamDigestMismatch("upstream answered for another manifest")
        self._members.record(target.upstream_name, target.repo, [digest])

    # -- blobs ---------------------------------------------------------------------------------

    async def blob(self, target: Target, query: BlobQuery) -> Reply:
        digest = query.digest
        headers = {
            "Content-Type": BLOB_CONTENT_TYPE,
            "Docker-Content-Digest": str(digest),
            "ETag": f'"{digest}"',
            "Accept-Ranges": "bytes",
            "Cache-Control": "max-age=31536000, immutable",
        }
        if query.head:
            return await self._blob_head(target, query, headers)
        if self._prefetch is not None:
            self._prefetch.asked(target.upstream_name, digest)
        opened = await self._open_stored(digest)
        if opened is not None:
            return await self._blob_hit(target, query, opened, headers)
        return await self._blob_fill(target, query, headers)

    async def _open_stored(self, digest: Digest) -> OpenBlob | None:
        """The stored blob, open, if the index vouches for it (at start-up, until the disk walk is done,
        only what it lists); a file that is not the one admitted (its size, mtime or inode, from the
        fstat the open made) is quarantined and the request becomes a miss: it is never served."""
        vouched, expected = await self._keeper.vouched(digest)
        if not vouched:
            return None
        opened = await self._store.open_blob(digest)
        wrong_size = opened is not None and expected is not None and opened.size != expected
        if opened is not None and (wrong_size or not await self._keeper.unchanged(digest, opened.identity)):
            opened.close()
            await self._keeper.quarantine(digest, ObjectKind.BLOB, opened.identity, "changed")
            return None
        return opened

    async def _blob_hit(
        self, target: Target, query: BlobQuery, opened: OpenBlob, headers: dict[str, str]
    ) -> Reply:
        try:
            await self._confirm_blob(target, query.digest)
            self._keeper.touch(query.digest)
            opened.hold(self._keeper.reading(query.digest))
            if query.if_none_match is not None and _etag_matches(query.if_none_match, headers["ETag"]):
                opened.close()
                return Reply(304, headers, None, CacheResult.HIT)
            byte_range = parse_range(query.range_headers, opened.size)
        except BaseException:
            opened.close()
            raise
        status, start, length = _span(byte_range, opened.size, headers)
        return Reply(status, headers, FileBody(opened, start, length), CacheResult.HIT)

    async def _blob_fill(self, target: Target, query: BlobQuery, headers: dict[str, str]) -> Reply:
        digest = query.digest
        running = self._flights.running(target.upstream_name, digest)
        if (running is not None and running.repo != target.repo) or (
            running is None and self._shared is not None
        ):
            # Another repository's fill: join it only once this repository is known to hold the blob.
            # The same before the shared tier serves it: the bucket knows no repositories.
            await self._confirm_blob(target, digest)
        source = self._source(target)
        flight, led = self._flights.blob(source, target.repo, digest)
        # The reply holds the fill from the moment it joins (dropped by Reply.close): a fill that
        # every other reader has left is not abandoned while this one waits for it to start.
        flight.add_reply()
        waited = False
        try:
            try:
                size, waited = await flight.wait_started()
            except errors.BlobUnknown:
                if flight.repo == target.repo:
                    raise
                # The leader asked under a repository that lacks the blob; ours may have it.
                flight, led = self._switch(flight, self._flights.blob(source, target.repo, digest))
                size, waited = await flight.wait_started()
            if flight.repo == target.repo:
                self._members.record(target.upstream_name, target.repo, [digest])  # upstream served it
            if size is None:  # upstream sent no length: stream it all, chunked
                status, start, length = 200, 0, None
            else:
                byte_range = parse_range(query.range_headers, size)
                status, start, length = _span(byte_range, size, headers)
            cursor = None
            if flight.passing:
                cursor = flight.claim(start, waited=waited)
                waited = False
                if cursor is None:
                    # Its bytes have left the window (it came after the first readers, whose places
                    # were kept): a fill of its own, a second upstream GET, since nothing was stored.
                    fresh = self._flights.blob(source, target.repo, digest, fresh=True)
                    flight, led = self._switch(flight, fresh)
                    _, waited = await flight.wait_started()
                    if flight.passing:  # (else there is room now: a stored fill, read from its spool)
                        cursor = flight.claim(start, waited=waited)
                        waited = False
                        if cursor is None:
                            raise errors.UpstreamUnavailable("the pass-through fill moved on too soon")
        except BaseException:
            if waited:
                flight.unwait()  # refused (a bad Range): its place in the window is given back
            flight.drop_reply()
            raise
        # A verified fill still being persisted is as good as the store: a hit.
        result = CacheResult.HIT if flight.done else CacheResult.MISS if led else CacheResult.JOINED
        return Reply(status, headers, SpoolBody(flight, start, length, cursor), result)

    @staticmethod
    def _switch(held: BlobFlight, joined: tuple[BlobFlight, bool]) -> tuple[BlobFlight, bool]:
        """Move this reply's hold from one fill to another."""
        joined[0].add_reply()
        held.drop_reply()
        return joined

    async def _blob_head(self, target: Target, query: BlobQuery, headers: dict[str, str]) -> Reply:
        digest = query.digest
        vouched, _ = await self._keeper.vouched(digest)
        stored = await self._store.has_blob(digest) if vouched else None
        if stored is not None and not await self._keeper.unchanged(digest, stored):
            # Its Content-Length could be wrong: quarantined as a GET would, and answered as a miss.
            await self._keeper.quarantine(digest, ObjectKind.BLOB, stored, "changed")
            stored = None
        size = stored.size if stored is not None else None
        result = CacheResult.HIT
        if size is not None:
            await self._confirm_blob(target, digest)
            self._keeper.touch(digest)
        else:
            flight = self._flights.running(target.upstream_name, digest)
            if flight is not None and flight.repo != target.repo:
                size = await self._confirm_blob(target, digest)
            if size is None and flight is not None:
                size = await flight.started
            result = CacheResult.JOINED if flight is not None else CacheResult.MISS
            if size is None:
                size = await target.upstream.head_blob(target.repo, digest)
                self._members.record(target.upstream_name, target.repo, [digest])
        if size is not None:
            headers["Content-Length"] = str(size)
        return Reply(200, headers, None, result)

    # -- listings, relayed ---------------------------------------------------------------------

    async def tags_list(
        self, target: Target, params: Mapping[str, str], link_name: str, ns: str | None
    ) -> Reply:
        """The upstream's tag list, paged here as the spec says (sorted, after `last`, at most `n`),
        whether or not the upstream honoured n and last (they are passed on all the same). The body
        and the Link name the repository as the client wrote it (`link_name`)."""
        n = int(params["n"]) if "n" in params else None
        # n=0 is answered here (an empty list); upstream is asked for one tag, which is enough to
        # learn whether the repository exists, and which no upstream can refuse as a page size.
        asked = {**params, "n": "1"} if n == 0 else params
        answer = await target.upstream.passthrough(target.repo, "tags/list", asked)
        if answer.status == 404:
            raise errors.NameUnknown(f"upstream {target.upstream_name} has no such repository")
        page = await _tag_page(answer.body, n, params.get("last"))
        headers = {"Content-Type": "application/json"}
        link = _next_tags_link(page, n, answer.link, link_name, ns)
        if link:
            headers["Link"] = link
        body = json.dumps({"name": link_name, "tags": page.tags}).encode()
        return Reply(200, headers, BytesBody(body), CacheResult.PASS)

    # -- referrers (issue 18): cached briefly, with the tag-schema fallback ---------------------------

    async def referrers(self, target: Target, digest: Digest, params: Mapping[str, str]) -> Reply:
        """The referrers of `digest` as an OCI index, filtered by `artifactType` when asked.

        From upstream's referrers API when it has one; when it answers 404 (no such API: distribution
        2.8, many mirrors) from the tag-schema fallback, the index tagged `sha256-<hex>`, as the
        distribution spec says a client would; with neither, an empty index (the spec's answer for a
        digest without referrers: a registry with the API never says 404 here). A listing is kept
        `cache.referrers_ttl` seconds: signatures and attestations are added after the image."""
        artifact_type = params.get("artifactType")
        key = (target.upstream_name, target.repo, digest, artifact_type or "")
        if self._referrers is not None and (held := self._referrers.get(key)) is not None:
            return Reply(200, dict(held[0]), BytesBody(held[1]), CacheResult.HIT)
        answer = await target.upstream.passthrough(target.repo, f"referrers/{digest}", params)
        if answer.status == 200:
            if artifact_type and "artifactType" not in (answer.filters or ""):
                body, filtered = _referrers_index(_listed(answer.body), artifact_type), True
            else:
                _listed(answer.body)  # relayed as it is, once known to be a listing
                body, filtered = answer.body, bool(answer.filters)
        else:
            body = await self._referrers_fallback(target, digest, artifact_type)
            filtered = artifact_type is not None
        headers = {"Content-Type": OCI_INDEX}
        if filtered:
            headers["OCI-Filters-Applied"] = "artifactType"
        if self._referrers is not None:
            self._referrers[key] = (headers, body)
        return Reply(200, dict(headers), BytesBody(body), CacheResult.MISS)

    async def _referrers_fallback(self, target: Target, digest: Digest, artifact_type: str | None) -> bytes:
        """The `sha256-<hex>` tag's index (through the manifest path: cached, verified), filtered."""
        fallback = ManifestQuery(Tag.parse(f"{digest.algorithm}-{digest.hex}"), None, head=False)
        try:
            reply = await self.manifest(target, fallback)
        except (errors.ManifestUnknown, errors.SignatureRefused):
            # none; or an image pushed under that tag, which the signature policy refused
            return _referrers_index([], None)
        body = reply.body.data if isinstance(reply.body, BytesBody) else b"{}"
        reply.close()
        try:
            manifests = _listed(body)
        except errors.UpstreamUnavailable:
            manifests = []
        return _referrers_index(manifests, artifact_type)


def _listed(body: bytes) -> list[object]:
    """The descriptors of a referrers listing (an OCI index); UpstreamUnavailable if it is not one."""
    try:
        document = json.loads(body)
        manifests = document.get("manifests") or []
    except (ValueError, AttributeError):
        raise errors.UpstreamUnavailable("upstream sent a referrers list that does not parse") from None
    if not isinstance(manifests, list):
        raise errors.UpstreamUnavailable("upstream sent a referrers list that does not parse")
    return manifests


def _referrers_index(manifests: list[object], artifact_type: str | None) -> bytes:
    """An OCI image index of referrer descriptors, only those of `artifact_type` when given."""
    kept = [
        m
        for m in manifests
        if isinstance(m, dict) and (artifact_type is None or m.get("artifactType") == artifact_type)
    ]
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": kept}).encode()


def _span(byte_range: ByteRange | None, size: int, headers: dict[str, str]) -> tuple[int, int, int]:
    """Status, start and length of what to send; sets Content-Length (and Content-Range)."""
    if byte_range is None:
        headers["Content-Length"] = str(size)
        return 200, 0, size
    headers["Content-Length"] = str(byte_range.length)
    headers["Content-Range"] = byte_range.content_range(size)
    return 206, byte_range.start, byte_range.length


def _etag_matches(header: str, etag: str) -> bool:
    candidates = {c.strip().removeprefix("W/") for c in header.split(",")}
    return "*" in candidates or etag in candidates


async def _tag_page(body: bytes, n: int | None, last: str | None) -> TagPage:
    """`page_tag_list`, on a worker thread for a large list (parsing and sorting 4 MiB of tags is tens
    of ms of CPU: not on the event loop)."""
    try:
        if len(body) <= INLINE_TAG_LIST_BYTES:
            return page_tag_list(body, n, last)
        return await asyncio.to_thread(page_tag_list, body, n, last)
    except ValueError:
        raise errors.UpstreamUnavailable("upstream sent a tag list that does not parse") from None


def _next_tags_link(
    page: TagPage, n: int | None, upstream_link: str | None, name: str, ns: str | None
) -> str | None:
    """The Link to the next page: ours when tags remain after our page (the upstream sent more than
    asked), else the upstream's own (it paginated), pointed at us. None for n=0, as the spec says."""
    if n == 0:
        return None
    if page.more:
        return _tags_link(name, [("last", page.tags[-1]), ("n", str(len(page.tags)))], ns)
    return _rewrite_link(upstream_link, name, ns) if upstream_link else None


def _rewrite_link(link: str, name: str, ns: str | None) -> str | None:
    """Point an upstream's pagination Link at our own path, keeping only its n and last."""
    start, end = link.find("<"), link.find(">")
    if start < 0 or end < start:
        return None
    target = urlsplit(link[start + 1 : end])
    return _tags_link(name, [(k, v) for k, v in parse_qsl(target.query) if k in ("n", "last")], ns)


def _tags_link(name: str, query: list[tuple[str, str]], ns: str | None) -> str:
    """`</v2/<name>/tags/list?last=..&n=..&ns=..>; rel="next"`: containerd's ns= is kept for its next
    request to route the same way."""
    if ns:
        query = [*query, ("ns", ns)]
    encoded = f"?{urlencode(query)}" if query else ""
    return f'</v2/{name}/tags/list{encoded}>; rel="next"'

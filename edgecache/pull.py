"""The pull use case: decide hit / join / lead / revalidate / stale, and say what to send.

The service returns a `Reply` (status, headers, and a body source: bytes, an open file range, or a spool
stream); the fronts only send it. It talks to parts (store, manifest cache, flights, upstream clients)
and never to aiohttp's server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit

from cachetools import TTLCache

from edgecache import errors
from edgecache.config import CacheConfig
from edgecache.fill.flights import BlobFlight, Flights
from edgecache.metrics import Metrics
from edgecache.oci import (
    ByteRange,
    Digest,
    Reference,
    RepoName,
    Tag,
    manifest_media_type,
    parse_range,
)
from edgecache.store.blobs import BlobStore, OpenBlob
from edgecache.store.keeper import CacheKeeper
from edgecache.store.manifests import CachedManifest, ManifestCache, TagEntry, TagKey
from edgecache.store.membership import Membership
from edgecache.upstream.client import UpstreamClient

log = logging.getLogger(__name__)
BLOB_CONTENT_TYPE = "application/octet-stream"
STALE_WARNING = '110 - "Response is Stale"'


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

    @property
    def end(self) -> int:
        return self.start + self.length - 1 if self.length is not None else 2**62


Body = BytesBody | FileBody | SpoolBody


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: Body | None = None
    cache: str = "PASS"  # HIT, MISS, JOINED, REVALIDATED, STALE, PASS

    def close(self) -> None:
        """Release what an unsent body holds (an open file)."""
        if isinstance(self.body, FileBody):
            self.body.blob.close()


@dataclass(frozen=True)
class ManifestQuery:
    repo: RepoName
    reference: Reference
    accept: frozenset[str] | None
    head: bool
    if_none_match: str | None = None


@dataclass(frozen=True)
class BlobQuery:
    repo: RepoName
    digest: Digest
    head: bool
    range_headers: tuple[str, ...] = ()
    if_none_match: str | None = None


class PullService:
    def __init__(
        self,
        store: BlobStore,
        manifests: ManifestCache,
        flights: Flights,
        metrics: Metrics,
        keeper: CacheKeeper,
        members: Membership,
        *,
        tag_ttl: float,
        max_stale: float,
        stale_while_revalidate: float = 0.0,
        negative_ttl: float = 30.0,
    ) -> None:
        self._store = store
        self._manifests = manifests
        self._flights = flights
        self._metrics = metrics
        self._keeper = keeper
        self._members = members
        self._tag_ttl = tag_ttl
        self._max_stale = max_stale
        self._swr = stale_while_revalidate
        self._background: set[asyncio.Task[object]] = set()
        # Tags upstream just said do not exist: answered 404 for a moment without asking again.
        self._missing_tags: TTLCache[TagKey, bool] | None = (
            TTLCache(maxsize=10_000, ttl=negative_ttl) if negative_ttl > 0 else None
        )

    def reconfigure(self, cache: CacheConfig) -> None:
        """Reloaded TTLs apply to the next request; entries already cached keep their confirmation time."""
        self._tag_ttl = cache.tag_ttl
        self._max_stale = cache.max_stale
        self._swr = cache.stale_while_revalidate

    # -- manifests -----------------------------------------------------------------------------

    async def manifest(self, client: UpstreamClient, query: ManifestQuery) -> Reply:
        if isinstance(query.reference, Digest):
            manifest, result = await self._manifest_by_digest(
                client, query.repo, query.reference, confirm=True
            )
            await self._members.record_manifest(client, query.repo, manifest.digest, manifest.body)
            return self._manifest_reply(query, manifest.digest, manifest.media_type, manifest, None, result)
        return await self._manifest_by_tag(client, query, query.reference)

    async def _manifest_by_digest(
        self, client: UpstreamClient, repo: RepoName, digest: Digest, *, confirm: bool = False
    ) -> tuple[CachedManifest, str]:
        """The manifest `digest`; with `confirm`, only once `repo` is known to hold it (the tag
        path needs no confirmation: the tag of this repository named the digest)."""
        cached = await self._manifests.get(digest)
        if cached is not None:
            if confirm:
                await self._members.ensure_manifest(client, repo, digest)
            self._keeper.touch(digest)
            return cached, "HIT"

        async def fetch() -> CachedManifest:
            fetched = await client.get_manifest(repo, str(digest))
            if await Digest.of_async(fetched.body, digest.algorithm) != digest:
                log.error("upstream %s sent a manifest that does not match %s", client.name, digest)
                self._metrics.digest_mismatches.labels(client.name, "manifest").inc()
                raise errors.UpstreamDigestMismatch("manifest content does not match its digest")
            manifest = CachedManifest(
                digest, manifest_media_type(fetched.body, fetched.media_type), fetched.body
            )
            await self._store_manifest(client, repo, manifest)
            return manifest

        return await self._flights.coalesce(("manifest", client.name, digest), fetch), "MISS"

    async def _manifest_by_tag(self, client: UpstreamClient, query: ManifestQuery, tag: Tag) -> Reply:
        key = (client.name, client.upstream_name(query.repo), tag)
        if self._missing_tags is not None and key in self._missing_tags:
            refused = errors.ManifestUnknown(f"upstream {client.name} has no such manifest")
            refused.negative = True
            raise refused
        known = await self._manifests.tag(key)
        ttl = client.config.tag_ttl(str(tag), self._tag_ttl)
        if known is not None and self._manifests.age(known) < ttl + self._swr:
            cached = await self._manifests.get(known.digest)
            if cached is not None or (query.head and known.size is not None):
                if cached is not None:
                    await self._members.record_manifest(client, query.repo, cached.digest, cached.body)
                if self._manifests.age(known) < ttl:
                    self._keeper.touch(known.digest)
                    return self._manifest_reply(
                        query, known.digest, known.media_type, cached, known.size, "HIT"
                    )
                # Stale-while-revalidate: answer now, ask upstream once in the background.
                self._revalidate_later(client, query, key, known)
                reply = self._manifest_reply(
                    query, known.digest, known.media_type, cached, known.size, "STALE"
                )
                reply.headers["Warning"] = STALE_WARNING
                return reply
        warning = None
        try:
            entry, cached, result = await self._flights.coalesce(
                ("tag", key, query.head),
                lambda: self._resolve_tag(client, query.repo, key, known, not query.head),
            )
        except errors.ManifestUnknown:
            # Authoritative: upstream says the tag is gone, so it is not served stale either.
            await self._manifests.drop_tag(key)
            if self._missing_tags is not None:
                self._missing_tags[key] = True
            raise
        except (errors.UpstreamError, errors.UpstreamRateLimited) as exc:
            stale = await self._stale(known)
            if stale is None:
                raise
            reason = (
                "rate_limited"
                if isinstance(exc, errors.UpstreamRateLimited)
                else "down"
                if isinstance(exc, errors.UpstreamDown)
                else "error"
            )
            log.warning("upstream %s failing (%s); serving tag %s stale", client.name, reason, tag)
            self._metrics.stale_served.labels(client.name, reason).inc()
            entry, cached = stale
            result = "STALE"
            warning = STALE_WARNING
        if cached is None and (not query.head or entry.size is None):
            cached, _ = await self._manifest_by_digest(client, query.repo, entry.digest)
        if cached is not None:
            await self._members.record_manifest(client, query.repo, cached.digest, cached.body)
        else:
            self._members.record(client, query.repo, [str(entry.digest)])
        if cached is not None and await self._keeper.is_pinned_tag(client.name, str(key[1]), str(tag)):
            await self._keeper.pin_manifest(cached.digest, cached.body)
        reply = self._manifest_reply(query, entry.digest, entry.media_type, cached, entry.size, result)
        if warning:
            reply.headers["Warning"] = warning
        return reply

    def _revalidate_later(
        self, client: UpstreamClient, query: ManifestQuery, key: TagKey, known: TagEntry
    ) -> None:
        async def revalidate() -> object:
            try:
                return await self._flights.coalesce(
                    ("tag", key, True), lambda: self._resolve_tag(client, query.repo, key, known, False)
                )
            except errors.EdgecacheError as exc:  # the next request sees the outcome; nobody waits here
                log.info("background revalidation of %s failed: %s", key[2], exc.message)
                return None

        task = asyncio.create_task(revalidate())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resolve_tag(
        self,
        client: UpstreamClient,
        repo: RepoName,
        key: tuple[str, RepoName, Tag],
        known: TagEntry | None,
        want_body: bool,
    ) -> tuple[TagEntry, CachedManifest | None, str]:
        """Ask upstream what the tag points at.

        A HEAD when it may be enough (revalidating what we hold, or a HEAD from the client): it is
        cheap and Docker Hub does not count it against the pull limit. A cold GET goes straight to GET.
        """
        tag = str(key[2])
        if known is not None or not want_body:
            head = await client.head_manifest(repo, tag)
            if head.digest is not None:
                cached = await self._manifests.get(head.digest)
                if cached is not None or not want_body:
                    media_type = cached.media_type if cached else manifest_media_type(b"", head.media_type)
                    entry = await self._manifests.set_tag(key, head.digest, media_type, head.size)
                    return entry, cached, "REVALIDATED" if cached else "MISS"
        fetched = await client.get_manifest(repo, tag)
        claimed = fetched.digest
        if claimed is not None and await Digest.of_async(fetched.body, claimed.algorithm) != claimed:
            self._metrics.digest_mismatches.labels(client.name, "manifest").inc()
            raise errors.UpstreamDigestMismatch("manifest content does not match its digest")
        digest = claimed or await Digest.of_async(fetched.body)
        manifest = CachedManifest(digest, manifest_media_type(fetched.body, fetched.media_type), fetched.body)
        await self._store_manifest(client, repo, manifest)
        entry = await self._manifests.set_tag(key, digest, manifest.media_type, len(fetched.body))
        return entry, manifest, "MISS"

    async def _store_manifest(self, client: UpstreamClient, repo: RepoName, manifest: CachedManifest) -> None:
        """Keep a verified manifest (when the cache has room) and extend pins to what it references."""
        stored = await self._keeper.admit(manifest.digest, "manifest", len(manifest.body))
        await self._manifests.put(manifest, persist=stored)
        if stored:
            await self._keeper.stored(
                manifest.digest, "manifest", len(manifest.body), client.name, str(client.upstream_name(repo))
            )
        if self._keeper.is_pinned(manifest.digest):
            await self._keeper.pin_manifest(manifest.digest, manifest.body)

    async def _stale(self, entry: TagEntry | None) -> tuple[TagEntry, CachedManifest] | None:
        if entry is None or self._manifests.age(entry) > self._max_stale:
            return None
        cached = await self._manifests.get(entry.digest)
        return (entry, cached) if cached is not None else None

    def _manifest_reply(
        self,
        query: ManifestQuery,
        digest: Digest,
        media_type: str,
        manifest: CachedManifest | None,
        size: int | None,
        result: str,
    ) -> Reply:
        """Headers for a manifest; a HEAD answered from upstream's HEAD has `size` but no body."""
        if query.accept is not None and media_type not in query.accept:
            raise errors.NotAcceptable(f"manifest is {media_type}, not in the request's Accept")
        etag = f'"{digest}"'
        headers = {
            "Content-Type": media_type,
            "Docker-Content-Digest": str(digest),
            "ETag": etag,
        }
        if manifest is not None:
            headers["Content-Length"] = str(len(manifest.body))
        elif size is not None:
            headers["Content-Length"] = str(size)
        if query.if_none_match is not None and _etag_matches(query.if_none_match, etag):
            return Reply(304, headers, None, result)
        if query.head or manifest is None:
            return Reply(200, headers, None, result)
        return Reply(200, headers, BytesBody(manifest.body), result)

    # -- blobs ---------------------------------------------------------------------------------

    async def blob(self, client: UpstreamClient, query: BlobQuery) -> Reply:
        digest = query.digest
        etag = f'"{digest}"'
        headers = {
            "Content-Type": BLOB_CONTENT_TYPE,
            "Docker-Content-Digest": str(digest),
            "ETag": etag,
            "Accept-Ranges": "bytes",
            "Cache-Control": "max-age=31536000, immutable",
        }
        if query.head:
            return await self._blob_head(client, query, headers)
        opened = await self._store.open_blob(digest)
        expected = self._keeper.expected_size(digest)
        if opened is not None and expected is not None and opened.size != expected:
            log.error(
                "cached %s has %d bytes, not %d: dropped, fetching again", digest, opened.size, expected
            )
            opened.close()
            await self._keeper.forget(digest)
            opened = None
        if opened is not None:
            try:
                await self._members.ensure_blob(client, query.repo, digest)
            except BaseException:
                opened.close()
                raise
            self._keeper.touch(digest)
            opened.hold(self._keeper.reading(digest))
            try:
                if query.if_none_match is not None and _etag_matches(query.if_none_match, etag):
                    opened.close()
                    return Reply(304, headers, None, "HIT")
                byte_range = parse_range(query.range_headers, opened.size)
            except BaseException:
                opened.close()
                raise
            status, start, length = _span(byte_range, opened.size, headers)
            return Reply(status, headers, FileBody(opened, start, length), "HIT")

        running = self._flights.running(client.name, digest)
        if running is not None and running.repo != client.upstream_name(query.repo):
            # Another repository's fill: join it only once this repository is known to hold the blob.
            await self._members.ensure_blob(client, query.repo, digest)
        flight, led = self._flights.blob(client, query.repo, digest)
        try:
            size = await flight.started
        except errors.BlobUnknown:
            if flight.repo == client.upstream_name(query.repo):
                raise
            # The leader asked under a repository that lacks the blob; ours may have it.
            flight, led = self._flights.blob(client, query.repo, digest)
            size = await flight.started
        if flight.repo == client.upstream_name(query.repo):
            self._members.record(client, query.repo, [str(digest)])  # upstream served it to us
        if size is None:  # upstream sent no length: stream it all, chunked
            return Reply(200, headers, SpoolBody(flight, 0, None), "MISS")
        byte_range = parse_range(query.range_headers, size)
        status, start, length = _span(byte_range, size, headers)
        # A verified fill still being persisted is as good as the store: a hit.
        result = "HIT" if flight.done else "MISS" if led else "JOINED"
        return Reply(status, headers, SpoolBody(flight, start, length), result)

    async def _blob_head(self, client: UpstreamClient, query: BlobQuery, headers: dict[str, str]) -> Reply:
        size = await self._store.has_blob(query.digest)
        if size is not None:
            await self._members.ensure_blob(client, query.repo, query.digest)
            self._keeper.touch(query.digest)
        result = "HIT"
        if size is None:
            flight = self._flights.running(client.name, query.digest)
            if flight is not None and flight.repo != client.upstream_name(query.repo):
                size = await self._members.ensure_blob(client, query.repo, query.digest)
            if size is None and flight is not None:
                size = await flight.started
            result = "JOINED" if flight is not None else "MISS"
            if size is None:
                size = await client.head_blob(query.repo, query.digest)
                self._members.record(client, query.repo, [str(query.digest)])
        if size is not None:
            headers["Content-Length"] = str(size)
        return Reply(200, headers, None, result)

    # -- listings, relayed ---------------------------------------------------------------------

    async def tags_list(
        self,
        client: UpstreamClient,
        repo: RepoName,
        params: Mapping[str, str],
        link_name: str,
        ns: str | None,
    ) -> Reply:
        answer = await client.passthrough(repo, "tags/list", params)
        if answer.status == 404:
            raise errors.NameUnknown(f"upstream {client.name} has no such repository")
        headers = {"Content-Type": answer.content_type}
        if answer.link:
            link = _rewrite_link(answer.link, link_name, ns)
            if link:
                headers["Link"] = link
        return Reply(200, headers, BytesBody(answer.body), "PASS")

    async def referrers(
        self, client: UpstreamClient, repo: RepoName, digest: Digest, params: Mapping[str, str]
    ) -> Reply:
        answer = await client.passthrough(repo, f"referrers/{digest}", params)
        if answer.status == 404:
            raise errors.ManifestUnknown(f"upstream {client.name} has no referrers for it")
        headers = {"Content-Type": answer.content_type}
        return Reply(200, headers, BytesBody(answer.body), "PASS")


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


def _rewrite_link(link: str, name: str, ns: str | None) -> str | None:
    """Point a pagination Link at our own path: `</v2/<repo>/tags/list?n=..&last=..>; rel="next"`."""
    start, end = link.find("<"), link.find(">")
    if start < 0 or end < start:
        return None
    target = urlsplit(link[start + 1 : end])
    kept = [(k, v) for k, v in parse_qsl(target.query) if k in ("n", "last")]
    if ns:
        kept.append(("ns", ns))
    query = f"?{urlencode(kept)}" if kept else ""
    return f'</v2/{name}/tags/list{query}>; rel="next"'

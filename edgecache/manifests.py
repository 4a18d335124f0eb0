"""The manifest cache: immutable manifests by digest (disk + a bounded memory LRU) and tag → digest entries.

Manifests are kept as the exact bytes upstream sent, with the media type it declared; they are never
re-serialised. Tag entries remember when they were last confirmed upstream, so the pull service can tell
fresh from expired from too stale to serve.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import LRUCache

from edgecache.blobstore import BlobStore
from edgecache.oci import Digest, RepoName, Tag

MEMORY_BYTES = 64 * 1024 * 1024
MAX_TAGS = 100_000


@dataclass(frozen=True)
class CachedManifest:
    digest: Digest
    media_type: str
    body: bytes


@dataclass(frozen=True)
class TagEntry:
    digest: Digest
    media_type: str
    size: int | None
    confirmed_at: float


TagKey = tuple[str, RepoName, Tag]


class ManifestCache:
    def __init__(self, store: BlobStore, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._clock = clock
        self._memory: LRUCache[Digest, CachedManifest] = LRUCache(
            maxsize=MEMORY_BYTES, getsizeof=lambda m: len(m.body) + 256
        )
        self._tags: LRUCache[TagKey, TagEntry] = LRUCache(maxsize=MAX_TAGS)

    async def get(self, digest: Digest) -> CachedManifest | None:
        cached = self._memory.get(digest)
        if cached is not None:
            return cached
        stored = await self._store.read_manifest(digest)
        if stored is None:
            return None
        manifest = CachedManifest(digest, stored[0], stored[1])
        self._memory[digest] = manifest
        return manifest

    async def put(self, manifest: CachedManifest) -> None:
        """Store a manifest whose bytes the caller verified against `manifest.digest`."""
        if manifest.digest not in self._memory:
            await self._store.write_manifest(manifest.digest, manifest.media_type, manifest.body)
        self._memory[manifest.digest] = manifest

    def tag(self, key: TagKey) -> TagEntry | None:
        return self._tags.get(key)

    def set_tag(self, key: TagKey, digest: Digest, media_type: str, size: int | None) -> TagEntry:
        entry = TagEntry(digest, media_type, size, self._clock())
        self._tags[key] = entry
        return entry

    def drop_tag(self, key: TagKey) -> None:
        self._tags.pop(key, None)

    def age(self, entry: TagEntry) -> float:
        return self._clock() - entry.confirmed_at

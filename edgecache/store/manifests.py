"""The manifest cache: immutable manifests by digest (disk + a bounded memory LRU) and tag → digest entries.

Manifests are kept as the exact bytes upstream sent, with the media type it declared; they are never
re-serialised. Tag entries remember when they were last confirmed upstream (wall-clock time), so the
pull service can tell fresh from expired from too stale to serve. They are also written to
`<root>/tags/<upstream>/<repository>/_tags/<tag>`, so a restarted edgecache still serves its tags while an
upstream is down.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache

from edgecache.errors import DigestInvalid
from edgecache.oci import Digest, RepoName, Tag
from edgecache.store.blobs import BlobStore

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
    def __init__(
        self,
        store: BlobStore,
        clock: Callable[[], float] = time.time,
        on_corrupt: Callable[[Digest], Awaitable[None]] | None = None,
        vouch: Callable[[Digest], Awaitable[bool]] | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._on_corrupt = on_corrupt  # a stored manifest that no longer hashes to its digest
        self._vouch = vouch  # may a manifest file be read from disk (CacheKeeper.may_serve)
        self._memory: LRUCache[Digest, CachedManifest] = LRUCache(
            maxsize=MEMORY_BYTES, getsizeof=lambda m: len(m.body) + 256
        )
        self._tags: LRUCache[TagKey, TagEntry] = LRUCache(maxsize=MAX_TAGS)

    async def get(self, digest: Digest) -> CachedManifest | None:
        cached = self._memory.get(digest)
        if cached is not None:
            return cached
        if self._vouch is not None and not await self._vouch(digest):
            return None
        stored = await self._store.read_manifest(digest)
        if isinstance(stored, str):  # missing, or corrupt: checked on every read from disk, never
            if stored == "corrupt" and self._on_corrupt is not None:  # served, fetched again
                await self._on_corrupt(digest)
            return None
        manifest = CachedManifest(digest, stored[0], stored[1])
        self._memory[digest] = manifest
        return manifest

    async def put(self, manifest: CachedManifest, *, persist: bool = True) -> None:
        """Keep a manifest whose bytes the caller verified against `manifest.digest`: in memory,
        and on disk unless the cache has no room for it."""
        if persist and manifest.digest not in self._memory:
            await self._store.write_manifest(manifest.digest, manifest.media_type, manifest.body)
        self._memory[manifest.digest] = manifest

    async def tag(self, key: TagKey) -> TagEntry | None:
        entry = self._tags.get(key)
        if entry is None:
            entry = await asyncio.to_thread(self._load_tag, key)
            if entry is not None:
                self._tags[key] = entry
        return entry

    async def set_tag(self, key: TagKey, digest: Digest, media_type: str, size: int | None) -> TagEntry:
        entry = TagEntry(digest, media_type, size, self._clock())
        self._tags[key] = entry
        await asyncio.to_thread(self._save_tag, key, entry)
        return entry

    def forget_tags(self) -> None:
        """Drop the tag entries held in memory: each is read again from its file when next asked
        (after `edgecache import` wrote tag files beside the running server)."""
        self._tags.clear()

    async def drop_tag(self, key: TagKey) -> None:
        self._tags.pop(key, None)
        await asyncio.to_thread(self._tag_path(key).unlink, missing_ok=True)

    def _tag_path(self, key: TagKey) -> Path:
        """Built only from validated values: an upstream name, a repository name and a tag.

        Tags live in a `_tags` folder, a name no repository component can have (they start with a
        letter or digit), so repository `a` tag `b` and repository `a/b` never collide.
        """
        upstream, repo, tag = key
        return self._store.root / "tags" / upstream / str(repo) / "_tags" / str(tag)

    def _save_tag(self, key: TagKey, entry: TagEntry) -> None:
        record = {
            "digest": str(entry.digest),
            "media_type": entry.media_type,
            "size": entry.size,
            "confirmed_at": entry.confirmed_at,
        }
        self._store.write_small_file(self._tag_path(key), json.dumps(record).encode())

    def _load_tag(self, key: TagKey) -> TagEntry | None:
        try:
            record = json.loads(self._tag_path(key).read_bytes())
            return TagEntry(
                Digest.parse(record["digest"]),
                str(record["media_type"]),
                int(record["size"]) if record.get("size") is not None else None,
                float(record["confirmed_at"]),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, DigestInvalid):
            return None  # unreadable: as if never cached; the next confirmation rewrites it

    def age(self, entry: TagEntry) -> float:
        return self._clock() - entry.confirmed_at

"""Which repositories are known to contain which digests: facts, kept; asking upstream is the use case's.

Content is stored once per digest, but a digest is served for a repository only when that repository
is known to hold it: a manifest served from it referenced the digest, a tag of it resolved to it, or
the upstream confirmed it (it served or HEAD-answered it under that repository). Otherwise the pull
use case asks upstream under that repository first. So a client allowed on one repository cannot
read another's layers or manifests by digest, and content fetched with edgecache's upstream
credentials is not handed to a repository the upstream would refuse.

Repositories are named as the upstream names them (`library/alpine`, never `alpine`). Facts live in
the index (SQLite, on its worker thread) and in a bounded memory LRU in front of it, so a hit costs a
dictionary lookup.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Iterable

from cachetools import LRUCache

from edgecache.oci import Digest, RepoName, referenced_digests
from edgecache.store.index import IndexWorker

log = logging.getLogger(__name__)
MemberKey = tuple[str, str, str]  # upstream, repository (as upstream names it), digest
LARGE_MANIFEST = 64 * 1024


class Membership:
    def __init__(self, index: IndexWorker, memory: int = 200_000) -> None:
        self._index = index
        self._known: LRUCache[MemberKey, bool] = LRUCache(memory)
        self._expanded: LRUCache[MemberKey, bool] = LRUCache(memory // 4)
        self._pending: list[MemberKey] = []
        self._writer: asyncio.Task[None] | None = None

    def record(self, upstream: str, repo: RepoName, digests: Iterable[Digest | str]) -> None:
        """Known at once in memory; written to the index in the background, batched."""
        keys = ((upstream, str(repo), str(digest)) for digest in digests)
        new = [key for key in keys if key not in self._known]
        if not new:
            return
        for key in new:
            self._known[key] = True
        self._pending.extend(new)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._index.run(self._index.index.add_members, batch)
            except sqlite3.Error as exc:
                # Best effort: the facts stay known in memory; after a restart upstream is asked again.
                log.warning("could not record %d repository memberships: %s", len(batch), exc)

    async def flush(self) -> None:
        """Wait for facts still being written (at shutdown, and in tests)."""
        if self._writer is not None:
            await self._writer

    async def record_manifest(self, upstream: str, repo: RepoName, digest: Digest, body: bytes) -> None:
        """The manifest is in `repo`, and so is everything it references (parsed once per process)."""
        key = (upstream, str(repo), str(digest))
        if key in self._expanded:
            return
        if len(body) > LARGE_MANIFEST:
            children = await asyncio.to_thread(referenced_digests, body)
        else:
            children = referenced_digests(body)
        self.record(upstream, repo, [digest, *children])
        self._expanded[key] = True

    async def known(self, upstream: str, repo: RepoName, digest: Digest) -> bool:
        key = (upstream, str(repo), str(digest))
        if key in self._known:
            return True
        found = await self._index.run(self._index.index.is_member, *key)
        if found:
            self._known[key] = True
        return found

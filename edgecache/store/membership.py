"""Which repositories are known to contain which digests.

Content is stored once per digest, but a digest is served for a repository only when that repository
is known to hold it: a manifest served from it referenced the digest, a tag of it resolved to it, or
the upstream confirmed it (it served or HEAD-answered it under that repository). Otherwise upstream is
asked under that repository first. So a client allowed on one repository cannot read another's
layers or manifests by digest, and content fetched with edgecache's upstream credentials is not
handed to a repository the upstream would refuse.

Facts live in the index (SQLite, on its worker thread) and in a bounded memory LRU in front of it, so
a hit costs a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3

from cachetools import LRUCache

from edgecache import errors
from edgecache.oci import Digest, RepoName
from edgecache.store.keeper import CacheKeeper, referenced_digests
from edgecache.upstream.client import UpstreamClient

log = logging.getLogger(__name__)
MemberKey = tuple[str, str, str]  # upstream, repository (as upstream names it), digest
LARGE_MANIFEST = 64 * 1024


class Membership:
    def __init__(self, keeper: CacheKeeper, memory: int = 200_000) -> None:
        self._keeper = keeper
        self._known: LRUCache[MemberKey, bool] = LRUCache(memory)
        self._expanded: LRUCache[MemberKey, bool] = LRUCache(memory // 4)
        self._pending: list[MemberKey] = []
        self._writer: asyncio.Task[None] | None = None

    @staticmethod
    def _key(client: UpstreamClient, repo: RepoName, digest: Digest | str) -> MemberKey:
        return (client.name, str(client.upstream_name(repo)), str(digest))

    def record(self, client: UpstreamClient, repo: RepoName, digests: list[str]) -> None:
        """Known at once in memory; written to the index in the background, batched."""
        new = [k for k in (self._key(client, repo, d) for d in digests) if k not in self._known]
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
                await self._keeper.run_index(self._keeper.index.add_members, batch)
            except sqlite3.Error as exc:
                # Best effort: the facts stay known in memory; after a restart upstream is asked again.
                log.warning("could not record %d repository memberships: %s", len(batch), exc)

    async def flush(self) -> None:
        """Wait for facts still being written (at shutdown, and in tests)."""
        if self._writer is not None:
            await self._writer

    async def record_manifest(
        self, client: UpstreamClient, repo: RepoName, digest: Digest, body: bytes
    ) -> None:
        """The manifest is in `repo`, and so is everything it references (once per process)."""
        key = self._key(client, repo, digest)
        if key in self._expanded:
            return
        if len(body) > LARGE_MANIFEST:
            children = await asyncio.to_thread(referenced_digests, body)
        else:
            children = referenced_digests(body)
        self.record(client, repo, [str(digest), *children])
        self._expanded[key] = True

    async def known(self, client: UpstreamClient, repo: RepoName, digest: Digest) -> bool:
        key = self._key(client, repo, digest)
        if key in self._known:
            return True
        found = await self._keeper.run_index(self._keeper.index.is_member, *key)
        if found:
            self._known[key] = True
        return found

    async def ensure_blob(self, client: UpstreamClient, repo: RepoName, digest: Digest) -> int | None:
        """Confirm `repo` holds the blob, asking upstream (HEAD) if we do not know; raises
        BlobUnknown when upstream says it does not. Returns upstream's size when it was asked."""
        if await self.known(client, repo, digest):
            return None
        size = await client.head_blob(repo, digest)
        self.record(client, repo, [str(digest)])
        return size

    async def ensure_manifest(self, client: UpstreamClient, repo: RepoName, digest: Digest) -> None:
        """Confirm `repo` holds the manifest, asking upstream (HEAD) if we do not know."""
        if await self.known(client, repo, digest):
            return
        head = await client.head_manifest(repo, str(digest))
        if head.digest is not None and head.digest != digest:
            raise errors.UpstreamDigestMismatch("upstream answered for another manifest")
        self.record(client, repo, [str(digest)])

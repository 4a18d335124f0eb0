"""An in-memory upstream for the pure tests of fills and the pull use case.

It satisfies `fill.source.BlobSource` and `pull.Upstream` (the seams those take), so single-flight,
resume, abandonment, verification and membership run in milliseconds without sockets. This is a
fake on purpose: the real-process tests (test_api, test_flights, test_clients) keep covering the
real upstream client against a real registry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

from edgecache import errors
from edgecache.oci import OCI_MANIFEST, Digest, RepoName
from edgecache.upstream.client import FetchedManifest, ManifestHead, Passthrough


@dataclass
class MemoryBody:
    """A blob body served from bytes: optionally paced by a gate, optionally cut once."""

    data: bytes
    gate: asyncio.Event | None = None  # when set, the body waits for it before each chunk
    cut_at: int | None = None  # raise UpstreamInterrupted once this many bytes went out
    chunk: int = 64 * 1024

    @property
    def length(self) -> int | None:
        return len(self.data)

    async def drain(self, consume: Callable[[memoryview], None]) -> None:
        """As the upstream client's body: each block consumed on a worker thread."""
        sent = 0
        data = memoryview(self.data)
        while sent < len(data):
            if self.gate is not None:
                await self.gate.wait()
            if self.cut_at is not None and sent >= self.cut_at:
                raise errors.UpstreamInterrupted("cut by the test")
            block = data[sent : sent + self.chunk]
            await asyncio.to_thread(consume, block)
            sent += len(block)


@dataclass
class MemoryUpstream:
    """Repositories of blobs and manifests (by digest and by tag), counting every request."""

    name: str = "mem"
    blobs: dict[tuple[str, Digest], bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (operation, repo, reference)
    gate: asyncio.Event | None = None
    manifest_gate: asyncio.Event | None = None  # when set, manifest GETs wait for it
    cut_once_at: int | None = None
    down: bool = False
    tampered: set[Digest] = field(default_factory=set)  # served with one byte changed
    listing: Passthrough | None = None  # what passthrough answers (tags/list), else an empty JSON object
    listing_queries: list[dict[str, str]] = field(default_factory=list)  # the query of each passthrough

    def add_blob(self, repo: str, data: bytes) -> Digest:
        digest = Digest.of(data)
        self.blobs[(repo, digest)] = data
        return digest

    def add_manifest(self, repo: str, body: bytes, *tags: str, media_type: str = OCI_MANIFEST) -> Digest:
        digest = Digest.of(body)
        for reference in (str(digest), *tags):
            self.manifests[(repo, reference)] = (body, media_type)
        return digest

    def count(self, operation: str) -> int:
        return sum(1 for op, _, _ in self.requests if op == operation)

    def tag_ttl(self, tag: str, default: float) -> float:
        return default

    def _check(self) -> None:
        if self.down:
            raise errors.UpstreamDown("down in the test")

    @contextlib.asynccontextmanager
    async def open_blob(self, repo: RepoName, digest: Digest, start: int = 0) -> AsyncIterator[MemoryBody]:
        self.requests.append(("open_blob", str(repo), f"{digest}@{start}"))
        self._check()
        data = self.blobs.get((str(repo), digest))
        if data is None:
            raise errors.BlobUnknown("not in this repository")
        if digest in self.tampered:
            data = data[:-1] + bytes([data[-1] ^ 1])
        cut, self.cut_once_at = self.cut_once_at, None
        yield MemoryBody(data[start:], self.gate, None if cut is None else cut - start)

    async def head_blob(self, repo: RepoName, digest: Digest) -> int | None:
        self.requests.append(("head_blob", str(repo), str(digest)))
        self._check()
        data = self.blobs.get((str(repo), digest))
        if data is None:
            raise errors.BlobUnknown("not in this repository")
        return len(data)

    async def head_manifest(self, repo: RepoName, reference: str) -> ManifestHead:
        self.requests.append(("head_manifest", str(repo), reference))
        self._check()
        found = self.manifests.get((str(repo), reference))
        if found is None:
            raise errors.ManifestUnknown("not in this repository")
        return ManifestHead(Digest.of(found[0]), found[1], len(found[0]))

    async def get_manifest(self, repo: RepoName, reference: str) -> FetchedManifest:
        self.requests.append(("get_manifest", str(repo), reference))
        if self.manifest_gate is not None:
            await self.manifest_gate.wait()
        self._check()
        found = self.manifests.get((str(repo), reference))
        if found is None:
            raise errors.ManifestUnknown("not in this repository")
        return FetchedManifest(found[0], found[1], Digest.of(found[0]))

    async def passthrough(self, repo: RepoName, path: str, query: Mapping[str, str]) -> Passthrough:
        self.requests.append(("passthrough", str(repo), path))
        self.listing_queries.append(dict(query))
        self._check()
        return self.listing or Passthrough(200, "application/json", b"{}", None)

"""Where a fill reads from: a Protocol, so fills are tested with an in-memory source in milliseconds
and later tiers (a shared bucket, a parent edgecache) plug in beside the upstream client."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from edgecache.oci import Digest, RepoName


class BlobBody(Protocol):
    """An opened blob body, read on the source's own threads: receiving, hashing and writing then
    all happen off the event loop, which only hears that another block has landed.

    A body from another tier than the upstream (the shared bucket) has `counts_as_upstream = False`
    (optional attribute), so its bytes are not counted as upstream bytes."""

    @property
    def length(self) -> int | None:
        """The announced length of what follows (from the requested start), or None."""
        ...

    async def drain(self, consume: Callable[[memoryview], None]) -> None:
        """Read the body to its end, calling consume(block) on a worker thread for each block (its
        memory is reused once consume returns). A body that breaks off raises
        errors.UpstreamInterrupted (resumable); other EdgecacheErrors end the fill; an exception from
        consume ends the read and is raised here. Cancelling stops the reading thread before it
        returns, so nothing is consumed afterwards."""
        ...


class BlobSource(Protocol):
    """Something that serves blobs by digest under a repository name (as that source names it)."""

    @property
    def name(self) -> str:
        """A closed-set name for metrics and flight keys (the upstream's configured name)."""
        ...

    def open_blob(
        self, repo: RepoName, digest: Digest, start: int = 0
    ) -> AbstractAsyncContextManager[BlobBody]:
        """The blob from byte `start` (a resume). Raises EdgecacheError subclasses: BlobUnknown when
        the source does not hold it, UpstreamError and friends when it fails."""
        ...

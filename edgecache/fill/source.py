"""Where a fill reads from: a Protocol, so fills are tested with an in-memory source in milliseconds
and later tiers (a shared bucket, a parent edgecache) plug in beside the upstream client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from edgecache.oci import Digest, RepoName


class BlobBody(Protocol):
    """An opened blob body: its announced length (None when not announced) and its bytes."""

    @property
    def length(self) -> int | None: ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body in chunks as they arrive (any size; the fill batches them). A body that breaks
        off raises errors.UpstreamInterrupted (resumable); other EdgecacheErrors end the fill."""
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

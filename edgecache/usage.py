"""Which repositories are pulled most: for `edgecache stats`, never for metric labels.

Kept in memory, bounded: past MAX_ENTRIES the least-pulled half is forgotten, so a scan of many
names cannot grow it without end. Counts restart with the process.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

MAX_ENTRIES = 10_000


@dataclass
class RepositoryUsage:
    upstream: str
    repository: str
    pulls: int = 0  # manifest GETs by tag: one per image pull
    bytes_served: int = 0


class Usage:
    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], RepositoryUsage] = {}

    def record(self, upstream: str, repository: str, *, pull: bool, bytes_served: int) -> None:
        key = (upstream, repository)
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= MAX_ENTRIES:
                self._forget_least_used()
            entry = self._entries[key] = RepositoryUsage(upstream, repository)
        entry.pulls += pull
        entry.bytes_served += bytes_served

    def top(self, n: int = 10) -> list[RepositoryUsage]:
        return sorted(self._entries.values(), key=lambda e: (e.pulls, e.bytes_served), reverse=True)[:n]

    def by_bytes(self, n: int = 20) -> list[RepositoryUsage]:
        """The `n` repositories served the most bytes: a heap over the entries, not a sort of them
        (the status page asks on every load)."""
        return heapq.nlargest(n, self._entries.values(), key=lambda e: e.bytes_served)

    def __len__(self) -> int:
        return len(self._entries)

    def _forget_least_used(self) -> None:
        ranked = sorted(self._entries.items(), key=lambda item: (item[1].pulls, item[1].bytes_served))
        for key, _ in ranked[: len(ranked) // 2]:
            del self._entries[key]

"""Closed sets the whole package shares: where an answer came from, and what kind of object is stored.

They are StrEnums because their values go out as they are (the X-Cache header, metric labels, the
index's `kind` column) and must stay exactly what operators already see.
"""

from __future__ import annotations

from enum import StrEnum


class CacheResult(StrEnum):
    """Where an answer came from, as X-Cache and the request metrics say it."""

    HIT = "HIT"  # from the store (or a verified fill still being persisted)
    MISS = "MISS"  # this request led an upstream fetch, or upstream's answer was relayed
    JOINED = "JOINED"  # this request streamed another request's fill
    REVALIDATED = "REVALIDATED"  # a cached tag confirmed unchanged upstream
    STALE = "STALE"  # served past its TTL (upstream failing, or stale-while-revalidate)
    NEGATIVE = "NEGATIVE"  # a failure remembered briefly, answered without asking upstream
    PASS = "PASS"  # not cacheable: a listing relayed, a refusal of ours, an operational route


# Answers that did not ask upstream for the content: what hit ratios count as hits (the status page,
# `edgecache stats`).
HIT_RESULTS = frozenset({CacheResult.HIT, CacheResult.REVALIDATED, CacheResult.STALE})


class ObjectKind(StrEnum):
    """What a stored digest is: the `kind` column of the index and the directory it lives in."""

    BLOB = "blob"
    MANIFEST = "manifest"

"""The scrubber's pure parts: the pace that keeps its average rate, its verdict on a file, and the
index columns it relies on (migrated into an old index.db, reset when the disk disagrees)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgecache.store.identity import FileIdentity, judge
from edgecache.store.index import CacheIndex
from edgecache.store.scrub import Pacer
from tests.support.clock import Clock

MB = 1_000_000
A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64


def test_the_pace_keeps_the_average_at_the_rate() -> None:
    clock = Clock()
    pacer = Pacer(10 * MB, clock=clock)
    waited = 0.0
    for _ in range(100):  # 100 MB hashed instantly: 10 s of waits in all, one chunk's worth each
        delay = pacer.delay(MB)
        assert delay == pytest.approx(0.1)
        clock.advance(delay)
        waited += delay
    assert waited == pytest.approx(10.0)


def test_slow_hashing_is_not_made_slower_and_idle_time_is_not_saved_up() -> None:
    clock = Clock()
    pacer = Pacer(10 * MB, clock=clock)
    clock.advance(0.5)  # a chunk that took longer than its budget (0.1 s) to read
    assert pacer.delay(MB) == pytest.approx(0.1)  # paced from now: the budget starts when it is done
    clock.advance(60)  # idle for a minute (an empty store): no burst afterwards
    assert pacer.delay(MB) == pytest.approx(0.1)
    assert pacer.delay(MB) == pytest.approx(0.2)  # two chunks at once: the second waits its turn


def test_a_reloaded_rate_applies_to_the_next_chunk() -> None:
    clock = Clock()
    pacer = Pacer(10 * MB, clock=clock)
    pacer.rate = 100 * MB
    assert pacer.delay(MB) == pytest.approx(0.01)


def test_the_verdict_on_a_hashed_file() -> None:
    seen = FileIdentity(100, 5, 7)
    assert judge(100, seen, seen, seen, intact=True) == "ok"
    assert judge(100, None, seen, seen, intact=True) == "ok"  # unknown identity: the hash decides
    assert judge(100, seen, seen, seen, intact=False) == "corrupt"  # silent: same identity, bad bytes
    assert judge(100, FileIdentity(100, 6, 7), seen, seen, intact=True) == "changed"  # touched
    assert judge(100, seen, seen, FileIdentity(100, 9, 7), intact=True) == "changed"  # while reading
    assert judge(99, None, seen, seen, intact=True) == "changed"  # not the size admitted


OLD_SCHEMA = """
CREATE TABLE entries (digest TEXT PRIMARY KEY, kind TEXT NOT NULL, size INTEGER NOT NULL,
    last_access REAL NOT NULL, hits INTEGER NOT NULL DEFAULT 0, upstream TEXT NOT NULL DEFAULT '',
    repository TEXT NOT NULL DEFAULT '');
INSERT INTO entries (digest, kind, size, last_access) VALUES ('%s', 'blob', 100, 1.0);
"""


def test_an_old_index_gets_the_new_columns_as_unknown(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA % A)
    db.close()
    index = CacheIndex(path)
    entry = index.get(A)
    assert entry is not None and entry.size == 100
    assert (entry.identity, entry.verified_at) == (None, None)  # unknown: never trusted blindly
    assert index.identities() == {}
    index.record_identities([(A, FileIdentity(100, 5, 7))])  # what a hit saw
    assert index.identities() == {A: FileIdentity(100, 5, 7)}
    assert [e.digest for e in index.least_recently_verified(10)] == [A]  # still first in the queue
    index.close()
    CacheIndex(path).close()  # opening a migrated index again changes nothing


def test_verified_order_and_reconcile_resetting_what_is_known(tmp_path: Path) -> None:
    index = CacheIndex(tmp_path / "index.db")
    index.add(A, "blob", 100, identity=FileIdentity(100, 5, 7))
    index.add(B, "blob", 200, identity=FileIdentity(200, 6, 8))
    index.mark_verified([(A, None, 2e9)])  # A verified after B's admission: B comes first
    assert [e.digest for e in index.least_recently_verified(10)] == [B, A]
    assert index.identities()[A] == FileIdentity(100, 5, 7)  # a verification without one keeps it
    index.reconcile({A: ("blob", 100), B: ("blob", 250)})  # B is not the size indexed any more
    entry = index.get(B)
    assert entry is not None and (entry.identity, entry.verified_at) == (None, None)
    assert set(index.identities()) == {A}
    index.close()

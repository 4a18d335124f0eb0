"""The keeper's running totals of what is stored (Holdings): the figures behind every admission and
eviction decision and the cache size metrics, so they must never drift from the entries they sum."""

from __future__ import annotations

from edgecache.store.keeper import Holdings

BLOB_A = "sha256:" + "a" * 64
BLOB_B = "sha256:" + "b" * 64
MANIFEST = "sha256:" + "c" * 64
UNKNOWN = "sha256:" + "f" * 64


def test_an_empty_cache_holds_nothing() -> None:
    held = Holdings()
    assert held.used == 0
    assert held.get(BLOB_A) is None and BLOB_A not in held
    assert held.count == {"blob": 0, "manifest": 0} and held.bytes == {"blob": 0, "manifest": 0}
    assert held.bytes_of({BLOB_A}) == 0


def test_totals_per_kind_and_overall() -> None:
    held = Holdings()
    held.add(BLOB_A, "blob", 1000)
    held.add(BLOB_B, "blob", 24)
    held.add(MANIFEST, "manifest", 7)
    assert held.used == 1031
    assert held.bytes == {"blob": 1024, "manifest": 7}
    assert held.count == {"blob": 2, "manifest": 1}
    assert held.get(BLOB_A) == ("blob", 1000) and held.get(MANIFEST) == ("manifest", 7)
    assert BLOB_B in held and UNKNOWN not in held


def test_built_from_a_start_up_inventory() -> None:
    held = Holdings({BLOB_A: ("blob", 10), MANIFEST: ("manifest", 3)})
    assert held.used == 13 and held.count == {"blob": 1, "manifest": 1}


def test_re_adding_a_digest_replaces_it_instead_of_counting_it_twice() -> None:
    held = Holdings()
    held.add(BLOB_A, "blob", 1000)
    held.add(BLOB_A, "blob", 1000)
    assert held.used == 1000 and held.count["blob"] == 1
    held.add(BLOB_A, "blob", 400)  # e.g. the index had a stale size: the latest one counts
    assert held.used == 400 and held.get(BLOB_A) == ("blob", 400)
    held.add(BLOB_A, "manifest", 400)  # moved between kinds: counted under the new one only
    assert held.bytes == {"blob": 0, "manifest": 400} and held.count == {"blob": 0, "manifest": 1}


def test_removing_gives_back_the_entry_and_its_bytes() -> None:
    held = Holdings()
    held.add(BLOB_A, "blob", 1000)
    held.add(MANIFEST, "manifest", 7)
    assert held.remove(BLOB_A) == ("blob", 1000)
    assert held.used == 7 and held.count == {"blob": 0, "manifest": 1}
    assert BLOB_A not in held and held.get(BLOB_A) is None


def test_removing_what_is_not_held_is_harmless() -> None:
    held = Holdings()
    held.add(BLOB_A, "blob", 1000)
    assert held.remove(UNKNOWN) is None
    assert held.remove(BLOB_A) == ("blob", 1000)
    assert held.remove(BLOB_A) is None  # twice: evicted and then found gone on disk
    assert held.used == 0 and held.count == {"blob": 0, "manifest": 0}


def test_bytes_of_counts_only_held_digests_of_the_set() -> None:
    held = Holdings()
    held.add(BLOB_A, "blob", 1000)
    held.add(BLOB_B, "blob", 24)
    held.add(MANIFEST, "manifest", 7)
    assert held.bytes_of({BLOB_A, MANIFEST}) == 1007
    assert held.bytes_of({BLOB_B, UNKNOWN}) == 24  # unknown digests add nothing
    assert held.bytes_of(set()) == 0


def test_totals_stay_in_step_over_many_changes() -> None:
    held = Holdings()
    expected: dict[str, tuple[str, int]] = {}
    for i in range(300):
        digest = f"sha256:{i % 50:064x}"
        if i % 7 == 3:
            held.remove(digest)
            expected.pop(digest, None)
        else:
            kind = "manifest" if i % 5 == 0 else "blob"
            held.add(digest, kind, i * 13)
            expected[digest] = (kind, i * 13)
    assert held.used == sum(size for _, size in expected.values())
    for kind in ("blob", "manifest"):
        assert held.count[kind] == sum(1 for k, _ in expected.values() if k == kind)
        assert held.bytes[kind] == sum(s for k, s in expected.values() if k == kind)
    assert held.bytes_of(set(expected)) == held.used

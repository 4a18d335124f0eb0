"""The parts of index recovery that need no server: which repository facts tags and stored manifests
still tell, when the repository check protects nothing (and a reload that changes it), and that a
start-up which serves from the index before walking the disk never serves a file the index does not
list. The processes-and-files test is test_index_recovery.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import time
from pathlib import Path

import pytest

from edgecache.app import Edgecache, unchecked_upstreams
from edgecache.config import AccessConfig, AccessRule, UpstreamConfig, load_config
from edgecache.metrics import Metrics
from edgecache.oci import Digest
from edgecache.store.blobs import BlobStore
from edgecache.store.index import CacheIndex
from edgecache.store.keeper import CacheKeeper
from edgecache.store.recovery import recover_members
from tests.support.waiting import wait_until

MEDIA = "application/vnd.oci.image.manifest.v1+json"


def store_manifest(store: BlobStore, doc: dict[str, object]) -> str:
    body = json.dumps(doc).encode()
    digest = Digest.of(body)
    store.write_small_file(store.manifest_path(digest), MEDIA.encode() + b"\n" + body)
    return str(digest)


def tag(store: BlobStore, upstream: str, repo: str, name: str, digest: str) -> None:
    path = store.root / "tags" / upstream / repo / "_tags" / name
    record = {"digest": digest, "media_type": MEDIA, "size": 1, "confirmed_at": time.time()}
    store.write_small_file(path, json.dumps(record).encode())


def fake(n: int) -> str:
    return f"sha256:{n:064x}"


def test_tags_and_stored_manifests_give_back_their_repositories_through_indexes(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.prepare()
    child = store_manifest(store, {"config": {"digest": fake(1)}, "layers": [{"digest": fake(2)}]})
    index = store_manifest(store, {"manifests": [{"digest": child}, {"digest": fake(3)}]})
    tag(store, "docker.io", "library/multi", "v1", index)
    tag(store, "ghcr.io", "owner/app/sub", "1.0", child)
    tag(store, "docker.io", "library/gone", "old", fake(9))  # its manifest is not stored
    (store.root / "tags" / "docker.io" / "library" / "broken" / "_tags").mkdir(parents=True)
    (store.root / "tags" / "docker.io" / "library" / "broken" / "_tags" / "x").write_text("{not json")
    facts, tags = recover_members(store)
    assert tags == 3
    multi = {d for u, r, d in facts if (u, r) == ("docker.io", "library/multi")}
    assert multi == {index, child, fake(1), fake(2), fake(3)}  # fake(3): not stored, still named
    assert {d for u, r, d in facts if (u, r) == ("ghcr.io", "owner/app/sub")} == {child, fake(1), fake(2)}
    assert {d for u, r, d in facts if r == "library/gone"} == {fake(9)}


def test_recovery_of_an_empty_or_missing_tags_folder_finds_nothing(tmp_path: Path) -> None:
    assert recover_members(BlobStore(tmp_path)) == ([], 0)


OPEN = AccessConfig()
ANON = UpstreamConfig(name="docker.io")
CREDS = UpstreamConfig(name="corp", username="mirror")


@pytest.mark.parametrize(
    ("access", "upstreams", "unchecked"),
    [
        (OPEN, [ANON, CREDS], {"docker.io"}),  # credentials: what was fetched may be private
        (OPEN, [CREDS], set()),
        (AccessConfig(rules=(AccessRule("anonymous", ("docker.io/*",)),)), [ANON], set()),
        (AccessConfig(mode="htpasswd", htpasswd="/nonexistent"), [ANON], set()),
        (AccessConfig(mode="mtls"), [ANON], set()),
    ],
)
def test_the_repository_check_is_off_only_where_it_protects_nothing(
    access: AccessConfig, upstreams: list[UpstreamConfig], unchecked: set[str]
) -> None:
    assert unchecked_upstreams(access, upstreams) == unchecked


def test_a_reload_that_adds_a_rule_turns_the_check_back_on(tmp_path: Path) -> None:
    config = load_config(env={}, cache_dir=str(tmp_path), upstreams=["http://127.0.0.1:9"])
    instance = Edgecache.build(config)
    try:
        pull = instance.front.pull
        assert pull._unchecked == {"docker.io"}
        ruled = dataclasses.replace(config.access, rules=(AccessRule("anonymous", ("docker.io/*",)),))
        instance.apply(dataclasses.replace(config, access=ruled))
        assert pull._unchecked == frozenset()
        instance.apply(config)
        assert pull._unchecked == {"docker.io"}
    finally:
        instance.lock.release()


async def test_before_the_disk_walk_only_what_the_index_lists_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(tmp_path)
    store.prepare()
    listed, unlisted, vanished = Digest.parse(fake(1)), Digest.parse(fake(2)), Digest.parse(fake(3))
    for digest in (listed, unlisted):
        store.blob_path(digest).parent.mkdir(parents=True, exist_ok=True)
        store.blob_path(digest).write_bytes(b"x" * 10)
    index = CacheIndex(tmp_path / "index.db")
    index.add(str(listed), "blob", 10)
    index.add(str(vanished), "blob", 10)  # its file went while edgecache was stopped
    index.close()
    walk_may_finish = asyncio.Event()
    names = store.names

    def slow_walk() -> dict[str, str]:
        asyncio.run_coroutine_threadsafe(walk_may_finish.wait(), loop).result()
        return names()

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(store, "names", slow_walk)
    keeper = CacheKeeper(store, Metrics(["docker.io"]), max_size=0)
    await keeper.start()
    try:
        assert await keeper.vouched(listed) == (True, 10)
        assert await keeper.vouched(unlisted) == (False, None)
        walk_may_finish.set()

        async def walked() -> bool:
            return await keeper.vouched(unlisted) == (True, 10)

        await wait_until(walked, message="the walk never vouched for the file")
        assert {e.digest for e in keeper.index.all_entries()} == {str(listed), str(unlisted)}
        assert keeper.used == 20
    finally:
        walk_may_finish.set()
        await keeper.close()


def test_a_truncated_index_is_moved_aside_and_an_unopenable_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    index = CacheIndex(path)
    assert index.rebuilt == "missing"
    for n in range(5000):
        index.add(fake(n), "blob", n)
    index._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    index.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    reopened = CacheIndex(path)
    assert reopened.rebuilt == "corrupt" and reopened.all_entries() == []
    aside = [p for p in tmp_path.glob("index.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].read_bytes() == data[: len(data) // 2]  # kept as it was
    reopened.close()
    assert CacheIndex(path).rebuilt is None
    # Not corrupt, just not openable (a directory in its place; a lock, a disk error): refused, kept.
    other = tmp_path / "other.db"
    other.mkdir()
    with pytest.raises(sqlite3.OperationalError):
        CacheIndex(other)
    assert other.is_dir() and not list(tmp_path.glob("other.db.corrupt-*"))

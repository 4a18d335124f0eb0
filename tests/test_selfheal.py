"""A store that heals itself: a stored blob changed behind edgecache's back is never served complete.

Real `edgecache serve` processes (in-process where a test follows the scrubber mid-file), real files,
the real origin behind a recording proxy. Each test
damages a stored file the way an operator, a stray process or a bad disk would, then checks what a
client gets (status, a complete body that hashes to the digest) and what reached the upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from edgecache.store.index import CacheIndex
from tests.conftest import EdgeProcess, blob_path, edge_config, running_edge, scrape, spawn_edge
from tests.support.faults import FaultProxy
from tests.support.images import DOCKER_MANIFEST, Image, Pusher, build_image
from tests.support.registry import Registry
from tests.support.waiting import wait_until

MiB = 1024 * 1024
REPO = "selfheal/app"


@pytest.fixture(scope="module")
def image(origin: Registry) -> Image:
    """An image whose last layer is 2 MiB of incompressible bytes, under a repository of its own."""
    built = build_image("selfheal", random_bytes=2 * MiB)
    Pusher(origin.url).push_image(REPO, "v1", built)
    return built


@pytest.fixture
async def upstream(origin: Registry) -> AsyncIterator[FaultProxy]:
    """The origin behind a proxy that records every request edgecache makes."""
    proxy = await FaultProxy(origin.url).start()
    yield proxy
    await proxy.stop()


async def metric(http: aiohttp.ClientSession, edge: EdgeProcess, name: str, **labels: str) -> float:
    return await scrape(http, f"{edge.url}/metrics", name, **labels)


async def pull(http: aiohttp.ClientSession, edge: EdgeProcess, digest: str) -> tuple[int, str, bytes]:
    """GET a blob to the end: (status, X-Cache, body); a body cut short raises."""
    async with http.get(f"{edge.url}/v2/{REPO}/blobs/{digest}") as resp:
        body = await resp.read()
        assert int(resp.headers["Content-Length"]) == len(body)
        return resp.status, resp.headers["X-Cache"], body


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def cached(http: aiohttp.ClientSession, edge: EdgeProcess, digest: str) -> Path:
    """GET the blob once (a miss), then wait until it is stored and admitted (the keeper holds it)."""
    status, cache, body = await pull(http, edge, digest)
    assert (status, cache, sha256(body)) == (200, "MISS", digest)
    path = blob_path(edge.cache_dir, digest)

    async def admitted() -> bool:
        return path.exists() and await metric(http, edge, "edgecache_cache_entries", kind="blob") == 1

    await wait_until(admitted, message=f"{digest} not stored")
    return path


def flip_byte(path: Path, offset: int) -> None:
    """One byte changed in place: same size, same inode (r+b writes into the file)."""
    with path.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


async def assert_healed(
    http: aiohttp.ClientSession, edge: EdgeProcess, upstream: FaultProxy, digest: str, reason: str
) -> None:
    """The damaged file is in quarantine/, the next GET is a complete 200 with the right bytes from
    exactly one more upstream GET, and the GET after that is a hit again."""
    gets = upstream.count("GET", f"/blobs/{digest}")
    status, cache, body = await pull(http, edge, digest)
    assert (status, cache, sha256(body)) == (200, "MISS", digest)
    assert upstream.count("GET", f"/blobs/{digest}") == gets + 1
    quarantined = edge.cache_dir / "quarantine" / digest.replace(":", "-")
    assert quarantined.exists()
    assert await metric(http, edge, "edgecache_store_quarantined_total", reason=reason) == 1
    await wait_until(lambda: sha256(blob_path(edge.cache_dir, digest).read_bytes()) == digest)
    status, cache, body = await pull(http, edge, digest)
    assert (status, cache, sha256(body)) == (200, "HIT", digest)
    assert upstream.count("GET", f"/blobs/{digest}") == gets + 1
    log = edge.log_path.read_text()
    assert sum(1 for line in log.splitlines() if "quarantine" in line and digest in line) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate"])
async def test_a_changed_blob_is_quarantined_and_fetched_again(
    tmp_path: Path, upstream: FaultProxy, image: Image, damage: str
) -> None:
    """The default configuration (the scrubber on at 20 MB/s): whichever sees the change first, the
    next hit's stat check or the scrubber, the client never gets the damaged bytes."""
    digest = image.layers[-1].digest
    with spawn_edge(tmp_path, upstream.url) as edge:
        async with aiohttp.ClientSession() as http:
            path = await cached(http, edge, digest)
            if damage == "flip":
                flip_byte(path, MiB)
            else:
                os.truncate(path, MiB)  # what a full disk or a killed copy leaves
                # A HEAD never announces the damaged file's length: it is quarantined as a GET would.
                async with http.head(f"{edge.url}/v2/{REPO}/blobs/{digest}") as resp:
                    assert resp.status == 200 and resp.headers["X-Cache"] == "MISS"
                    assert int(resp.headers["Content-Length"]) == len(image.layers[-1].data)
            await assert_healed(http, edge, upstream, digest, "changed")


async def test_silent_corruption_is_found_by_the_scrubber(
    tmp_path: Path, upstream: FaultProxy, image: Image
) -> None:
    """A byte flipped with the mtime put back: size, mtime and inode are those admitted, so no stat
    can tell (bit rot looks the same). With the scrubber off, a hit serves what is on disk; turned on
    by a reload, it re-hashes the file, quarantines it, and the next GET fetches the right bytes."""
    digest = image.layers[-1].digest
    config = "[cache]\nscrub_rate = 0.0\n"
    with spawn_edge(tmp_path, upstream.url, config=config) as edge:
        async with aiohttp.ClientSession() as http:
            path = await cached(http, edge, digest)
            st = path.stat()
            flip_byte(path, MiB)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_ino == st.st_ino
            status, cache, body = await pull(http, edge, digest)
            assert (status, cache) == (200, "HIT") and sha256(body) != digest  # the stat check's limit

            (tmp_path / "edgecache.toml").write_text("[cache]\nscrub_rate = 100.0\n")
            edge.proc.send_signal(signal.SIGHUP)

            async def quarantined() -> bool:
                return await metric(http, edge, "edgecache_store_quarantined_total", reason="corrupt") == 1

            await wait_until(quarantined, message="the scrubber did not quarantine the corrupt blob")
            assert await metric(http, edge, "edgecache_scrub_files_total", result="corrupt") == 1
            await assert_healed(http, edge, upstream, digest, "corrupt")
            assert await metric(http, edge, "edgecache_store_quarantined_total", reason="changed") == 0


async def test_scrub_rate_0_turns_the_scrubber_off(
    tmp_path: Path, upstream: FaultProxy, image: Image
) -> None:
    """With scrub_rate = 0 nothing is re-hashed: no bytes scrubbed, nothing verified after admission,
    and the stat check still guards every hit."""
    digest = image.layers[-1].digest
    with spawn_edge(tmp_path, upstream.url, config="[cache]\nscrub_rate = 0.0\n") as edge:
        async with aiohttp.ClientSession() as http:
            path = await cached(http, edge, digest)
            admitted_at = _verified_at(edge.cache_dir, digest)
            for _ in range(3):
                assert (await pull(http, edge, digest))[:2] == (200, "HIT")
            assert await metric(http, edge, "edgecache_scrub_bytes_total") == 0
            assert _verified_at(edge.cache_dir, digest) == admitted_at  # admission, never since
            assert "store scrubber on" not in edge.log_path.read_text()
            flip_byte(path, 0)
            await assert_healed(http, edge, upstream, digest, "changed")


def _verified_at(cache: Path, digest: str) -> float | None:
    index = CacheIndex(cache / "index.db")
    try:
        entry = index.get(digest)
        assert entry is not None
        return entry.verified_at
    finally:
        index.close()


async def test_an_index_from_before_identities_is_migrated_and_checked(
    tmp_path: Path, upstream: FaultProxy, image: Image
) -> None:
    """An index.db written before the identity columns existed: start-up adds them (unknown), the
    first hit records what it sees, the scrubber hashes it, and a later change is still caught."""
    digest = image.layers[-1].digest
    with spawn_edge(tmp_path, upstream.url, config="[cache]\nscrub_rate = 0.0\n") as edge:
        async with aiohttp.ClientSession() as http:
            await cached(http, edge, digest)
    index = CacheIndex(tmp_path / "cache" / "index.db")  # the server has stopped: make it old
    index._db.executescript(
        "DROP INDEX entries_by_verified; ALTER TABLE entries DROP COLUMN mtime_ns; "
        "ALTER TABLE entries DROP COLUMN inode; ALTER TABLE entries DROP COLUMN verified_at;"
    )
    index.close()
    with spawn_edge(tmp_path, upstream.url, config="[cache]\nscrub_rate = 100.0\n") as edge:
        async with aiohttp.ClientSession() as http:
            assert (await pull(http, edge, digest))[:2] == (200, "HIT")

            async def scrubbed() -> bool:
                return _verified_at(edge.cache_dir, digest) is not None

            await wait_until(scrubbed, message="the scrubber did not verify the migrated entry")
            flip_byte(blob_path(edge.cache_dir, digest), 10)
            await assert_healed(http, edge, upstream, digest, "changed")


async def test_a_changed_manifest_is_never_served(tmp_path: Path, upstream: FaultProxy, image: Image) -> None:
    """Manifests are re-hashed whenever they are read from disk (after a restart, or once out of the
    memory cache): a changed one is quarantined and fetched again."""
    digest = image.manifest.digest
    url_path = f"/v2/{REPO}/manifests/{digest}"
    headers = {"Accept": DOCKER_MANIFEST}
    config = "[cache]\nscrub_rate = 0.0\n"
    with spawn_edge(tmp_path, upstream.url, config=config) as edge:
        async with aiohttp.ClientSession() as http, http.get(edge.url + url_path, headers=headers) as resp:
            assert resp.status == 200 and await resp.read() == image.manifest.data
    path = edge.cache_dir / "manifests" / "sha256" / digest[7:9] / digest[7:]
    stored = path.read_bytes()
    path.write_bytes(stored.replace(b'"schemaVersion"', b'"schemaversion"'))  # same size, one byte
    with spawn_edge(tmp_path, upstream.url, config=config) as edge:
        gets = upstream.count("GET", f"/manifests/{digest}")
        async with aiohttp.ClientSession() as http:
            async with http.get(edge.url + url_path, headers=headers) as resp:
                assert resp.status == 200 and await resp.read() == image.manifest.data
            assert upstream.count("GET", f"/manifests/{digest}") == gets + 1
            assert await metric(http, edge, "edgecache_store_quarantined_total", reason="corrupt") == 1
            assert (edge.cache_dir / "quarantine" / digest.replace(":", "-")).exists()
            await wait_until(lambda: path.read_bytes() == stored, message="manifest not stored again")


async def test_a_cache_copied_to_another_disk_is_kept_after_a_verify(
    tmp_path: Path, upstream: FaultProxy, image: Image
) -> None:
    """Copying the cache directory changes every inode, so every blob would look changed and be
    fetched again; `edgecache verify` re-hashes them and records the identities they have now."""
    digest = image.layers[-1].digest
    config = "[cache]\nscrub_rate = 0.0\n"
    with spawn_edge(tmp_path, upstream.url, config=config) as edge:
        async with aiohttp.ClientSession() as http:
            await cached(http, edge, digest)
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "cache").rename(moved / "cache")
    shutil.copytree(moved / "cache", tmp_path / "cache")  # new inodes (copy2 keeps mtimes)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "edgecache", "verify", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    with spawn_edge(tmp_path, upstream.url, config=config) as edge:
        gets = upstream.count("GET", f"/blobs/{digest}")
        async with aiohttp.ClientSession() as http:
            status, cache, body = await pull(http, edge, digest)
            assert (status, cache, sha256(body)) == (200, "HIT", digest)
            assert upstream.count("GET", f"/blobs/{digest}") == gets


async def test_a_blob_evicted_while_it_is_scrubbed_is_left_alone(
    tmp_path: Path, origin: Registry, image: Image
) -> None:
    """The scrubber hashes through its open descriptor: a file pruned half-way is read to the end,
    nothing is quarantined, the entry is not brought back, and the next GET simply fetches it again."""
    digest = image.layers[-1].digest
    async with running_edge(edge_config(tmp_path / "cache", origin.url, scrub_rate=0.0)) as edge:
        async with edge.http.get(f"/v2/{REPO}/blobs/{digest}") as resp:
            assert sha256(await resp.read()) == digest
        await edge.instance.flights.settled()
        edge.instance.scrubber.reconfigure(1.0)  # as a reload would: the blob is the whole store

        async def half_way() -> bool:  # 1 MB/s: the second MiB is a second away
            return MiB <= await edge.metric("edgecache_scrub_bytes_total") < 2 * MiB

        await wait_until(half_way, message="the scrubber did not start on the blob")
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "edgecache", "prune", "--to", "0", "--cache-dir", str(edge.cache_dir)],
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert not blob_path(edge.cache_dir, digest).exists()

        async def scrubbed() -> float:
            done = [await edge.metric("edgecache_scrub_files_total", result=r) for r in ("ok", "gone")]
            return sum(done)

        await wait_until(scrubbed, message="the scrubber did not finish the pruned blob")
        for reason in ("changed", "corrupt"):
            assert await edge.metric("edgecache_store_quarantined_total", reason=reason) == 0
        index = CacheIndex(edge.cache_dir / "index.db")
        assert index.get(digest) is None
        index.close()
        async with edge.http.get(f"/v2/{REPO}/blobs/{digest}") as resp:
            assert resp.headers["X-Cache"] == "MISS" and sha256(await resp.read()) == digest

"""A cache that never outgrows its disk and survives anything: LRU eviction, pins, pass-through,
kill -9, a lost index, a full disk, corrupt files, and the operator commands. Real disk, real origin."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from edgecache.store.index import CacheIndex
from tests.conftest import Edge, Seeded, blob_path, edge_config, running_edge
from tests.support.faults import FaultProxy
from tests.support.images import DOCKER_MANIFEST, Image, Pusher, build_image
from tests.support.registry import Registry, free_port, wait_http
from tests.support.waiting import wait_until, wait_until_sync

MiB = 1024 * 1024
ACCEPT = {"Accept": DOCKER_MANIFEST}


@pytest.fixture(scope="module")
def churn(origin: Registry) -> list[Image]:
    """Eight images whose last layer is 1 MiB of incompressible bytes."""
    images = [build_image(f"churn-{i}", random_bytes=MiB) for i in range(8)]
    pusher = Pusher(origin.url)
    for i, image in enumerate(images):
        pusher.push_image(f"churn/img{i}", "v1", image)
    return images


def stored_bytes(cache: Path) -> int:
    return sum(
        p.stat().st_size for sub in ("blobs", "manifests") for p in (cache / sub).rglob("*") if p.is_file()
    )


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgecache", *args], capture_output=True, text=True, timeout=60
    )


async def get_blob(edge: Edge, repo: str, digest: str) -> tuple[str, bytes]:
    """GET a blob, then wait for its fill (if any) to be stored, so the disk can be checked."""
    async with edge.http.get(f"/v2/{repo}/blobs/{digest}") as resp:
        assert resp.status == 200
        result = resp.headers["X-Cache"], await resp.read()
    await edge.instance.flights.settled()
    return result


@pytest.fixture
async def small_edge(tmp_path: Path, origin: Registry, churn: list[Image]) -> AsyncIterator[Edge]:
    async with running_edge(
        edge_config(tmp_path / "cache", origin.url, max_size=str(int(4.5 * MiB)))
    ) as edge:
        yield edge


async def test_least_recently_used_goes_first_and_the_limit_holds(
    small_edge: Edge, churn: list[Image]
) -> None:
    layers = [image.layers[-1] for image in churn]
    limit = int(4.5 * MiB)
    for i in range(4):
        await get_blob(small_edge, f"churn/img{i}", layers[i].digest)
        assert stored_bytes(small_edge.cache_dir) <= limit
    assert await get_blob(small_edge, "churn/img0", layers[0].digest) == (
        "HIT",
        layers[0].data,
    )  # 0 is hot now
    await get_blob(small_edge, "churn/img4", layers[4].digest)  # needs room: the coldest (1) goes
    present = [blob_path(small_edge.cache_dir, layer.digest).exists() for layer in layers[:5]]
    assert present == [True, False, True, True, True]
    assert stored_bytes(small_edge.cache_dir) <= limit
    index = CacheIndex(small_edge.cache_dir / "index.db")
    assert {e.digest for e in index.all_entries()} == {layers[i].digest for i in (0, 2, 3, 4)}
    index.close()
    assert await small_edge.metric("edgecache_evictions_total", reason="size") == 1
    # evicted content is simply fetched again
    assert await get_blob(small_edge, "churn/img1", layers[1].digest) == ("MISS", layers[1].data)


async def test_churn_never_exceeds_the_limit_and_pinned_images_survive(
    tmp_path: Path, origin: Registry, churn: list[Image]
) -> None:
    limit = 4 * MiB
    config = edge_config(tmp_path / "cache", origin.url, max_size=str(limit))
    async with running_edge(config) as edge:
        pinned = churn[0]
        async with edge.http.get("/v2/churn/img0/manifests/v1", headers=ACCEPT) as resp:
            assert resp.status == 200
        for blob in pinned.blobs:
            await get_blob(edge, "churn/img0", blob.digest)
        result = cli("pin", "add", "docker.io/churn/img0:v1", "--cache-dir", str(edge.cache_dir))
        assert result.returncode == 0, result.stderr
        assert "3 cached entries are now pinned" in result.stdout  # manifest, config, layer
        for _round in range(2):  # a working set several times the limit
            for i, image in enumerate(churn[1:], 1):
                await get_blob(edge, f"churn/img{i}", image.layers[-1].digest)
                assert stored_bytes(edge.cache_dir) <= limit
        for blob in pinned.blobs:
            assert blob_path(edge.cache_dir, blob.digest).read_bytes() == blob.data
        assert await edge.metric("edgecache_pinned_bytes") > MiB
        listing = cli("pin", "ls", "--cache-dir", str(edge.cache_dir))
        assert listing.stdout.strip() == "docker.io/churn/img0:v1"


async def test_when_pinned_content_fills_the_cache_misses_pass_through(
    tmp_path: Path, origin: Registry, churn: list[Image]
) -> None:
    config = edge_config(tmp_path / "cache", origin.url, max_size=str(int(1.5 * MiB)))
    async with running_edge(config) as edge:
        await get_blob(edge, "churn/img0", churn[0].layers[-1].digest)
        assert cli("pin", "add", "churn/*", "--cache-dir", str(edge.cache_dir)).returncode == 0
        async with edge.http.get("/v2/churn/img0/manifests/v1", headers=ACCEPT) as resp:
            await resp.read()  # the pinned tag's manifest and what it references are now pinned
        big = churn[1].layers[-1]
        for _ in range(2):
            cache, body = await get_blob(edge, "churn/img1", big.digest)
            assert body == big.data and cache == "MISS"  # verified and served, never stored
        assert not blob_path(edge.cache_dir, big.digest).exists()
        assert blob_path(edge.cache_dir, churn[0].layers[-1].digest).exists()
        assert await edge.metric("edgecache_passthrough_total", kind="blob") == 2


async def test_a_cached_file_of_the_wrong_size_is_fetched_again(small_edge: Edge, churn: list[Image]) -> None:
    layer = churn[5].layers[-1]
    await get_blob(small_edge, "churn/img5", layer.digest)
    path = blob_path(small_edge.cache_dir, layer.digest)
    path.write_bytes(layer.data[:1000])  # truncated behind edgecache's back
    assert await get_blob(small_edge, "churn/img5", layer.digest) == ("MISS", layer.data)
    assert path.read_bytes() == layer.data  # get_blob waited for the new fill to be stored


@pytest.fixture
def served_cache(tmp_path: Path, origin: Registry, churn: list[Image]) -> Iterator[tuple[str, Path]]:
    """A real `edgecache serve` process that has cached two images."""
    port, cache = free_port(), tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecache", "serve", "--listen", f"127.0.0.1:{port}",
         "--upstream", origin.url, "--cache-dir", str(cache), "--log-level", "warning"],
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/v2/", proc=proc)
    import urllib.request

    for i in (2, 3):
        for blob in churn[i].blobs:
            with urllib.request.urlopen(f"{url}/v2/churn/img{i}/blobs/{blob.digest}") as resp:
                resp.read()
    yield url, cache
    proc.terminate()
    proc.wait(15)


def test_operator_commands_beside_a_running_server(
    served_cache: tuple[str, Path], churn: list[Image]
) -> None:
    url, cache = served_cache
    du = cli("du", "--cache-dir", str(cache))
    assert du.returncode == 0
    assert "docker.io/churn/img2" in du.stdout and "4 entries" in du.stdout
    layer = churn[2].layers[-1]
    path = blob_path(cache, layer.digest)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    verify = cli("verify", "--cache-dir", str(cache))
    assert verify.returncode == 1
    assert "verified 4 entries" in verify.stdout and "1 quarantined" in verify.stdout
    assert not path.exists() and (cache / "quarantine" / layer.digest.replace(":", "-")).exists()
    import urllib.request

    with urllib.request.urlopen(f"{url}/v2/churn/img2/blobs/{layer.digest}") as resp:
        assert resp.read() == layer.data  # fetched again, good this time
    wait_until_sync(path.exists, message=f"{path} not stored again")  # stored just after the response
    prune = cli("prune", "--to", "1M", "--cache-dir", str(cache))
    assert prune.returncode == 0, prune.stderr
    assert stored_bytes(cache) <= MiB
    assert cli("prune", "--to", "1M", "--cache-dir", str(cache / "nope")).returncode == 2


def test_index_lost_or_corrupt_is_rebuilt_from_the_store(
    tmp_path: Path, origin: Registry, churn: list[Image]
) -> None:
    cache = tmp_path / "cache"

    async def pull_and_stop() -> None:
        async with running_edge(edge_config(cache, origin.url)) as edge:
            for blob in churn[6].blobs:
                await get_blob(edge, "churn/img6", blob.digest)

    asyncio.run(pull_and_stop())
    for damage in ("delete", "garbage"):
        for suffix in ("", "-wal", "-shm"):
            target = Path(f"{cache / 'index.db'}{suffix}")
            if damage == "delete" or suffix == "":
                target.unlink(missing_ok=True)
            if damage == "garbage" and suffix == "":
                target.write_bytes(b"this is not a database" * 100)

        async def restart_and_check() -> None:
            async with running_edge(edge_config(cache, origin.url)) as edge:
                entries = {e.digest: e.size for e in CacheIndex(cache / "index.db").all_entries()}
                assert entries == {b.digest: len(b.data) for b in churn[6].blobs}
                for blob in churn[6].blobs:
                    assert await get_blob(edge, "churn/img6", blob.digest) == ("HIT", blob.data)

        asyncio.run(restart_and_check())


@pytest.mark.parametrize("read_before_kill", [1 * MiB, 12 * MiB, 23 * MiB])
async def test_kill_9_mid_fill_leaves_nothing_unverified(
    tmp_path: Path, origin: Registry, seeded: Seeded, read_before_kill: int
) -> None:
    proxy = await FaultProxy(origin.url).start()
    proxy.rules.throttle = 0.005  # the 24 MiB layer takes seconds: time to kill it mid-way
    port, cache = free_port(), tmp_path / "cache"
    command = [sys.executable, "-m", "edgecache", "serve", "--listen", f"127.0.0.1:{port}",
               "--upstream", proxy.url, "--cache-dir", str(cache), "--log-level", "warning"]  # fmt: skip
    layer = seeded.big.layers[-1]
    proc = await asyncio.create_subprocess_exec(*command)
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/v2/")
        blob_url = f"http://127.0.0.1:{port}/v2/library/big/blobs/{layer.digest}"
        async with aiohttp.ClientSession() as http, http.get(blob_url) as resp:
            await resp.content.readexactly(read_before_kill)  # the fill is under way
            assert any((cache / "tmp").iterdir())
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        assert not blob_path(cache, layer.digest).exists()
        proxy.rules.throttle = 0
        proc = await asyncio.create_subprocess_exec(*command)
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/v2/")
        assert not any((cache / "tmp").iterdir())  # leftover spools removed at start
        index = CacheIndex(cache / "index.db")
        on_disk = {
            str(p.parent.parent.name) + ":" + p.name for p in (cache / "blobs").rglob("*") if p.is_file()
        }
        assert {e.digest for e in index.all_entries() if e.kind == "blob"} == on_disk
        index.close()
        async with aiohttp.ClientSession() as http, http.get(blob_url) as resp:
            assert await resp.read() == layer.data
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        await proxy.stop()


def mounted_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A real file system of `size` for the cache (tmpfs, mounted as root; skipped where that is not
    allowed, since a small disk and ENOSPC cannot be had otherwise)."""
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()})")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """3 MiB: smaller than some blobs, so a fill can run out of disk."""
    yield from mounted_tmpfs(tmp_path / "tiny", "3m")


async def test_min_free_space_is_kept_by_evicting(
    tiny_disk: Path, origin: Registry, churn: list[Image]
) -> None:
    # 3 MiB file system, at least 1.5 MiB kept free: room for one 1 MiB layer at a time.
    async with running_edge(edge_config(tiny_disk / "cache", origin.url, min_free="1536K")) as edge:
        layers = [image.layers[-1] for image in churn[:3]]
        for i, layer in enumerate(layers):
            assert (await get_blob(edge, f"churn/img{i}", layer.digest))[1] == layer.data
            assert shutil.disk_usage(tiny_disk).free >= 1536 * 1024
        assert [blob_path(tiny_disk / "cache", layer.digest).exists() for layer in layers] == [
            False,
            False,
            True,
        ]
        assert await edge.metric("edgecache_evictions_total", reason="free_space") == 2


async def test_a_blob_bigger_than_the_disk_passes_through_whole(
    tiny_disk: Path, origin: Registry, seeded: Seeded
) -> None:
    """24 MiB on a 3 MiB file system: streamed to its readers without being stored, one upstream GET
    for readers that come together, Range answered, memory bounded by the window, not the blob."""
    big = seeded.big.layers[-1]
    path = f"/v2/library/big/blobs/{big.digest}"
    proxy = await FaultProxy(origin.url).start()
    # The readers come together: both ask before upstream has answered (a slow first byte), as
    # clients of a new rollout do.
    proxy.rules.slow_blob_headers = 0.5
    try:
        async with running_edge(edge_config(tiny_disk / "cache", proxy.url)) as edge:
            gets = origin.count("GET", big.digest)

            async def pull(headers: dict[str, str]) -> tuple[int, str, bytes]:
                async with edge.http.get(path, headers=headers) as resp:
                    return resp.status, resp.headers["X-Cache"], await resp.read()

            whole, ranged = await asyncio.gather(pull({}), pull({"Range": "bytes=100-199"}))
            assert whole[0] == 200 and hashlib.sha256(whole[2]).hexdigest() == big.digest.split(":")[1]
            assert ranged[0] == 206 and ranged[2] == big.data[100:200]
            assert origin.count("GET", big.digest) - gets == 1  # one fill for both readers
            await edge.instance.flights.settled()
            assert not blob_path(tiny_disk / "cache", big.digest).exists()
            assert not any((tiny_disk / "cache" / "tmp").iterdir())
            assert await edge.metric("edgecache_passthrough_total", kind="blob") >= 1
            # Again, alone: passed through again, complete again (never a cut-short 200 every time).
            status, cache, body = await pull({})
            assert (status, cache, body == big.data) == (200, "MISS", True)
    finally:
        await proxy.stop()


async def test_a_disk_that_fills_mid_fill_cuts_the_readers_and_the_next_request_passes_through(
    tiny_disk: Path, origin: Registry, seeded: Seeded
) -> None:
    layer = seeded.alpine.layers[-1]  # 2 MiB: fits the 3 MiB file system when the fill starts
    proxy = await FaultProxy(origin.url).start()
    proxy.rules.throttle = 0.05  # slow enough to fill the disk under the fill's feet
    cache = tiny_disk / "cache"
    try:
        async with running_edge(edge_config(cache, proxy.url)) as edge:
            path = f"/v2/library/alpine/blobs/{layer.digest}"
            async with edge.http.get(path) as resp:
                assert resp.status == 200
                await wait_until(lambda: any(p.stat().st_size for p in (cache / "tmp").iterdir()))
                junk = tiny_disk / "junk"
                # another process takes the rest of the disk
                with junk.open("wb") as fh, contextlib.suppress(OSError):
                    fh.write(b"\0" * 3 * 1024 * 1024)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()  # cut short: never a clean end of a short body
            await edge.instance.flights.settled()
            assert await edge.metric("edgecache_fills_failed_total", upstream="docker.io", reason="disk") == 1
            assert not blob_path(cache, layer.digest).exists()
            assert not any((cache / "tmp").iterdir())
            junk.unlink()  # room again: still, the next request passes through instead of failing again
            proxy.rules.throttle = 0.0
            async with edge.http.get(path) as resp:
                assert resp.status == 200 and await resp.read() == layer.data
            await edge.instance.flights.settled()
            assert not blob_path(cache, layer.digest).exists()
            assert await edge.metric("edgecache_passthrough_total", kind="blob") == 1
    finally:
        await proxy.stop()


def test_pin_references_are_checked() -> None:
    from edgecache.ops.maintenance import parse_pin

    assert str(parse_pin("alpine:3.19")) == "docker.io/library/alpine:3.19"
    assert str(parse_pin("ghcr.io/owner/app")) == "ghcr.io/owner/app:*"
    assert str(parse_pin("registry.corp:5000/team/*:v*")) == "registry.corp:5000/team/*:v*"
    result = cli("pin", "add", "Bad/Name:x", "--cache-dir", "/nonexistent")
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.fixture
def roomy_disk(tmp_path: Path) -> Iterator[Path]:
    """256 MiB of its own, so its used space is the cache's alone (deleted files still open
    included, which a walk of the directory would miss)."""
    yield from mounted_tmpfs(tmp_path / "roomy", "256m")


async def test_the_size_bound_holds_at_every_instant_under_churn(roomy_disk: Path, origin: Registry) -> None:
    """160 MiB of 4 MiB layers through a 48 MiB cache, 4 clients, Zipf-distributed: disk use sampled
    every 20 ms never exceeds max_size plus the index (fills in flight reserve their room first)."""
    images = [build_image(f"zipf-{i}", random_bytes=4 * MiB) for i in range(40)]
    pusher = Pusher(origin.url)
    for i, image in enumerate(images):
        pusher.push_image(f"zipf/img{i}", "v1", image)
    cache = roomy_disk / "cache"
    limit = 48 * MiB
    peak = {"used": 0, "over": 0}
    sampling = True

    def sample() -> None:
        while sampling:
            used = shutil.disk_usage(roomy_disk).used
            index = sum(p.stat().st_size for p in cache.glob("index.db*") if p.exists())
            peak["used"] = max(peak["used"], used)
            peak["over"] = max(peak["over"], used - limit - index)
            time.sleep(0.02)

    sampler = asyncio.get_running_loop().run_in_executor(None, sample)
    rng = random.Random(15)
    weights = [1 / (i + 1) for i in range(len(images))]
    async with running_edge(edge_config(cache, origin.url, max_size="48M")) as edge:

        async def client(picks: list[int]) -> None:
            for i in picks:
                layer = images[i].layers[-1]
                async with edge.http.get(f"/v2/zipf/img{i}/blobs/{layer.digest}") as resp:
                    assert resp.status == 200 and await resp.read() == layer.data

        plans = [rng.choices(range(len(images)), weights, k=30) for _ in range(4)]
        try:
            await asyncio.gather(*(client(plan) for plan in plans))
            await edge.instance.flights.settled()
        finally:
            sampling = False
            await sampler
        assert await edge.metric("edgecache_evictions_total", reason="size") > 0  # it did churn
    # Page rounding of the small files (tags, directories) is all the slack there is.
    assert peak["over"] <= 256 * 1024, f"disk use went {peak['over']} bytes over max_size + index"

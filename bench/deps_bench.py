"""Two dependencies the project card names that edgecache does not use, measured against what the code
does instead (README "Design choices: dependencies we do not use"):

1. aiofiles vs `edgecache.http.chunks.read_chunks` (one `asyncio.to_thread(os.pread)` per 1 MiB chunk):
   read a 256 MiB file (warm in the page cache, as a cache hit is) in 1 MiB chunks, 1 and 8 readers at
   a time. Figures: throughput, CPU seconds (whole process, and the event-loop thread alone: the work
   that delays every other request), thread hops (submissions to the loop's default executor).
2. diskcache vs `ManifestCache`'s tag files (JSON, fsync, atomic rename, fsync of the directory):
   set and get of 10k tag entries; diskcache as it ships (SQLite WAL, synchronous=NORMAL) and with
   synchronous=FULL (a commit survives power loss, as our fsync'd renames do); disk footprint; and a
   writer SIGKILLed mid-way, counting entries that read back torn.

Needs `pip install aiofiles diskcache` in the venv (benchmark only; they are not dependencies).

    .venv/bin/python bench/deps_bench.py [--dir DIR] [--file-mib 256] [--tags 10000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import importlib.metadata
import json
import multiprocessing
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiofiles  # type: ignore[import-untyped]  # noqa: E402
import aiofiles.os  # type: ignore[import-untyped]  # noqa: E402
import diskcache  # type: ignore[import-untyped]  # noqa: E402

from edgecache.http.chunks import CHUNK, read_chunks  # noqa: E402
from edgecache.oci import Digest, RepoName, Tag  # noqa: E402
from edgecache.store.blobs import BlobStore  # noqa: E402
from edgecache.store.manifests import ManifestCache, TagEntry, TagKey  # noqa: E402

MIB = 1024 * 1024


# -- 1. file reads off the event loop -----------------------------------------------------------


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's default executor (what both asyncio.to_thread and aiofiles use), counting hops."""

    hops = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        CountingExecutor.hops += 1
        return super().submit(fn, *args, **kwargs)


async def read_edgecache(path: str) -> int:
    """What the TLS front does for a cached blob: open + fstat in a thread (blobs.py), then
    read_chunks (chunks.py), one pread hop per MiB."""
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
    try:
        size = (await asyncio.to_thread(os.fstat, fd)).st_size
        total = 0
        async for data in read_chunks(fd, 0, size):
            total += len(data)
        return total
    finally:
        os.close(fd)


async def read_aiofiles(path: str) -> int:
    async with aiofiles.open(path, "rb") as fh:
        await aiofiles.os.stat(path)
        total = 0
        while data := await fh.read(CHUNK):
            total += len(data)
        return total


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one_read_run(
    reader: Callable[[str], Coroutine[Any, Any, int]], path: str, readers: int, size: int
) -> dict[str, float]:
    CountingExecutor.hops = 0
    cpu0, loop_cpu0, wall0 = cpu_seconds(), time.thread_time(), time.perf_counter()
    totals = await asyncio.gather(*(reader(path) for _ in range(readers)))
    wall, loop_cpu, cpu = time.perf_counter() - wall0, time.thread_time() - loop_cpu0, cpu_seconds() - cpu0
    assert all(t == size for t in totals)
    return {
        "mb_s": sum(totals) / 1e6 / wall,
        "cpu_s": cpu,
        "loop_cpu_s": loop_cpu,
        "hops": CountingExecutor.hops / readers,
    }


async def bench_reads(path: str, runs: int, readers: int) -> dict[str, dict[str, float]]:
    size = await asyncio.to_thread(os.path.getsize, path)
    asyncio.get_running_loop().set_default_executor(CountingExecutor())
    variants: dict[str, Callable[[str], Coroutine[Any, Any, int]]] = {
        "edgecache (to_thread + pread)": read_edgecache,
        "aiofiles": read_aiofiles,
    }
    for reader in variants.values():  # warm the page cache and the executor's threads
        await one_read_run(reader, path, readers, size)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(runs):  # interleaved, so drift hits both alike
        for name, reader in variants.items():
            samples[name].append(await one_read_run(reader, path, readers, size))
    return {
        name: {k: statistics.median(s[k] for s in runs_) for k in runs_[0]} for name, runs_ in samples.items()
    }


# -- 2. persisted tag entries -------------------------------------------------------------------

DIGEST = Digest.parse("sha256:" + "ab" * 32)
MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"


def tag_keys(count: int) -> list[TagKey]:
    return [("docker.io", RepoName.parse(f"team{i % 100}/app{i}"), Tag.parse("latest")) for i in range(count)]


def record(entry: TagEntry) -> dict[str, Any]:
    return {
        "digest": str(entry.digest),
        "media_type": entry.media_type,
        "size": entry.size,
        "confirmed_at": entry.confirmed_at,
    }


class OurTags:
    """The code's own way: ManifestCache._save_tag / _load_tag on a BlobStore (what set_tag and a
    cold tag() run in their worker thread)."""

    name = "edgecache tag files (fsync + rename)"

    def __init__(self, root: Path) -> None:
        store = BlobStore(root)
        store.prepare()
        self.root = root
        self.cache = ManifestCache(store)

    def set(self, key: TagKey, entry: TagEntry) -> None:
        self.cache._save_tag(key, entry)

    def get(self, key: TagKey) -> TagEntry | None:
        return self.cache._load_tag(key)

    def footprint(self) -> int:
        return du(self.root / "tags")

    def close(self) -> None:
        pass


class DiskcacheTags:
    def __init__(self, root: Path, synchronous: int) -> None:
        # eviction_policy="none": eviction is the keeper's job; diskcache's default would cull tags
        # on its own once its 1 GiB size_limit is reached.
        self.root = root
        self.cache = diskcache.Cache(str(root), eviction_policy="none", sqlite_synchronous=synchronous)
        self.name = f"diskcache (synchronous={'NORMAL' if synchronous == 1 else 'FULL'})"

    def set(self, key: TagKey, entry: TagEntry) -> None:
        self.cache.set(f"{key[0]}/{key[1]}:{key[2]}", json.dumps(record(entry)))

    def get(self, key: TagKey) -> TagEntry | None:
        text = self.cache.get(f"{key[0]}/{key[1]}:{key[2]}")
        if text is None:
            return None
        r = json.loads(text)
        return TagEntry(Digest.parse(r["digest"]), r["media_type"], r["size"], r["confirmed_at"])

    def footprint(self) -> int:
        return du(self.root)

    def close(self) -> None:
        self.cache.close()


def du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        total += os.stat(dirpath).st_blocks * 512
        for name in files:
            total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def make_store(kind: str, root: Path) -> OurTags | DiskcacheTags:
    if kind == "ours":
        return OurTags(root)
    return DiskcacheTags(root, 1 if kind == "diskcache-normal" else 2)


def bench_tags(base: Path, count: int, runs: int) -> dict[str, dict[str, float]]:
    keys = tag_keys(count)
    entry = TagEntry(DIGEST, MEDIA_TYPE, 1234, 1_700_000_000.0)
    results: dict[str, list[dict[str, float]]] = {}
    for run in range(runs):
        for kind in ("ours", "diskcache-normal", "diskcache-full"):
            root = base / f"tags-{kind}-{run}"
            store = make_store(kind, root)
            t0, c0 = time.perf_counter(), cpu_seconds()
            for key in keys:
                store.set(key, entry)
            set_s, set_cpu = time.perf_counter() - t0, cpu_seconds() - c0
            t0 = time.perf_counter()
            for key in keys:
                assert store.get(key) == entry
            get_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for key in keys:  # an update of every tag (a re-confirmation writes the entry again)
                store.set(key, entry)
            update_s = time.perf_counter() - t0
            figures = {
                "set_ops": count / set_s,
                "set_cpu_us": set_cpu / count * 1e6,
                "update_ops": count / update_s,
                "get_ops": count / get_s,
                "disk_mib": store.footprint() / MIB,
            }
            store.close()
            shutil.rmtree(root)
            results.setdefault(store.name, []).append(figures)
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}


def _writer(kind: str, root: str, count: int, ready: Any) -> None:
    store = make_store(kind, Path(root))
    keys = tag_keys(count)
    for i, key in enumerate(keys):  # every entry exists before the kill: count what survives whole
        store.set(key, TagEntry(DIGEST, MEDIA_TYPE, i, float(i)))
    ready.set()
    for i in range(10**9):  # rewrite every entry with a new confirmation time until killed
        key = keys[i % count]
        store.set(key, TagEntry(DIGEST, MEDIA_TYPE, i, float(i)))


def crash_check(base: Path, count: int, seconds: float) -> dict[str, dict[str, int]]:
    """SIGKILL a writer mid-way; then every entry must read back whole (or be absent), never torn."""
    found: dict[str, dict[str, int]] = {}
    ctx = multiprocessing.get_context("fork")
    for kind in ("ours", "diskcache-normal"):
        root = base / f"crash-{kind}"
        ready = ctx.Event()
        proc = ctx.Process(target=_writer, args=(kind, str(root), count, ready))
        proc.start()
        ready.wait(120)
        time.sleep(seconds)
        os.kill(proc.pid or 0, signal.SIGKILL)
        proc.join()
        if kind == "ours":  # a restart empties tmp/ (BlobStore.prepare): count what was left there
            leftovers = len(os.listdir(root / "tmp"))
        store = make_store(kind, root)
        whole = torn = 0
        for key in tag_keys(count):
            try:
                got = store.get(key)
            except Exception:
                torn += 1
                continue
            if got is None:
                continue
            if got.digest == DIGEST and got.size == int(got.confirmed_at):
                whole += 1
            else:
                torn += 1
        store.close()
        found[store.name] = {
            "whole": whole,
            "torn": torn,
            **({"tmp_leftovers": leftovers} if kind == "ours" else {}),
        }
        shutil.rmtree(root)
    return found


# -- report -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--file-mib", type=int, default=256)
    parser.add_argument("--tags", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="deps-bench-", dir=args.dir))
    try:
        path = base / "blob"
        with open(path, "wb") as fh:
            for _ in range(args.file_mib):
                fh.write(os.urandom(MIB))
        reads = {n: asyncio.run(bench_reads(str(path), args.runs, n)) for n in (1, 8)}
        path.unlink()
        tags = bench_tags(base, args.tags, args.runs)
        crash = crash_check(base, 2000, 1.0)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    today = datetime.date.today().isoformat()
    print(f"Dependencies bench, {today}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"aiofiles {importlib.metadata.version('aiofiles')}, "
          f"diskcache {diskcache.__version__}, medians of {args.runs}")  # fmt: skip
    print(f"\nReading a {args.file_mib} MiB file (page cache warm) in 1 MiB chunks; CPU = whole process, "
          "loop CPU = the event-loop thread; hops = executor submissions per reader\n")  # fmt: skip
    print("| readers | way | MB/s | ratio | CPU s | loop CPU s | hops per reader |")
    print("|---|---|---|---|---|---|---|")
    for n, by_way in reads.items():
        base_mb = by_way["edgecache (to_thread + pread)"]["mb_s"]
        for way, f in by_way.items():
            print(f"| {n} | {way} | {f['mb_s']:,.0f} | {f['mb_s'] / base_mb:.2f}x | {f['cpu_s']:.2f} | "
                  f"{f['loop_cpu_s']:.2f} | {f['hops']:.0f} |")  # fmt: skip
    print(f"\n{args.tags:,} tag entries, one thread, set then get then update each; disk = space used\n")
    print("| way | set ops/s | set CPU us/op | update ops/s | get ops/s | disk MiB |")
    print("|---|---|---|---|---|---|")
    for way, f in tags.items():
        print(f"| {way} | {f['set_ops']:,.0f} | {f['set_cpu_us']:.0f} | {f['update_ops']:,.0f} | "
              f"{f['get_ops']:,.0f} | {f['disk_mib']:.1f} |")  # fmt: skip
    print(
        "\nA writer holding 2,000 tags, SIGKILLed after 1 s of rewriting them: "
        "entries read back whole / torn\n"
    )
    for way, counts in crash.items():
        extra = (
            f", {counts['tmp_leftovers']} temp file(s) left in tmp/ (removed at start-up)"
            if "tmp_leftovers" in counts
            else ""
        )
        print(f"- {way}: {counts['whole']:,} whole, {counts['torn']} torn{extra}")


if __name__ == "__main__":
    main()

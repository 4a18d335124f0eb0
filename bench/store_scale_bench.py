"""A big edge disk: start-up, hit latency and eviction at 10k, 100k and 1M cached entries, same run.

10 TB of 10 MB layers is a million entries. For each count N this builds a synthetic cache (blobs
are sparse files: a real size, no data blocks, so 1M of them cost inodes, not disk; 1% of entries
are real manifests; the index has a row and a repository fact for every entry), then runs a real
`python -m edgecache serve` on it, upstream refusing connections (nothing can come from upstream,
so every answer is from the cache):

- start-up: from exec to the first blob hit answered; the times edgecache logs for opening the
  index, reading it and walking the disk (in the background since 0.3.0), the worst latency of a
  client hitting meanwhile, and the RSS after; at the end, start-up with the index deleted (rebuilt
  from the disk before serving);
- hit latency: sequential HEAD and GET of blobs and manifests by digest (one client, aiohttp), from
  the same working set at every N (2,000 blobs, 100 manifests) and spread over every entry; median
  and p99, as ratios to the smallest N; all servers run meanwhile and are measured in turns, five
  rounds, so load from elsewhere on the machine falls on every N alike;
- eviction: lower `max_size` by 1,000 entries' bytes with SIGHUP and time until 1,000 are evicted
  (from the signal, so up to a housekeeping round of 2 s; and the work itself, as logged), while one
  client keeps asking for blobs: its worst latency during the eviction against its worst latency in
  a 2 s window without one.

    python bench/store_scale_bench.py [--counts 10000 100000 1000000] [--workdir DIR] [--hits 2000]

With --workdir the synthetic stores are kept (and reused by the next run; the index is rebuilt each
time); otherwise they are made in a temporary directory and removed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
BLOB_SIZE = 1024  # sparse: no data blocks
MANIFEST_SHARE = 100  # one entry in 100 is a manifest
EVICT = 1_000
HOT_BLOBS = 2_000
HOT_MANIFESTS = 100
REPO = "library/bench"
MEDIA = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class Store:
    root: Path
    blobs: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.blobs) + len(self.manifests)


def _path(root: Path, sub: str, digest: str) -> Path:
    hex_ = digest.split(":", 1)[1]
    return root / sub / "sha256" / hex_[:2] / hex_


def make_store(root: Path, count: int) -> Store:
    """Files for `count` entries (reused when a list of them is already there), then a fresh index."""
    listing = root / "entries.json"
    if listing.exists():
        saved = json.loads(listing.read_text())
        store = Store(root, saved["blobs"], saved["manifests"])
    else:
        store = Store(root)
        for sub in ("blobs", "manifests"):
            for i in range(256):
                (root / sub / "sha256" / f"{i:02x}").mkdir(parents=True, exist_ok=True)
        (root / "tags").mkdir(exist_ok=True)
        for i in range(count):
            if i % MANIFEST_SHARE == 0:
                store.manifests.append(_write_manifest(root, i))
            else:
                store.blobs.append(f"sha256:{secrets.token_hex(32)}")
        for digest in store.blobs:
            fd = os.open(_path(root, "blobs", digest), os.O_WRONLY | os.O_CREAT, 0o644)
            os.ftruncate(fd, BLOB_SIZE)
            os.close(fd)
        listing.write_text(json.dumps({"blobs": store.blobs, "manifests": store.manifests}))
    for digest in store.blobs[: EVICT * 2]:  # a previous run's eviction took some of the coldest
        path = _path(root, "blobs", digest)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.ftruncate(fd, BLOB_SIZE)
            os.close(fd)
    # (a bench run before this one evicted some manifests: they were the coldest then)
    store.manifests = [d for d in store.manifests if _path(root, "manifests", d).exists()]
    _write_index(store)
    return store


def _write_manifest(root: Path, i: int) -> str:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA,
            "config": {"digest": f"sha256:{i:064x}", "size": 2},
            "layers": [{"digest": f"sha256:{i + 1:064x}", "size": 2}],
        }
    ).encode()
    digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
    _path(root, "manifests", digest).write_bytes(MEDIA.encode() + b"\n" + body)
    return digest


def drop_index(root: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root / 'index.db'}{suffix}").unlink(missing_ok=True)


def _write_index(store: Store) -> None:
    """Rows as a long-running edgecache leaves them: the first blobs the coldest."""
    drop_index(store.root)
    sys.path.insert(0, str(ROOT))
    from edgecache.store.index import SCHEMA

    db = sqlite3.connect(store.root / "index.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    db.execute("BEGIN")
    now = time.time() - len(store.blobs)
    # With each blob's identity (size, mtime, inode), as stored files have had since 0.3.0.
    columns = "(digest, kind, size, last_access, hits, upstream, repository, mtime_ns, inode, verified_at)"
    db.executemany(
        f"INSERT INTO entries {columns} VALUES (?, 'blob', ?, ?, 0, 'docker.io', ?, ?, ?, ?)",
        (
            (d, BLOB_SIZE, now + i, REPO, st.st_mtime_ns, st.st_ino, now)
            for i, d in enumerate(store.blobs)
            for st in (os.stat(_path(store.root, "blobs", d)),)
        ),
    )
    db.executemany(
        f"INSERT INTO entries {columns} VALUES (?, 'manifest', ?, ?, 0, 'docker.io', ?, NULL, NULL, ?)",
        (
            (d, _path(store.root, "manifests", d).stat().st_size, time.time(), REPO, now)
            for d in store.manifests
        ),
    )
    db.executemany(
        "INSERT INTO members VALUES ('docker.io', ?, ?)", ((REPO, d) for d in store.blobs + store.manifests)
    )
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, store: Store, workdir: Path, checked: bool) -> None:
        self.checked = checked
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / f"edgecache-{store.count}.toml"
        self.log = workdir / f"edgecache-{store.count}.log"
        self.write_config(max_size=0)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        # The synthetic blobs do not hash to their digests: the scrubber would quarantine them.
        env["EDGECACHE_CACHE_SCRUB_RATE"] = "0"
        self.started = time.perf_counter()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgecache", "serve", "--config", str(self.config),
                 "--listen", f"127.0.0.1:{self.port}", "--upstream", "http://127.0.0.1:9",
                 "--cache-dir", str(store.root), "--log-format", "text"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def write_config(self, max_size: int, low: float = 0.9, high: float = 0.95) -> None:
        rule = '[[access.rules]]\nidentity = "anonymous"\nallow = ["*"]\n' if self.checked else ""
        self.config.write_text(
            f'[cache]\nmax_size = "{max_size}"\nlow_watermark = {low}\nhigh_watermark = {high}\n{rule}'
        )

    def logged_seconds(self, pattern: str) -> float:
        """A duration edgecache logged (NaN when it did not: older code, or not this case)."""
        found = re.findall(pattern, self.log.read_text())
        return float(found[0]) if found else float("nan")

    def walked(self) -> bool:
        """The index agrees with the disk (older code: it did before serving)."""
        text = self.log.read_text()
        return "checked against the disk in" in text or (
            "cache index ready" in text and "cache index open in" not in text
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def first_hit(server: Server, session: aiohttp.ClientSession, digest: str, limit: float = 300) -> float:
    """Seconds from exec to a 200 for `digest`; NaN if none came within `limit`."""
    url = f"{server.url}/v2/{REPO}/blobs/{digest}"
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        if server.proc.poll() is not None:
            raise SystemExit(f"edgecache exited: see {server.log}")
        try:
            async with session.get(url) as resp:
                await resp.read()
                if resp.status == 200:
                    return time.perf_counter() - server.started
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.01)
    return float("nan")


async def latencies(
    session: aiohttp.ClientSession, url: str, method: str, digests: list[str], kind: str, n: int
) -> list[float]:
    picks = [random.choice(digests) for _ in range(n)]
    out = []
    for digest in picks:
        t0 = time.perf_counter()
        async with session.request(method, f"{url}/v2/{REPO}/{kind}/{digest}") as resp:
            await resp.read()
            assert resp.status == 200, (resp.status, kind, digest)
        out.append(time.perf_counter() - t0)
    return out


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def hits_during(
    session: aiohttp.ClientSession, url: str, digests: list[str], until: asyncio.Event
) -> list[float]:
    out: list[float] = []
    while not until.is_set():
        out.extend(await latencies(session, url, "GET", digests, "blobs", 1))
    return out


ROUNDS = 5  # latency figures are taken in rounds, every N in turn, so load from elsewhere hits all alike


def hot_sets(store: Store) -> dict[str, list[str]]:
    """The same working set at every N: what the store's size costs a hit."""
    warm = store.blobs[len(store.blobs) // 2 :]  # not among the coldest, which eviction takes
    return {"blobs": random.Random(15).sample(warm, HOT_BLOBS), "manifests": store.manifests[:HOT_MANIFESTS]}


def spread_sets(store: Store) -> dict[str, list[str]]:
    """Requests spread over every entry: what a working set beyond the memory caches costs."""
    return {"blobs": store.blobs[len(store.blobs) // 2 :], "manifests": store.manifests}


async def start_up(server: Server, store: Store, session: aiohttp.ClientSession) -> dict[str, float]:
    row: dict[str, float] = {}
    hot = hot_sets(store)["blobs"]
    row["startup"] = await first_hit(server, session, hot[0])
    # Hits while the index loads and the disk is walked in the background (older code: none).
    walked = asyncio.Event()
    task = asyncio.create_task(hits_during(session, server.url, hot, walked))
    while not server.walked():  # noqa: ASYNC110 - the signal is a line in its log file
        await asyncio.sleep(0.05)
    walked.set()
    during = await task
    row["background: hits"] = len(during)
    row["background: max hit"] = max(during) if during else float("nan")
    row["index open"] = server.logged_seconds(r"cache index open in ([0-9.]+)s")
    row["index loaded"] = server.logged_seconds(r"cache index ready: \d+ entries in ([0-9.]+)s")
    row["disk walk"] = server.logged_seconds(r"checked against the disk in ([0-9.]+)s")
    row["RSS MiB"] = rss_mib(server.proc.pid)
    return row


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def rebuilt(store: Store, workdir: Path, session: aiohttp.ClientSession) -> dict[str, float]:
    """Start-up with the index lost: rebuilt from the disk before serving (the check off, so the
    first hit needs no repository fact)."""
    drop_index(store.root)
    server = Server(store, workdir, checked=False)
    try:
        hit = await first_hit(server, session, hot_sets(store)["blobs"][0], limit=60)
        return {"startup, index lost": hit}
    finally:
        server.stop()


async def hit_latencies(
    servers: list[tuple[Server, Store]], session: aiohttp.ClientSession, hits: int
) -> dict[int, dict[str, float]]:
    figures = [
        (label, method, kind)
        for label in ("", "spread ")
        for method in ("HEAD", "GET")
        for kind in ("blobs", "manifests")
        if not (label and method == "HEAD")
    ]
    samples: dict[tuple[int, str], list[float]] = {}
    for server, store in servers:  # warm up every set once
        for label, method, kind in figures:
            sets = spread_sets(store) if label else hot_sets(store)
            await latencies(session, server.url, method, sets[kind], kind, 200)
    for _ in range(ROUNDS):
        for server, store in servers:
            for label, method, kind in figures:
                sets = spread_sets(store) if label else hot_sets(store)
                got = await latencies(session, server.url, method, sets[kind], kind, hits // ROUNDS)
                samples.setdefault((store.count, f"{label}{method} {kind}"), []).extend(got)
    rows: dict[int, dict[str, float]] = {}
    for (count, name), got in samples.items():
        rows.setdefault(count, {})[f"{name} p50"] = statistics.median(got)
        rows[count][f"{name} p99"] = statistics.quantiles(got, n=100)[98]
    return rows


async def eviction(server: Server, store: Store, session: aiohttp.ClientSession) -> dict[str, float]:
    """Lower max_size by EVICT entries' bytes (SIGHUP) while one client keeps hitting."""
    row: dict[str, float] = {}
    hot = hot_sets(store)["blobs"]
    quiet = asyncio.Event()  # a window without eviction first
    task = asyncio.create_task(hits_during(session, server.url, hot, quiet))
    await asyncio.sleep(2.0)
    quiet.set()
    row["max hit, quiet"] = max(await task)
    used = len(store.blobs) * BLOB_SIZE + sum(
        _path(store.root, "manifests", d).stat().st_size for d in store.manifests
    )
    server.write_config(max_size=used - 1, low=(used - EVICT * BLOB_SIZE) / used, high=1.0)
    before = await metric(session, server.url, "edgecache_evictions_total")
    done = asyncio.Event()
    task = asyncio.create_task(hits_during(session, server.url, hot, done))
    t0 = time.perf_counter()
    server.proc.send_signal(signal.SIGHUP)
    while await metric(session, server.url, "edgecache_evictions_total") < before + EVICT:
        await asyncio.sleep(0.02)
        if time.perf_counter() - t0 > 120:
            raise SystemExit("eviction did not happen within 120 s")
    row["evict 1000 (from SIGHUP)"] = time.perf_counter() - t0
    done.set()
    during = await task
    row["max hit, evicting"] = max(during)
    row["hits while evicting"] = len(during)
    found = re.findall(r"evicted (\d+) entries .* in ([0-9.]+)s", server.log.read_text())
    if found:
        row["evict work"] = sum(float(s) for _, s in found)
    return row


async def measure(
    stores: list[Store], workdir: Path, hits: int, checked: bool
) -> list[tuple[int, dict[str, float]]]:
    """Start-up one N at a time; hit latencies with every server up, in rounds; then eviction."""
    servers: list[tuple[Server, Store]] = []
    rows: dict[int, dict[str, float]] = {}
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            for store in stores:
                server = Server(store, workdir, checked)
                servers.append((server, store))
                rows[store.count] = await start_up(server, store, session)
                print(f"{store.count:,}: {rows[store.count]}", file=sys.stderr)
            for count, figures in (await hit_latencies(servers, session, hits)).items():
                rows[count].update(figures)
            for server, store in servers:
                rows[store.count].update(await eviction(server, store, session))
                server.stop()
            if not checked:
                for store in stores:
                    rows[store.count].update(await rebuilt(store, workdir, session))
    finally:
        for server, _ in servers:
            if server.proc.poll() is None:
                server.stop()
    return [(store.count, rows[store.count]) for store in stores]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--workdir", type=Path, help="keep the synthetic stores here and reuse them")
    parser.add_argument("--hits", type=int, default=2000, help="requests per latency figure")
    parser.add_argument(
        "--checked",
        action="store_true",
        help="with an access rule, so every hit checks which repository holds the digest",
    )
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgecache-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        stores = []
        for count in args.counts:
            t0 = time.perf_counter()
            stores.append(make_store(workdir / f"store-{count}", count))
            print(f"{count:,} entries made in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rows = asyncio.run(measure(stores, workdir, args.hits, args.checked))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(rows, args.checked)


def report(rows: list[tuple[int, dict[str, float]]], checked: bool) -> None:
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    check = "repository check on (an access rule)" if checked else "default configuration"
    print(f"Store scale bench, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, at {commit}, {check}\n")
    base = rows[0][1]
    keys = list(base)
    print("| figure | " + " | ".join(f"{c:,} entries" for c, _ in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for key in keys:
        cells = []
        for _, row in rows:
            value = row.get(key, float("nan"))
            if key in ("hits while evicting", "background: hits", "RSS MiB"):
                cells.append(f"{value:.0f}")
            elif "p50" in key or "p99" in key or "max" in key:
                ratio = value / base[key] if base.get(key) else float("nan")
                cells.append(f"{value * 1000:.2f} ms ({ratio:.2f}x)")
            elif key == "startup, index lost" and value != value:
                cells.append("no hit in 60 s")
            else:
                cells.append(f"{value:.2f} s")
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

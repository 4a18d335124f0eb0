"""Start-up time of edgecache over a large store: 10k and 100k cached blobs, with the index present
(the normal restart) and with it lost (rebuilt from the store). Target: under 2 s at 100k, growing no
worse than linearly. The blobs are small files named by digest; start-up checks names and sizes only
(`edgecache verify` re-hashes), so their content does not change the figures.

    python bench/startup_bench.py [--counts 10000 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgecache.app import Edgecache  # noqa: E402
from edgecache.config import load_config  # noqa: E402


def make_store(root: Path, count: int) -> None:
    blobs = root / "blobs" / "sha256"
    for _ in range(count):
        hex_ = secrets.token_hex(32)
        folder = blobs / hex_[:2]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / hex_).write_bytes(b"x" * 512)


async def start_once(root: Path) -> float:
    config = load_config(env={}, cache_dir=str(root), upstreams=["http://127.0.0.1:9"])
    started = time.perf_counter()
    instance = Edgecache.build(config)
    await instance.start()
    elapsed = time.perf_counter() - started
    await instance.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    rows = []
    for count in args.counts:
        root = Path(tempfile.mkdtemp(prefix="edgecache-startup-"))
        try:
            make_store(root, count)
            rebuild = asyncio.run(start_once(root))  # no index yet: built from the store
            restart = asyncio.run(start_once(root))  # the normal case: index present
            os.unlink(root / "index.db")
            lost = asyncio.run(start_once(root))
            rows.append((count, restart, rebuild, lost))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(f"Start-up bench, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores\n")
    print("| cached blobs | restart (index present) | first start (index built) | index lost (rebuilt) |")
    print("|---|---|---|---|")
    for count, restart, rebuild, lost in rows:
        print(f"| {count:,} | {restart:.2f} s | {rebuild:.2f} s | {lost:.2f} s |")
    if len(rows) > 1:
        (c0, r0, *_), (c1, r1, *_) = rows[0], rows[-1]
        print(f"\nrestart time x{r1 / r0:.1f} for x{c1 / c0:.0f} blobs (linear would be x{c1 / c0:.0f})")


if __name__ == "__main__":
    main()

"""Cold pulls from the shared tier (a bucket on a real radosgw) against cold pulls from the upstream,
in the same run (issue 16).

An origin registry behind `bench/wan_proxy.py` (added latency each way, a per-connection rate cap) is
the upstream; a throwaway Ceph cluster (tests/support/ceph.py) holds the bucket. Each cold pull is a
fresh `edgecache serve` with an empty disk pulling like dockerd (bench/compare.py `pull`):
- upstream, WAN: no shared tier, across the WAN proxy (what a node pays without the tier);
- upstream, loopback: no shared tier, the origin direct (the fastest source there is here);
- bucket: the shared tier on, seeded by one earlier node (uploads settled), the WAN upstream behind it.
Also: a HEAD against a PUT of one layer (is `head_before_upload` worth its request?). Medians of 3.

    .venv/bin/python bench/shared_bench.py [--latency 0.02] [--rate 4M]   # Ceph: what tests/run installs
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import obstore
from obstore.store import S3Store

from bench.compare import make_image, pull
from bench.node import EdgeNode, start_wan_proxy
from tests.support.ceph import ACCESS_KEY, SECRET_KEY, env_credentials, start_ceph
from tests.support.registry import start_registry
from tests.support.waiting import wait_until_sync

LAYERS_MIB = [8, 8, 8, 8, 8, 8]
REPO = "bench/shared"


def start_node(upstream: str, work: Path, config: Path | None) -> EdgeNode:
    """A node with the bucket's credentials in its environment (prefetch off: one pull, one fill each)."""
    env = {**env_credentials(), "EDGECACHE_PREFETCH_ENABLED": "false"}
    return EdgeNode(upstream, work, env=env, config=config, ready="/readyz")


def cold_pull(upstream: str, work: Path, config: Path | None) -> tuple[float, float, float]:
    """(seconds, upstream blob bytes, bytes read from the bucket) of one cold pull by a fresh node."""
    node = start_node(upstream, work, config)
    try:
        seconds = pull(node.url, REPO)
        return (
            seconds,
            node.metric("edgecache_upstream_blob_bytes_total"),
            node.metric("edgecache_shared_read_bytes_total"),
        )
    finally:
        node.stop()


async def head_vs_put(endpoint: str, bucket: str, size: int) -> tuple[float, float]:
    store = S3Store(
        bucket, endpoint=endpoint, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
        region="us-east-1", virtual_hosted_style_request=False, client_options={"allow_http": True},
    )  # fmt: skip
    data = os.urandom(size)
    heads, puts = [], []
    for i in range(5):
        t = time.perf_counter()
        await obstore.put_async(store, f"hp/{i}", data)
        puts.append(time.perf_counter() - t)
        t = time.perf_counter()
        await obstore.head_async(store, f"hp/{i}")
        heads.append(time.perf_counter() - t)
        await obstore.delete_async(store, f"hp/{i}")
    return statistics.median(heads), statistics.median(puts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.02, help="one-way seconds (RTT is twice)")
    parser.add_argument("--rate", default="4M", help="per connection and direction")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgecache-shared-"))
    ceph = start_ceph()
    origin = start_registry(work / "origin")
    wan_url, wan = start_wan_proxy(origin.url, args.latency, args.rate)
    try:
        size = make_image(origin, work, REPO, [m << 20 for m in LAYERS_MIB])
        ceph.create_bucket("bench")
        config = work / "shared.toml"
        config.write_text(f'[shared]\nendpoint = "{ceph.endpoint}"\nbucket = "bench"\n')
        seed = start_node(wan_url, work, config)
        try:
            pull(seed.url, REPO)
            wait_until_sync(
                lambda: (
                    seed.metric("edgecache_shared_uploads_total") >= len(LAYERS_MIB) + 2
                    and seed.metric("edgecache_shared_upload_backlog") == 0
                ),
                timeout=120,
                message="the seeding node's uploads did not end",
            )
        finally:
            seed.stop()
        runs: dict[str, list[tuple[float, float, float]]] = {"wan": [], "loopback": [], "bucket": []}
        for _ in range(args.reps):
            runs["wan"].append(cold_pull(wan_url, work, None))
            runs["loopback"].append(cold_pull(origin.url, work, None))
            runs["bucket"].append(cold_pull(wan_url, work, config))
        head, put = asyncio.run(head_vs_put(ceph.endpoint, "bench", LAYERS_MIB[0] << 20))
        mib = size / (1 << 20)
        rtt = 2 * args.latency * 1000
        print(f"image: {len(LAYERS_MIB)} layers of {LAYERS_MIB[0]} MiB ({mib:.0f} MiB); WAN upstream "
              f"{rtt:.0f} ms RTT, {args.rate}B/s per connection; medians of {args.reps}")  # fmt: skip
        print("| cold pull from | seconds | MiB/s | upstream blob bytes | bytes read from the bucket |")
        print("|---|---|---|---|---|")
        names = {"wan": "upstream across the WAN proxy", "loopback": "upstream on loopback (no WAN)",
                 "bucket": "shared tier (radosgw), WAN upstream behind it"}  # fmt: skip
        for key, label in names.items():
            seconds = statistics.median(r[0] for r in runs[key])
            up = max(r[1] for r in runs[key])
            shared = max(r[2] for r in runs[key])
            print(f"| {label} | {seconds:.2f} | {mib / seconds:.0f} | {up / (1 << 20):.1f} MiB "
                  f"| {shared / (1 << 20):.1f} MiB |")  # fmt: skip
        wan_s = statistics.median(r[0] for r in runs["wan"])
        bucket_s = statistics.median(r[0] for r in runs["bucket"])
        print(f"bucket against WAN upstream: {wan_s / bucket_s:.1f}x faster")
        print(f"HEAD of a {LAYERS_MIB[0]} MiB object: {head * 1000:.1f} ms; PUT of it: {put * 1000:.0f} ms")
    finally:
        wan.terminate()
        origin.proc.terminate()
        wan.wait(10)
        origin.proc.wait(10)
        ceph.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Prefetch benchmark: a cold pull of a 10-layer image through edgecache with prefetch on and off,
in one run, in front of an upstream that looks like one across a WAN.

Starts on loopback: a real origin (Debian's docker-registry) holding a 10-layer image of
incompressible layers, `bench/wan_proxy.py` in front of it (added latency each way and a
per-connection rate cap), and for every repetition two fresh edgecaches on that proxy: one with
prefetch on (the default), one with `prefetch.enabled = false`. The client pulls like dockerd
(/v2/ ping, manifest, then config and layers 3 at a time, every digest verified: bench/compare.py's
`pull`). Reported: median cold pull time of each and their ratio, and the upstream bytes each
edgecache read (its own edgecache_upstream_blob_bytes_total) against the image's size.

    python bench/prefetch_bench.py                  # 10 layers, 40 ms RTT, 4 MiB/s per connection
    python bench/prefetch_bench.py --quick          # smaller image, 2 repetitions
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compare import make_image, pull  # noqa: E402
from bench.node import EdgeNode, start_wan_proxy  # noqa: E402
from edgecache.sizes import parse_size  # noqa: E402
from tests.support.registry import start_registry  # noqa: E402

# Two 10-layer images (MiB per layer): layers of one size, where a puller's concurrency decides
# everything, and a typical application image, whose large base layer bounds any pull of it.
IMAGES = {"bench/even": [5] * 10, "bench/mixed": [16, 8, 6, 4, 4, 3, 2, 2, 1, 1]}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--quick", action="store_true", help="layers a quarter the size, 2 repetitions")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.02, help="one-way seconds (RTT is twice)")
    parser.add_argument("--rate", default="4M", help="per connection and direction")
    parser.add_argument("--concurrency", type=int, default=6, help="prefetch.concurrency")
    args = parser.parse_args()
    reps = 2 if args.quick else args.reps
    scale = 4 if args.quick else 1
    work = Path(tempfile.mkdtemp(prefix="edgecache-prefetch-"))
    origin = start_registry(work / "origin")
    wan_url, wan = start_wan_proxy(origin.url, args.latency, args.rate)
    try:
        sizes = {repo: make_image(origin, work, repo, [(m << 20) // scale for m in layers])
                 for repo, layers in IMAGES.items()}  # fmt: skip
        rtt = 2 * args.latency * 1000
        print(f"upstream: {rtt:.0f} ms RTT, {args.rate}B/s per connection; prefetch.concurrency "
              f"{args.concurrency}; medians of {reps}")  # fmt: skip
        print("| image | prefetch off | prefetch on | speed-up | floor: largest layer at the cap "
              "| upstream bytes / image (off, on) |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        rate = parse_size(args.rate, "--rate")
        for repo, size in sizes.items():
            times: dict[bool, list[float]] = {True: [], False: []}
            upstream_bytes: dict[bool, list[float]] = {True: [], False: []}
            for rep in range(reps):
                for prefetch in (False, True) if rep % 2 == 0 else (True, False):
                    env = {
                        "EDGECACHE_PREFETCH_ENABLED": "true" if prefetch else "false",
                        "EDGECACHE_PREFETCH_CONCURRENCY": str(args.concurrency),
                    }
                    edge = EdgeNode(wan_url, work, env=env)
                    try:
                        times[prefetch].append(pull(edge.url, repo))
                        upstream_bytes[prefetch].append(edge.metric("edgecache_upstream_blob_bytes_total"))
                    finally:
                        edge.stop()
            off, on = statistics.median(times[False]), statistics.median(times[True])
            ratios = [max(upstream_bytes[p]) / size for p in (False, True)]
            layers = "+".join(str(m) for m in IMAGES[repo])
            floor = (max(IMAGES[repo]) << 20) / scale / rate
            print(f"| {repo} ({layers} MiB{' / 4' if args.quick else ''}) | {off:.2f} s | {on:.2f} s "
                  f"| {off / on:.2f}x | {floor:.2f} s | {ratios[0]:.3f}, {ratios[1]:.3f} |")  # fmt: skip
    finally:
        wan.terminate()
        origin.proc.terminate()
        wan.wait(10)
        origin.proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

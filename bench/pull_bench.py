"""Pull-path benchmark: edgecache against pulling from the origin registry directly, in one run.

Starts a real origin (Debian's docker-registry) and a real `edgecache serve` on loopback, pushes one
incompressible blob, and measures with curl (C, so the client is not the bottleneck):

- direct: GET from the origin (its files in the page cache, like a warm registry);
- cold: GET through a fresh edgecache (one upstream fetch, streamed while it fills);
- warm: GET through edgecache again (sendfile from its disk);
- two tiers: GET through a fresh edgecache whose upstream is a fresh parent edgecache in front of
  the origin (`parent = true`), against one tier in the same run;
- 32 cold: 32 concurrent clients of the same blob through a fresh edgecache (wall time vs one cold
  client; upstream GETs counted in the origin's access log);
- CPU seconds (user + system) of the edgecache process per cold GiB;
- peak RSS of the edgecache process (VmHWM).

Every figure is a ratio to a baseline measured in the same run (medians of --reps runs), so it holds on
a noisy shared machine. Bodies are checked against the digest once per path.

    python bench/pull_bench.py            # 1 GiB blob
    python bench/pull_bench.py --quick    # 256 MiB, fewer clients: under a minute
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.registry import Registry, free_port, start_registry, wait_http  # noqa: E402

REPO = "bench/blob"


def make_blob(path: Path, size: int) -> str:
    """Incompressible bytes on disk; returns their sha256 digest."""
    hasher = hashlib.sha256()
    with path.open("wb") as fh:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 << 20))
            hasher.update(chunk)
            fh.write(chunk)
            left -= len(chunk)
    return "sha256:" + hasher.hexdigest()


def touch_memory(workdir: Path, size: int) -> None:
    """Write and delete `size` bytes just before a cold run.

    This VM hands memory back to its host while idle and pays a first-touch cost on every such page
    when it is used again (seen here: ~400 MB/s for new page-cache pages, even on tmpfs, against
    5-6 GB/s for pages freed a moment ago). Without this, a cold fill, which writes a whole blob of
    new pages, would be charged for the machine rather than for edgecache.
    """
    scratch = workdir / "scratch"
    chunk = b"\0" * (8 << 20)
    with scratch.open("wb") as fh:
        for _ in range(size // len(chunk) + 1):
            fh.write(chunk)
    scratch.unlink()


def push_blob(origin: Registry, path: Path, digest: str) -> None:
    with urllib.request.urlopen(
        urllib.request.Request(f"{origin.url}/v2/{REPO}/blobs/uploads/", data=b"", method="POST")
    ) as resp:
        location = urljoin(origin.url + "/", resp.headers["Location"])
    sep = "&" if "?" in location else "?"
    with path.open("rb") as fh:
        req = urllib.request.Request(
            f"{location}{sep}digest={digest}",
            data=fh,
            method="PUT",
            headers={"Content-Length": str(path.stat().st_size), "Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(req) as resp:
            assert resp.status == 201


def curl_seconds(url: str) -> float:
    out = subprocess.run(
        ["curl", "-sf", "-o", "/dev/null", "-w", "%{time_total}", url],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout)


def concurrent_seconds(url: str, clients: int) -> float:
    """Wall time for `clients` curl processes fetching `url` at once."""
    start = time.perf_counter()
    procs = [subprocess.Popen(["curl", "-sf", "-o", "/dev/null", url]) for _ in range(clients)]
    assert all(p.wait() == 0 for p in procs)
    return time.perf_counter() - start


def curl_digest(url: str) -> str:
    curl = subprocess.Popen(["curl", "-sf", url], stdout=subprocess.PIPE)
    assert curl.stdout is not None
    hasher = hashlib.sha256()
    while chunk := curl.stdout.read(1 << 20):
        hasher.update(chunk)
    assert curl.wait() == 0
    return "sha256:" + hasher.hexdigest()


class Edge:
    def __init__(self, origin: Registry | Edge, workdir: Path) -> None:
        """An edgecache in front of `origin`: the registry, or a parent edgecache (then as a tier)."""
        self.port = free_port()
        self.cache = workdir / f"cache-{self.port}"
        env = {**os.environ}
        if isinstance(origin, Edge):
            env["EDGECACHE_UPSTREAM_PARENT"] = "true"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgecache", "serve", "--listen", f"127.0.0.1:{self.port}",
             "--upstream", origin.url, "--cache-dir", str(self.cache), "--log-level", "warning"],
            cwd=ROOT, env=env,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        wait_http(f"{self.url}/v2/", proc=self.proc)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the edgecache process so far (/proc/PID/stat)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.cache, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="256 MiB, 16 clients, 3 reps")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.clients = 256, 16
    size = args.size_mib << 20

    work = Path(tempfile.mkdtemp(prefix="edgecache-bench-"))
    origin = start_registry(work / "origin")
    try:
        blob = work / "blob.bin"
        digest = make_blob(blob, size)
        push_blob(origin, blob, digest)
        blob.unlink()
        path = f"/v2/{REPO}/blobs/{digest}"
        assert curl_digest(origin.url + path) == digest

        direct = statistics.median(curl_seconds(origin.url + path) for _ in range(args.reps))
        many_direct = statistics.median(
            concurrent_seconds(origin.url + path, args.clients) for _ in range(args.reps)
        )
        cold, warm, many, rss, upstream_gets, cold_cpu, two_tier = [], [], [], [], [], [], []
        for _ in range(args.reps):
            edge = Edge(origin, work)
            touch_memory(work, size + (64 << 20))
            cpu_before = edge.cpu_seconds()
            cold.append(curl_seconds(edge.url + path))
            cold_cpu.append((edge.cpu_seconds() - cpu_before) / (size / 2**30))
            warm.append(statistics.median(curl_seconds(edge.url + path) for _ in range(args.reps)))
            assert curl_digest(edge.url + path) == digest
            rss.append(edge.peak_rss_mib())
            edge.stop()

            parent = Edge(origin, work)
            child = Edge(parent, work)
            touch_memory(work, 2 * size + (64 << 20))
            two_tier.append(curl_seconds(child.url + path))
            assert curl_digest(child.url + path) == digest
            child.stop()
            parent.stop()

            edge = Edge(origin, work)
            touch_memory(work, size + (64 << 20))
            before = origin.count("GET", path)
            start = time.perf_counter()
            clients = [
                subprocess.Popen(["curl", "-sf", "-o", "/dev/null", edge.url + path])
                for _ in range(args.clients)
            ]
            assert all(c.wait() == 0 for c in clients)
            many.append(time.perf_counter() - start)
            upstream_gets.append(origin.count("GET", path) - before)
            rss.append(edge.peak_rss_mib())
            edge.stop()

        mb = size / 1e6
        cold_s, warm_s, many_s = statistics.median(cold), statistics.median(warm), statistics.median(many)
        rows = [
            ("direct from origin (baseline)", f"{mb / direct:,.0f} MB/s", "1.00x"),
            ("cold through edgecache", f"{mb / cold_s:,.0f} MB/s", f"{direct / cold_s:.2f}x direct"),
            (
                "cold through two tiers (edge -> parent -> origin)",
                f"{mb / statistics.median(two_tier):,.0f} MB/s",
                f"{cold_s / statistics.median(two_tier):.2f}x one tier",
            ),
            ("edgecache CPU per cold GiB", f"{statistics.median(cold_cpu):.2f} s", "user + system"),
            ("warm through edgecache", f"{mb / warm_s:,.0f} MB/s", f"{direct / warm_s:.2f}x direct"),
            (
                f"{args.clients} concurrent cold clients",
                f"{many_s:.2f} s wall",
                f"{many_s / cold_s:.2f}x one cold client, {many_s / many_direct:.2f}x {args.clients} direct",
            ),
            (f"{args.clients} concurrent clients direct (baseline)", f"{many_direct:.2f} s wall", "1.00x"),
            ("upstream GETs per cold fill", f"{max(upstream_gets)}", f"{args.clients} clients each time"),
            ("edgecache peak RSS", f"{max(rss):.0f} MiB", "max over runs"),
        ]
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        machine = f"{os.cpu_count()} cores, {memory_gib:.0f} GiB"
        lines = [
            f"Pull benchmark, {time.strftime('%Y-%m-%d')}, {machine}, blob {args.size_mib} MiB, "
            f"medians of {args.reps}, loopback",
            "",
            "| figure | value | ratio |",
            "|---|---|---|",
            *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        ]
        print("\n".join(lines))
        if args.markdown:
            args.markdown.write_text("\n".join(lines) + "\n")
    finally:
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""edgecache against what users would pick instead, measured in one run on this machine.

Starts on loopback: a real origin registry (Debian's docker-registry), distribution's own proxy mode
(anchor A: a second docker-registry with proxy.remoteurl), nginx as a caching reverse proxy (anchor B:
blobs cached long, manifests briefly, cache lock on, sendfile on) and edgecache. Generates
incompressible images and pulls them the way dockerd does (/v2/ ping, manifest with Accept headers,
config and layers 3 at a time, every digest verified) straight from the origin and through each
proxy. Every figure is a ratio to pulling from the origin directly in the same run; medians of --reps.

    bash bench/run-compare            # installs nginx, wrk, curl, docker-registry if missing
    python bench/compare.py --quick   # small images: a few minutes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.registry import Registry, free_port, start_registry, wait_http  # noqa: E402

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        MANIFEST_TYPE,
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


# -- images --------------------------------------------------------------------------------------


def push_file(origin: Registry, repo: str, path: Path) -> tuple[str, int]:
    hasher = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 << 20):
            hasher.update(chunk)
    digest = "sha256:" + hasher.hexdigest()
    with urllib.request.urlopen(
        urllib.request.Request(f"{origin.url}/v2/{repo}/blobs/uploads/", data=b"", method="POST")
    ) as resp:
        location = urljoin(origin.url + "/", resp.headers["Location"])
    size = path.stat().st_size
    with path.open("rb") as fh:
        req = urllib.request.Request(
            f"{location}{'&' if '?' in location else '?'}digest={digest}",
            data=fh,
            method="PUT",
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )
        urllib.request.urlopen(req).close()
    return digest, size


def make_image(origin: Registry, work: Path, repo: str, layer_sizes: list[int]) -> int:
    """An image of incompressible layers; returns its total blob bytes."""
    layers = []
    for i, size in enumerate(layer_sizes):
        path = work / f"{repo.replace('/', '_')}-{i}"
        with path.open("wb") as fh:
            left = size
            while left:
                chunk = os.urandom(min(left, 8 << 20))
                fh.write(chunk)
                left -= len(chunk)
        layers.append(push_file(origin, repo, path))
        path.unlink()
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    )
    config_path = work / "config.json"
    config_path.write_text(config)
    config_digest, config_size = push_file(origin, repo, config_path)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s}
            for d, s in layers
        ],
    }
    req = urllib.request.Request(
        f"{origin.url}/v2/{repo}/manifests/latest",
        data=json.dumps(manifest).encode(),
        method="PUT",
        headers={"Content-Type": MANIFEST_TYPE},
    )
    urllib.request.urlopen(req).close()
    return sum(s for _, s in layers) + config_size


# -- the puller ----------------------------------------------------------------------------------


def fetch_verified(url: str, digest: str, curl_args: tuple[str, ...] = ()) -> None:
    """curl piped into sha256sum: C speed for both, so the puller is not the bottleneck."""
    curl = subprocess.Popen(["curl", "-sf", *curl_args, url], stdout=subprocess.PIPE)
    out = subprocess.run(["sha256sum"], stdin=curl.stdout, capture_output=True, text=True, check=True).stdout
    assert curl.stdout is not None
    curl.stdout.close()
    if curl.wait() != 0 or "sha256:" + out.split()[0] != digest:
        raise RuntimeError(f"{url}: failed or wrong digest")


def pull(base: str, repo: str) -> float:
    """Like dockerd: ping, manifest with Accept, then config and layers 3 at a time, verified."""
    started = time.perf_counter()
    urllib.request.urlopen(f"{base}/v2/").close()
    req = urllib.request.Request(f"{base}/v2/{repo}/manifests/latest", headers={"Accept": ACCEPT})
    with urllib.request.urlopen(req) as resp:
        manifest = json.loads(resp.read())
    digests = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda d: fetch_verified(f"{base}/v2/{repo}/blobs/{d}", d), digests))
    return time.perf_counter() - started


# -- the proxies ---------------------------------------------------------------------------------


@dataclass
class Proxy:
    name: str
    url: str
    procs: list[subprocess.Popen[bytes]]

    def peak_rss_mib(self) -> float:
        peaks = []
        for proc in self.procs:
            for pid in [proc.pid, *_children(proc.pid)]:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except FileNotFoundError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        peaks.append(int(line.split()[1]) / 1024)
        return max(peaks, default=float("nan"))

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the proxy's processes so far (nginx: master and workers)."""
        ticks = 0
        for proc in self.procs:
            for pid in [proc.pid, *_children(proc.pid)]:
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except FileNotFoundError:
                    continue
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def settled_cpu_seconds(self, limit: float = 10.0) -> float:
        """cpu_seconds() once the processes have gone idle (work after the last byte, such as
        edgecache's fsync and rename of a verified blob, counts too): unchanged over 0.2 s."""
        end = time.monotonic() + limit
        last = self.cpu_seconds()
        while time.monotonic() < end:
            time.sleep(0.2)
            now = self.cpu_seconds()
            if now == last:
                break
            last = now
        return last

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def start_edgecache(origin: Registry, work: Path) -> Proxy:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecache", "serve", "--listen", f"127.0.0.1:{port}",
         "--upstream", origin.url,
         "--cache-dir", str(work / f"edgecache-{port}"), "--log-level", "error"],
        cwd=ROOT, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/v2/", proc=proc)
    return Proxy("edgecache", f"http://127.0.0.1:{port}", [proc])


def start_distribution_proxy(origin: Registry, work: Path) -> Proxy:
    registry = start_registry(work / f"distribution-{free_port()}", f"proxy:\n  remoteurl: {origin.url}\n")
    return Proxy("distribution proxy", registry.url, [registry.proc])


def nginx_conf(origin: Registry, root: Path, listen: str, access_log: bool = False) -> str:
    """anchor B's configuration; `listen` holds the server's listen (and ssl) directives. With
    `access_log`, nginx logs every request as installed (combined format, a write per request)."""
    log = f"access_log {root}/access.log" if access_log else "access_log off"
    return f"""
daemon off;
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 2;
pid {root}/nginx.pid;
error_log {root}/error.log error;
events {{ worker_connections 4096; }}
http {{
    {log};
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy_temp;
    proxy_cache_path {root}/cache levels=1:2 keys_zone=registry:50m max_size=100g
                     inactive=7d use_temp_path=off;
    upstream origin {{ server {origin.url.removeprefix("http://")}; keepalive 32; }}
    server {{
        {listen}
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_cache_lock on;
        proxy_cache_lock_timeout 10m;
        proxy_cache_lock_age 10m;
        location ~ ^/v2/.+/blobs/sha256: {{
            proxy_pass http://origin;
            proxy_cache registry;
            proxy_cache_key $uri;
            proxy_cache_valid 200 365d;
        }}
        location ~ ^/v2/.+/manifests/ {{
            proxy_pass http://origin;
            proxy_cache registry;
            proxy_cache_key $uri$http_accept;
            proxy_cache_valid 200 60s;
        }}
        location /v2/ {{ proxy_pass http://origin; }}
    }}
}}
"""


def start_nginx(origin: Registry, work: Path) -> Proxy:
    port = free_port()
    root = work / f"nginx-{port}"
    (root / "cache").mkdir(parents=True)
    conf = root / "nginx.conf"
    conf.write_text(nginx_conf(origin, root, f"listen 127.0.0.1:{port};"))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(root)], stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/v2/", proc=proc)
    return Proxy("nginx cache", f"http://127.0.0.1:{port}", [proc])


PROXIES = {
    "distribution proxy": start_distribution_proxy,
    "nginx cache": start_nginx,
    "edgecache": start_edgecache,
}


def wrk_manifest(url: str, repo: str, seconds: int) -> tuple[float, float]:
    """Warm manifest requests/s and p99 latency (ms) with 50 connections."""
    out = subprocess.run(
        ["wrk", "-t2", "-c50", f"-d{seconds}s", "--latency", "-H", f"Accept: {ACCEPT}",
         f"{url}/v2/{repo}/manifests/latest"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(next(line.split()[1] for line in out.splitlines() if line.startswith("Requests/sec")))
    p99 = next(line.split()[1] for line in out.splitlines() if line.strip().startswith("99%"))
    unit = (
        1000.0
        if p99.endswith("s") and not p99.endswith(("ms", "us"))
        else 1.0
        if p99.endswith("ms")
        else 0.001
    )
    return rps, float(p99.rstrip("msu")) * unit


def concurrent_cold(url: str, digest: str, repo: str, clients: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: fetch_verified(f"{url}/v2/{repo}/blobs/{digest}", digest), range(clients)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small images, 2 repetitions")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    big = (128 if args.quick else 1024) << 20
    layer = (4 if args.quick else 20) << 20
    clients = 8 if args.quick else 32
    reps = 2 if args.quick else args.reps
    wrk_seconds = 3 if args.quick else 5
    for tool in ("curl", "nginx", "wrk", "sha256sum"):
        if not shutil.which(tool):
            sys.exit(f"bench/compare.py needs {tool}: run bench/run-compare, which installs it")

    work = Path(tempfile.mkdtemp(prefix="edgecache-compare-"))
    origin = start_registry(work / "origin")
    results: dict[str, dict[str, list[float]]] = {}
    try:
        sizes = {
            "big": make_image(origin, work, "bench/big", [big]),
            "ten": make_image(origin, work, "bench/ten", [layer] * 10),
            "many": make_image(origin, work, "bench/many", [16 * 1024] * 100),
        }
        big_digest = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(
                    f"{origin.url}/v2/bench/big/manifests/latest", headers={"Accept": ACCEPT}
                )
            ).read()
        )["layers"][0]["digest"]

        def record(proxy: str, figure: str, value: float) -> None:
            results.setdefault(proxy, {}).setdefault(figure, []).append(value)

        for _ in range(reps):
            for image in ("big", "ten", "many"):
                record("origin (direct)", f"{image} pull s", pull(origin.url, f"bench/{image}"))
            record(
                "origin (direct)",
                "big concurrent s",
                concurrent_cold(origin.url, big_digest, "bench/big", clients),
            )
            for name, start in PROXIES.items():
                proxy = start(origin, work)
                try:
                    cpu_before = proxy.cpu_seconds()
                    record(name, "big cold s", pull(proxy.url, "bench/big"))
                    cpu = proxy.settled_cpu_seconds() - cpu_before
                    record(name, "cold CPU s/GiB", cpu / (sizes["big"] / 2**30))
                    record(name, "rss MiB", proxy.peak_rss_mib())
                    record(name, "ten cold s", pull(proxy.url, "bench/ten"))
                    for image in ("big", "ten", "many"):
                        pull(proxy.url, f"bench/{image}")  # make sure it is all cached
                        record(name, f"{image} pull s", pull(proxy.url, f"bench/{image}"))
                    rps, p99 = wrk_manifest(proxy.url, "bench/ten", wrk_seconds)
                    record(name, "manifest rps", rps)
                    record(name, "manifest p99 ms", p99)
                finally:
                    proxy.stop()
                proxy = start(origin, work)
                try:
                    before = origin.count("GET", big_digest)
                    record(
                        name, "big concurrent s", concurrent_cold(proxy.url, big_digest, "bench/big", clients)
                    )
                    record(name, "upstream GETs", origin.count("GET", big_digest) - before)
                    record(name, "rss MiB", proxy.peak_rss_mib())
                finally:
                    proxy.stop()
        print_table(results, sizes, big, layer, clients, reps, args.markdown)
    finally:
        origin.stop()
        if os.environ.get("EDGECACHE_BENCH_KEEP"):
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def first_line(cmd: list[str]) -> str:
    """The first line a tool prints about itself (its version, usually)."""
    result = subprocess.run(cmd, capture_output=True, text=True)
    return (result.stdout or result.stderr).strip().splitlines()[0]


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(
        [
            f"edgecache {version('edgecache')} (Python {sys.version.split()[0]}, "
            f"aiohttp {version('aiohttp')})",
            first_line(["docker-registry", "--version"]).replace("github.com/docker/distribution ", ""),
            first_line(["nginx", "-v"]),
            first_line(["curl", "--version"]).split(" (")[0],
        ]
    )


def print_table(
    results: dict[str, dict[str, list[float]]],
    sizes: dict[str, int],
    big: int,
    layer: int,
    clients: int,
    reps: int,
    out: Path | None,
) -> None:
    med = {
        p: {f: statistics.median(v) if f != "rss MiB" else max(v) for f, v in figs.items()}
        for p, figs in results.items()
    }
    direct = med["origin (direct)"]
    nginx_rps = med["nginx cache"]["manifest rps"]
    lines = [
        f"Comparison, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, loopback, "
        f"medians of {reps}; big = 1 x {big >> 20} MiB, ten = 10 x {layer >> 20} MiB, many = 100 x 16 KiB; "
        "ratios: x direct from the origin "
        "(throughput: higher is better)",
        "",
        "| proxy | big cold | big warm | ten cold | ten warm | many warm (s) | "
        f"{clients} cold clients of big | upstream GETs | manifest req/s (x nginx) | p99 ms | peak RSS MiB "
        "| CPU s per cold GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in PROXIES:
        m = med[name]
        lines.append(
            f"| {name} | {direct['big pull s'] / m['big cold s']:.2f}x "
            f"| {direct['big pull s'] / m['big pull s']:.2f}x "
            f"| {direct['ten pull s'] / m['ten cold s']:.2f}x "
            f"| {direct['ten pull s'] / m['ten pull s']:.2f}x "
            f"| {m['many pull s']:.2f} ({direct['many pull s'] / m['many pull s']:.2f}x) "
            f"| {m['big concurrent s']:.1f} s = {m['big concurrent s'] / m['big cold s']:.2f}x one client "
            f"({m['big concurrent s'] / direct['big concurrent s']:.2f}x {clients} direct) "
            f"| {m['upstream GETs']:.0f} | {m['manifest rps']:,.0f} ({m['manifest rps'] / nginx_rps:.2f}x) "
            f"| {m['manifest p99 ms']:.1f} | {m['rss MiB']:.0f} | {m['cold CPU s/GiB']:.2f} |"
        )
    lines.append(
        f"\nDirect from the origin: big {sizes['big'] / direct['big pull s'] / 1e6:,.0f} MB/s, "
        f"ten {sizes['ten'] / direct['ten pull s'] / 1e6:,.0f} MB/s, many {direct['many pull s']:.2f} s, "
        f"{clients} concurrent clients of big {direct['big concurrent s']:.1f} s."
    )
    lines.append(f"Versions: {versions()}.")
    text = "\n".join(lines)
    print(text)
    if out:
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()

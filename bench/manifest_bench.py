"""Manifest hits in every shape a client asks for them: by tag and by digest, GET and HEAD, over plain
HTTP/1.1, TLS HTTP/1.1 and TLS HTTP/2, edgecache against nginx serving the same warm manifest in the
same run.

The servers are bench/tls_bench.py's: a real origin (Debian's docker-registry) holding one small
image, edgecache with a TLS listener (granian) and a plain one (aiohttp), and nginx as the caching
proxy of bench/compare.py with a plain and a TLS listener (h2 and http/1.1). Each of the cases
is warmed and checked on both servers (status 200, the manifest's digest in Docker-Content-Digest for
edgecache, the body's length), then loaded with 50 connections: wrk for HTTP/1.1, h2load (`:method`
overridden for HEAD, 10 streams per connection) for HTTP/2. Requests/s and p99, medians of --reps,
and the ratio edgecache / nginx. HEAD is loaded over HTTP/2 only: over HTTP/1.1 both wrk 4.1 and
h2load --h1 wait for a body after a HEAD's Content-Length and stall (0 requests; checked against
nginx too), and edgecache answers HEAD and GET by the same path, less the body.

    python bench/manifest_bench.py --quick    # 2 s per load, one repetition: about two minutes
    python bench/manifest_bench.py            # 5 s per load, medians of 3
    python bench/manifest_bench.py --access-log   # both logging every request, as installed
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import ACCEPT, make_image
from tls_bench import (
    CONNECTIONS,
    H2_STREAMS,
    PROTOCOLS,
    SERVERS,
    Endpoints,
    curl_args,
    make_certificate,
    manifest_load,
    start_edgecache_tls,
    start_nginx_tls,
)

from tests.support.registry import start_registry

REPO = "bench/manifest"
VARIANTS = (("tag", "GET"), ("tag", "HEAD"), ("digest", "GET"), ("digest", "HEAD"))


def variants(protocol: str) -> tuple[tuple[str, str], ...]:
    """What is loaded over `protocol`: HEAD over HTTP/2 only (the HTTP/1.1 load tools stall on it)."""
    return VARIANTS if protocol == "TLS HTTP/2" else tuple(v for v in VARIANTS if v[1] == "GET")


def check(url: str, protocol: str, method: str, digest: str, length: int) -> None:
    """One request of the case: 200, and (GET) the manifest's bytes, (HEAD) its length and no body."""
    head = ("-I",) if method == "HEAD" else ()
    out = subprocess.run(
        ["curl", "-sS", *curl_args(protocol), *head, "-H", f"Accept: {ACCEPT}", "-D", "-", "-o",
         "/dev/null" if method == "HEAD" else "-", url],
        capture_output=True, timeout=60,
    )  # fmt: skip
    text = out.stdout.decode(errors="replace")
    status = text.split(None, 2)[1] if text else "none"
    if out.returncode != 0 or status != "200":
        raise RuntimeError(f"{method} {url} over {protocol}: {status} {out.stderr.decode().strip()}")
    if f"content-length: {length}" not in text.lower():
        raise RuntimeError(f"{method} {url} over {protocol}: not the manifest's length {length}")
    if method == "GET":
        body = out.stdout.split(b"\r\n\r\n", 1)[1]
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise RuntimeError(f"GET {url} over {protocol}: the body is not the manifest")


def count_lines(path: Path) -> int:
    """Lines in a server's log (the log files live in the run's temp directory: the log-on run writes
    hundreds of MB there)."""
    if not path.exists():
        return 0
    with path.open("rb") as log:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: log.read(1 << 20), b""))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 s loads, one repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="both servers log every request as installed: edgecache at level info (JSON lines), nginx's "
        "access_log (combined, a write per request); without it neither logs requests",
    )
    args = parser.parse_args()
    reps, seconds = (1, 2) if args.quick else (args.reps, args.seconds)
    for tool in ("curl", "nginx", "wrk", "h2load", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"bench/manifest_bench.py needs {tool}: run bench/run-compare --tls, which installs it")

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="edgecache-manifest-bench-"))
    origin = start_registry(work / "origin")
    servers: dict[str, Endpoints] = {}
    results: dict[tuple[str, str, str, str], list[dict[str, float]]] = {}
    try:
        make_image(origin, work, REPO, [4096, 4096])
        tag_url = f"{origin.url}/v2/{REPO}/manifests/latest"
        body = urllib.request.urlopen(urllib.request.Request(tag_url, headers={"Accept": ACCEPT})).read()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        paths = {"tag": f"/v2/{REPO}/manifests/latest", "digest": f"/v2/{REPO}/manifests/{digest}"}
        cert, key = make_certificate(work)
        servers["edgecache"] = start_edgecache_tls(origin.url, work, cert, key, args.access_log)
        servers["nginx"] = start_nginx_tls(origin, work, cert, key, args.access_log)
        for server in servers.values():
            for protocol in PROTOCOLS:
                for reference, method in VARIANTS:
                    url = server.base(protocol) + paths[reference]
                    for _ in range(2):  # the first may fill the cache; the second is the hit measured
                        check(url, protocol, method, digest, len(body))
        for rep in range(reps):
            for protocol in PROTOCOLS:
                for reference, method in variants(protocol):
                    for name in SERVERS:
                        url = servers[name].base(protocol) + paths[reference]
                        got = manifest_load(url, protocol, seconds, work, method)
                        results.setdefault((name, protocol, reference, method), []).append(got)
            print(f"repetition {rep + 1}/{reps} done", file=sys.stderr)
        logged = {
            "edgecache": count_lines(work / "edgecache.log"),
            "nginx": count_lines(work / "nginx" / "access.log"),
        }
        if args.access_log and min(logged.values()) < 1000:
            sys.exit(f"--access-log: a server did not log the requests it served ({logged} lines)")
    finally:
        for server in servers.values():
            server.proxy.stop()
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(json.dumps({" ".join(k): v for k, v in results.items()}, indent=1), file=sys.stderr)

    def med(name: str, protocol: str, reference: str, method: str, figure: str) -> float:
        return statistics.median(run[figure] for run in results[(name, protocol, reference, method)])

    lines = [
        f"Manifest bench, {time.strftime('%Y-%m-%d')}, medians of {reps}, {CONNECTIONS} connections for "
        f"{seconds} s (wrk -t2 for HTTP/1.1, h2load -t2 -m{H2_STREAMS} for HTTP/2), a {len(body)}-byte "
        "manifest warm in both caches; "
        + ("both logging every request (edgecache JSON lines, nginx combined); " if args.access_log else "")
        + "ratio: edgecache / nginx in the same run",
        "",
        "| listener | request | edgecache req/s | nginx req/s | ratio | p99 ms edgecache | p99 ms nginx "
        "| failed (edgecache / nginx) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for protocol in PROTOCOLS:
        for reference, method in variants(protocol):
            e, n = (med(s, protocol, reference, method, "rps") for s in SERVERS)
            p_e, p_n = (med(s, protocol, reference, method, "p99") for s in SERVERS)
            failed = [sum(r["failed"] for r in results[(s, protocol, reference, method)]) for s in SERVERS]
            lines.append(
                f"| {protocol} | {method} by {reference} | {e:,.0f} | {n:,.0f} | {e / n:.2f}x "
                f"| {p_e:.1f} | {p_n:.1f} | {failed[0]:.0f} / {failed[1]:.0f} |"
            )
    lines.append(
        f"\nRun time {time.monotonic() - started:.0f} s; lines logged: edgecache {logged['edgecache']:,}, "
        f"nginx {logged['nginx']:,}."
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()

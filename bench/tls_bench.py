"""TLS and HTTP/2: edgecache against nginx serving the same warm cached content, in one run.

Starts on loopback a real origin registry (Debian's docker-registry) holding one image with a single
incompressible blob, then edgecache with `--tls-cert/--tls-key` (granian: HTTPS with ALPN h2 and
http/1.1) plus `server.plain_listen` (aiohttp, plain HTTP/1.1), and nginx as the caching proxy of
bench/compare.py (anchor B) with a plain listener and a TLS listener offering h2 and http/1.1, both
with the same self-signed certificate (EC P-256, made here with openssl). Both caches are warmed
through their plain listener, then every endpoint is checked once (the blob's sha256 over each
protocol, the negotiated HTTP version), and measured for the same cached content:

- blob: one GET of the whole blob with curl (`--http1.1` / `--http2`, `-k`, body to /dev/null),
  MB/s, median of --reps; the six cases are interleaved within each repetition;
- manifest: GET of the tag's manifest with 50 connections for --seconds each: wrk (`-t2 -c50`) for
  plain and TLS HTTP/1.1, h2load (`-t2 -c50 -m10`, per-request log for the p99) for HTTP/2;
  requests/s and p99 latency, medians of --reps;
- edgecache's peak RSS (VmHWM) during each case (reset through /proc/PID/clear_refs before each).

Every figure is given next to nginx's in the same run (edgecache / nginx per protocol), so it holds
on a small shared machine.

    bash bench/run-compare --tls [--quick]    # installs nginx, wrk, h2load (nghttp2-client), curl
    python bench/tls_bench.py --quick         # 256 MiB blob, 2 s per load: about a minute
    python bench/tls_bench.py --write-results bench/RESULTS.md   # also replace the RESULTS section
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import (
    ACCEPT,
    ROOT,
    Proxy,
    fetch_verified,
    first_line,
    make_image,
    nginx_conf,
)

from tests.support.registry import Registry, free_port, start_registry, wait_http

REPO = "bench/tls"
SECTION = "## TLS and HTTP/2 (edgecache vs nginx, same run)"
PROTOCOLS = ("plain HTTP/1.1", "TLS HTTP/1.1", "TLS HTTP/2")
SERVERS = ("edgecache", "nginx")
CONNECTIONS = 50
H2_STREAMS = 10  # h2load -m: requests in flight per HTTP/2 connection


@dataclass
class Endpoints:
    """One server's three ways in, and the processes whose memory is measured."""

    proxy: Proxy
    plain: str
    tls: str

    def base(self, protocol: str) -> str:
        return self.plain if protocol == "plain HTTP/1.1" else self.tls


def curl_args(protocol: str) -> tuple[str, ...]:
    return ("-k", "--http2") if protocol == "TLS HTTP/2" else ("-k", "--http1.1")


# -- servers -------------------------------------------------------------------------------------


def make_certificate(work: Path) -> tuple[Path, Path]:
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "30", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def start_edgecache_tls(
    origin_url: str, work: Path, cert: Path, key: Path, access_log: bool = False
) -> Endpoints:
    """edgecache with a TLS and a plain listener; `access_log`: logging every request as installed
    (level info, JSON lines to its stderr, here a file), else warnings only."""
    tls_port, plain_port = free_port(), free_port()
    log = (work / "edgecache.log").open("ab")
    level = ("info", "--log-format", "json") if access_log else ("warning",)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecache", "serve", "--listen", f"127.0.0.1:{tls_port}",
         "--tls-cert", str(cert), "--tls-key", str(key), "--upstream", origin_url,
         "--cache-dir", str(work / "edgecache-cache"), "--log-level", *level],
        cwd=ROOT, stderr=log, stdout=log,
        env={**os.environ, "EDGECACHE_SERVER_PLAIN_LISTEN": f"127.0.0.1:{plain_port}"},
    )  # fmt: skip
    plain = f"http://127.0.0.1:{plain_port}"
    wait_http(f"{plain}/v2/", proc=proc)
    tls = f"https://127.0.0.1:{tls_port}"
    wait_curl(f"{tls}/v2/", proc)
    return Endpoints(Proxy("edgecache", plain, [proc]), plain, tls)


def nginx_version() -> tuple[int, ...]:
    out = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
    if "--with-http_v2_module" not in out:
        sys.exit("this nginx lacks the http_v2 module: install Debian's `nginx` (bench/run-compare --tls)")
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    assert found, out
    return tuple(int(part) for part in found.groups())


def start_nginx_tls(
    origin: Registry, work: Path, cert: Path, key: Path, access_log: bool = False
) -> Endpoints:
    plain_port, tls_port = free_port(), free_port()
    root = work / "nginx"
    (root / "cache").mkdir(parents=True)
    # `http2 on;` from 1.25.1; before that (Debian 12 has 1.22) h2 is a flag of `listen`.
    h2 = ("ssl", "http2 on;") if nginx_version() >= (1, 25, 1) else ("ssl http2", "")
    listen = (
        f"listen 127.0.0.1:{plain_port};\n"
        f"        listen 127.0.0.1:{tls_port} {h2[0]};\n"
        f"        {h2[1]}\n"
        f"        ssl_certificate {cert};\n"
        f"        ssl_certificate_key {key};\n"
        "        ssl_protocols TLSv1.2 TLSv1.3;\n"
        # nginx closes a connection after 1000 requests by default; h2load's duration mode does not
        # reconnect (it then counts 0 requests), and wrk's reconnects would add handshakes nginx
        # alone pays. edgecache has no such cap.
        "        keepalive_requests 1000000;"
    )
    conf = root / "nginx.conf"
    conf.write_text(nginx_conf(origin, root, listen, access_log))
    log = (root / "stderr.log").open("ab")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(root)], stderr=log)
    plain = f"http://127.0.0.1:{plain_port}"
    wait_http(f"{plain}/v2/", proc=proc)
    tls = f"https://127.0.0.1:{tls_port}"
    wait_curl(f"{tls}/v2/", proc)
    return Endpoints(Proxy("nginx", plain, [proc]), plain, tls)


def wait_curl(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        if subprocess.run(["curl", "-sk", "-o", "/dev/null", url], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


# -- memory --------------------------------------------------------------------------------------


def pids(proxy: Proxy) -> list[int]:
    from compare import _children

    return [pid for proc in proxy.procs for pid in (proc.pid, *_children(proc.pid))]


def reset_peak_rss(proxy: Proxy) -> None:
    """Linux: writing 5 to clear_refs sets VmHWM back to the current RSS."""
    for pid in pids(proxy):
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def rss_mib(proxy: Proxy, field: str) -> float:
    """Sum over the server's processes of VmRSS or VmHWM."""
    total = 0.0
    for pid in pids(proxy):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        for line in status.splitlines():
            if line.startswith(f"{field}:"):
                total += int(line.split()[1]) / 1024
    return total


# -- clients -------------------------------------------------------------------------------------


def curl_write_out(url: str, protocol: str, extra: tuple[str, ...] = ()) -> dict[str, str]:
    out = subprocess.run(
        ["curl", "-sS", *curl_args(protocol), *extra, "--max-time", "600", "-o", "/dev/null", "-w",
         "%{http_code} %{size_download} %{speed_download} %{http_version}", url],
        capture_output=True, text=True, timeout=660,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"curl {protocol} {url}: exit {out.returncode}: {out.stderr.strip()}")
    code, size, speed, http_version = out.stdout.split()
    return {"code": code, "size": size, "speed": speed, "http_version": http_version}


def blob_mbps(url: str, protocol: str, size: int) -> float:
    got = curl_write_out(url, protocol)
    if got["code"] != "200" or int(got["size"]) != size:
        raise RuntimeError(f"{protocol} {url}: status {got['code']}, {got['size']} of {size} bytes")
    return float(got["speed"]) / 1e6


def check_endpoint(base: str, protocol: str, blob_path: str, digest: str, manifest_path: str) -> None:
    """The warm-up requests of each case: the blob's bytes hash to its digest, the manifest is there,
    and the HTTP version is the one asked for."""
    fetch_verified(base + blob_path, digest, curl_args(protocol))
    got = curl_write_out(base + manifest_path, protocol, ("-H", f"Accept: {ACCEPT}"))
    want = "2" if protocol == "TLS HTTP/2" else "1.1"
    if got["code"] != "200" or got["http_version"] != want:
        raise RuntimeError(
            f"{base}{manifest_path}: asked for {protocol}, got {got['code']} over HTTP/{got['http_version']}"
        )


def wrk(url: str, seconds: int, headers: tuple[str, ...] = ()) -> dict[str, float]:
    """HTTP/1.1 (plain or TLS): requests/s, p99 ms and failed requests with 50 connections; `headers`
    ("Name: value") are sent with every request besides Accept."""
    sent = [arg for header in (f"Accept: {ACCEPT}", *headers) for arg in ("-H", header)]
    out = subprocess.run(
        ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", *sent, url],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    assert p99, out
    p99_ms = float(p99[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99[2]]
    failed = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        failed += sum(int(n) for n in socket_errors.groups())
    return {"rps": rps, "p99": p99_ms, "failed": failed}


def h2load(url: str, seconds: int, log: Path, method: str = "GET") -> dict[str, float]:
    """HTTP/2 over TLS: requests/s, p99 ms (from h2load's per-request log) and failed requests;
    `method` overrides the `:method` pseudo-header (HEAD)."""
    out = subprocess.run(
        ["h2load", "-t2", f"-c{CONNECTIONS}", f"-m{H2_STREAMS}", f"-D{seconds}", "--warm-up-time=1",
         f"--log-file={log}", "-H", f"Accept: {ACCEPT}", "-H", f":method: {method}", url],
        capture_output=True, text=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    found = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    counts = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                       r"(\d+) errored, (\d+) timeout", out)  # fmt: skip
    statuses = re.search(r"status codes: (\d+) 2xx", out)
    if not (found and counts and statuses):
        raise RuntimeError(f"h2load {url}: unexpected output:\n{out}")
    durations = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line)
    log.unlink()
    p99_ms = durations[min(len(durations) - 1, int(len(durations) * 0.99))] / 1000 if durations else 0
    done, succeeded = int(counts[1]), int(counts[2])
    failed = (done - int(statuses[1])) + int(counts[3]) + int(counts[4]) + int(counts[5])
    failed = max(failed, done - succeeded)
    return {"rps": float(found[1]), "p99": p99_ms, "failed": failed}


def manifest_load(url: str, protocol: str, seconds: int, work: Path, method: str = "GET") -> dict[str, float]:
    """50 connections of `method` requests: h2load over HTTP/2, wrk over HTTP/1.1 (GET only: wrk 4.1
    and h2load --h1 both stall after a HEAD's Content-Length)."""
    if protocol == "TLS HTTP/2":
        return h2load(url, seconds, work / "h2load.log", method)
    assert method == "GET", "HEAD over HTTP/1.1: wrk and h2load --h1 stall on it"
    return wrk(url, seconds)


# -- the run -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="256 MiB blob, 2 s loads")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=int, help="seconds per manifest load (default 5, quick 2)")
    parser.add_argument("--blob-mib", type=int, help="blob size (default 1024, quick 256)")
    parser.add_argument("--write-results", type=Path, help="replace the TLS section of this RESULTS.md")
    args = parser.parse_args()
    blob_size = (args.blob_mib or (256 if args.quick else 1024)) << 20
    seconds = args.seconds or (2 if args.quick else 5)
    reps = args.reps
    for tool in ("curl", "nginx", "wrk", "h2load", "openssl", "sha256sum"):
        if not shutil.which(tool):
            sys.exit(f"bench/tls_bench.py needs {tool}: run bench/run-compare --tls, which installs it")
    nginx_version()

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="edgecache-tls-bench-"))
    origin = start_registry(work / "origin")
    servers: dict[str, Endpoints] = {}
    blob: dict[tuple[str, str], list[float]] = {}
    load: dict[tuple[str, str], list[dict[str, float]]] = {}
    peak: dict[tuple[str, str], float] = {}
    notes: list[str] = []
    try:
        make_image(origin, work, REPO, [blob_size])
        manifest = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(f"{origin.url}/v2/{REPO}/manifests/latest", headers={"Accept": ACCEPT})
            ).read()
        )
        digest = manifest["layers"][0]["digest"]
        cert, key = make_certificate(work)
        servers["edgecache"] = start_edgecache_tls(origin.url, work, cert, key)
        servers["nginx"] = start_nginx_tls(origin, work, cert, key)
        blob_path = f"/v2/{REPO}/blobs/{digest}"
        manifest_path = f"/v2/{REPO}/manifests/latest"

        # Warm both caches through the plain listener (the fill), then check every endpoint.
        for name, server in servers.items():
            fetch_verified(server.plain + blob_path, digest)
            idle = rss_mib(server.proxy, "VmRSS")
            if name == "edgecache":
                notes.append(f"edgecache RSS after the fill: {idle:.0f} MiB")
            for protocol in PROTOCOLS:
                check_endpoint(server.base(protocol), protocol, blob_path, digest, manifest_path)
        print(f"warm and checked in {time.monotonic() - started:.0f} s", file=sys.stderr)

        def case_done(name: str, case: str) -> None:
            """Peak RSS of the case (reset before it), and the server still running."""
            proxy = servers[name].proxy
            peak[(name, case)] = max(peak.get((name, case), 0.0), rss_mib(proxy, "VmHWM"))
            for proc in proxy.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} during {case}")

        for rep in range(reps):
            for protocol in PROTOCOLS:
                for name in SERVERS:
                    reset_peak_rss(servers[name].proxy)
                    speed = blob_mbps(servers[name].base(protocol) + blob_path, protocol, blob_size)
                    blob.setdefault((name, protocol), []).append(speed)
                    case_done(name, f"blob {protocol}")
            print(f"blob repetition {rep + 1}/{reps} done", file=sys.stderr)
        for rep in range(reps):
            for protocol in PROTOCOLS:
                for name in SERVERS:
                    reset_peak_rss(servers[name].proxy)
                    got = manifest_load(servers[name].base(protocol) + manifest_path, protocol, seconds, work)
                    load.setdefault((name, protocol), []).append(got)
                    case_done(name, f"manifest {protocol}")
            print(f"manifest repetition {rep + 1}/{reps} done", file=sys.stderr)
        overall = rss_mib(servers["edgecache"].proxy, "VmRSS")
        notes.append(f"edgecache RSS at the end: {overall:.0f} MiB")
        ciphers = {name: tls_session(server.tls) for name, server in servers.items()}
        log_lines = [
            line
            for line in (work / "edgecache.log").read_text(errors="replace").splitlines()
            if not re.search(r'"level": ?"(debug|info)"', line)
        ]
        nginx_errors = (work / "nginx" / "error.log").read_text(errors="replace").splitlines()
    finally:
        for server in servers.values():
            server.proxy.stop()
        origin.stop()
        if os.environ.get("EDGECACHE_BENCH_KEEP"):
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    raw = {
        "blob MB/s": {f"{n} {p}": v for (n, p), v in blob.items()},
        "manifest": {f"{n} {p}": v for (n, p), v in load.items()},
        "peak RSS MiB": {f"{n} {c}": v for (n, c), v in peak.items()},
    }
    print(json.dumps(raw, indent=1), file=sys.stderr)
    text = report(blob, load, peak, blob_size, seconds, reps, notes, ciphers)
    text += f"\nRun time {time.monotonic() - started:.0f} s; edgecache log lines (warning and above): "
    text += f"{len(log_lines)}; nginx error log lines: {len(nginx_errors)}."
    print(text)
    for line in log_lines[:20]:
        print("edgecache log:", line, file=sys.stderr)
    for line in nginx_errors[:20]:
        print("nginx error log:", line, file=sys.stderr)
    if args.write_results:
        write_section(args.write_results, text)


def tls_session(url: str) -> str:
    """Protocol and cipher the server picks for OpenSSL's client (what curl, wrk and h2load use)."""
    out = subprocess.run(
        ["openssl", "s_client", "-brief", "-connect", url.removeprefix("https://"), "-alpn", "h2,http/1.1"],
        input=b"", capture_output=True, timeout=20,
    ).stderr.decode(errors="replace")  # fmt: skip
    protocol = re.search(r"Protocol version: (\S+)", out)
    cipher = re.search(r"Ciphersuite: (\S+)", out)
    return f"{protocol[1]} {cipher[1]}" if protocol and cipher else "unknown"


def report(
    blob: dict[tuple[str, str], list[float]],
    load: dict[tuple[str, str], list[dict[str, float]]],
    peak: dict[tuple[str, str], float],
    blob_size: int,
    seconds: int,
    reps: int,
    notes: list[str],
    ciphers: dict[str, str],
) -> str:
    def med(name: str, protocol: str, figure: str) -> float:
        return statistics.median(run[figure] for run in load[(name, protocol)])

    lines = [
        f"TLS bench, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, loopback, "
        f"medians of {reps}; blob = 1 x {blob_size >> 20} MiB warm in both caches (curl, one GET); "
        f"manifest = {CONNECTIONS} connections for {seconds} s (wrk -t2 for HTTP/1.1, "
        f"h2load -t2 -m{H2_STREAMS} for HTTP/2); ratios: edgecache / nginx in the same run",
        "",
        "| protocol | blob edgecache MB/s | blob nginx MB/s | blob ratio | manifest edgecache req/s "
        "| manifest nginx req/s | req/s ratio | p99 ms edgecache | p99 ms nginx | failed requests "
        "(edgecache / nginx) | edgecache peak RSS MiB (blob / manifest) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for protocol in PROTOCOLS:
        e_blob = statistics.median(blob[("edgecache", protocol)])
        n_blob = statistics.median(blob[("nginx", protocol)])
        e_rps, n_rps = med("edgecache", protocol, "rps"), med("nginx", protocol, "rps")
        failed = [sum(run["failed"] for run in load[(name, protocol)]) for name in SERVERS]
        lines.append(
            f"| {protocol} | {e_blob:,.0f} | {n_blob:,.0f} | {e_blob / n_blob:.2f}x "
            f"| {e_rps:,.0f} | {n_rps:,.0f} | {e_rps / n_rps:.2f}x "
            f"| {med('edgecache', protocol, 'p99'):.1f} | {med('nginx', protocol, 'p99'):.1f} "
            f"| {failed[0]:.0f} / {failed[1]:.0f} "
            f"| {peak[('edgecache', f'blob {protocol}')]:.0f} "
            f"/ {peak[('edgecache', f'manifest {protocol}')]:.0f} |"
        )

    def cost(name: str, protocol: str) -> str:
        plain = statistics.median(blob[(name, "plain HTTP/1.1")])
        rps = med(name, "plain HTTP/1.1", "rps")
        return (
            f"blob {statistics.median(blob[(name, protocol)]) / plain:.2f}x, "
            f"manifest req/s {med(name, protocol, 'rps') / rps:.2f}x"
        )

    lines.append("")
    for name in SERVERS:
        lines.append(
            f"{name} against its own plain HTTP/1.1: TLS HTTP/1.1 {cost(name, 'TLS HTTP/1.1')}; "
            f"TLS HTTP/2 {cost(name, 'TLS HTTP/2')}."
        )
    highest = {name: max(v for (n, _), v in peak.items() if n == name) for name in SERVERS}
    lines.append(
        "; ".join(notes) + f"; edgecache peak over all cases {highest['edgecache']:.0f} MiB"
        f" (nginx, master and 2 workers summed: {highest['nginx']:.0f} MiB)."
    )
    lines.append(
        "TLS sessions (OpenSSL client): " + "; ".join(f"{name} {c}" for name, c in ciphers.items()) + "."
    )
    lines.append(f"Versions: {versions()}.")
    return "\n".join(lines)


def versions() -> str:
    return ", ".join(
        [
            f"edgecache {version('edgecache')} (Python {sys.version.split()[0]}, "
            f"granian {version('granian')}, aiohttp {version('aiohttp')})",
            first_line(["nginx", "-v"]).removeprefix("nginx version: "),
            first_line(["curl", "--version"]).split(" (")[0],
            first_line(["h2load", "--version"]),
            first_line(["wrk", "-v"]).split(" Copyright")[0].replace("debian/", ""),
            " ".join(first_line(["openssl", "version"]).split()[:2]),
        ]
    )


def write_section(results: Path, text: str) -> None:
    """Replace (or append) the TLS section of RESULTS.md, keeping its command line on top."""
    intro = textwrap.fill(
        "`bash bench/run-compare --tls --write-results bench/RESULTS.md` (`--quick`: 256 MiB blob, 2 s "
        "loads, about a minute; or `.venv/bin/python bench/tls_bench.py` when nginx, wrk and h2load are "
        "there): edgecache serving TLS (embedded granian) and plain HTTP/1.1 (aiohttp, "
        "`server.plain_listen`) against nginx (the caching proxy of compare.py with a TLS listener, same "
        "certificate), the same warm content in both caches.",
        width=100,
        break_on_hyphens=False,
    )
    body = f"{SECTION}\n\n{intro}\n\n{text}\n"
    old = results.read_text()
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + body
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + body + (old[end:] if end >= 0 else "")
    results.write_text(new)


if __name__ == "__main__":
    main()

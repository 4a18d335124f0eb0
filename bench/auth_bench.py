"""Login cost benchmark: pulls per second of a small image by many clients, with HTTP Basic (htpasswd)
on every request against the token flow, in one run.

Starts a real origin (Debian's docker-registry), pushes a small image (config + 2 small layers), and
runs a real `edgecache serve` per mode on loopback, warmed first (every pull is then a cache hit, so
the figures show what logins cost, not upstream fills). A "pull" is what a client does: the manifest by
tag, then the config and each layer, each request authenticated:

- basic, login_cache = 0: bcrypt on every request (the worst case; the cost an attacker can make
  anyone pay with wrong passwords is bounded by max_failures separately);
- basic, login_cache = 60 (the default): bcrypt once per user per minute, a hash lookup after;
- token: GET /token with Basic once per pull (login_cache = 0, so bcrypt once per pull, as dockerd
  asks one token per pull), then the manifest and blobs with the Bearer token (signature checked).
  Also with login_cache = 60.

Clients are asyncio tasks of aiohttp in this process (one connection each), sharing the 2 cores with
edgecache, so compare the ratios, not the absolute numbers. bcrypt cost 10 (htpasswd -B -C 10).

    python bench/auth_bench.py               # 50 clients x 20 pulls per mode
    python bench/auth_bench.py --quick       # 50 clients x 4 pulls
    python bench/auth_bench.py --hits        # only: manifest hits carrying credentials, under wrk

`--hits` loads one node (token service on, login_cache 60) with wrk (50 connections, 5 s per load)
on the warm manifest: the same request with one user's Basic credentials, then with the Bearer token
/token gave that user. It shows what a check costs on every request of a warm node, where the pull
figures above are dominated by first logins.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import bcrypt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tls_bench import wrk  # noqa: E402

from bench.node import EdgeNode  # noqa: E402
from tests.support.images import Image, Pusher, build_image  # noqa: E402
from tests.support.registry import start_registry  # noqa: E402

REPO = "library/small"
ACCEPT = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"
PASSWORD = "bench-password-1"


class Edge(EdgeNode):
    """A node with its config file written under `workdir` (prefetch off: requests are what is measured)."""

    def __init__(self, origin_url: str, workdir: Path, config: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edge-", dir=workdir))
        (self.dir / "edgecache.toml").write_text(config)
        env = {"EDGECACHE_PREFETCH_ENABLED": "false"}
        super().__init__(origin_url, self.dir, env=env, config=self.dir / "edgecache.toml", ready="/healthz")

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def config_text(workdir: Path, users: int, *, token: bool, login_cache: float) -> str:
    htpasswd = workdir / "htpasswd"
    if not htpasswd.exists():
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
        htpasswd.write_text("".join(f"user{i}:{hashed}\n" for i in range(users)))
        key = ec.generate_private_key(ec.SECP256R1())
        (workdir / "token.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    text = f'[access]\nmode = "htpasswd"\nhtpasswd = "{htpasswd}"\nlogin_cache = {login_cache}\n'
    text += "max_failures = 1000\n"
    if token:
        text += f'token = true\ntoken_key = "{workdir / "token.pem"}"\n'
    return text + '[[access.rules]]\nidentity = "*"\nallow = ["*"]\n'


async def one_pull(http: aiohttp.ClientSession, url: str, image: Image, user: str, token: bool) -> None:
    basic = "Basic " + base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()
    auth = basic
    if token:
        async with http.get(
            f"{url}/token?service=edgecache&scope=repository:{REPO}:pull", headers={"Authorization": basic}
        ) as resp:
            assert resp.status == 200, resp.status
            auth = "Bearer " + (await resp.json())["token"]
    async with http.get(
        f"{url}/v2/{REPO}/manifests/latest", headers={"Authorization": auth, "Accept": ACCEPT}
    ) as resp:
        assert resp.status == 200, resp.status
        await resp.read()
    for blob in image.blobs:
        async with http.get(f"{url}/v2/{REPO}/blobs/{blob.digest}", headers={"Authorization": auth}) as resp:
            assert resp.status == 200, resp.status
            await resp.read()


async def run_clients(url: str, image: Image, clients: int, pulls: int, token: bool) -> float:
    """Wall seconds for `clients` concurrent clients doing `pulls` pulls each (each its own user)."""

    async def client(n: int) -> None:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as http:
            for _ in range(pulls):
                await one_pull(http, url, image, f"user{n}", token)

    start = time.perf_counter()
    async with asyncio.timeout(600):
        await asyncio.gather(*(client(n) for n in range(clients)))
    return time.perf_counter() - start


def credential_hits(origin_url: str, workdir: Path, image: Image, reps: int) -> None:
    """Manifest hits per second carrying Basic credentials, then a Bearer token (see the docstring)."""
    if not shutil.which("wrk"):
        sys.exit("auth_bench.py --hits needs wrk: run bench/run-compare --tls once, which installs it")
    edge = Edge(origin_url, workdir, config_text(workdir, 1, token=True, login_cache=60.0))
    try:
        asyncio.run(run_clients(edge.url, image, 1, 1, True))  # warm, and the login remembered
        basic = "Basic " + base64.b64encode(f"user0:{PASSWORD}".encode()).decode()
        request = urllib.request.Request(
            f"{edge.url}/token?service=edgecache&scope=repository:{REPO}:pull",
            headers={"Authorization": basic},
        )
        with urllib.request.urlopen(request) as resp:
            bearer = "Bearer " + json.loads(resp.read())["token"]
        url = f"{edge.url}/v2/{REPO}/manifests/latest"
        results: dict[str, list[dict[str, float]]] = {"Basic (login_cache 60)": [], "Bearer token": []}
        for _ in range(reps):
            for name, auth in zip(results, (basic, bearer), strict=True):
                got = wrk(url, 5, (f"Authorization: {auth}",))
                if got["failed"]:
                    sys.exit(f"{name}: {got['failed']:.0f} requests failed")
                results[name].append(got)
    finally:
        edge.stop()
    print(
        f"\nManifest hits with credentials, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, wrk 50 "
        f"connections for 5 s on the plain listener, one user, medians of {reps}\n"
    )
    print("| credentials | req/s | p99 ms |")
    print("|---|---|---|")
    for name, runs in results.items():
        rps = statistics.median(run["rps"] for run in runs)
        p99 = statistics.median(run["p99"] for run in runs)
        print(f"| {name} | {rps:,.0f} | {p99:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--pulls", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--hits", action="store_true", help="only manifest hits with credentials (wrk)")
    args = parser.parse_args()
    if args.quick:
        args.pulls, args.reps = 4, 1
    workdir = Path(tempfile.mkdtemp(prefix="auth-bench-"))
    origin = start_registry(workdir / "origin")
    try:
        image = build_image("small", layer_files=[{"bin/sh": b"#!/bin/true\n"}, {"etc/motd": b"hello\n"}])
        Pusher(origin.url).push_image(REPO, "latest", image)
        if args.hits:
            credential_hits(origin.url, workdir, image, args.reps)
            return
        modes = [
            ("basic on every request, login_cache 0 (bcrypt per request)", False, 0.0),
            ("basic on every request, login_cache 60 (default)", False, 60.0),
            ("token flow, login_cache 0 (bcrypt once per pull)", True, 0.0),
            ("token flow, login_cache 60", True, 60.0),
        ]
        results: dict[str, tuple[float, float]] = {}
        for name, token, cache in modes:
            edge = Edge(
                origin.url, workdir, config_text(workdir, args.clients, token=token, login_cache=cache)
            )
            try:
                asyncio.run(run_clients(edge.url, image, 1, 1, token))  # warm: every later pull is a hit
                rates, cpu = [], []
                for _ in range(args.reps):
                    before = edge.cpu_seconds()
                    seconds = asyncio.run(run_clients(edge.url, image, args.clients, args.pulls, token))
                    pulls = args.clients * args.pulls
                    rates.append(pulls / seconds)
                    cpu.append((edge.cpu_seconds() - before) / pulls * 1000)
                results[name] = (statistics.median(rates), statistics.median(cpu))
            finally:
                edge.stop()
        baseline = results[modes[0][0]][0]
        requests = 1 + len(image.blobs)
        heading = (
            f"Auth benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {args.clients} clients x "
            f"{args.pulls} pulls, {requests} requests per pull (+1 /token), bcrypt cost 10, "
            f"medians of {args.reps}"
        )
        print(f"\n{heading}\n")
        print("| mode | pulls/s | ratio | edgecache CPU ms per pull |")
        print("|---|---|---|---|")
        for name, (rate, cpu_ms) in results.items():
            print(f"| {name} | {rate:,.0f} | {rate / baseline:.2f}x | {cpu_ms:.1f} |")
    finally:
        origin.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

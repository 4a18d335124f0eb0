"""Fixtures: a real origin registry seeded through its push API, and edgecache in front of it.

The origin is Debian's `docker-registry` (CNCF distribution) on a free loopback port, started once per
session; tests count upstream work in its access log. edgecache runs in-process (the real app on a real
socket) or as a real `python -m edgecache serve` process where a client needs one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import RawTestServer
from prometheus_client.parser import text_string_to_metric_families

from edgecache.app import SHUTDOWN_GRACE, Edgecache
from edgecache.config import Config, load_config
from edgecache.http.aiohttp_server import MAX_FIELD_SIZE
from edgecache.http.granian_front import AsgiFront, TlsListener
from tests.support.certs import TestCA
from tests.support.faults import FaultProxy
from tests.support.images import Image, Index, Pusher, build_image, build_index
from tests.support.registry import Registry, free_port, start_registry, wait_http
from tests.support.waiting import wait_until


@dataclass
class Seeded:
    alpine: Image  # docker v2 schema 2, two layers, the last one ~2 MiB of incompressible bytes
    app: Image  # OCI manifest under a two-component name
    multi: Index  # OCI index with amd64 + arm64
    big: Image  # one ~24 MiB layer: long enough to watch a fill in progress


@pytest.fixture(scope="session")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    registry = start_registry(tmp_path_factory.mktemp("origin"))
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def seeded(origin: Registry) -> Seeded:
    pusher = Pusher(origin.url)
    alpine = build_image(
        "alpine",
        layer_files=[{"bin/sh": b"#!/bin/true\n"}, {"etc/os-release": b"ID=edgecache-test\n"}],
        random_bytes=2 * 1024 * 1024,
    )
    pusher.push_image("library/alpine", "latest", alpine)
    for tag in ("3.19", "3.20", "3.21"):
        pusher.push_image("library/alpine", tag, alpine)
    app = build_image("team-app", oci=True)
    pusher.push_image("team/app", "1.0", app)
    multi = build_index("multi")
    pusher.push_index("library/multi", "v1", multi)
    big = build_image("big", random_bytes=24 * 1024 * 1024)
    pusher.push_image("library/big", "latest", big)
    return Seeded(alpine, app, multi, big)


@pytest.fixture
async def proxy(origin: Registry, seeded: Seeded) -> AsyncIterator[FaultProxy]:
    """The fault-injecting proxy in front of the seeded origin (tests/support/faults.py)."""
    running = await FaultProxy(origin.url).start()
    yield running
    await running.stop()


def edge_config(
    cache_dir: Path,
    upstream_url: str,
    upstream: dict[str, object] | None = None,
    *,
    prefetch: bool = False,
    **cache: object,
) -> Config:
    """edgecache's config for a test: one default upstream (named docker.io) at `upstream_url`.

    Prefetch is off unless asked for: these tests count exactly the upstream work each request
    makes (tests/test_prefetch.py turns it on; `spawn_edge` runs the product's defaults, with it on)."""
    config = load_config(env={}, cache_dir=str(cache_dir), upstreams=[upstream_url])
    upstreams = tuple(dataclasses.replace(u, **(upstream or {})) for u in config.upstreams)
    return dataclasses.replace(
        config,
        cache=dataclasses.replace(config.cache, **cache),
        upstreams=upstreams,
        prefetch=dataclasses.replace(config.prefetch, enabled=prefetch),
    )


async def scrape(http: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """One sample of a metric from a real /metrics endpoint at `url` (0 when the series is absent)."""
    async with http.get(url) as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def blob_path(cache: Path, digest: str) -> Path:
    """Where the store keeps a blob (the layout in store/blobs.py)."""
    hex_ = digest.split(":", 1)[1]
    return cache / "blobs" / "sha256" / hex_[:2] / hex_


@dataclass
class Edge:
    """A running in-process edgecache: its URL, an HTTP session to it, and its cache directory."""

    url: str
    http: aiohttp.ClientSession
    instance: Edgecache
    cache_dir: Path

    async def metric(self, name: str, **labels: str) -> float:
        """One sample from the real /metrics endpoint (0 when the series is absent)."""
        return await scrape(self.http, "/metrics", name, **labels)

    def cached_files(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.cache_dir))
            for p in self.cache_dir.rglob("*")
            if p.is_file() and p.name != "lock"
        )


@contextlib.asynccontextmanager
async def running_edge(config: Config) -> AsyncIterator[Edge]:
    """edgecache in-process on the plain aiohttp listener, with a session to it; closed on exit."""
    instance = Edgecache.build(config)
    await instance.start()
    server = RawTestServer(instance.web_handler(), host="127.0.0.1")
    await server.start_server(access_log=None, max_field_size=MAX_FIELD_SIZE, shutdown_timeout=SHUTDOWN_GRACE)
    http = aiohttp.ClientSession(str(server.make_url("")), auto_decompress=False)
    try:
        yield Edge(str(server.make_url("")).rstrip("/"), http, instance, Path(config.cache.dir))
    finally:
        await http.close()
        await server.close()
        await instance.close()


@contextlib.asynccontextmanager
async def tls_edge_in_process(config: Config, pki: Path) -> AsyncIterator[Edge]:
    """The same instance behind the TLS listener (embedded granian, ASGI) on a free port; the
    session trusts the test CA (aiohttp's client speaks HTTP/1.1, so this is the TLS HTTP/1.1 path)."""
    ca = TestCA(pki)
    issued = ca.issue("edge")
    server = dataclasses.replace(config.server, tls_cert=str(issued.cert), tls_key=str(issued.key))
    config = dataclasses.replace(config, server=server)
    instance = Edgecache.build(config)
    await instance.start()
    port = free_port()
    app = AsgiFront(instance.front, instance.metrics, (), instance.access_log, admin=True)
    listener = TlsListener(app, "127.0.0.1", port, config.server)
    await listener.start()
    url = f"https://127.0.0.1:{port}"
    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(ca.cert_path)))
    http = aiohttp.ClientSession(url, connector=connector, auto_decompress=False)
    try:

        async def healthy() -> bool:  # granian binds in its own task: refused until it has
            async with http.get("/healthz") as resp:
                return resp.status == 200

        await wait_until(healthy, message=f"the TLS listener on {url} did not answer /healthz")
        yield Edge(url, http, instance, Path(config.cache.dir))
    finally:
        await http.close()
        await listener.stop()
        await instance.close()


@pytest.fixture
async def edge(tmp_path: Path, origin: Registry, seeded: Seeded) -> AsyncIterator[Edge]:
    async with running_edge(edge_config(tmp_path / "cache", origin.url)) as running:
        yield running


@dataclass
class EdgeProcess:
    url: str
    proc: subprocess.Popen[bytes]
    cache_dir: Path
    log_path: Path


@pytest.fixture
def edge_process(tmp_path: Path, origin: Registry, seeded: Seeded) -> Iterator[EdgeProcess]:
    """`python -m edgecache serve` as a user would run it, in front of the origin."""
    with spawn_edge(tmp_path, origin.url) as running:
        yield running


@contextlib.contextmanager
def serve_with_metrics_listener(tmp_path: Path, upstream_url: str) -> Iterator[tuple[str, str]]:
    """`edgecache serve` with `server.metrics_listen` set: (the registry URL, the metrics URL), both
    answering."""
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecache", "serve", "--upstream", upstream_url,
         "--cache-dir", str(tmp_path / "c")],
        env={**os.environ, "EDGECACHE_SERVER_LISTEN": f"127.0.0.1:{port}",
             "EDGECACHE_SERVER_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"},
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{metrics_port}/healthz", proc=proc)
        wait_http(f"http://127.0.0.1:{port}/v2/", proc=proc)
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}"
    finally:
        proc.terminate()
        proc.wait(15)


@contextlib.contextmanager
def spawn_edge(
    tmp_path: Path, upstream_url: str, *, config: str = "", args: tuple[str, ...] = (), tls: bool = False
) -> Iterator[EdgeProcess]:
    """Run `python -m edgecache serve` with an optional TOML `config` and extra flags; with `tls`,
    the listener is HTTPS (the certificate must be in `config` or `args`) and `url` is https://."""
    port = free_port()
    log_path = tmp_path / "edgecache.log"
    cache_dir = tmp_path / "cache"
    command = [
        sys.executable, "-m", "edgecache", "serve",
        "--listen", f"127.0.0.1:{port}",
        "--upstream", upstream_url,
        "--cache-dir", str(cache_dir),
        "--log-format", "json",
    ]  # fmt: skip
    if config:
        (tmp_path / "edgecache.toml").write_text(config)
        command += ["--config", str(tmp_path / "edgecache.toml")]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*command, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        # Over TLS any answer will do: with mutual TLS the handshake without a client certificate is
        # refused, which shows the listener is up all the same.
        wait_http(f"{url}/healthz", proc=proc, log_path=log_path, status=None if tls else 200)
        yield EdgeProcess(url, proc, cache_dir, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()

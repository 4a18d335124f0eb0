"""Three real edgecache nodes behind a real HAProxy (the shipped conf/haproxy/haproxy.cfg) in front of
a real registry: each blob is fetched from upstream once across the cluster, and killing a node loses
no pull."""

from __future__ import annotations

import csv
import io
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Seeded
from tests.support.images import Blob
from tests.support.registry import Registry, free_port, wait_http
from tests.support.waiting import StopWaiting, wait_until_sync

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Cluster:
    url: str
    nodes: list[subprocess.Popen[bytes]]
    node_urls: list[str]


@pytest.fixture
def cluster(tmp_path: Path, origin: Registry, seeded: Seeded) -> Iterator[Cluster]:
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy (Debian package haproxy) is needed: tests/run installs it"
    ports = [free_port() for _ in range(3)]
    command = [sys.executable, "-m", "edgecache", "serve", "--upstream", origin.url, "--log-level", "warning"]
    nodes = [
        subprocess.Popen(
            [*command, "--listen", f"127.0.0.1:{port}", "--cache-dir", str(tmp_path / f"node{i}")]
        )
        for i, port in enumerate(ports)
    ]
    front_port = free_port()
    config = (
        (ROOT / "conf/haproxy/haproxy.cfg").read_text().replace("bind :5000", f"bind 127.0.0.1:{front_port}")
    )
    for i, port in enumerate(ports):
        config = config.replace(f"10.0.0.1{i + 1}:5000", f"127.0.0.1:{port}")
    assert "10.0.0." not in config
    # The runtime API, for the test only: it says when HAProxy's health checks have marked a node up.
    stats = tmp_path / "haproxy.sock"
    config = config.replace("global\n", f"global\n    stats socket {stats} level user\n", 1)
    (tmp_path / "haproxy.cfg").write_text(config)
    proxy = subprocess.Popen([haproxy, "-f", str(tmp_path / "haproxy.cfg")], stderr=subprocess.DEVNULL)
    try:
        for node, port in zip(nodes, ports, strict=True):
            wait_http(f"http://127.0.0.1:{port}/readyz", proc=node, status=200)
        # Every node up in HAProxy's eyes (rise 2, inter 1s), by a check made since it was ready.
        wait_until_sync(
            lambda: all_servers_up(stats, proxy, len(ports)),
            message=lambda: f"HAProxy has not marked every node up: {server_states(stats)}",
        )
        yield Cluster(f"http://127.0.0.1:{front_port}", nodes, [f"http://127.0.0.1:{p}" for p in ports])
    finally:
        proxy.terminate()
        for node in nodes:
            if node.poll() is None:
                node.terminate()
                node.wait(15)
        proxy.wait(15)


def server_states(stats: Path) -> dict[str, tuple[str, str]]:
    """(status, last check) of each server of the edgecache backend, from HAProxy's `show stat`."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(stats))
        sock.sendall(b"show stat\n")
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    rows = csv.DictReader(io.StringIO(data.decode().removeprefix("# ")))
    return {
        row["svname"]: (row["status"], row["check_status"])
        for row in rows
        if row["pxname"] == "edgecache" and row["svname"] not in ("BACKEND", "FRONTEND")
    }


def all_servers_up(stats: Path, proxy: subprocess.Popen[bytes], count: int) -> bool:
    if proxy.poll() is not None:
        raise StopWaiting(f"haproxy exited with {proxy.returncode}")
    states = server_states(stats)
    # "UP", not "UP 1/2" (going down); L7OK: the last check passed.
    return len(states) == count and all(s == ("UP", "L7OK") for s in states.values())


def pull(url: str, blob: Blob, repo: str, attempts: int = 3) -> None:
    """What a client does: GET, verify, and retry a failed pull (dockerd and containerd do)."""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(f"{url}/v2/{repo}/blobs/{blob.digest}", timeout=30) as resp:
                assert resp.read() == blob.data
                return
        except (urllib.error.URLError, ConnectionError, AssertionError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)  # a client's back-off before its retry: part of the behaviour under test


def holder(cluster: Cluster, blob: Blob, repo: str) -> int:
    """Which node has the blob on disk (asked directly, by HEAD: a miss would not fetch the body)."""
    holders = []
    for i, url in enumerate(cluster.node_urls):
        request = urllib.request.Request(f"{url}/v2/{repo}/blobs/{blob.digest}", method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                if resp.headers["X-Cache"] == "HIT":
                    holders.append(i)
        except (urllib.error.URLError, ConnectionError):
            pass
    assert len(holders) == 1, f"{blob.digest} on nodes {holders}"
    return holders[0]


def test_each_blob_is_fetched_once_across_the_cluster_and_a_dead_node_loses_no_pull(
    cluster: Cluster, origin: Registry, seeded: Seeded
) -> None:
    # Each blob under the names clients use for it: the hash ignores the repository.
    names = {
        **{b.digest: ("library/alpine", "alpine") for b in seeded.alpine.blobs},
        **{b.digest: ("team/app",) for b in seeded.app.blobs},
        **{b.digest: ("library/multi", "multi") for i in seeded.multi.images for b in i.blobs},
    }
    blobs = [*seeded.alpine.blobs, *seeded.app.blobs, *(b for i in seeded.multi.images for b in i.blobs)]
    before = {b.digest: origin.count("GET", f"/blobs/{b.digest}") for b in blobs}
    for _round in range(2):
        for blob in blobs:
            for repo in names[blob.digest]:
                pull(cluster.url, blob, repo)
    fetched = {b.digest: origin.count("GET", f"/blobs/{b.digest}") - before[b.digest] for b in blobs}
    assert fetched == {b.digest: 1 for b in blobs}
    placement = {b.digest: holder(cluster, b, names[b.digest][0]) for b in blobs}
    assert len(set(placement.values())) >= 2  # spread over the nodes, each blob on exactly one

    victim = max(set(placement.values()), key=list(placement.values()).count)
    cluster.nodes[victim].send_signal(signal.SIGKILL)
    cluster.nodes[victim].wait()
    for blob in blobs:  # right away: HAProxy retries refused connections on another node
        pull(cluster.url, blob, names[blob.digest][0])
    lost = {b.digest for b in blobs if placement[b.digest] == victim}
    for blob in blobs:
        extra = origin.count("GET", f"/blobs/{blob.digest}") - before[blob.digest] - 1
        assert extra == (1 if blob.digest in lost else 0)  # only the dead node's share moved

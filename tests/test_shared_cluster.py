"""Three real `edgecache serve` processes sharing one bucket on a real radosgw, behind the shipped
HAProxy config, and a real client (skopeo): what one node fetched from the upstream, the others
serve from the bucket. Credentials come from the standard AWS_* environment variables here."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Seeded
from tests.support.ceph import Ceph, env_credentials, start_ceph
from tests.support.clients import Containerd, require_clients, require_root, skopeo_copy_all
from tests.support.images import Image
from tests.support.registry import Registry, free_port, wait_http
from tests.support.waiting import wait_until_sync
from tests.test_haproxy import all_servers_up, server_states

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ceph() -> Iterator[Ceph]:
    cluster = start_ceph()
    yield cluster
    cluster.stop()


@dataclass
class Node:
    url: str
    proc: subprocess.Popen[bytes]


@dataclass
class SharedCluster:
    url: str  # HAProxy
    nodes: list[Node]


def metric(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def uploads_idle(node: Node, blobs: int) -> bool:
    """`blobs` blob uploads done and nothing queued. Blobs are counted apart from the manifest: a
    blob's upload is offered only once its fill is stored, which may be after the client got its
    last byte, so "done" counting the manifest too could be reached with the last blob not offered."""
    done = metric(node.url, "edgecache_shared_uploads_total", kind="blob", result="done")
    return done >= blobs and metric(node.url, "edgecache_shared_upload_backlog") == 0


@pytest.fixture
def shared_cluster(
    tmp_path: Path, origin: Registry, seeded: Seeded, ceph: Ceph, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SharedCluster]:
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy (Debian package haproxy) is needed: tests/run installs it"
    bucket = f"c-{uuid.uuid4().hex[:12]}"
    ceph.create_bucket(bucket)
    for name, value in env_credentials().items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "edgecache.toml"
    config.write_text(
        f'[shared]\nendpoint = "{ceph.endpoint}"\nbucket = "{bucket}"\nprefix = "dc1"\n'
        "[prefetch]\nenabled = false\n"
    )
    ports = [free_port() for _ in range(3)]
    command = [sys.executable, "-m", "edgecache", "serve", "--upstream", origin.url, "--log-level", "warning"]
    with contextlib.ExitStack() as stack:
        procs = []
        for i, port in enumerate(ports):
            log = stack.enter_context((tmp_path / f"node{i}.log").open("wb"))
            procs.append(
                subprocess.Popen(
                    [
                        *command,
                        "--config",
                        str(config),
                        "--listen",
                        f"127.0.0.1:{port}",
                        "--cache-dir",
                        str(tmp_path / f"node{i}"),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        front_port = free_port()
        text = (
            (ROOT / "conf/haproxy/haproxy.cfg")
            .read_text()
            .replace("bind :5000", f"bind 127.0.0.1:{front_port}")
        )
        for i, port in enumerate(ports):
            text = text.replace(f"10.0.0.1{i + 1}:5000", f"127.0.0.1:{port}")
        stats = tmp_path / "haproxy.sock"
        text = text.replace("global\n", f"global\n    stats socket {stats} level user\n", 1)
        (tmp_path / "haproxy.cfg").write_text(text)
        proxy = subprocess.Popen([haproxy, "-f", str(tmp_path / "haproxy.cfg")], stderr=subprocess.DEVNULL)
        try:
            for i, (proc, port) in enumerate(zip(procs, ports, strict=True)):
                wait_http(f"http://127.0.0.1:{port}/readyz", proc=proc, log_path=tmp_path / f"node{i}.log")
            wait_until_sync(
                lambda: all_servers_up(stats, proxy, len(ports)),
                message=lambda: f"HAProxy has not marked every node up: {server_states(stats)}",
            )
            yield SharedCluster(
                f"http://127.0.0.1:{front_port}",
                [Node(f"http://127.0.0.1:{p}", proc) for p, proc in zip(ports, procs, strict=True)],
            )
        finally:
            proxy.terminate()
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(15)
            proxy.wait(15)


def get(url: str, path: str, accept: str | None = None) -> bytes:
    request = urllib.request.Request(f"{url}{path}", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200
        return bytes(resp.read())


def pull(url: str, repo: str, tag: str, image: Image) -> None:
    assert get(url, f"/v2/{repo}/manifests/{tag}", image.manifest.media_type) == image.manifest.data
    for blob in image.blobs:
        assert get(url, f"/v2/{repo}/blobs/{blob.digest}") == blob.data


def blob_gets(origin: Registry, image: Image) -> int:
    return sum(origin.count("GET", f"/blobs/{blob.digest}") for blob in image.blobs)


def test_a_pull_through_one_node_then_the_others_serve_from_the_bucket(
    shared_cluster: SharedCluster, origin: Registry, seeded: Seeded
) -> None:
    image = seeded.app
    first, *others = shared_cluster.nodes
    before = blob_gets(origin, image)
    pull(first.url, "team/app", "1.0", image)
    assert blob_gets(origin, image) == before + len(image.blobs)
    wait_until_sync(lambda: uploads_idle(first, len(image.blobs)), message="node one's uploads did not end")

    for node in others:  # each node on its own, empty disks
        pull(node.url, "team/app", "1.0", image)
    pull(shared_cluster.url, "team/app", "1.0", image)  # and through HAProxy's ring
    assert blob_gets(origin, image) == before + len(image.blobs), "a node fetched a blob upstream"
    for node in others:
        assert metric(node.url, "edgecache_shared_hits_total", kind="blob") == len(image.blobs)


def test_skopeo_pulls_an_index_from_the_bucket_through_a_cold_node(
    shared_cluster: SharedCluster, origin: Registry, seeded: Seeded, tmp_path: Path
) -> None:
    first, second, _ = shared_cluster.nodes
    images = seeded.multi.images
    blobs = {blob.digest for image in images for blob in image.blobs}
    copied = skopeo_copy_all(f"{first.url.removeprefix('http://')}/library/multi:v1", tmp_path / "one")
    assert copied.digest == seeded.multi.manifest.digest
    wait_until_sync(lambda: uploads_idle(first, len(blobs)), message="node one's uploads did not end")
    gets = sum(origin.count("GET", f"/blobs/{d}") for d in blobs)
    manifest_gets = sum(origin.count("GET", f"/manifests/{image.manifest.digest}") for image in images)

    copied = skopeo_copy_all(f"{second.url.removeprefix('http://')}/library/multi:v1", tmp_path / "two")

    assert copied.digest == seeded.multi.manifest.digest
    assert sum(origin.count("GET", f"/blobs/{d}") for d in blobs) == gets
    # The platform manifests, asked by digest, came from the bucket too (the index, by tag, did not).
    assert (
        sum(origin.count("GET", f"/manifests/{image.manifest.digest}") for image in images) == manifest_gets
    )
    assert metric(second.url, "edgecache_shared_hits_total", kind="manifest") == len(images)


def test_serve_refuses_to_start_on_a_missing_bucket_with_one_line(
    tmp_path: Path, origin: Registry, ceph: Ceph, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env_credentials().items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "edgecache.toml"
    config.write_text(f'[shared]\nendpoint = "{ceph.endpoint}"\nbucket = "no-such-bucket"\n')
    done = subprocess.run(
        [sys.executable, "-m", "edgecache", "serve", "--config", str(config), "--upstream", origin.url,
         "--listen", f"127.0.0.1:{free_port()}", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "configuration error" in line]
    assert errors == [
        "edgecache: configuration error: shared.bucket 'no-such-bucket': no such bucket on the endpoint"
    ]
    assert "Traceback" not in done.stderr
    assert env_credentials()["AWS_SECRET_ACCESS_KEY"] not in done.stderr


def test_stats_shows_the_shared_tier(shared_cluster: SharedCluster, seeded: Seeded) -> None:
    node = shared_cluster.nodes[0]
    pull(node.url, "library/alpine", "latest", seeded.alpine)
    wait_until_sync(lambda: uploads_idle(node, len(seeded.alpine.blobs)), message="uploads did not end")
    result = subprocess.run(
        [sys.executable, "-m", "edgecache", "stats", "--url", node.url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("shared tier:"))
    assert line.startswith("shared tier: up; hits 0 blobs")
    assert f"uploads done {len(seeded.alpine.blobs) + 1}," in line


@pytest.mark.clients
def test_containerd_pulls_through_a_cold_node_from_the_bucket(
    shared_cluster: SharedCluster, origin: Registry, seeded: Seeded
) -> None:
    require_root()
    require_clients()
    image = seeded.big
    first, second, _ = shared_cluster.nodes
    pull(first.url, "library/big", "latest", image)
    wait_until_sync(lambda: uploads_idle(first, len(image.blobs)), message="node one's uploads did not end")
    before = blob_gets(origin, image)
    with Containerd() as containerd:
        ref = "docker.io/library/big:latest"
        containerd.pull(ref, mirror_url=second.url)  # ranged, parallel GETs through hosts.toml
        assert containerd.image_digest(ref) == image.manifest.digest
        check = containerd.check(ref)
        assert check.complete and check.unpacked
    assert blob_gets(origin, image) == before
    assert metric(second.url, "edgecache_shared_hits_total", kind="blob") == len(image.blobs)

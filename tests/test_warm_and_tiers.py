"""Warming the cache ahead of the clients, and a two-tier chain (edge → parent → registry)."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EdgeProcess, Seeded
from tests.support.clients import skopeo_copy_all
from tests.support.registry import Registry, free_port, wait_http


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgecache", *args], capture_output=True, text=True, timeout=120
    )


def x_cache(url: str) -> str:
    with urllib.request.urlopen(url) as resp:
        resp.read()
        return str(resp.headers["X-Cache"])


def test_warm_through_a_running_instance(edge_process: EdgeProcess, seeded: Seeded, tmp_path: Path) -> None:
    refs = tmp_path / "images.txt"
    refs.write_text("# warmed before the rollout\nalpine:latest\nteam/app:1.0\n")
    result = cli("warm", "--url", edge_process.url, "--file", str(refs), "docker.io/library/multi:v1")
    assert result.returncode == 0, result.stderr
    amd64 = next(i for i in seeded.multi.images if i.platform["architecture"] == "amd64")
    images = [seeded.alpine, seeded.app, amd64]
    repos = ["library/alpine", "team/app", "library/multi"]
    blobs = {b.digest: b for image in images for b in image.blobs}
    assert f"warmed 3/3 images: {len(blobs)} blobs" in result.stdout
    for repo, image in zip(repos, images, strict=True):
        for blob in image.blobs:  # served from the cache under the repository that holds it
            assert x_cache(f"{edge_process.url}/v2/{repo}/blobs/{blob.digest}") == "HIT"
    again = cli("warm", "--url", edge_process.url, "alpine")
    assert "0 B fetched" in again.stdout
    bad = cli("warm", "--url", edge_process.url, "Not/Valid:x")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_warm_a_cache_directory_and_pin(origin: Registry, seeded: Seeded, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = cli(
        "warm", "--cache-dir", str(cache), "--upstream", origin.url, "--platform", "all", "--pin", "multi:v1"
    )
    assert result.returncode == 0, result.stderr
    blobs = {b.digest for image in seeded.multi.images for b in image.blobs}
    for digest in blobs:  # every platform, on disk
        hex_ = digest.split(":", 1)[1]
        assert (cache / "blobs/sha256" / hex_[:2] / hex_).exists()
    assert cli("pin", "ls", "--cache-dir", str(cache)).stdout.strip() == "docker.io/library/multi:v1"


@pytest.fixture
def two_tiers(origin: Registry, seeded: Seeded, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A parent edgecache in front of the registry, and an edge whose docker.io upstream is the parent."""
    procs = []
    parent_port, edge_port = free_port(), free_port()
    parent = f"http://127.0.0.1:{parent_port}"
    config = tmp_path / "edge.toml"  # the shipped example, pointed at this test's parent
    example = (
        Path(__file__).resolve().parent.parent / "docs/examples/edgecache-edge-with-parent.toml"
    ).read_text()
    config.write_text(example.replace("http://edge.region1:5000", parent))
    commands = [
        [
            "--listen",
            f"127.0.0.1:{parent_port}",
            "--upstream",
            origin.url,
            "--cache-dir",
            str(tmp_path / "p"),
        ],
        ["--listen", f"127.0.0.1:{edge_port}", "--config", str(config), "--cache-dir", str(tmp_path / "e")],
    ]
    try:
        for args in commands:
            procs.append(subprocess.Popen([sys.executable, "-m", "edgecache", "serve", *args]))
        wait_http(f"{parent}/v2/", proc=procs[0])
        wait_http(f"http://127.0.0.1:{edge_port}/v2/", proc=procs[1])
        yield f"http://127.0.0.1:{edge_port}", parent
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(15)


def test_two_tier_chain_with_a_real_client(
    two_tiers: tuple[str, str], seeded: Seeded, origin: Registry, tmp_path: Path
) -> None:
    edge, parent = two_tiers
    before = {b.digest: origin.count("GET", f"/blobs/{b.digest}") for b in seeded.alpine.blobs}
    copied = skopeo_copy_all(f"{edge.removeprefix('http://')}/library/alpine:latest", tmp_path / "copy")
    assert copied.manifest == seeded.alpine.manifest.data
    copied = skopeo_copy_all(f"{edge.removeprefix('http://')}/library/alpine:latest", tmp_path / "again")
    assert copied.manifest == seeded.alpine.manifest.data
    for blob in seeded.alpine.blobs:
        assert origin.count("GET", f"/blobs/{blob.digest}") <= before[blob.digest] + 1
        assert x_cache(f"{edge}/v2/library/alpine/blobs/{blob.digest}") == "HIT"  # the edge holds it
        assert x_cache(f"{parent}/v2/library/alpine/blobs/{blob.digest}") == "HIT"  # and so does the parent

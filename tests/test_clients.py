"""Real clients pull through a real `edgecache serve` process: skopeo, containerd (ctr), dockerd.

Each gets the exact digests the origin holds, and a second pull is served from edgecache's disk with no
blob fetched from the origin again (counted in the origin's access log). The daemons run as root with
all their state in their own temp dirs; a proxy at a dead address stops them falling back to Docker Hub.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EdgeProcess, Seeded
from tests.support.clients import (
    Containerd,
    Dockerd,
    require_clients,
    require_root,
    skopeo_copy_all,
    skopeo_inspect_raw,
)
from tests.support.images import Image
from tests.support.registry import Registry

pytestmark = pytest.mark.clients
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    require_root()
    require_clients()
    with Containerd() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def dockerd(containerd: Containerd) -> Iterator[Dockerd]:
    # Mirrors are set per test (SIGHUP reload) since every test starts its own edgecache.
    with Dockerd(registry_mirrors=["http://127.0.0.1:9"], containerd=containerd) as daemon:
        yield daemon


def blob_gets(origin: Registry, image: Image) -> int:
    return sum(origin.count("GET", f"/blobs/{blob.digest}") for blob in image.blobs)


def test_skopeo_copy_all_gets_the_exact_index_and_images(
    edge_process: EdgeProcess, seeded: Seeded, tmp_path: Path
) -> None:
    host = edge_process.url.removeprefix("http://")
    copied = skopeo_copy_all(f"{host}/library/multi:v1", tmp_path / "multi")
    assert copied.manifest == seeded.multi.manifest.data
    assert set(copied.instances) == {img.manifest.digest for img in seeded.multi.images}
    for image in seeded.multi.images:
        assert copied.instances[image.manifest.digest] == image.manifest.data
        assert {b.digest for b in image.blobs} <= copied.blobs
    raw = skopeo_inspect_raw(f"{host}/library/alpine:latest")
    assert raw == seeded.alpine.manifest.data


def test_containerd_pulls_through_hosts_toml_and_repulls_from_cache(
    edge_process: EdgeProcess, containerd: Containerd, seeded: Seeded, origin: Registry
) -> None:
    image = seeded.app
    ref = "docker.io/team/app:1.0"
    containerd.pull(ref, mirror_url=edge_process.url)
    assert containerd.image_digest(ref) == image.manifest.digest
    check = containerd.check(ref)
    assert check.complete and check.unpacked
    fetched = blob_gets(origin, image)
    assert fetched == len(image.blobs)  # each blob fetched from the origin once

    containerd.remove_image(ref)
    containerd.pull(ref, mirror_url=edge_process.url)
    assert containerd.image_digest(ref) == image.manifest.digest
    assert blob_gets(origin, image) == fetched  # the second pull came from edgecache's disk
    containerd.remove_image(ref)


def test_containerd_pulls_one_platform_of_an_index(
    edge_process: EdgeProcess, containerd: Containerd, seeded: Seeded, origin: Registry
) -> None:
    ref = "docker.io/library/multi:v1"
    containerd.pull(ref, mirror_url=edge_process.url, platform="linux/amd64")
    assert containerd.image_digest(ref) == seeded.multi.manifest.digest
    assert containerd.check(ref).unpacked
    amd64 = next(i for i in seeded.multi.images if i.platform["architecture"] == "amd64")
    assert {b.digest for b in amd64.blobs} <= containerd.content_digests()
    containerd.remove_image(ref)


def test_dockerd_pulls_through_registry_mirrors_and_repulls_from_cache(
    edge_process: EdgeProcess, dockerd: Dockerd, seeded: Seeded, origin: Registry
) -> None:
    image = seeded.alpine
    # The shipped docs/examples/daemon.json, pointed at this test's edgecache.
    daemon_json = json.loads(
        (ROOT / "docs/examples/daemon.json").read_text().replace("http://edge.dc1:5000", edge_process.url)
    )
    dockerd.set_registry_mirrors(daemon_json["registry-mirrors"])
    dockerd.pull("alpine:latest")  # dockerd asks the mirror for library/alpine
    assert f"alpine@{image.manifest.digest}" in dockerd.repo_digests("alpine:latest")
    assert dockerd.image_id("alpine:latest") == image.config.digest
    fetched = blob_gets(origin, image)
    assert fetched >= len(image.blobs)

    dockerd.remove_image("alpine:latest")
    dockerd.pull("alpine:latest")
    assert dockerd.image_id("alpine:latest") == image.config.digest
    assert blob_gets(origin, image) == fetched
    dockerd.remove_image("alpine:latest")

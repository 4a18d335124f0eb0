"""Real clients pull through a real `edgecache serve` process: skopeo, containerd (ctr), dockerd.

Each gets the exact digests the origin holds, and a second pull is served from edgecache's disk with no
blob fetched from the origin again (counted in the origin's access log). The daemons run as root with
all their state in their own temp dirs; a proxy at a dead address stops them falling back to Docker Hub.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from tests.conftest import EdgeProcess, Seeded, spawn_edge
from tests.support.certs import TestCA
from tests.support.clients import (
    Containerd,
    Dockerd,
    require_clients,
    require_root,
    skopeo_copy_all,
    skopeo_inspect_raw,
)
from tests.support.images import Image
from tests.support.logs import access_records
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
    before = blob_gets(origin, image)  # the origin is the session's: other tests pulled it too
    containerd.pull(ref, mirror_url=edge_process.url)
    assert containerd.image_digest(ref) == image.manifest.digest
    check = containerd.check(ref)
    assert check.complete and check.unpacked
    fetched = blob_gets(origin, image)
    assert fetched - before == len(image.blobs)  # each blob fetched from the origin once

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


@pytest.fixture
def certs_d_for() -> Iterator[list[Path]]:
    """dockerd reads a mirror's CA from /etc/docker/certs.d/HOST:PORT/ca.crt (there is no flag for
    another place); each test's port is fresh, and the directory is removed afterwards."""
    made: list[Path] = []
    yield made
    for directory in made:
        shutil.rmtree(directory, ignore_errors=True)


def test_dockerd_pulls_from_an_https_mirror_with_a_login(
    tmp_path: Path,
    dockerd: Dockerd,
    origin: Registry,
    seeded: Seeded,
    certs_d_for: list[Path],
) -> None:
    ca = TestCA(tmp_path / "pki")
    server = ca.issue("edge")
    htpasswd = tmp_path / "htpasswd"
    password = "correct-horse-battery-staple"
    htpasswd.write_text(f"alice:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}\n")
    config = (
        f'[server]\ntls_cert = "{server.cert}"\ntls_key = "{server.key}"\n'
        f'[access]\nmode = "htpasswd"\nhtpasswd = "{htpasswd}"\n'
        '[[access.rules]]\nidentity = "alice"\nallow = ["docker.io/library/*"]\n'
    )
    with spawn_edge(tmp_path, origin.url, config=config, tls=True) as edge:
        host = edge.url.removeprefix("https://")
        certs_d = Path("/etc/docker/certs.d") / host
        certs_d.mkdir(parents=True, exist_ok=True)
        certs_d_for.append(certs_d)
        shutil.copy(ca.cert_path, certs_d / "ca.crt")
        # The user's Docker Hub login: dockerd sends it to the mirror when the mirror asks (401).
        dockerd.cli_config_dir.mkdir(exist_ok=True)
        auth = base64.b64encode(f"alice:{password}".encode()).decode()
        (dockerd.cli_config_dir / "config.json").write_text(
            json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": auth}}})
        )
        try:
            dockerd.set_registry_mirrors([edge.url])
            dockerd.pull("alpine:latest")
            assert dockerd.image_id("alpine:latest") == seeded.alpine.config.digest
        finally:
            (dockerd.cli_config_dir / "config.json").unlink()
            dockerd.remove_image("alpine:latest")
        pulls = [r for r in access_records(edge.log_path) if r.get("route") in ("manifest", "blob")]
        assert pulls and all(r["identity"] == "alice" and r["status"] == 200 for r in pulls)
        # dockerd 28 talks HTTP/1.1 to mirrors: its registry transport sets its own TLS config and
        # so never gets Go's automatic HTTP/2.
        assert {r["protocol"] for r in pulls} <= {"HTTP/1.1", "HTTP/2"}
        log_text = edge.log_path.read_text()
        assert password not in log_text and auth not in log_text  # never logged


def test_containerd_pulls_from_an_https_mirror_trusting_its_ca(
    tmp_path: Path, containerd: Containerd, origin: Registry, seeded: Seeded
) -> None:
    ca = TestCA(tmp_path / "pki")
    server = ca.issue("edge")
    args = ("--tls-cert", str(server.cert), "--tls-key", str(server.key))
    with spawn_edge(tmp_path, origin.url, args=args, tls=True) as edge:
        ref = "docker.io/library/multi:v1"
        hosts_dir = tmp_path / "hosts"
        containerd.pull(ref, mirror_url=edge.url, hosts_dir=hosts_dir, ca=ca.cert_path)
        assert containerd.image_digest(ref) == seeded.multi.manifest.digest
        assert containerd.check(ref).complete
        containerd.remove_image(ref)
        pulls = [r for r in access_records(edge.log_path) if r.get("route") in ("manifest", "blob")]
        assert pulls and all(r["status"] == 200 for r in pulls)
        # containerd 1.6 offers only http/1.1 in ALPN (its transport has its own TLS config, so Go's
        # automatic HTTP/2 is off); the listener offers both (test_tls checks h2 with curl, h2load).
        assert {r["protocol"] for r in pulls} <= {"HTTP/1.1", "HTTP/2"}

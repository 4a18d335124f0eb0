"""One endpoint for every configured upstream: routing by containerd's ns=, a path prefix, the Host
header and the default, with two real registries behind one real `edgecache serve` process."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Seeded
from tests.support.clients import (
    Containerd,
    client_env,
    require_clients,
    require_root,
    skopeo_inspect_raw,
)
from tests.support.images import DOCKER_MANIFEST, OCI_MANIFEST, Image, Pusher, build_image
from tests.support.registry import Registry, free_port, start_registry, wait_http

ACCEPT = f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ghcr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Image]]:
    """A second real registry, standing in for ghcr.io."""
    registry = start_registry(tmp_path_factory.mktemp("ghcr"))
    image = build_image("ghcr-app", oci=True)
    Pusher(registry.url).push_image("owner/app", "1.0", image)
    yield registry, image
    registry.stop()


@dataclass
class MultiEdge:
    url: str
    port: int


@pytest.fixture
def multi_edge(
    tmp_path: Path, origin: Registry, seeded: Seeded, ghcr: tuple[Registry, Image]
) -> Iterator[MultiEdge]:
    config = tmp_path / "edgecache.toml"
    config.write_text(
        f'[[upstream]]\nname = "docker.io"\nurl = "{origin.url}"\n'
        f'[[upstream]]\nname = "ghcr.io"\nurl = "{ghcr[0].url}"\naliases = ["ghcr.edge.test"]\n'
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecache", "serve", "--config", str(config),
         "--listen", f"127.0.0.1:{port}", "--cache-dir", str(tmp_path / "cache")],
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/", proc=proc)
        yield MultiEdge(f"http://127.0.0.1:{port}", port)
    finally:
        proc.terminate()
        proc.wait(15)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Accept": ACCEPT, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_each_route_reaches_its_upstream(
    multi_edge: MultiEdge, seeded: Seeded, ghcr: tuple[Registry, Image], origin: Registry
) -> None:
    registry, app = ghcr
    hub_manifest = seeded.alpine.manifest.data
    # default upstream (dockerd's registry-mirrors sends no hint)
    assert get(f"{multi_edge.url}/v2/library/alpine/manifests/latest")[2] == hub_manifest
    # containerd's ns=
    assert get(f"{multi_edge.url}/v2/owner/app/manifests/1.0?ns=ghcr.io")[2] == app.manifest.data
    assert get(f"{multi_edge.url}/v2/library/alpine/manifests/3.19?ns=docker.io")[2] == hub_manifest
    # a registry prefix in the path (podman/CRI-O mirrors with a path, containerd override_path)
    status, _, body = get(f"{multi_edge.url}/v2/ghcr.io/owner/app/blobs/{app.config.digest}")
    assert (status, body) == (200, app.config.data)
    assert get(f"{multi_edge.url}/v2/ghcr.io/owner/app/manifests/1.0?ns=ghcr.io")[2] == app.manifest.data
    # the Host header, when it is an upstream's alias
    status, _, body = get(
        f"{multi_edge.url}/v2/owner/app/manifests/1.0", {"Host": f"ghcr.edge.test:{multi_edge.port}"}
    )
    assert (status, body) == (200, app.manifest.data)
    assert registry.count("GET", "/v2/owner/app/manifests/1.0") >= 1
    assert origin.count("GET", "/v2/owner/app/") == 0  # nothing for ghcr.io went to the other upstream


@pytest.mark.parametrize(
    "path",
    [
        "/v2/owner/app/manifests/1.0?ns=quay.io",
        "/v2/quay.io/owner/app/manifests/1.0",
        "/v2/registry.evil:5000/owner/app/manifests/1.0",
        "/v2/localhost/owner/app/manifests/1.0",
    ],
)
def test_unconfigured_registries_are_refused_without_contacting_anyone(
    multi_edge: MultiEdge, origin: Registry, ghcr: tuple[Registry, Image], path: str
) -> None:
    seen = len(origin.access_log()) + len(ghcr[0].access_log())
    status, _, body = get(multi_edge.url + path)
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"
    assert len(origin.access_log()) + len(ghcr[0].access_log()) == seen


def example(name: str, mirror_url: str) -> str:
    """A file from docs/examples as shipped, pointed at this test's edgecache."""
    text = (ROOT / "docs/examples" / name).read_text()
    assert "edge.dc1:5000" in text
    return text.replace("http://edge.dc1:5000", mirror_url).replace(
        "edge.dc1:5000", mirror_url.removeprefix("http://")
    )


def test_podman_registries_conf_routes_by_prefix(
    multi_edge: MultiEdge, seeded: Seeded, ghcr: tuple[Registry, Image], tmp_path: Path
) -> None:
    """skopeo reads registries.conf like podman and CRI-O: the shipped example, pointed here."""
    conf = tmp_path / "registries.conf"
    conf.write_text(example("registries.conf", multi_edge.url))
    env = client_env()
    for ref, manifest in (
        ("docker.io/library/alpine:latest", seeded.alpine.manifest.data),
        ("ghcr.io/owner/app:1.0", ghcr[1].manifest.data),
    ):
        result = subprocess.run(
            ["skopeo", "--registries-conf", str(conf), "inspect", "--raw", f"docker://{ref}"],
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == manifest


def test_skopeo_through_a_path_prefix(multi_edge: MultiEdge, ghcr: tuple[Registry, Image]) -> None:
    host = multi_edge.url.removeprefix("http://")
    assert skopeo_inspect_raw(f"{host}/ghcr.io/owner/app:1.0") == ghcr[1].manifest.data


@pytest.mark.clients
def test_containerd_with_one_default_hosts_toml_pulls_from_both(
    multi_edge: MultiEdge, seeded: Seeded, ghcr: tuple[Registry, Image], tmp_path: Path
) -> None:
    require_root()
    require_clients()
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "_default").mkdir(parents=True)
    (hosts_dir / "_default/hosts.toml").write_text(example("containerd/_default/hosts.toml", multi_edge.url))
    with Containerd() as containerd:
        for ref, image in (
            ("docker.io/library/alpine:latest", seeded.alpine),
            ("ghcr.io/owner/app:1.0", ghcr[1]),
        ):
            containerd.ctr(
                "images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", containerd.snapshotter,
                "--platform", "linux/amd64", ref,
            )  # fmt: skip
            assert containerd.image_digest(ref) == image.manifest.digest
            assert containerd.check(ref).unpacked

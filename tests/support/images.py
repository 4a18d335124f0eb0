"""Build real images (gzip tar layers, image configs, manifests, indexes) and push them to a registry.

Everything here talks to the *origin* registry through the real distribution push API, so the images
that clients later pull through edgecache are byte-for-byte what a registry would hold.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urljoin

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Blob:
    data: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return sha256(self.data)

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "size": len(self.data), "digest": self.digest}


@dataclass
class Image:
    """One platform's image: config, layers and the manifest that ties them together."""

    config: Blob
    layers: list[Blob]
    manifest: Blob
    platform: dict[str, str] = field(default_factory=dict)

    @property
    def blobs(self) -> list[Blob]:
        return [self.config, *self.layers]


@dataclass
class Index:
    images: list[Image]
    manifest: Blob


def tar_gz_layer(files: dict[str, bytes], *, random_bytes: int = 0, seed: str = "") -> tuple[bytes, str]:
    """A real gzip'd tar layer and its diff_id (sha256 of the uncompressed tar)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        contents = dict(files)
        if random_bytes:
            contents[f"data/{seed or 'random'}.bin"] = deterministic_bytes(random_bytes, seed)
        for path, data in sorted(contents.items()):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o755 if path.startswith("bin/") else 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, compresslevel=1, mtime=0), sha256(tar_bytes)


def deterministic_bytes(size: int, seed: str) -> bytes:
    """Incompressible bytes, the same for the same seed (so tests can re-create them)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha512(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def build_image(
    name: str,
    *,
    oci: bool = False,
    arch: str = "amd64",
    layer_files: list[dict[str, bytes]] | None = None,
    random_bytes: int = 0,
) -> Image:
    layer_files = layer_files or [{"etc/edgecache-test": f"{name} {arch}\n".encode()}]
    layers: list[Blob] = []
    diff_ids: list[str] = []
    for i, files in enumerate(layer_files):
        extra = random_bytes if i == len(layer_files) - 1 else 0
        data, diff_id = tar_gz_layer(files, random_bytes=extra, seed=f"{name}-{arch}-{i}")
        layers.append(Blob(data, OCI_LAYER if oci else DOCKER_LAYER))
        diff_ids.append(diff_id)
    config_doc = {
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"edgecache test layer {i}"} for i in range(len(layers))],
    }
    config = Blob(json.dumps(config_doc).encode(), OCI_CONFIG if oci else DOCKER_CONFIG)
    manifest_doc: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST if oci else DOCKER_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    # Indented on purpose: the mirror must keep these exact bytes, never re-serialise them.
    manifest = Blob(json.dumps(manifest_doc, indent=3).encode(), str(manifest_doc["mediaType"]))
    return Image(config, layers, manifest, {"architecture": arch, "os": "linux"})


def build_index(name: str, arches: tuple[str, ...] = ("amd64", "arm64")) -> Index:
    images = [build_image(name, oci=True, arch=arch) for arch in arches]
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{**img.manifest.descriptor(), "platform": img.platform} for img in images],
    }
    return Index(images, Blob(json.dumps(doc, indent=2).encode(), OCI_INDEX))


class Pusher:
    """Pushes blobs and manifests to a registry through the distribution push API."""

    def __init__(self, base_url: str, authorization: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.authorization = authorization  # e.g. "Basic ..." for an htpasswd registry

    def _request(
        self, method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str]]:
        headers = dict(headers or {})
        if self.authorization and "Authorization" not in headers:
            headers["Authorization"] = self.authorization
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return resp.status, dict(resp.headers)

    def push_blob(self, repo: str, blob: Blob | bytes) -> str:
        data = blob.data if isinstance(blob, Blob) else blob
        digest = sha256(data)
        _, headers = self._request("POST", f"{self.base_url}/v2/{repo}/blobs/uploads/", b"")
        location = urljoin(self.base_url + "/", headers["Location"])
        sep = "&" if "?" in location else "?"
        status, _ = self._request(
            "PUT",
            f"{location}{sep}digest={digest}",
            data,
            {"Content-Type": "application/octet-stream"},
        )
        assert status == 201, status
        return digest

    def push_manifest(self, repo: str, ref: str, manifest: Blob) -> str:
        status, headers = self._request(
            "PUT",
            f"{self.base_url}/v2/{repo}/manifests/{ref}",
            manifest.data,
            {"Content-Type": manifest.media_type},
        )
        assert status == 201, status
        return headers.get("Docker-Content-Digest", manifest.digest)

    def push_image(self, repo: str, tag: str, image: Image) -> None:
        for blob in image.blobs:
            self.push_blob(repo, blob)
        self.push_manifest(repo, tag, image.manifest)

    def push_index(self, repo: str, tag: str, index: Index) -> None:
        for image in index.images:
            for blob in image.blobs:
                self.push_blob(repo, blob)
            self.push_manifest(repo, image.manifest.digest, image.manifest)
        self.push_manifest(repo, tag, index.manifest)


def host_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)

"""Bundles for new and air-gapped sites: `edgecache export` writes an OCI layout tar that skopeo
reads, `edgecache import` takes edgecache's and skopeo's archives into a cache, whose images are then
pulled by real clients with the upstream refusing connections."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import pty
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgecache.errors import ManifestInvalid
from edgecache.oci import OCI_INDEX, OCI_MANIFEST, Digest
from edgecache.ops.bundle_export import ExportError, _checked
from edgecache.ops.oci_layout import manifest_references
from tests.conftest import EdgeProcess, Seeded, blob_path, edge_config, running_edge, spawn_edge
from tests.support.clients import Containerd, client_env, require_binary, skopeo_copy_all
from tests.support.cosign import make_key_pair, sign_image
from tests.support.images import Blob, Image, Pusher, build_image
from tests.support.registry import Registry, free_port
from tests.support.waiting import wait_until


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgecache", *args], capture_output=True, text=True, timeout=300
    )


def skopeo(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    policy = tmp / "skopeo-policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    command = [require_binary("skopeo"), "--policy", str(policy), "--tmpdir", str(tmp), *args]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=180,
        env=client_env(REGISTRIES_CONFIG_PATH=os.devnull),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


def closed_upstream() -> str:
    """An upstream URL nothing listens on: every connection is refused."""
    return f"http://127.0.0.1:{free_port()}"


def stored_files(cache: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file in the store and the tag files."""
    return {
        str(p.relative_to(cache)): (p.stat().st_size, p.stat().st_mtime_ns)
        for sub in ("blobs", "manifests", "tags")
        for p in (cache / sub).rglob("*")
        if p.is_file()
    }


def index_rows(cache: Path) -> tuple[list[tuple[object, ...]], ...]:
    db = sqlite3.connect(cache / "index.db")
    try:
        return tuple(
            db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("entries", "members", "pins", "pinned")
        )
    finally:
        db.close()


@pytest.fixture(scope="module")
def app_archive(origin: Registry, seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """team/app:1.0 as skopeo writes an OCI archive, named by a bare tag (its usual form)."""
    tmp = tmp_path_factory.mktemp("archive")
    archive = tmp / "app.tar"
    host = origin.url.removeprefix("http://")
    skopeo(
        "copy", "--preserve-digests", "--src-tls-verify=false", "--src-no-creds",
        f"docker://{host}/team/app:1.0", f"oci-archive:{archive}:1.0",
        tmp=tmp,
    )  # fmt: skip
    return archive


def import_app(archive: Path, cache: Path, *more: str) -> subprocess.CompletedProcess[str]:
    return cli("import", str(archive), "--cache-dir", str(cache), "--repository", "docker.io/team/app", *more)


def test_export_through_a_running_node_is_read_by_skopeo(
    edge_process: EdgeProcess, seeded: Seeded, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle.tar"
    refs = ("team/app:1.0", "multi:v1", "alpine:3.19")
    result = cli("export", "--url", edge_process.url, *refs, "-o", str(bundle))
    assert result.returncode == 0, result.stderr
    assert "exported 3 images" in result.stdout
    assert result.stderr == ""  # no progress display when stderr is not a terminal
    # skopeo reads OCI images and indexes from an OCI layout (not docker schema 2 ones: alpine is
    # exported with its exact bytes, for edgecache import, and read back below by edgecache)
    app = tmp_path / "app"
    skopeo(
        "copy",
        "--preserve-digests",
        f"oci-archive:{bundle}:docker.io/team/app:1.0",
        f"dir:{app}",
        tmp=tmp_path,
    )
    # the exact bytes the registry serves, so the same digests
    assert (app / "manifest.json").read_bytes() == seeded.app.manifest.data
    for blob in seeded.app.blobs:
        assert (app / blob.digest[7:]).read_bytes() == blob.data
    multi = tmp_path / "multi"
    skopeo(
        "copy", "--all", "--preserve-digests",
        f"oci-archive:{bundle}:docker.io/library/multi:v1", f"dir:{multi}",
        tmp=tmp_path,
    )  # fmt: skip
    assert (multi / "manifest.json").read_bytes() == seeded.multi.manifest.data
    for image in seeded.multi.images:
        for blob in image.blobs:
            assert (multi / blob.digest[7:]).read_bytes() == blob.data
    site = tmp_path / "site"
    imported = cli("import", str(bundle), "--cache-dir", str(site))
    assert imported.returncode == 0, imported.stderr
    assert "3 tags" in imported.stdout
    for blob in seeded.alpine.blobs:
        assert blob_path(site, blob.digest).read_bytes() == blob.data
    tag = json.loads((site / "tags/docker.io/library/alpine/_tags/3.19").read_text())
    assert tag["digest"] == seeded.alpine.manifest.digest


async def test_zstd_bundle_of_one_platform_from_a_cache_directory(
    origin: Registry, seeded: Seeded, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    warmed = await asyncio.to_thread(
        cli, "warm", "--cache-dir", str(source), "--upstream", origin.url, "--platform", "all", "multi:v1"
    )
    assert warmed.returncode == 0, warmed.stderr
    bundle = tmp_path / "multi.tar.zst"
    exported = await asyncio.to_thread(
        cli, "export", "--cache-dir", str(source), "--platform", "linux/arm64", "multi:v1", "-o", str(bundle)
    )
    assert exported.returncode == 0, exported.stderr
    assert "1 platforms left out" in exported.stdout
    assert bundle.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zstd, from the name alone
    site = tmp_path / "site"
    imported = await asyncio.to_thread(cli, "import", str(bundle), "--cache-dir", str(site))
    assert imported.returncode == 0, imported.stderr
    assert "platform manifest" in imported.stderr  # amd64's absence is said, not an error
    arm64, amd64 = (
        next(i for i in seeded.multi.images if i.platform["architecture"] == a) for a in ("arm64", "amd64")
    )
    for blob in arm64.blobs:
        assert blob_path(site, blob.digest).read_bytes() == blob.data
    for blob in amd64.blobs:
        assert not blob_path(site, blob.digest).exists()
    cut = tmp_path / "cut.tar.zst"  # a compressed bundle cut short imports nothing either
    cut.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    refused = await asyncio.to_thread(cli, "import", str(cut), "--cache-dir", str(tmp_path / "other"))
    assert refused.returncode == 1 and "nothing was imported" in refused.stderr, refused.stderr
    # tag_ttl 0: the tag is revalidated at once, upstream refuses the connection, and the imported
    # tag is served stale (its confirmation is the import, well within max_stale)
    async with running_edge(edge_config(site, closed_upstream(), tag_ttl=0.0)) as edge:
        async with edge.http.get("/v2/library/multi/manifests/v1", headers={"Accept": OCI_INDEX}) as resp:
            assert resp.status == 200
            assert resp.headers["X-Cache"] == "STALE"
            assert await resp.read() == seeded.multi.manifest.data
        url = f"/v2/library/multi/manifests/{arm64.manifest.digest}"
        async with edge.http.get(url, headers={"Accept": OCI_MANIFEST}) as resp:
            assert resp.status == 200
        for blob in arm64.blobs:
            async with edge.http.get(f"/v2/library/multi/blobs/{blob.digest}") as resp:
                assert resp.status == 200
                assert await resp.read() == blob.data
        # This site exports again through its node, upstream still down: what is cached goes, and
        # the signatures it cannot look up are said, not fatal.
        again = tmp_path / "again.tar"
        exported = await asyncio.to_thread(
            cli, "export", "--url", edge.url, "--platform", "linux/arm64", "multi:v1", "-o", str(again)
        )
        assert exported.returncode == 0, exported.stderr
        assert "not looked up" in exported.stderr


@pytest.mark.clients
def test_a_skopeo_archive_imports_and_is_pulled_with_the_upstream_down(
    seeded: Seeded, app_archive: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    unnamed = cli("import", str(app_archive), "--cache-dir", str(cache))
    assert unnamed.returncode == 1 and "--repository" in unnamed.stderr and "Traceback" not in unnamed.stderr
    result = import_app(app_archive, cache)
    assert result.returncode == 0, result.stderr
    assert "1 tags" in result.stdout
    with spawn_edge(tmp_path, closed_upstream()) as edge:
        with Containerd() as ctrd:
            ctrd.pull("docker.io/team/app:1.0", mirror_url=edge.url)
            assert ctrd.image_digest("docker.io/team/app:1.0") == seeded.app.manifest.digest
            assert ctrd.check("docker.io/team/app:1.0").complete
        port = edge.url.rsplit(":", 1)[1]
        copied = skopeo_copy_all(f"127.0.0.1:{port}/team/app:1.0", tmp_path / "copied")
        assert copied.digest == seeded.app.manifest.digest
        assert copied.blobs == {blob.digest for blob in seeded.app.blobs}


async def test_import_beside_a_running_server_and_pinned(
    origin: Registry, seeded: Seeded, app_archive: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    async with running_edge(edge_config(cache, closed_upstream())) as edge:
        async with edge.http.get("/v2/team/app/manifests/1.0") as resp:
            assert resp.status >= 500  # not cached, upstream down
        result = await asyncio.to_thread(import_app, app_archive, cache, "--pin")
        assert result.returncode == 0, result.stderr

        async def served() -> bool:
            async with edge.http.get("/v2/team/app/manifests/1.0", headers={"Accept": OCI_MANIFEST}) as r:
                return r.status == 200 and await r.read() == seeded.app.manifest.data

        await wait_until(served, message="the running server did not serve the imported tag")
        for blob in seeded.app.blobs:
            async with edge.http.get(f"/v2/team/app/blobs/{blob.digest}") as resp:
                assert resp.status == 200
                assert await resp.read() == blob.data
        # The tag moves by a second import (now the multi index): the server, which holds the tag in
        # memory (fresh for tag_ttl), answers with the imported one without a restart.
        moved = tmp_path / "moved.tar"
        exported = await asyncio.to_thread(cli, "export", "--url", origin.url, "multi:v1", "-o", str(moved))
        assert exported.returncode == 0, exported.stderr
        with tarfile.open(moved) as tar:
            index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        index["manifests"][0]["annotations"] = {"org.opencontainers.image.ref.name": "docker.io/team/app:1.0"}
        renamed = {"index.json": json.dumps(index).encode()}
        bundle = await asyncio.to_thread(_rewrite, moved, tmp_path / "renamed.tar", renamed)
        assert (
            await asyncio.to_thread(cli, "import", str(bundle), "--cache-dir", str(cache))
        ).returncode == 0

        async def moved_served() -> bool:
            accept = f"{OCI_INDEX}, {OCI_MANIFEST}"
            async with edge.http.get("/v2/team/app/manifests/1.0", headers={"Accept": accept}) as r:
                return r.status == 200 and await r.read() == seeded.multi.manifest.data

        await wait_until(moved_served, message="the running server kept the tag it held in memory")
    pins = await asyncio.to_thread(cli, "pin", "ls", "--cache-dir", str(cache))
    assert pins.stdout.strip() == "docker.io/team/app:1.0"
    pruned = await asyncio.to_thread(cli, "prune", "--to", "0", "--cache-dir", str(cache))
    assert pruned.returncode == 1 and "pinned" in pruned.stderr
    for blob in seeded.app.blobs:  # pinned: never evicted
        assert blob_path(cache, blob.digest).exists()
    unpinned = tmp_path / "unpinned"  # the same import without --pin is evicted by the same prune
    assert (await asyncio.to_thread(import_app, app_archive, unpinned)).returncode == 0
    assert (await asyncio.to_thread(cli, "prune", "--to", "0", "--cache-dir", str(unpinned))).returncode == 0
    assert not any(blob_path(unpinned, blob.digest).exists() for blob in seeded.app.blobs)


def test_a_second_import_changes_nothing(app_archive: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = import_app(app_archive, cache, "--pin")
    assert first.returncode == 0, first.stderr
    files, rows = stored_files(cache), index_rows(cache)
    again = import_app(app_archive, cache, "--pin")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("nothing new"), again.stdout
    assert stored_files(cache) == files
    assert index_rows(cache) == rows


def _rewrite(archive: Path, out: Path, change: dict[str, bytes | None]) -> Path:
    """A copy of the archive with members replaced (bytes) or left out (None)."""
    with tarfile.open(archive) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            name = member.name.removeprefix("./")
            if name in change:
                data = change[name]
                if data is None:
                    continue
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
            else:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    return out


def test_damaged_bundles_import_nothing(seeded: Seeded, app_archive: Path, tmp_path: Path) -> None:
    layer = seeded.app.layers[0]
    layer_name = f"blobs/sha256/{layer.digest[7:]}"
    data = bytearray(app_archive.read_bytes())
    with tarfile.open(app_archive) as tar:
        offset = next(m for m in tar.getmembers() if m.name.removeprefix("./") == layer_name).offset_data
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    flipped = bytearray(data)
    flipped[offset + len(layer.data) // 2] ^= 0xFF

    def renamed(ref_name: str) -> dict[str, bytes | None]:
        entry = {**index["manifests"][0], "annotations": {"org.opencontainers.image.ref.name": ref_name}}
        return {"index.json": json.dumps({**index, "manifests": [entry]}).encode()}

    cases = {
        "corrupt.tar": (bytes(flipped), "does not match its digest"),
        "truncated.tar": (bytes(data[: offset + len(layer.data) // 2]), "truncated"),
        "not-a-tar.tar": (b"this is not a bundle\n" * 100, "not a tar archive"),
        "empty.tar": (b"", "not a tar archive"),
    }
    rewritten = {  # valid tars whose names or content are wrong
        "bad-name.tar": (renamed("docker.io/Team/App:1.0"), "invalid image name"),
        "bad-tag.tar": (renamed("docker.io/team/app:-x"), "invalid image name"),
        "bad-registry.tar": (renamed("../library/app:1.0"), "is no registry"),
        "missing-layer.tar": ({layer_name: None}, "not in the bundle"),
    }
    made = {
        name: (_rewrite(app_archive, tmp_path / name, change), text)
        for name, (change, text) in rewritten.items()
    }
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    expected = {name: (tmp_path / name, text) for name, (_, text) in cases.items()} | made
    for name, (path, text) in expected.items():
        cache = tmp_path / f"cache-{name}"
        result = import_app(path, cache)
        assert result.returncode == 1, (name, result.stdout, result.stderr)
        assert text in result.stderr and "nothing was imported" in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr
        assert stored_files(cache) == {}, name
        assert not any((cache / "tmp").iterdir()), name  # no spool left behind
        assert index_rows(cache) == ([], [], [], []), name


async def test_signatures_travel_with_their_image(origin: Registry, tmp_path: Path) -> None:
    pusher = Pusher(origin.url)
    image = build_image("bundle-signed", oci=True)
    pusher.push_image("bundle/signed", "1", image)
    signature = sign_image(pusher, "bundle/signed", image.manifest.digest, make_key_pair(tmp_path, "k").key)
    sig_tag = image.manifest.digest.replace(":", "-") + ".sig"
    bundle = tmp_path / "signed.tar"
    async with running_edge(edge_config(tmp_path / "node", origin.url)) as node:
        exported = await asyncio.to_thread(
            cli, "export", "--url", node.url, "docker.io/bundle/signed:1", "-o", str(bundle)
        )
    assert exported.returncode == 0, exported.stderr
    assert "1 signatures" in exported.stdout
    with tarfile.open(bundle) as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        names = set(tar.getnames())
    refs = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]}
    assert refs == {
        "docker.io/bundle/signed:1": image.manifest.digest,
        f"docker.io/bundle/signed:{sig_tag}": signature.digest,
    }
    for digest in json.loads(signature.data)["layers"]:
        assert f"blobs/sha256/{digest['digest'][7:]}" in names
    site = tmp_path / "site"
    imported = await asyncio.to_thread(cli, "import", str(bundle), "--cache-dir", str(site))
    assert imported.returncode == 0, imported.stderr
    async with running_edge(edge_config(site, closed_upstream())) as edge:
        url = f"/v2/bundle/signed/manifests/{sig_tag}"
        async with edge.http.get(url, headers={"Accept": OCI_MANIFEST}) as resp:
            assert resp.status == 200
            assert await resp.read() == signature.data


async def test_an_image_exported_by_digest_is_served_by_digest(
    seeded: Seeded, app_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert (await asyncio.to_thread(import_app, app_archive, first)).returncode == 0
    bundle = tmp_path / "by-digest.tar"
    ref = f"docker.io/team/app@{seeded.app.manifest.digest}"
    exported = await asyncio.to_thread(cli, "export", "--cache-dir", str(first), ref, "-o", str(bundle))
    assert exported.returncode == 0, exported.stderr
    imported = await asyncio.to_thread(cli, "import", str(bundle), "--cache-dir", str(second))
    assert imported.returncode == 0, imported.stderr
    assert not (second / "tags/docker.io/team/app").exists()  # no tag to record
    # Upstream credentials turn the repository check on: a digest is served for a repository only
    # when it is known to hold it, and the import recorded that.
    monkeypatch.setenv("EC_BUNDLE_PASSWORD", "secret")
    credentials = {"username": "mirror", "password_env": "EC_BUNDLE_PASSWORD"}
    async with running_edge(edge_config(second, closed_upstream(), upstream=credentials)) as edge:
        for repository, status in (("team/app", 200), ("team/other", 502)):  # other: upstream must say
            url = f"/v2/{repository}/manifests/{seeded.app.manifest.digest}"
            async with edge.http.get(url, headers={"Accept": OCI_MANIFEST}) as resp:
                assert resp.status == status, repository
            layer = seeded.app.layers[0]
            async with edge.http.get(f"/v2/{repository}/blobs/{layer.digest}") as resp:
                assert resp.status == status, repository


MEASURED = (
    "import sys\n"
    "from edgecache.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "status = open('/proc/self/status').read()\n"
    "print('peak=' + status.split('VmHWM:')[1].split()[0], file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def measured_cli(*args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """The command and its peak resident memory in bytes: VmHWM, which starts afresh at exec (unlike
    getrusage's maxrss, which keeps the forking test process's size)."""
    result = subprocess.run(
        [sys.executable, "-c", MEASURED, *args], capture_output=True, text=True, timeout=300
    )
    peak = int(result.stderr.rsplit("peak=", 1)[1].split()[0]) * 1024
    return result, peak


def test_memory_stays_bounded_whatever_the_blob_size(origin: Registry, tmp_path: Path) -> None:
    """A 160 MiB layer goes through export (HTTP and cache directory, zstd) and import while neither
    process grows anywhere near its size: blobs are streamed, never held whole."""
    size = 160 * 1024 * 1024
    layer = Blob(os.urandom(size), "application/vnd.oci.image.layer.v1.tar")
    config = Blob(b'{"architecture":"amd64","os":"linux"}', "application/vnd.oci.image.config.v1+json")
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
    }
    image = Image(config, [layer], Blob(json.dumps(document).encode(), OCI_MANIFEST))
    Pusher(origin.url).push_image("bundle/large", "1", image)
    del layer
    bundle, again, site = tmp_path / "large.tar", tmp_path / "again.tar.zst", tmp_path / "site"
    steps = [
        ("export", "--url", origin.url, "docker.io/bundle/large:1", "-o", str(bundle)),
        ("import", str(bundle), "--cache-dir", str(site)),
        ("export", "--cache-dir", str(site), "docker.io/bundle/large:1", "-o", str(again)),
    ]
    for step in steps:
        result, peak = measured_cli(*step)
        assert result.returncode == 0, result.stderr
        assert peak < size // 2, (step[0], peak)
    assert blob_path(site, image.layers[0].digest).stat().st_size == size


def on_a_terminal(*args: str) -> tuple[int, str]:
    """Run the command with its stderr on a pseudo-terminal; (exit status, what it showed there)."""
    main, secondary = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "edgecache", *args], stdout=subprocess.PIPE, stderr=secondary, timeout=120
        )
        os.close(secondary)
        shown = b""
        with contextlib.suppress(OSError):  # EIO once everything written was read
            while chunk := os.read(main, 65536):
                shown += chunk
    finally:
        os.close(main)
    return result.returncode, shown.decode(errors="replace")


def test_progress_is_shown_on_a_terminal(app_archive: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    status, shown = on_a_terminal(
        "import", str(app_archive), "--cache-dir", str(cache), "--repository", "docker.io/team/app"
    )
    assert status == 0 and "read 3 files" in shown, shown  # manifest, config, layer
    status, shown = on_a_terminal(
        "export", "--cache-dir", str(cache), "docker.io/team/app:1.0", "-o", str(tmp_path / "b.tar")
    )
    assert status == 0 and "2/2 blobs" in shown and "(100%)" in shown, shown


def test_an_export_that_fails_leaves_no_file(seeded: Seeded, app_archive: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert import_app(app_archive, cache).returncode == 0
    config, layer = (blob_path(cache, blob.digest) for blob in seeded.app.blobs)
    bundle = tmp_path / "out" / "app.tar"
    bundle.parent.mkdir()
    data = bytearray(layer.read_bytes())  # changed behind the cache's back (what verify would catch)
    data[len(data) // 2] ^= 0xFF
    layer.chmod(0o644)
    layer.write_bytes(bytes(data))
    corrupt = cli("export", "--cache-dir", str(cache), "docker.io/team/app:1.0", "-o", str(bundle))
    assert corrupt.returncode == 1 and "does not match its digest" in corrupt.stderr, corrupt.stderr
    config.unlink()
    missing = cli("export", "--cache-dir", str(cache), "docker.io/team/app:1.0", "-o", str(bundle))
    assert missing.returncode == 1 and "is not in the cache" in missing.stderr, missing.stderr
    unknown = cli("export", "--cache-dir", str(cache), "docker.io/team/app:2.0", "-o", str(bundle))
    assert unknown.returncode == 1 and "not found in the cache" in unknown.stderr, unknown.stderr
    assert not any(bundle.parent.iterdir())  # no bundle, no temporary file
    for result in (corrupt, missing, unknown):
        assert "Traceback" not in result.stderr


def test_a_manifest_asked_for_by_a_sha512_digest_is_checked_with_sha512() -> None:
    """The export checks each manifest against the digest it was asked by, in that digest's own
    algorithm (a sha512 reference was once hashed with sha256 and always refused)."""
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
    asked = Digest.of(body, "sha512")
    assert _checked(str(asked), body, OCI_MANIFEST).digest == asked
    with pytest.raises(ExportError, match="does not match"):
        _checked(str(Digest.of(b"something else", "sha512")), body, OCI_MANIFEST)


def test_manifest_references_are_strict_and_leave_foreign_layers_out() -> None:
    """What export walks and import checks, read by one parser: every descriptor must be whole (a
    bundle names all it holds), and layers a registry never serves are not expected in it."""
    config = {"digest": "sha256:" + "a" * 64, "size": 2}
    layer = {"digest": "sha256:" + "b" * 64, "size": 7}
    foreign_by_urls = {"digest": "sha256:" + "c" * 64, "size": 9, "urls": ["https://example.com/l"]}
    nondistributable = {
        "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "digest": "sha256:" + "d" * 64,
        "size": 9,
    }
    children, blobs = manifest_references(
        {"config": config, "layers": [layer, foreign_by_urls, nondistributable]}
    )
    assert children == [] and [(str(d), size) for d, size in blobs] == [
        (config["digest"], 2),
        (layer["digest"], 7),
    ]
    index = {"manifests": [{"digest": "sha256:" + "e" * 64, "mediaType": "x", "platform": {"os": "linux"}}]}
    (child,), _ = manifest_references(index)
    assert (str(child.digest), child.media_type, child.platform) == (
        "sha256:" + "e" * 64,
        "x",
        {"os": "linux"},
    )
    for malformed in (
        {"layers": [{"digest": "sha256:short", "size": 1}]},
        {"layers": [{"digest": "sha256:" + "b" * 64}]},
        {"layers": [{"digest": "sha256:" + "b" * 64, "size": "many"}]},
        {"manifests": [{"size": 1}]},
        ["not", "a", "manifest"],
    ):
        with pytest.raises(ManifestInvalid):
            manifest_references(malformed)


def test_a_bundle_naming_a_child_many_times_is_walked_once_per_manifest(tmp_path: Path) -> None:
    """Indexes that each name the next one twice, 40 deep: a walk that followed every mention would
    take 2**40 steps (a few KB of bundle running for hours); each manifest is read once instead, and
    the image at the bottom is imported."""
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    image = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                       "size": len(config)},
            "layers": [],
        }
    ).encode()  # fmt: skip
    files = {config_digest: config}
    child, child_type = image, OCI_MANIFEST
    for _ in range(40):
        descriptor = {"mediaType": child_type, "digest": "sha256:" + hashlib.sha256(child).hexdigest(),
                      "size": len(child)}  # fmt: skip
        files[descriptor["digest"]] = child
        child = json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor] * 2}
        ).encode()
        child_type = OCI_INDEX
    top = "sha256:" + hashlib.sha256(child).hexdigest()
    files[top] = child
    index = {"schemaVersion": 2, "manifests": [{"mediaType": OCI_INDEX, "digest": top, "size": len(child),
             "annotations": {"org.opencontainers.image.ref.name": "docker.io/team/deep:1.0"}}]}  # fmt: skip
    bundle = tmp_path / "deep.tar"
    with tarfile.open(bundle, "w") as tar:
        members = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": json.dumps(index).encode()}
        members |= {f"blobs/sha256/{digest[7:]}": data for digest, data in files.items()}
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    done = cli("import", str(bundle), "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cache" / "tags" / "docker.io" / "team" / "deep" / "_tags" / "1.0").exists()

"""Run REAL container clients (skopeo, containerd + ctr, dockerd + docker) against a mirror URL.

Why: edgecache has to satisfy the exact request sequences of real clients (containerd's `?ns=`
mirror requests, dockerd's registry-mirrors fallback logic, skopeo's `--all` index walk), which a
hand-written HTTP test cannot reproduce faithfully.

Every daemon is started by the harness itself, as root, with all of its state under its own short
temp dir (`/tmp/ec-XXXXXXXX`): its own root/state/exec dirs, unix sockets inside that dir, nothing
listening on TCP. The system services and default sockets (/run/containerd, /var/run/docker.sock)
are never touched. Logs go to a file in the temp dir and their tail is attached to every error.

Typical use::

    with Containerd() as ctrd:
        ctrd.pull("alpine:latest", mirror_url=mirror.url)
        assert ctrd.image_digest("alpine:latest") == pushed_digest
    with Containerd() as ctrd, Dockerd(registry_mirrors=[mirror.url], containerd=ctrd) as dockerd:
        dockerd.pull("alpine:latest")
        assert f"docker.io/library/alpine@{digest}" in dockerd.repo_digests("alpine:latest")
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.waiting import StopWaiting, WaitTimeout, wait_until_sync

# Unix socket paths are limited to 108 bytes (sun_path) including the NUL.
_MAX_SOCKET_PATH = 107
DOCKER_HUB = "docker.io"
DOCKER_HUB_SERVER = "https://registry-1.docker.io"


class MissingBinaryError(RuntimeError):
    """A client binary the test suite needs is not installed (fail loudly, never skip)."""


class ClientError(RuntimeError):
    """A client command failed; the message carries its output and the daemon log tail."""


def require_binary(name: str, *candidates: str) -> str:
    """Absolute path of `name` (or of the first existing candidate path), else raise.

    Why raise instead of pytest.skip: a CI image that silently lost dockerd would otherwise turn the
    most important compatibility tests green-by-skipping.
    """
    for cand in candidates:
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found:
        return found
    raise MissingBinaryError(
        f"required binary {name!r} not found in PATH (candidates: {list(candidates)}); "
        "install it (Debian: skopeo, containerd, docker.io, runc) - client tests never skip"
    )


CLIENT_BINARIES = (
    "skopeo",
    "containerd",
    "ctr",
    "containerd-shim-runc-v2",
    "runc",
    "dockerd",
    "docker",
)


# the docker.io package's CLI matches its dockerd; /usr/local/bin may hold a newer static one
_PREFERRED = {"docker": ("/usr/bin/docker",)}


def require_clients() -> dict[str, str]:
    """Check every binary the client tests use up front (one clear error listing all missing)."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for name in CLIENT_BINARIES:
        try:
            found[name] = require_binary(name, *_PREFERRED.get(name, ()))
        except MissingBinaryError:
            missing.append(name)
    if missing:
        raise MissingBinaryError(
            f"client tests need {missing} (Debian: skopeo containerd docker.io runc); never skipped"
        )
    return found


def require_root() -> None:
    """The daemons need real root (mounts, chown of layer files); fail with a clear message."""
    if os.geteuid() != 0:
        raise ClientError("real-client tests must run as root (containerd/dockerd need it)")


def manifest_digest(data: bytes) -> str:
    """The registry digest of a manifest: sha256 over its exact bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def normalize_ref(ref: str) -> str:
    """Fully qualify a reference like docker does: `alpine` -> `docker.io/library/alpine:latest`.

    Why: ctr does no normalisation at all, dockerd does; tests want to write one form for both.
    """
    name, sep_digest, digest = ref.partition("@")
    first, slash, rest = name.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost"):
        name = f"{DOCKER_HUB}/{name}"
        first, _, rest = name.partition("/")
    if first == DOCKER_HUB and "/" not in rest:
        name = f"{DOCKER_HUB}/library/{rest}"
    last = name.rsplit("/", 1)[-1]
    if not sep_digest and ":" not in last:
        name += ":latest"
    return name + (f"@{digest}" if sep_digest else "")


def ref_host(ref: str) -> str:
    """Registry host part of a (normalised) reference."""
    return normalize_ref(ref).split("/", 1)[0]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


def _run(
    cmd: list[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client command; raise ClientError with its output (and daemon log tail) on failure."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ClientError(
            f"timed out after {timeout}s: {' '.join(cmd)}\nstdout: {exc.stdout!r}\n"
            f"stderr: {exc.stderr!r}" + (f"\n--- daemon log tail ---\n{_tail(log)}" if log else "")
        ) from exc
    if proc.returncode != 0:
        raise ClientError(
            f"exit {proc.returncode}: {' '.join(cmd)}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
            + (f"\n--- daemon log tail ---\n{_tail(log)}" if log else "")
        )
    return proc


# Nothing listens here: every non-loopback request a client or daemon makes fails fast with
# "proxyconnect ... connection refused" instead of silently reaching Docker Hub.
BLACKHOLE_PROXY = "http://127.0.0.1:9"


def client_env(**extra: str) -> dict[str, str]:
    """Environment for clients/daemons: loopback direct, everything else into a dead proxy.

    Why: dockerd falls back to registry-1.docker.io whenever a mirror fails, and containerd falls
    back to the hosts.toml `server`. On a CI runner with internet that would turn a broken proxy
    into a green test; with this env such a fallback is a loud, immediate error. (Go never proxies
    loopback addresses, so the mirror at 127.0.0.1 is always reached directly.)
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    }
    env["HTTP_PROXY"] = env["http_proxy"] = BLACKHOLE_PROXY
    env["HTTPS_PROXY"] = env["https_proxy"] = BLACKHOLE_PROXY
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------
# skopeo


@dataclass
class CopiedImage:
    """What `skopeo copy --all` wrote: the top-level manifest and, for an index, its instances."""

    path: Path
    layout: str  # "dir" or "oci"
    manifest: bytes  # exact bytes of the top-level manifest (index or single manifest)
    instances: dict[str, bytes] = field(default_factory=dict)  # digest -> manifest bytes
    blobs: set[str] = field(default_factory=set)  # digests of every config/layer blob copied

    @property
    def digest(self) -> str:
        return manifest_digest(self.manifest)

    @property
    def media_type(self) -> str:
        return str(json.loads(self.manifest).get("mediaType", ""))


def _skopeo_policy(dest_dir: Path) -> Path:
    policy = dest_dir.parent / f".{dest_dir.name}-policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    return policy


def skopeo_copy_all(
    src_ref: str,
    dest_dir: Path,
    *,
    tls_verify: bool = False,
    layout: str = "dir",
    timeout: float = 180.0,
    cert_dir: Path | None = None,
    creds: str | None = None,
) -> CopiedImage:
    """`skopeo copy --all --preserve-digests docker://SRC dir:DEST` (or oci:DEST) and read it back.

    `src_ref` is `127.0.0.1:PORT/repo:tag` (a `docker://` prefix is accepted). With --all skopeo
    copies the index and every platform's image; --preserve-digests makes it fail instead of
    silently converting, so the digests read back are the ones the mirror served.
    """
    skopeo = require_binary("skopeo")
    if layout not in ("dir", "oci"):
        raise ValueError(f"layout must be 'dir' or 'oci', not {layout!r}")
    src = src_ref if src_ref.startswith("docker://") else f"docker://{src_ref}"
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    if dest_dir.exists():
        shutil.rmtree(dest_dir)
    dest = f"dir:{dest_dir}" if layout == "dir" else f"oci:{dest_dir}:latest"
    cmd = [
        skopeo, "--policy", str(_skopeo_policy(dest_dir)),
        "--tmpdir", str(dest_dir.parent),
        "copy", "--all", "--preserve-digests", "--retry-times", "0",
        f"--src-tls-verify={'true' if tls_verify else 'false'}",
        *(["--src-cert-dir", str(cert_dir)] if cert_dir else []),
        *(["--src-creds", creds] if creds else ["--src-no-creds"]),
        src, dest,
    ]  # fmt: skip
    _run(cmd, timeout=timeout, env=client_env(REGISTRIES_CONFIG_PATH=os.devnull))
    return read_copied_image(dest_dir, layout)


def read_copied_image(path: Path, layout: str = "dir") -> CopiedImage:
    """Parse what skopeo wrote into `path` (a dir: or oci: layout)."""
    if layout == "dir":
        top = (path / "manifest.json").read_bytes()
        instances = {
            "sha256:" + p.name.split(".", 1)[0]: p.read_bytes() for p in path.glob("*.manifest.json")
        }
        blobs = {
            "sha256:" + p.name
            for p in path.iterdir()
            if len(p.name) == 64 and all(c in "0123456789abcdef" for c in p.name)
        }
        return CopiedImage(path, layout, top, instances, blobs)
    index = json.loads((path / "index.json").read_text())
    top_digest = index["manifests"][0]["digest"]
    blob_dir = path / "blobs" / "sha256"
    top = (blob_dir / top_digest.split(":", 1)[1]).read_bytes()
    instances = {}
    for desc in json.loads(top).get("manifests", []):
        instances[desc["digest"]] = (blob_dir / desc["digest"].split(":", 1)[1]).read_bytes()
    manifests = {top_digest, *instances}
    blobs = {"sha256:" + p.name for p in blob_dir.iterdir()} - manifests
    return CopiedImage(path, layout, top, instances, blobs)


def skopeo_inspect_raw(ref: str, *, tls_verify: bool = False, timeout: float = 60.0) -> bytes:
    """Exact manifest bytes a registry/mirror serves for `ref` (`skopeo inspect --raw`)."""
    skopeo = require_binary("skopeo")
    src = ref if ref.startswith("docker://") else f"docker://{ref}"
    cmd = [
        skopeo, "inspect", "--raw", "--retry-times", "0", "--no-creds",
        f"--tls-verify={'true' if tls_verify else 'false'}", src,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd,
        capture_output=True,
        timeout=timeout,
        env=client_env(REGISTRIES_CONFIG_PATH=os.devnull),
        check=False,
    )
    if proc.returncode != 0:
        raise ClientError(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr.decode()}")
    return proc.stdout


# --------------------------------------------------------------------------------------------
# daemon plumbing


_MNT_DETACH = 2


def _unmount_under(root: Path) -> list[str]:
    """Lazily unmount anything still mounted below `root` (deepest first); returns what it did.

    Why: a daemon killed mid-unpack can leave overlay/bind mounts behind, and rmtree over a live
    mount would delete through it or fail with EBUSY.
    """
    prefix = str(root.resolve()) + "/"
    points: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mount_point = line.split()[4].replace("\\040", " ")
            if mount_point.startswith(prefix):
                points.append(mount_point)
    if not points:
        return []
    libc = ctypes.CDLL(None, use_errno=True)
    for point in sorted(points, key=len, reverse=True):
        libc.umount2(point.encode(), _MNT_DETACH)
    return points


def _short_tempdir(kind: str) -> Path:
    """A short /tmp/ec-XXXXXXXX dir: socket paths below it stay far under the 108-byte limit."""
    return Path(tempfile.mkdtemp(prefix=f"ec-{kind}-", dir="/tmp"))


def _check_socket_path(path: Path) -> None:
    if len(str(path).encode()) > _MAX_SOCKET_PATH:
        raise ValueError(f"unix socket path too long ({len(str(path))} > 107 bytes): {path}")


class _Daemon:
    """Start/stop/log plumbing shared by Containerd and Dockerd."""

    kind = "daemon"
    start_timeout = 30.0

    def __init__(self, workdir: Path | None, keep_dir: bool) -> None:
        require_root()
        self._own_dir = workdir is None
        self.workdir = (workdir or _short_tempdir(self.kind)).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.keep_dir = keep_dir
        self.log_path = self.workdir / f"{self.kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0
        self._atexit_registered = False
        self.leftover_mounts: list[str] = []

    # subclass hooks
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> Self:
        """Start the daemon and block until it answers; raises ClientError with its log if not."""
        if self.proc is not None:
            return self
        t0 = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self._command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=client_env(),
                start_new_session=True,  # ^C in the test terminal must not kill it mid-cleanup
            )
        if not self._atexit_registered:
            # a crashed/interrupted test run must not leave daemons (and their mounts) behind
            atexit.register(self.stop)
            self._atexit_registered = True
        proc = self.proc

        def ready() -> bool:  # a probe that fails or times out (daemon still starting) is "not yet"
            if proc.poll() is not None:
                raise StopWaiting(f"exited with {proc.returncode}")
            return self._ready()

        try:
            wait_until_sync(ready, timeout=self.start_timeout, interval=0.1, message=f"{self.kind} not ready")
        except StopWaiting as exc:
            self.proc = None
            self._cleanup()
            raise ClientError(f"{self.kind} {exc} during start\n{_tail(self.log_path)}") from None
        except WaitTimeout as exc:
            self.stop()
            raise ClientError(f"{exc}\n{_tail(self.log_path)}") from exc
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, wait, then SIGKILL; unmount leftovers; remove the temp dir unless keep_dir."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._cleanup()

    def _cleanup(self) -> None:
        self.leftover_mounts = _unmount_under(self.workdir)
        if self._own_dir and not self.keep_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            # keep the evidence of a failed test around
            self.keep_dir = True
        self.stop()


# --------------------------------------------------------------------------------------------
# containerd


def write_hosts_toml(
    hosts_dir: Path,
    mirror_url: str,
    host: str = DOCKER_HUB,
    *,
    server: str | None = None,
    ca: Path | None = None,
) -> Path:
    """`<hosts_dir>/<host>/hosts.toml` sending pulls/resolves for `host` to `mirror_url`.

    Why: this is exactly how a containerd node is pointed at a pull-through mirror; containerd then
    sends `GET /v2/<repo>/...?ns=<host>` to the mirror and only falls back to `server` on error.
    """
    server = server or (DOCKER_HUB_SERVER if host == DOCKER_HUB else f"https://{host}")
    # `_default` applies to every registry: no `server`, each falls back to itself.
    server_line = "" if host == "_default" else f'server = "{server}"\n\n'
    path = hosts_dir / host / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        server_line + f'[host."{mirror_url.rstrip("/")}"]\n'
        '  capabilities = ["pull", "resolve"]\n' + (f'  ca = "{ca}"\n' if ca else "  skip_verify = true\n")
    )
    return path


@dataclass
class ImageCheck:
    """One line of `ctr images check`: is every blob present, is the image unpacked."""

    ref: str
    media_type: str
    digest: str
    status: str  # e.g. "complete (3/3)"
    unpacked: bool

    @property
    def complete(self) -> bool:
        return self.status.startswith("complete")


class Containerd(_Daemon):
    """A private containerd (own root/state/socket/config), plus `ctr` pulls through a mirror."""

    kind = "containerd"
    # plugins that need hardware/filesystems/network we don't have, or that we never use
    DISABLED_PLUGINS = (
        "io.containerd.grpc.v1.cri",
        "io.containerd.snapshotter.v1.aufs",
        "io.containerd.snapshotter.v1.btrfs",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.snapshotter.v1.zfs",
        "io.containerd.tracing.processor.v1.otlp",
        "io.containerd.internal.v1.tracing",
    )

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        snapshotter: str | None = None,
        namespace: str = "edgecache",
        debug: bool = False,
        keep_dir: bool = False,
    ) -> None:
        super().__init__(workdir, keep_dir)
        self.containerd_bin = require_binary("containerd")
        self.ctr_bin = require_binary("ctr")
        self.namespace = namespace
        self.debug = debug
        self.address = self.workdir / "containerd.sock"
        _check_socket_path(self.address)
        _check_socket_path(Path(str(self.address) + ".ttrpc"))
        self.config_path = self.workdir / "config.toml"
        self.hosts_dir = self.workdir / "hosts"
        # resolved in start(): overlayfs if that plugin loaded, else native
        self.snapshotter = snapshotter or ""

    def start(self) -> Self:
        super().start()
        if not self.snapshotter:
            plugins = self.plugins()
            ok = plugins.get(("io.containerd.snapshotter.v1", "overlayfs")) == "ok"
            self.snapshotter = "overlayfs" if ok else "native"
        return self

    def plugins(self) -> dict[tuple[str, str], str]:
        """(type, id) -> status ("ok", "skip", "error") from `ctr plugins ls`."""
        out = self.ctr("plugins", "ls", timeout=30).stdout.splitlines()
        return {(c[0], c[1]): c[-1] for c in (line.split() for line in out[1:]) if len(c) >= 4}

    def _command(self) -> list[str]:
        root, state, opt = self.workdir / "root", self.workdir / "state", self.workdir / "opt"
        level = "debug" if self.debug else "info"
        disabled = ", ".join(f'"{p}"' for p in self.DISABLED_PLUGINS)
        self.config_path.write_text(
            f"""version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.address}.ttrpc"

[debug]
  address = ""
  level = "{level}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"""
        )
        return [self.containerd_bin, "--config", str(self.config_path)]

    def _ready(self) -> bool:
        if not self.address.is_socket():
            return False
        proc = subprocess.run(
            [self.ctr_bin, "--address", str(self.address), "version"],
            capture_output=True,
            timeout=10,
            check=False,
        )
        return proc.returncode == 0

    def ctr(self, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        """Run `ctr --address SOCK --namespace NS ARGS...` against this containerd."""
        cmd = [self.ctr_bin, "--address", str(self.address), "--namespace", self.namespace, *args]
        return _run(cmd, timeout=timeout, env=client_env(), log=self.log_path)

    def pull(
        self,
        ref: str,
        *,
        mirror_url: str,
        hosts_dir: Path | None = None,
        platform: str | None = "linux/amd64",
        all_platforms: bool = False,
        timeout: float = 180.0,
        ca: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`ctr images pull --hosts-dir DIR --platform P REF`, with REF's registry mirrored.

        Writes `<hosts_dir>/<registry host>/hosts.toml` pointing at `mirror_url`, then pulls. ctr
        fetches only the given platform's manifest/config/layers from an index and unpacks them into
        the snapshotter (so every layer really is downloaded and decompressed);
        `all_platforms=True` fetches every platform instead and unpacks each.
        """
        full = normalize_ref(ref)
        hosts_dir = hosts_dir or self.hosts_dir
        write_hosts_toml(hosts_dir, mirror_url, ref_host(full), ca=ca)
        args = ["images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", self.snapshotter]
        if all_platforms:
            args.append("--all-platforms")
        elif platform:
            args += ["--platform", platform]
        return self.ctr(*args, full, timeout=timeout)

    def images(self) -> dict[str, tuple[str, str]]:
        """ref -> (media type, target digest) for every image in our namespace (`ctr images ls`)."""
        out = self.ctr("images", "ls").stdout.splitlines()
        result: dict[str, tuple[str, str]] = {}
        for line in out[1:]:
            cols = line.split()
            if len(cols) >= 3:
                result[cols[0]] = (cols[1], cols[2])
        return result

    def image_digest(self, ref: str) -> str:
        """Target digest of the image record (the index digest for a multi-arch pull)."""
        full = normalize_ref(ref)
        images = self.images()
        if full not in images:
            raise ClientError(f"{full} not in containerd images: {sorted(images)}")
        return images[full][1]

    def check(self, ref: str) -> ImageCheck:
        """`ctr images check`: blob completeness and whether the image is unpacked."""
        full = normalize_ref(ref)
        lines = self.ctr(
            "images", "check", "--snapshotter", self.snapshotter, f"name=={full}"
        ).stdout.splitlines()
        for line in lines[1:]:
            cols = line.split()
            # REF TYPE DIGEST STATUS(2 words) SIZE(3 words: "x KiB/y KiB") UNPACKED
            if cols and cols[0] == full:
                return ImageCheck(
                    ref=cols[0],
                    media_type=cols[1],
                    digest=cols[2],
                    status=" ".join(cols[3:5]),
                    unpacked=cols[-1] == "true",
                )
        raise ClientError(f"{full} not in `ctr images check` output:\n" + "\n".join(lines))

    def content_digests(self) -> set[str]:
        """Every blob digest in containerd's content store (`ctr content ls`)."""
        lines = self.ctr("content", "ls", "-q").stdout.split()
        return {d for d in lines if d.startswith("sha256:")}

    def remove_image(self, ref: str) -> None:
        """Delete the image record and synchronously GC its content (so a re-pull refetches)."""
        self.ctr("images", "rm", "--sync", normalize_ref(ref))


# --------------------------------------------------------------------------------------------
# dockerd


class Dockerd(_Daemon):
    """A private dockerd (own data/exec root, socket, daemon.json) using `registry_mirrors`.

    Uses vfs storage (no overlay mounts to leak), no bridge/iptables (sandbox has no netfilter and
    we never run containers) and, if given, an existing Containerd instead of its own.
    """

    kind = "dockerd"
    start_timeout = 60.0

    def __init__(
        self,
        *,
        registry_mirrors: list[str],
        containerd: Containerd | None = None,
        workdir: Path | None = None,
        storage_driver: str = "vfs",
        debug: bool = False,
        extra_config: dict[str, object] | None = None,
        keep_dir: bool = False,
    ) -> None:
        super().__init__(workdir, keep_dir)
        self.dockerd_bin = require_binary("dockerd")
        self.docker_bin = require_binary("docker", *_PREFERRED["docker"])
        self.containerd = containerd
        self.socket = self.workdir / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.exec_root = self.workdir / "x"
        _check_socket_path(self.socket)
        # dockerd puts containerd shim/libnetwork sockets below exec-root; keep headroom
        _check_socket_path(self.exec_root / ("y" * 72))
        self.config_path = self.workdir / "daemon.json"
        self.cli_config_dir = self.workdir / "cli"
        self.config: dict[str, object] = {
            "registry-mirrors": list(registry_mirrors),
            "storage-driver": storage_driver,
            "iptables": False,
            "ip-masq": False,
            "ip-forward": False,
            "bridge": "none",
            "userland-proxy": False,
            "debug": debug,
            "max-concurrent-downloads": 3,
            # dockerd 20.10 otherwise writes /etc/docker/key.json
            "deprecated-key-path": str(self.workdir / "key.json"),
            **(extra_config or {}),
        }

    def _write_config(self) -> None:
        self.config_path.write_text(json.dumps(self.config, indent=2))

    def _command(self) -> list[str]:
        self._write_config()
        self.cli_config_dir.mkdir(exist_ok=True)
        cmd = [
            self.dockerd_bin,
            "--config-file", str(self.config_path),
            "--data-root", str(self.workdir / "data"),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.workdir / "dockerd.pid"),
            "-H", self.host,
        ]  # fmt: skip
        if self.containerd is not None:
            if self.containerd.proc is None:
                raise ClientError("start the Containerd before the Dockerd that uses it")
            cmd += ["--containerd", str(self.containerd.address)]
        return cmd

    def _ready(self) -> bool:
        if not self.socket.is_socket():
            return False
        proc = subprocess.run(
            [self.docker_bin, "-H", self.host, "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            timeout=10,
            env=client_env(DOCKER_CONFIG=str(self.cli_config_dir)),
            check=False,
        )
        return proc.returncode == 0

    def docker(self, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        """Run `docker -H unix://SOCK ARGS...` with a private CLI config dir (no ~/.docker)."""
        cmd = [self.docker_bin, "-H", self.host, *args]
        env = client_env(DOCKER_CONFIG=str(self.cli_config_dir))
        return _run(cmd, timeout=timeout, env=env, log=self.log_path)

    def pull(self, ref: str, *, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        """`docker pull REF`; docker.io refs go to the configured mirror first."""
        return self.docker("pull", ref, timeout=timeout)

    def inspect(self, ref: str) -> dict[str, object]:
        out = self.docker("image", "inspect", ref, timeout=30).stdout
        return dict(json.loads(out)[0])

    def image_id(self, ref: str) -> str:
        """Image ID = digest of the image *config* (for the host platform's image)."""
        return str(self.inspect(ref)["Id"])

    def repo_digests(self, ref: str) -> list[str]:
        """`name@digest` entries; the digest is the manifest (or index) digest pulled."""
        return [str(d) for d in self.inspect(ref).get("RepoDigests") or []]  # type: ignore[attr-defined]

    def remove_image(self, ref: str) -> None:
        """`docker rmi -f REF` (layers go too, so a re-pull refetches them)."""
        self.docker("rmi", "-f", ref, timeout=60)

    def set_registry_mirrors(self, mirrors: list[str], timeout: float = 30.0) -> None:
        """Point a running dockerd at other mirrors (daemon.json + SIGHUP live reload).

        Why: a session-scoped dockerd can then follow each test's freshly started proxy.
        """
        if self.proc is None:
            raise ClientError("dockerd not running")
        self.config["registry-mirrors"] = list(mirrors)
        self._write_config()
        self.proc.send_signal(signal.SIGHUP)
        wanted = [m.rstrip("/") for m in mirrors]

        def reloaded() -> bool:  # `docker info` may fail while the daemon reloads: "not yet"
            info = json.loads(self.docker("info", "--format", "{{json .RegistryConfig}}", timeout=30).stdout)
            return [m.rstrip("/") for m in info.get("Mirrors") or []] == wanted

        try:
            wait_until_sync(reloaded, timeout=timeout, interval=0.2, message=f"mirrors not {wanted}")
        except WaitTimeout as exc:
            raise ClientError(f"dockerd did not reload mirrors {mirrors}: {exc}\n{self.log_tail()}") from exc

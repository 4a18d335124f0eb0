"""The content-addressed store on disk: verified blobs and manifests, named by digest, never written in place.

Layout (drawn once, here):

    <root>/blobs/<alg>/<2 hex>/<hex>       verified blob bytes
    <root>/manifests/<alg>/<2 hex>/<hex>   "<media type>\\n" + the exact manifest bytes
    <root>/tags/<upstream>/<repository>/_tags/<tag>   JSON: digest, media type, size, last confirmed
    <root>/tmp/<random>                    spools of fills in progress; emptied at start-up
    <root>/quarantine/<alg>-<hex>          stored files found changed or corrupt, kept for the operator
    <root>/lock                            flock'd by the running process

Write path: spool in tmp/ → hash while writing → compare digest → fsync → rename → fsync directory.
A crash at any step leaves either nothing or a complete verified file. All file work runs in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from edgecache.errors import ConfigError, DigestInvalid, UpstreamDigestMismatch
from edgecache.oci import Digest, hex_pattern
from edgecache.store.identity import FileIdentity

log = logging.getLogger(__name__)


@dataclass
class OpenBlob:
    """An open, verified blob: the front sends `file` with the kernel, then closes it.

    `identity` comes from the same fstat as `size`, so checking it costs the hit nothing more."""

    file: IO[bytes]
    size: int
    identity: FileIdentity | None = None
    _held: list[contextlib.AbstractContextManager[object]] = field(default_factory=list)

    def hold(self, guard: contextlib.AbstractContextManager[object]) -> None:
        """Keep `guard` entered (e.g. protection from eviction) until the blob is closed."""
        guard.__enter__()
        self._held.append(guard)

    def close(self) -> None:
        self.file.close()
        while self._held:
            self._held.pop().__exit__(None, None, None)


class CacheDirLock:
    """One process per cache directory: a second one would race the first on spools and renames."""

    def __init__(self, root: Path) -> None:
        self._path = root / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"cache.dir: {self._path.parent} is in use by another edgecache process"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class BlobStore:
    """Disk CAS for blobs and manifests. Paths come only from validated Digest values."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"

    def inventory(self) -> dict[str, tuple[str, int]]:
        """{digest: (kind, size)} of every stored blob and manifest: a start-up walk (worker thread).

        Only names that are digests count; anything else in the store is left alone and logged.
        """
        found: dict[str, tuple[str, int]] = {}
        for kind, sub in (("blob", "blobs"), ("manifest", "manifests")):
            for algorithm_dir in _subdirs(self.root / sub):
                algorithm = algorithm_dir.name
                valid = hex_pattern(algorithm)  # a million names: one regex each, no Digest
                for prefix_dir in _subdirs(algorithm_dir):
                    with os.scandir(prefix_dir) as entries:
                        for entry in entries:
                            name = entry.name
                            if valid is None or not valid.fullmatch(name):
                                log.warning("ignoring %s in the store: not a digest", entry.path)
                                continue
                            with contextlib.suppress(FileNotFoundError):
                                found[f"{algorithm}:{name}"] = (kind, entry.stat().st_size)
        return found

    def names(self) -> dict[str, str]:
        """{digest: kind} of every stored blob and manifest, without a stat each: the background
        walk at start-up (sizes of what the index lists are checked on every hit anyway)."""
        found: dict[str, str] = {}
        for kind, sub in (("blob", "blobs"), ("manifest", "manifests")):
            for algorithm_dir in _subdirs(self.root / sub):
                algorithm = algorithm_dir.name
                valid = hex_pattern(algorithm)
                for prefix_dir in _subdirs(algorithm_dir):
                    with os.scandir(prefix_dir) as entries:
                        for entry in entries:
                            if valid is not None and valid.fullmatch(entry.name):
                                found[f"{algorithm}:{entry.name}"] = kind
        return found

    def size_of(self, kind: str, digest: str) -> int | None:
        """The size of a stored file now, None when there is none (blocking)."""
        try:
            return os.stat(self.path(kind, Digest.parse(digest))).st_size
        except (FileNotFoundError, DigestInvalid):
            return None

    def remove(self, kind: str, digest: Digest) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(kind, digest))

    def path(self, kind: str, digest: Digest) -> Path:
        return self.blob_path(digest) if kind == "blob" else self.manifest_path(digest)

    def quarantine(self, kind: str, digest: Digest, seen: FileIdentity | None) -> bool | None:
        """Move a stored file that turned out wrong to quarantine/ (a worker-thread call), where the
        operator can look at it; nothing is served from there. With `seen`, only if the file there is
        still that one (a refetch may have stored a good one meanwhile). True: moved; False: another
        file is there now, left alone; None: there is no file."""
        path = self.path(kind, digest)
        try:
            if seen is not None and FileIdentity.of(os.stat(path)) != seen:
                return False
            quarantine = self.root / "quarantine"
            quarantine.mkdir(exist_ok=True)
            os.replace(path, quarantine / f"{digest.algorithm}-{digest.hex}")
        except FileNotFoundError:
            return None
        return True

    def prepare(self) -> None:
        """Create the layout and drop spools a previous process left behind (start-up only)."""
        for sub in ("blobs", "manifests", "tags"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex

    def manifest_path(self, digest: Digest) -> Path:
        return self.root / "manifests" / digest.algorithm / digest.hex[:2] / digest.hex

    async def open_blob(self, digest: Digest) -> OpenBlob | None:
        return await asyncio.to_thread(self._open_blob, digest)

    def _open_blob(self, digest: Digest) -> OpenBlob | None:
        try:
            file = open(self.blob_path(digest), "rb")  # noqa: SIM115 - closed by the sender
        except FileNotFoundError:
            return None
        st = os.fstat(file.fileno())
        return OpenBlob(file, st.st_size, FileIdentity.of(st))

    async def has_blob(self, digest: Digest) -> FileIdentity | None:
        """The identity (with the size) of a cached blob, or None."""
        try:
            return FileIdentity.of(await asyncio.to_thread(os.stat, self.blob_path(digest)))
        except FileNotFoundError:
            return None

    async def read_manifest(self, digest: Digest) -> tuple[str, bytes] | Literal["missing", "corrupt"]:
        """(media type, body) of a stored manifest; "corrupt" when the stored file does not hash to
        its digest (the caller quarantines it and fetches it again)."""
        return await asyncio.to_thread(self._read_manifest, digest)

    def _read_manifest(self, digest: Digest) -> tuple[str, bytes] | Literal["missing", "corrupt"]:
        # Manifests are small and read whole: re-hashing them on every read from disk (the memory
        # LRU takes most reads) is cheap, so a changed manifest file is never served.
        try:
            data = self.manifest_path(digest).read_bytes()
        except FileNotFoundError:
            return "missing"
        media_type, _, body = data.partition(b"\n")
        if Digest.of(body, digest.algorithm) != digest:
            return "corrupt"
        return media_type.decode(), body

    async def write_manifest(self, digest: Digest, media_type: str, body: bytes) -> None:
        """Store verified manifest bytes (the caller checked the digest) with their media type."""
        await asyncio.to_thread(self._write_manifest, digest, media_type.encode() + b"\n" + body)

    def _write_manifest(self, digest: Digest, data: bytes) -> None:
        self._commit_bytes(self.manifest_path(digest), data)

    def write_small_file(self, final: Path, data: bytes) -> None:
        """Replace a small metadata file atomically (a worker-thread call)."""
        self._commit_bytes(final, data)

    def _commit_bytes(self, final: Path, data: bytes) -> None:
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            rename_durably(Path(tmp_name), final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise

    def new_spool(self, digest: Digest) -> Spool:
        return Spool(self, digest)


class Spool:
    """A blob being filled: bytes appended in a temp file and hashed, renamed in only when verified.

    Readers send the spool's bytes while it grows; `written` says how far they may go.
    """

    def __init__(self, store: BlobStore, digest: Digest) -> None:
        self._store = store
        self.digest = digest
        fd, name = tempfile.mkstemp(dir=store.tmp, prefix="spool-")
        self.fd = fd
        self.path = Path(name)
        self.written = 0
        self._hasher = digest.hasher()
        self._closed = False

    def append(self, data: bytes | memoryview) -> None:
        """Write and hash one block as it was received (blocking: the fill's reading thread; pwrite
        and hashlib drop the GIL, so the event loop runs meanwhile)."""
        # pwrite at an explicit offset: readers share this file description (sendfile moves its
        # offset), so a plain write() could land anywhere.
        view = memoryview(data)
        offset = self.written
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n
        self._hasher.update(data)
        self.written = offset

    def verify(self) -> None:
        """Raise UpstreamDigestMismatch (and drop the spool) unless the bytes hash to the digest."""
        if self._hasher.hexdigest() != self.digest.hex:
            self.discard()
            raise UpstreamDigestMismatch("blob content does not match its digest")

    def persist(self) -> FileIdentity:
        """fsync and rename the verified spool into the store (a worker-thread call); the stored
        file's identity, taken after the rename, so hits can tell when it changes."""
        os.fsync(self.fd)
        final = self._store.blob_path(self.digest)
        rename_durably(self.path, final)
        return FileIdentity.of(os.fstat(self.fd))

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


def _subdirs(path: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def rename_durably(source: Path, final: Path) -> None:
    """Rename a verified file into its place and fsync the directory: after a crash the name is
    either absent or the whole verified file (the store's write path; `edgecache import` uses it)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(source, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

"""An OCI image layout as a tar stream (optionally zstd-compressed): the bundle format of `export`
and `import`, the one `skopeo copy oci-archive:` reads and writes.

The tar is written and read sequentially, member by member, with the bytes of each file streamed
through: a 10 GiB layer never sits in memory, and the output needs no seeking (a pipe would do).
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol

import zstandard

from edgecache.errors import DigestInvalid, ManifestInvalid
from edgecache.oci import Digest, foreign_layer

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'
REF_NAME = "org.opencontainers.image.ref.name"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BLOCK = 512
RECORD = 20 * BLOCK  # tar pads the archive to whole records of 10 KiB, as GNU tar and tarfile do


@dataclass(frozen=True)
class LayoutChild:
    """A child manifest an index names, with what it declares of itself."""

    digest: Digest
    media_type: str | None
    platform: object  # the index's `platform` object, as written


def manifest_references(doc: Any) -> tuple[list[LayoutChild], list[tuple[Digest, int]]]:
    """(children, blobs with their sizes) of a parsed manifest or index, strictly: a bundle names
    everything it holds, so any malformed descriptor raises ManifestInvalid (prefetch's lenient
    `oci.manifest_parts` skips them instead). Foreign layers are left out: registries never hold
    them."""
    try:
        children = [
            LayoutChild(
                Digest.parse(str(child["digest"])),
                child.get("mediaType") if isinstance(child.get("mediaType"), str) else None,
                child.get("platform"),
            )
            for child in doc.get("manifests") or []
        ]
        blobs = [
            (Digest.parse(str(item["digest"])), int(item["size"]))
            for item in [doc.get("config"), *(doc.get("layers") or [])]
            if item is not None and not foreign_layer(item)
        ]
    except (DigestInvalid, KeyError, TypeError, AttributeError, ValueError):
        raise ManifestInvalid("a manifest names an invalid manifest or blob") from None
    return children, blobs


def blob_member(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


class Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


class TarWriter:
    """Writes tar members whose data arrives in chunks (the size is announced first, in the header).

    tarfile's own writer wants a file to read each member from; a blob arriving over HTTP is not
    one, so headers come from tarfile.TarInfo and the data is streamed and padded here."""

    def __init__(self, out: Sink) -> None:
        self._out = out
        self._written = 0
        self._member_left = 0
        self._mtime = int(time.time())

    def _put(self, data: bytes) -> None:
        self._out.write(data)
        self._written += len(data)

    def begin(self, name: str, size: int) -> None:
        """Start a regular file member of exactly `size` bytes (its parent directories are implied)."""
        if self._member_left:
            raise ValueError("the previous tar member is not complete")
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = self._mtime
        info.mode = 0o644
        self._put(info.tobuf(format=tarfile.PAX_FORMAT))
        self._member_left = size
        if size == 0:
            self.end()

    def data(self, chunk: bytes) -> None:
        if len(chunk) > self._member_left:
            raise ValueError("more bytes than the tar member announced")
        self._put(chunk)
        self._member_left -= len(chunk)
        if not self._member_left:
            self.end()

    def end(self) -> None:
        padding = -self._written % BLOCK
        if padding:
            self._put(b"\0" * padding)

    def add_bytes(self, name: str, data: bytes) -> None:
        self.begin(name, len(data))
        if data:
            self.data(data)

    def close(self) -> None:
        """The end-of-archive marker (two zero blocks), padded to a whole record."""
        if self._member_left:
            raise ValueError("the last tar member is not complete")
        self._put(b"\0" * (2 * BLOCK))
        padding = -self._written % RECORD
        if padding:
            self._put(b"\0" * padding)


def open_output(path: Path, zstd: bool) -> tuple[IO[bytes], Sink]:
    """(the file, what to write the tar to): the file itself, or a zstd stream writer over it."""
    raw = path.open("wb")
    if not zstd:
        return raw, raw
    # level 3 (zstd's default): layers are mostly compressed already; the bundle's JSON and any
    # uncompressed layers shrink, at several hundred MB/s on one core.
    writer = zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False)
    return raw, writer


def finish_output(raw: IO[bytes], sink: Sink) -> None:
    """Flush the compressor's last frame (when there is one), then the file, durably."""
    if isinstance(sink, zstandard.ZstdCompressionWriter):
        sink.flush(zstandard.FLUSH_FRAME)  # the frame's end; closing the writer adds nothing
    raw.flush()
    os.fsync(raw.fileno())
    raw.close()


def open_bundle(path: Path) -> tuple[IO[bytes], tarfile.TarFile]:
    """The bundle's tar, read as a stream: zstd-compressed or not, told by its first bytes, not its
    name. Raises OSError (cannot open), tarfile.ReadError (not a tar)."""
    raw = path.open("rb")
    magic = raw.read(4)
    raw.seek(0)
    stream: BinaryIO = raw
    if magic == ZSTD_MAGIC:
        inner = zstandard.ZstdDecompressor().stream_reader(raw, closefd=False)
        stream = io.BufferedReader(_Reader(inner), 1024 * 1024)
    try:
        return raw, tarfile.open(fileobj=stream, mode="r|")
    except BaseException:
        raw.close()
        raise


class _Reader(io.RawIOBase):
    """zstandard's reader as the plain binary stream tarfile expects (a truncated or corrupt frame
    surfaces as zstandard.ZstdError, or as a tar that ends too soon)."""

    def __init__(self, inner: zstandard.ZstdDecompressionReader) -> None:
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        return bytes(self._inner.read(size))

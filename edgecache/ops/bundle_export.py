"""`edgecache export REF... -o FILE`: the images as the cache resolves them, written as an OCI image
layout in a tar (zstd-compressed when asked), for `edgecache import` at a new or air-gapped site, or
for any tool that reads `oci-archive:` (skopeo, podman).

Two sources, like `warm`: a running edgecache (`--url`: it is a client, so what it lacks is pulled
through it and stays cached there), or a cache directory read directly (`--cache-dir`: no server,
no upstream; only what is cached can be exported). Every manifest and blob is hashed on its way into
the tar and the export fails on a mismatch, so a bundle never carries bytes that are not what their
digest says. Blobs are streamed in 1 MiB chunks: memory stays bounded whatever their size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import aiohttp

from edgecache.errors import DigestInvalid, ManifestInvalid
from edgecache.oci import (
    MANIFEST_MEDIA_TYPES,
    MAX_MANIFEST_BYTES,
    REGISTRY_HOST,
    Digest,
    manifest_media_type,
)
from edgecache.ops.oci_layout import (
    INDEX_FILE,
    LAYOUT_FILE,
    LAYOUT_VERSION,
    REF_NAME,
    Sink,
    TarWriter,
    blob_member,
    finish_output,
    manifest_references,
    open_output,
)
from edgecache.ops.warm import ImageRef
from edgecache.sizes import human_size
from edgecache.store.blobs import BlobStore, rename_durably
from edgecache.upstream.client import read_capped

CHUNK = 1024 * 1024
ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)
# Where an entry of index.json comes from, also for entries with no tag (exported by digest).
REPOSITORY = "io.edgecache.repository"


class ExportError(Exception):
    """What went wrong, said to the operator as is (no traceback)."""


@dataclass(frozen=True)
class Manifest:
    digest: Digest
    media_type: str
    body: bytes


class Source(Protocol):
    """Where manifests and blobs come from: a running edgecache, or a cache directory."""

    async def manifest(self, ref: ImageRef, reference: str) -> Manifest | None:
        """The manifest a tag or digest names in `ref`'s repository (verified), None if unknown."""
        ...

    def blob(self, ref: ImageRef, digest: Digest) -> AsyncIterator[bytes]:
        """The blob's bytes, in chunks (checked by the caller)."""
        ...


def _checked(reference: str, body: bytes, declared: str | None) -> Manifest:
    if len(body) > MAX_MANIFEST_BYTES:
        raise ExportError(f"manifest {reference} is larger than {human_size(MAX_MANIFEST_BYTES)}")
    asked = Digest.parse(reference) if ":" in reference else None
    digest = Digest.of(body, asked.algorithm if asked else "sha256")
    if asked is not None and asked != digest:
        raise ExportError(f"manifest {reference} does not match its digest")
    try:
        media_type = manifest_media_type(body, declared)
    except Exception as exc:
        raise ExportError(f"manifest {reference}: {exc}") from None
    return Manifest(digest, media_type, body)


class HttpSource:
    """A running edgecache (or any registry speaking the pull API, with containerd's `ns=`)."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self._http = http

    async def manifest(self, ref: ImageRef, reference: str) -> Manifest | None:
        url = f"/v2/{ref.repository}/manifests/{reference}"
        params = {"ns": ref.registry}
        async with self._http.get(url, params=params, headers={"Accept": ACCEPT}) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                text = (await resp.content.read(200)).decode(errors="replace")  # a snippet, not all
                raise ExportError(f"{ref}: manifest {reference}: HTTP {resp.status} {text}")
            body = await read_capped(resp, MAX_MANIFEST_BYTES)
            if body is None:
                raise ExportError(
                    f"{ref}: manifest {reference} is larger than {human_size(MAX_MANIFEST_BYTES)}"
                )
            return _checked(reference, body, resp.headers.get("Content-Type"))

    async def blob(self, ref: ImageRef, digest: Digest) -> AsyncIterator[bytes]:
        url = f"/v2/{ref.repository}/blobs/{digest}"
        async with self._http.get(url, params={"ns": ref.registry}) as resp:
            if resp.status != 200:
                raise ExportError(f"{ref}: blob {digest}: HTTP {resp.status}")
            async for chunk in resp.content.iter_chunked(CHUNK):
                yield chunk


class DirSource:
    """A cache directory, read directly (a running server on it is no obstacle: stored files are
    never written in place). Tags are read from the tag files the server writes."""

    def __init__(self, root: Path) -> None:
        if not (root / "blobs").is_dir():
            raise ExportError(f"--cache-dir: {root} is not an edgecache cache directory")
        self._store = BlobStore(root)

    async def manifest(self, ref: ImageRef, reference: str) -> Manifest | None:
        return await asyncio.to_thread(self._manifest, ref, reference)

    def _manifest(self, ref: ImageRef, reference: str) -> Manifest | None:
        if not REGISTRY_HOST.fullmatch(ref.registry):  # it names a folder under tags/
            raise ExportError(f"{ref}: {ref.registry[:100]!r} is no registry")
        if ":" in reference:
            digest = Digest.parse(reference)
        else:
            # The tag file's place and format: store/manifests.py (ManifestCache._tag_path).
            tag_file = self._store.root / "tags" / ref.registry / ref.repository / "_tags" / reference
            try:
                digest = Digest.parse(json.loads(tag_file.read_bytes())["digest"])
            except FileNotFoundError:
                return None
            except (OSError, ValueError, KeyError, TypeError, DigestInvalid):
                raise ExportError(f"{ref}: the cached tag file is unreadable") from None
        try:
            data = self._store.manifest_path(digest).read_bytes()
        except FileNotFoundError:
            return None
        media_type, _, body = data.partition(b"\n")
        if Digest.of(body, digest.algorithm) != digest:
            raise ExportError(f"{ref}: the cached manifest {digest} is corrupt (run edgecache verify)")
        return Manifest(digest, media_type.decode(), body)

    async def blob(self, ref: ImageRef, digest: Digest) -> AsyncIterator[bytes]:
        try:
            fh = await asyncio.to_thread(self._store.blob_path(digest).open, "rb")
        except FileNotFoundError:
            raise ExportError(f"{ref}: blob {digest} is not in the cache") from None
        try:
            while chunk := await asyncio.to_thread(fh.read, CHUNK):
                yield chunk
        finally:
            fh.close()


@dataclass
class Plan:
    """What the bundle will hold: index.json's entries, every manifest (small, kept in memory) and
    every blob (name, size, and a reference to fetch it under: its repository)."""

    entries: list[dict[str, object]] = field(default_factory=list)
    manifests: dict[Digest, Manifest] = field(default_factory=dict)
    blobs: dict[Digest, tuple[ImageRef, int]] = field(default_factory=dict)
    signatures: int = 0
    platforms_left_out: int = 0
    notes: list[str] = field(default_factory=list)


class Exporter:
    def __init__(self, source: Source, platforms: list[str]) -> None:
        self._source = source
        self._platforms = platforms  # empty: every platform
        self.plan = Plan()

    async def add(self, ref: ImageRef) -> None:
        top = await self._source.manifest(ref, ref.reference)
        if top is None:
            where = " in the cache" if isinstance(self._source, DirSource) else ""
            raise ExportError(f"{ref}: not found{where}")
        self._entry(ref, top, tag=ref.reference if ":" not in ref.reference else None)
        await self._walk(ref, top)

    def _entry(self, ref: ImageRef, manifest: Manifest, tag: str | None) -> None:
        annotations = {REPOSITORY: f"{ref.registry}/{ref.repository}"}
        if tag is not None:
            annotations[REF_NAME] = f"{ref.registry}/{ref.repository}:{tag}"
        entry: dict[str, object] = {
            "mediaType": manifest.media_type,
            "digest": str(manifest.digest),
            "size": len(manifest.body),
            "annotations": annotations,
        }
        if entry not in self.plan.entries:
            self.plan.entries.append(entry)

    async def _walk(self, ref: ImageRef, manifest: Manifest, *, signed: bool = True) -> None:
        """Take the manifest, its children (the wanted platforms), blobs and, unless it is a
        signature itself, its signature."""
        if manifest.digest in self.plan.manifests:
            return
        self.plan.manifests[manifest.digest] = manifest
        try:
            children, blobs = manifest_references(json.loads(manifest.body))
        except (ValueError, ManifestInvalid):  # ValueError: not JSON
            raise ExportError(f"{ref}: manifest {manifest.digest} is malformed") from None
        for child in children:
            if not self._wanted(child.platform):
                self.plan.platforms_left_out += 1
                continue
            found = await self._source.manifest(ref, str(child.digest))
            if found is None:
                raise ExportError(f"{ref}: manifest {child.digest} of its index is not available")
            await self._walk(ref, found)
        for digest, size in blobs:
            self.plan.blobs.setdefault(digest, (ref, size))
        if signed:
            await self._signature(ref, manifest.digest)

    async def _signature(self, ref: ImageRef, digest: Digest) -> None:
        """cosign's signature of `digest`, when the repository has one (the `sha256-<hex>.sig` tag)."""
        tag = f"{digest.algorithm}-{digest.hex}.sig"
        try:
            signature = await self._source.manifest(ref, tag)
        except ExportError as exc:  # e.g. the node's upstream is down: the image goes, unsigned
            self.plan.notes.append(f"{ref}: signature of {digest} not looked up: {exc}")
            return
        if signature is None:
            return
        self.plan.signatures += 1
        self._entry(ref, signature, tag=tag)
        await self._walk(ref, signature, signed=False)

    def _wanted(self, platform: object) -> bool:
        if not self._platforms:
            return True
        if not isinstance(platform, dict):
            return False
        name = f"{platform.get('os')}/{platform.get('architecture')}"
        variant = f"{name}/{platform.get('variant')}" if platform.get("variant") else name
        return name in self._platforms or variant in self._platforms

    async def write(self, out: TarWriter, progress: bool) -> int:
        """Write the bundle; returns its bytes of content. index.json comes first, so a reader
        streaming the tar (edgecache import) can refuse a bundle whose names are wrong before it
        reads any blob."""
        index: dict[str, object] = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
        }
        index["manifests"] = self.plan.entries
        out.add_bytes(LAYOUT_FILE, LAYOUT_VERSION)
        out.add_bytes(INDEX_FILE, json.dumps(index, indent=1).encode())
        total = sum(len(m.body) for m in self.plan.manifests.values())
        total += sum(size for _, size in self.plan.blobs.values())
        done = 0
        started = time.monotonic()
        for manifest in self.plan.manifests.values():
            out.add_bytes(blob_member(manifest.digest), manifest.body)
            done += len(manifest.body)
        for n, (digest, (ref, size)) in enumerate(self.plan.blobs.items(), 1):
            out.begin(blob_member(digest), size)
            hasher = digest.hasher()
            seen = 0
            async for chunk in self._source.blob(ref, digest):
                seen += len(chunk)
                if seen > size:
                    raise ExportError(f"{ref}: blob {digest} is larger than its manifest says")
                hasher.update(chunk)
                await asyncio.to_thread(out.data, chunk)
                done += len(chunk)
                if progress:
                    _progress(n, len(self.plan.blobs), done, total, started)
            if seen != size:
                raise ExportError(f"{ref}: blob {digest} ended after {seen} of {size} bytes")
            if hasher.hexdigest() != digest.hex:
                raise ExportError(f"{ref}: blob {digest} does not match its digest")
        if progress:
            print(file=sys.stderr)
        out.close()
        return total


def _progress(n: int, count: int, done: int, total: int, started: float) -> None:
    rate = done / max(time.monotonic() - started, 1e-6)
    percent = 100 * done // max(total, 1)
    print(
        f"\r{n}/{count} blobs, {human_size(done)} of {human_size(total)} ({percent}%), {human_size(rate)}/s",
        end="",
        file=sys.stderr,
        flush=True,
    )


@dataclass(frozen=True)
class Exported:
    images: int
    manifests: int
    blobs: int
    signatures: int
    platforms_left_out: int
    content_bytes: int
    file_bytes: int
    notes: list[str]


async def run(
    refs: list[ImageRef],
    output: Path,
    *,
    url: str | None,
    cache_dir: Path | None,
    platforms: list[str],
    zstd: bool,
    progress: bool,
) -> Exported:
    """Export `refs` into `output`: written under a temporary name beside it and renamed into place
    only when complete, so a failed export leaves no half bundle behind."""
    async with contextlib.AsyncExitStack() as stack:
        source: Source
        if url is not None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
            http = await stack.enter_async_context(
                aiohttp.ClientSession(url, timeout=timeout, auto_decompress=False)
            )
            source = HttpSource(http)
        else:
            assert cache_dir is not None
            source = DirSource(cache_dir)
        exporter = Exporter(source, platforms)
        try:
            for ref in refs:
                await exporter.add(ref)
            fd, temporary = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.")
            os.close(fd)
            try:
                raw, sink = open_output(Path(temporary), zstd)
                content = await _write(exporter, raw, sink, progress)
                rename_durably(Path(temporary), output)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
                raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ExportError(f"{url}: {exc or type(exc).__name__}") from None
        except OSError as exc:
            raise ExportError(f"{output}: {exc.strerror or exc}") from None
    plan = exporter.plan
    return Exported(
        images=len(refs),
        manifests=len(plan.manifests),
        blobs=len(plan.blobs),
        signatures=plan.signatures,
        platforms_left_out=plan.platforms_left_out,
        content_bytes=content,
        file_bytes=await asyncio.to_thread(lambda: output.stat().st_size),
        notes=plan.notes,
    )


async def _write(exporter: Exporter, raw: IO[bytes], sink: Sink, progress: bool) -> int:
    try:
        content = await exporter.write(TarWriter(sink), progress)
        await asyncio.to_thread(finish_output, raw, sink)
        return content
    finally:
        raw.close()

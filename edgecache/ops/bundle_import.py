"""`edgecache import FILE --cache-dir DIR [--pin]`: a bundle (an OCI image layout in a tar, zstd or
not: `edgecache export`'s, or skopeo's `oci-archive:`) into a cache, so its images are pulled by tag
from that cache even when the upstream cannot be reached (a new site, an air-gapped one).

Nothing enters the store before the whole bundle has been read and checked. Every file is spooled
into `<cache>/tmp/import-*/` and hashed as it is read; a file that does not hash to its name fails
the import at once. Then the manifests are walked from index.json: every image must have its config
and layers in the bundle (an index may leave platforms out: those are fetched from upstream when
asked, as any miss). Only then are the files renamed into the store (as verified fills are), the
index told (entries, which repository holds which digest, pins), and the tags written last, so a
tag never names what is not stored. A running server on the same directory sees all of it without
a restart: content and repository facts through the index (as for `pin` and `prune`), tags through
their files (read when not in its memory).

Imported tags count as confirmed upstream at the moment of the import: fresh for `tag_ttl`, then
revalidated when upstream answers (its answer wins, as for any cached tag), and served stale while
it does not for up to `cache.max_stale` after the import. A site whose upstream never answers sets
`max_stale` beyond the time between two imports. A tag already at the bundle's digest is left as
it is, so importing the same bundle again changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from edgecache.errors import ConfigError, DigestInvalid, ManifestInvalid
from edgecache.oci import (
    MAX_MANIFEST_BYTES,
    REGISTRY_HOST,
    Digest,
    RepoName,
    Tag,
    hex_pattern,
    manifest_media_type,
)
from edgecache.ops.bundle_export import REPOSITORY
from edgecache.ops.maintenance import pinned_digests
from edgecache.ops.oci_layout import INDEX_FILE, LAYOUT_FILE, REF_NAME, manifest_references, open_bundle
from edgecache.ops.warm import ImageRef, parse_ref
from edgecache.sizes import human_size
from edgecache.store.blobs import BlobStore, rename_durably
from edgecache.store.identity import FileIdentity
from edgecache.store.index import CacheIndex, Pin
from edgecache.store.manifests import ManifestCache, TagEntry

CHUNK = 1024 * 1024
MAX_INDEX_BYTES = 4 * 1024 * 1024


class BundleError(Exception):
    """Why a bundle was refused, said to the operator as is (no traceback)."""


@dataclass(frozen=True)
class Named:
    """An entry of index.json: the manifest it names, where, and under which tag (None: by digest)."""

    registry: str
    repository: str
    tag: str | None
    digest: Digest
    media_type: str | None

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}" + (f":{self.tag}" if self.tag else f"@{self.digest}")


@dataclass
class Imported:
    images: int = 0
    blobs_new: int = 0
    blobs_had: int = 0
    manifests_new: int = 0
    manifests_had: int = 0
    tags_new: int = 0
    tags_had: int = 0
    facts_new: int = 0
    bytes_new: int = 0
    pinned: int = 0
    unused: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.blobs_new or self.manifests_new or self.tags_new or self.facts_new or self.pinned)


def _name_of(descriptor: dict[str, object], repository: str | None, n: int) -> Named:
    """Where index.json's entry `n` goes: `registry/repository:tag` from its ref.name annotation (a
    bare tag, as `skopeo copy ... oci-archive:FILE:TAG` writes, takes `--repository`), or only a
    repository (edgecache's `io.edgecache.repository`, for images exported by digest)."""
    where = f"index.json entry {n}"
    try:
        digest = Digest.parse(str(descriptor.get("digest")))
    except DigestInvalid:
        raise BundleError(f"{where}: invalid digest {str(descriptor.get('digest'))[:80]!r}") from None
    annotations = descriptor.get("annotations")
    annotations = annotations if isinstance(annotations, dict) else {}
    ref_name = annotations.get(REF_NAME)
    media_type = descriptor.get("mediaType")
    media = media_type if isinstance(media_type, str) else None
    if isinstance(ref_name, str) and ref_name:
        if "/" not in ref_name and ":" not in ref_name:  # a bare tag
            if repository is None:
                raise BundleError(
                    f"{where} is named only by its tag {ref_name[:130]!r}: give --repository "
                    "[registry/]repository to import it under"
                )
            ref_name = f"{repository}:{ref_name}"
        ref = _parsed(ref_name, where)
        if ":" in ref.reference:  # registry/repository@digest: no tag to record
            return Named(ref.registry, ref.repository, None, digest, media)
        return Named(ref.registry, ref.repository, ref.reference, digest, media)
    where_from = annotations.get(REPOSITORY)
    if not isinstance(where_from, str) and repository is None:
        raise BundleError(f"{where} ({digest}) has no name: give --repository [registry/]repository")
    ref = _parsed(f"{where_from if isinstance(where_from, str) else repository}@{digest}", where)
    return Named(ref.registry, ref.repository, None, digest, media)


def _parsed(text: str, where: str) -> ImageRef:
    """An image name from the bundle, validated: its parts become paths under the cache (tags/)."""
    try:
        ref = parse_ref(text)
    except ConfigError as exc:
        raise BundleError(f"{where}: invalid image name {exc}") from None
    if not REGISTRY_HOST.fullmatch(ref.registry):
        raise BundleError(
            f"{where}: invalid image name {text[:200]!r}: {ref.registry[:100]!r} is no registry"
        )
    return ref


class Staging:
    """Files of the bundle, spooled and verified in `<cache>/tmp/import-*/` (same file system as the
    store: a verified file is renamed into place, never copied)."""

    def __init__(self, store: BlobStore, repository: str | None) -> None:
        store.tmp.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(dir=store.tmp, prefix="import-"))
        self.files: dict[Digest, tuple[Path, int]] = {}
        self.layout: bytes | None = None
        self.index: bytes | None = None
        self.repository = repository
        self.names: list[Named] | None = None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def read(self, path: Path, progress: bool) -> None:
        """Read the whole tar, member by member. Raises BundleError on anything wrong with it."""
        started = time.monotonic()
        done = 0
        try:
            raw, tar = open_bundle(path)
        except FileNotFoundError:
            raise BundleError(f"{path}: no such file") from None
        except (tarfile.TarError, zstandard.ZstdError) as exc:
            raise BundleError(f"{path} is not a tar archive (nor a zstd-compressed one): {exc}") from None
        try:
            for member in tar:
                name = member.name.removeprefix("./")
                if not member.isfile():
                    continue  # directories; links are never part of an OCI layout
                data = tar.extractfile(member)
                assert data is not None
                if name in (LAYOUT_FILE, INDEX_FILE):
                    if member.size > MAX_INDEX_BYTES:
                        raise BundleError(f"{name} is larger than {human_size(MAX_INDEX_BYTES)}")
                    content = data.read()
                    if len(content) != member.size:
                        raise BundleError(f"{name} is cut short: the bundle is truncated")
                    if name == LAYOUT_FILE:
                        self.layout = content
                    else:
                        self.index = content
                    if self.layout is not None and self.index is not None:
                        # both came first (as edgecache export writes them): wrong names are
                        # refused before any blob is read
                        self.names = _names(self, self.repository)
                    continue
                digest = _blob_name(name)
                if digest is None:
                    continue  # not part of the layout (e.g. a README beside it): ignored
                self.files[digest] = (self._spool(digest, data, member.size), member.size)
                done += member.size
                if progress:
                    rate = done / max(time.monotonic() - started, 1e-6)
                    print(
                        f"\rread {len(self.files)} files, {human_size(done)} ({human_size(rate)}/s)",
                        end="",
                        file=sys.stderr,
                        flush=True,
                    )
        except (tarfile.TarError, EOFError, zstandard.ZstdError) as exc:
            raise BundleError(f"{path} is damaged or truncated: {exc}") from None
        finally:
            tar.close()
            raw.close()
            if progress and done:
                print(file=sys.stderr)

    def _spool(self, digest: Digest, data: object, size: int) -> Path:
        spool = self.dir / f"{digest.algorithm}-{digest.hex}"
        hasher = digest.hasher()
        written = 0
        with spool.open("wb") as fh:
            while chunk := data.read(CHUNK):  # type: ignore[attr-defined]
                hasher.update(chunk)
                fh.write(chunk)
                written += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        if written != size:
            raise BundleError(f"blob {digest} is cut short ({written} of {size} bytes): truncated bundle")
        if hasher.hexdigest() != digest.hex:
            raise BundleError(f"blob {digest} does not match its digest: the bundle is corrupt")
        return spool

    def manifest(self, digest: Digest) -> bytes | None:
        found = self.files.get(digest)
        if found is None:
            return None
        if found[1] > MAX_MANIFEST_BYTES:
            raise BundleError(f"manifest {digest} is larger than {human_size(MAX_MANIFEST_BYTES)}")
        return found[0].read_bytes()


def _blob_name(name: str) -> Digest | None:
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "blobs":
        return None
    pattern = hex_pattern(parts[1])
    if pattern is None or not pattern.fullmatch(parts[2]):
        raise BundleError(f"{name[:200]!r}: not a blob name this cache can hold (sha256 or sha512)")
    return Digest.parse(f"{parts[1]}:{parts[2]}")


@dataclass
class Walked:
    """What the bundle's names reach: manifests with their media types, blobs, and per name every
    digest its repository holds."""

    manifests: dict[Digest, tuple[str, bytes]] = field(default_factory=dict)
    blobs: set[Digest] = field(default_factory=set)
    held: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)


def _walk(staging: Staging, named: Named, walked: Walked) -> None:
    """Check `named`'s manifest and everything it reaches is in the bundle (an index may lack some
    platforms); raises BundleError naming what is missing."""
    held = walked.held.setdefault((named.registry, named.repository), set())
    queue: list[tuple[Digest, str | None, bool]] = [(named.digest, named.media_type, True)]
    seen: set[Digest] = set()  # each manifest once: an index may name a child many times, at any depth
    while queue:
        digest, declared, required = queue.pop()
        if digest in seen:
            continue
        seen.add(digest)
        held.add(str(digest))
        body = staging.manifest(digest)
        if body is None:
            if required:
                raise BundleError(f"{named}: manifest {digest} is not in the bundle")
            walked.absent.append(f"{named}: platform manifest {digest}")
            held.discard(str(digest))
            continue
        try:
            media_type = manifest_media_type(body, declared)
            doc = json.loads(body)
        except (ManifestInvalid, ValueError):
            raise BundleError(f"{named}: manifest {digest} is not a valid manifest") from None
        walked.manifests[digest] = (media_type, body)
        try:
            children, blobs = manifest_references(doc)
        except ManifestInvalid:
            raise BundleError(f"{named}: manifest {digest} names an invalid manifest or blob") from None
        queue.extend((child.digest, child.media_type, False) for child in children)
        for blob, _size in blobs:
            if blob not in staging.files:
                raise BundleError(
                    f"{named}: blob {blob} of manifest {digest} is not in the bundle (an incomplete "
                    "image is not imported: export it again with its layers)"
                )
            walked.blobs.add(blob)
            held.add(str(blob))


def _open_cache(root: Path) -> tuple[BlobStore, CacheIndex]:
    """The cache directory, created when new (a site's first import); a running server on it is
    left alone (no lock taken, tmp/ not emptied)."""
    if root.exists() and not root.is_dir():
        raise BundleError(f"--cache-dir: {root} is not a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / "blobs").is_dir():
        raise BundleError(f"--cache-dir: {root} is not an edgecache cache directory")
    for sub in ("blobs", "manifests", "tags", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return BlobStore(root), CacheIndex(root / "index.db")


def run(path: Path, cache_dir: Path, *, pin: bool, repository: str | None, progress: bool) -> Imported:
    """Import the bundle at `path` into `cache_dir`: everything checked first, then committed."""
    if repository is not None:
        try:
            base = parse_ref(repository)
        except ConfigError as exc:
            raise BundleError(f"--repository: {exc}") from None
        repository = f"{base.registry}/{base.repository}"
    if not path.is_file():
        raise BundleError(f"{path}: no such file")
    root = cache_dir.expanduser()
    store, index = _open_cache(root)
    staging = Staging(store, repository)
    try:
        staging.read(path, progress)
        names = staging.names or _names(staging, repository)
        walked = Walked()
        for named in names:
            _walk(staging, named, walked)
        return _commit(store, index, staging, names, walked, pin)
    finally:
        staging.remove()
        index.close()


def _names(staging: Staging, repository: str | None) -> list[Named]:
    if staging.layout is None:
        raise BundleError("the bundle has no oci-layout file: it is not an OCI image layout")
    try:
        version = json.loads(staging.layout).get("imageLayoutVersion")
    except (ValueError, AttributeError):
        version = None
    if not isinstance(version, str) or not version.startswith("1."):
        raise BundleError("the bundle's oci-layout is not version 1.x")
    if staging.index is None:
        raise BundleError("the bundle has no index.json")
    try:
        doc = json.loads(staging.index)
        descriptors = doc["manifests"]
        if not isinstance(descriptors, list) or not all(isinstance(d, dict) for d in descriptors):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise BundleError("the bundle's index.json is not an OCI index") from None
    names = [_name_of(d, repository, n) for n, d in enumerate(descriptors, 1)]
    if not names:
        raise BundleError("the bundle's index.json names no image")
    return names


def _commit(
    store: BlobStore, index: CacheIndex, staging: Staging, names: list[Named], walked: Walked, pin: bool
) -> Imported:
    """Everything was checked: blobs and manifests into the store and the index, then the facts of
    which repository holds what, then tags, then pins."""
    done = Imported(images=len(names))
    done.notes = [f"{what}: not in the bundle (fetched from upstream if asked)" for what in walked.absent]
    done.unused = len(set(staging.files) - walked.blobs - set(walked.manifests))
    owner = {d: key for key, digests in walked.held.items() for d in digests}
    for digest in sorted(walked.blobs, key=str):
        spool, size = staging.files[digest]
        final = store.blob_path(digest)
        upstream, repo = owner.get(str(digest), ("", ""))
        if final.exists():
            done.blobs_had += 1
            if index.get(str(digest)) is None:  # stored, not indexed yet (the server will)
                index.add(str(digest), "blob", size, upstream, repo, FileIdentity.of(final.stat()))
            continue
        rename_durably(spool, final)
        index.add(str(digest), "blob", size, upstream, repo, FileIdentity.of(final.stat()))
        done.blobs_new += 1
        done.bytes_new += size
    for digest, (media_type, body) in sorted(walked.manifests.items(), key=lambda item: str(item[0])):
        upstream, repo = owner.get(str(digest), ("", ""))
        final = store.manifest_path(digest)
        if final.exists():
            done.manifests_had += 1
            if index.get(str(digest)) is None:
                index.add(str(digest), "manifest", len(body), upstream, repo)
            continue
        store.write_small_file(final, media_type.encode() + b"\n" + body)
        index.add(str(digest), "manifest", len(body), upstream, repo)
        done.manifests_new += 1
        done.bytes_new += len(body)
    facts = [
        (upstream, repo, digest)
        for (upstream, repo), digests in sorted(walked.held.items())
        for digest in sorted(digests)
        if not index.is_member(upstream, repo, digest)
    ]
    if facts:
        index.add_members(facts)
    done.facts_new = len(facts)
    tags = ManifestCache(store)
    now = time.time()
    for named in names:
        if named.tag is None:
            continue
        # Names were validated by parse_ref; the tag file's place and format are ManifestCache's.
        key = (named.registry, RepoName.parse(named.repository), Tag.parse(named.tag))
        media_type, body = walked.manifests[named.digest]
        current = tags._load_tag(key)
        if current is not None and current.digest == named.digest:
            done.tags_had += 1
            continue
        tags._save_tag(key, TagEntry(named.digest, media_type, len(body), now))
        done.tags_new += 1
    if pin:
        done.pinned = _pin(store, index, names)
    return done


def _pin(store: BlobStore, index: CacheIndex, names: list[Named]) -> int:
    """Pin the imported tags (as `edgecache pin add` does); how many pins are new."""
    before = set(index.pins())
    for named in names:
        if named.tag is not None:
            index.add_pin(Pin(named.registry, named.repository, named.tag))
    new = len(set(index.pins()) - before)
    wanted = pinned_digests(store, index.pins())
    if new or wanted - index.pinned_digests():
        index.set_pinned(wanted)
    return new


def describe(done: Imported) -> str:
    if not done.changed:
        return (
            f"nothing new: {done.images} names, {done.manifests_had} manifests and {done.blobs_had} blobs "
            "were already in the cache"
        )
    return (
        f"imported {done.images} names: {done.tags_new} tags ({done.tags_had} unchanged), "
        f"{done.manifests_new} manifests and {done.blobs_new} blobs new ({human_size(done.bytes_new)}), "
        f"{done.manifests_had + done.blobs_had} already cached"
        + (f"; {done.pinned} pins added" if done.pinned else "")
        + (f"; {done.unused} files of the bundle belong to no image and were left out" if done.unused else "")
    )

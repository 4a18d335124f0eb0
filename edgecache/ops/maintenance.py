"""Operator commands on a cache directory: du, prune, verify, pin. They work beside a running server:
they change files and the index (SQLite locking keeps both consistent) and the server notices."""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from edgecache.errors import ConfigError, DigestInvalid, NameInvalid, TagInvalid
from edgecache.oci import Digest, RepoName, Tag, referenced_digests, split_image_name
from edgecache.sizes import human_size
from edgecache.store.blobs import BlobStore
from edgecache.store.identity import FileIdentity
from edgecache.store.index import CacheIndex, Pin

HASH_CHUNK = 1024 * 1024


def _open(cache_dir: str) -> tuple[BlobStore, CacheIndex]:
    root = Path(cache_dir).expanduser()
    if not (root / "blobs").is_dir():
        raise ConfigError(f"--cache-dir: {root} is not an edgecache cache directory")
    store = BlobStore(root)
    index = CacheIndex(root / "index.db")
    if not index.totals() and store.inventory():  # a cache that never ran with an index
        index.reconcile(store.inventory())
    return store, index


def du(cache_dir: str, top: int = 10) -> int:
    _store, index = _open(cache_dir)
    totals = index.totals()
    entries = sum(count for count, _ in totals.values())
    size = sum(nbytes for _, nbytes in totals.values())
    print(f"{human_size(size)} in {entries} entries")
    for kind, (count, nbytes) in sorted(totals.items()):
        print(f"  {kind}s: {count}, {human_size(nbytes)}")
    print(f"  pinned: {human_size(index.pinned_bytes())}")
    print("largest repositories (size, entries, hits):")
    for upstream, repository, count, nbytes, hits in index.largest_repositories(top):
        name = f"{upstream}/{repository}" if upstream else "(unknown: found on disk)"
        print(f"  {name}: {human_size(nbytes)}, {count} entries, {hits} hits")
    return 0


def prune(cache_dir: str, to_size: int) -> int:
    store, index = _open(cache_dir)
    index.reconcile(store.inventory())  # the disk is the truth, whatever the server has not indexed yet
    used = sum(nbytes for _, nbytes in index.totals().values())
    freed = removed = 0
    while used - freed > to_size:
        batch = index.coldest(256)
        if not batch:
            break
        chosen = []
        for entry in batch:
            if used - freed <= to_size:
                break
            chosen.append(entry)
            freed += entry.size
        for entry in chosen:
            store.remove(entry.kind, Digest.parse(entry.digest))
        index.remove(e.digest for e in chosen)
        removed += len(chosen)
    left = used - freed
    print(f"pruned {removed} entries ({human_size(freed)}); {human_size(left)} left")
    if left > to_size:
        print(
            f"edgecache prune: the rest is pinned ({human_size(index.pinned_bytes())} pinned)",
            file=sys.stderr,
        )
        return 1
    return 0


def verify(cache_dir: str, sample: int | None = None, progress: bool = True) -> int:
    """Re-hash stored content; what does not match its digest is moved to quarantine/. What matches
    is recorded as verified, with the identity it has now (so after the cache directory was copied to
    another disk, which changes every inode, a verify spares the server refetching every blob)."""
    store, index = _open(cache_dir)
    items = sorted(store.inventory().items())
    if sample is not None and sample < len(items):
        items = random.sample(items, sample)
    total_bytes = sum(size for _, (_, size) in items) or 1
    done_bytes = bad = 0
    started = time.monotonic()
    verified: list[tuple[str, FileIdentity | None, float]] = []
    for n, (text, (kind, size)) in enumerate(items, 1):
        digest = Digest.parse(text)
        path = store.path(kind, digest)
        intact, identity = _matches(path, digest, kind)
        if not intact:
            bad += 1
            store.quarantine(kind, digest, None)
            index.remove([text])
            print(f"\nquarantined {text} ({kind}): content does not match its digest", file=sys.stderr)
        elif identity is not None:
            # Manifests keep no identity (their reads re-hash them); blobs the one just hashed.
            verified.append((text, identity if kind == "blob" else None, time.time()))
        if len(verified) >= 256:
            index.mark_verified(verified)
            verified.clear()
        done_bytes += size
        if progress:
            _progress(n, len(items), done_bytes, total_bytes, started)
    index.mark_verified(verified)
    if progress:
        print(file=sys.stderr)
    print(f"verified {len(items)} entries ({human_size(done_bytes)}): {bad} quarantined")
    return 1 if bad else 0


def _matches(path: Path, digest: Digest, kind: str) -> tuple[bool, FileIdentity | None]:
    """Whether the file hashes to its digest, and its identity when it stayed the same file
    throughout (None: gone, or changed while being read: not to be recorded)."""
    hasher = digest.hasher()
    try:
        with path.open("rb") as fh:
            before = FileIdentity.of(os.fstat(fh.fileno()))
            if kind == "manifest":
                fh.readline()  # the stored media type line
            while chunk := fh.read(HASH_CHUNK):
                hasher.update(chunk)
            after = FileIdentity.of(os.fstat(fh.fileno()))
    except FileNotFoundError:
        return True, None  # evicted meanwhile: nothing wrong to report
    return hasher.hexdigest() == digest.hex, before if before == after else None


def _progress(n: int, total: int, done: int, total_bytes: int, started: float) -> None:
    width = 30
    filled = int(width * done / total_bytes)
    rate = done / max(time.monotonic() - started, 1e-6)
    bar = "#" * filled + "-" * (width - filled)
    print(
        f"\r[{bar}] {n}/{total} {human_size(done)} {human_size(rate)}/s", end="", file=sys.stderr, flush=True
    )


# -- pins --------------------------------------------------------------------------------------


def parse_pin(text: str) -> Pin:
    """`[registry/]repository[:tag]`, globs allowed in repository and tag (`docker.io/library/*:3.*`).

    Like docker, a first component without a dot, colon or `localhost` means docker.io, and a
    single-component Docker Hub name means `library/<name>`. No tag means every tag.
    """
    name, _, tag = text.rpartition(":") if ":" in text.rsplit("/", 1)[-1] else (text, "", "*")
    upstream, repository = split_image_name(name)
    try:
        RepoName.parse(repository.replace("*", "x").replace("?", "x"))
        if tag != "*":
            Tag.parse(tag.replace("*", "x").replace("?", "x"))
    except (NameInvalid, TagInvalid) as exc:
        raise ConfigError(f"pin {text!r}: {exc.detail}") from None
    return Pin(upstream, repository, tag or "*")


def _tags(root: Path) -> Iterator[tuple[str, str, str, Path]]:
    """(upstream, repository, tag, file) of every cached tag."""
    tags_root = root / "tags"
    for dirpath, _dirs, files in os.walk(tags_root):
        here = Path(dirpath)
        if here.name != "_tags":
            continue
        relative = here.parent.relative_to(tags_root).parts
        if len(relative) < 2:
            continue
        upstream, repository = relative[0], "/".join(relative[1:])
        for tag in files:
            yield upstream, repository, tag, here / tag


def pinned_digests(store: BlobStore, pins: list[Pin]) -> set[str]:
    """Everything reachable from cached tags that a pin matches: manifests, children, blobs."""
    found: set[str] = set()
    queue: list[str] = []
    for upstream, repository, tag, path in _tags(store.root):
        if any(pin.matches(upstream, repository, tag) for pin in pins):
            with contextlib.suppress(OSError, ValueError, KeyError):
                queue.append(json.loads(path.read_bytes())["digest"])
    while queue:
        text = queue.pop()
        if text in found:
            continue
        found.add(text)
        with contextlib.suppress(OSError, DigestInvalid):
            data = store.manifest_path(Digest.parse(text)).read_bytes()
            queue.extend(referenced_digests(data.partition(b"\n")[2]))
    return found


def pin(cache_dir: str, action: str, ref: str | None) -> int:
    store, index = _open(cache_dir)
    if action == "ls":
        for each in index.pins():
            print(each)
        return 0
    assert ref is not None
    target = parse_pin(ref)
    if action == "add":
        index.add_pin(target)
    elif not index.remove_pin(target):
        print(f"edgecache pin: {target} was not pinned", file=sys.stderr)
        return 1
    digests = pinned_digests(store, index.pins())
    index.set_pinned(digests)
    stored = sum(1 for d in digests if index.get(d) is not None)
    print(f"{'pinned' if action == 'add' else 'unpinned'} {target}; {stored} cached entries are now pinned")
    return 0

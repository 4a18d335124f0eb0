"""Repository facts the disk can still tell, for an index that was lost or corrupt.

Which repository holds which digest lived only in the index. What survives it: the tag files
(`tags/<upstream>/<repository>/_tags/<tag>`: this repository's tag named this manifest) and the stored
manifests (a manifest names its config, layers and child manifests). So a repository with a tag on
disk holds that manifest and everything it references, through indexes to their children, as far as
the children are stored. Facts nothing on disk records (a blob fetched by digest alone, a manifest
whose tags were lost too) cannot be rebuilt: those digests are confirmed upstream again where the
repository check protects something. All calls are blocking (a worker thread, at start-up only).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from edgecache.errors import DigestInvalid, NameInvalid
from edgecache.oci import Digest, RepoName, referenced_digests
from edgecache.store.blobs import BlobStore

log = logging.getLogger(__name__)
TAGS_DIR = "_tags"
MemberKey = tuple[str, str, str]  # upstream, repository, digest


def tagged_manifests(root: Path) -> Iterator[tuple[str, str, str]]:
    """(upstream, repository, manifest digest) for every readable tag file under `root/tags`."""
    tags = root / "tags"
    for upstream in _dirs(tags):
        for folder, subdirs, files in os.walk(tags / upstream):
            if Path(folder).name != TAGS_DIR:
                subdirs[:] = [d for d in subdirs if not d.startswith(".")]
                continue
            subdirs[:] = []
            repository = Path(folder).parent.relative_to(tags / upstream).as_posix()
            try:
                RepoName.parse(repository)
            except NameInvalid:
                log.warning("ignoring tags of %s/%s: not a repository name", upstream, repository)
                continue
            for name in files:
                digest = _tag_digest(Path(folder) / name)
                if digest is not None:
                    yield upstream, repository, digest


def recover_members(store: BlobStore) -> tuple[list[MemberKey], int]:
    """(facts, tags read): each tagged repository holds its manifest and, recursively, what the
    stored manifests it reaches reference."""
    facts: set[MemberKey] = set()
    tags = 0
    references: dict[str, list[str]] = {}  # each stored manifest parsed once, however many tags
    for upstream, repository, digest in tagged_manifests(store.root):
        tags += 1
        pending = [digest]
        while pending:
            current = pending.pop()
            key = (upstream, repository, current)
            if key in facts:
                continue
            facts.add(key)
            if current not in references:
                references[current] = _references(store, current)
            pending.extend(references[current])
    return sorted(facts), tags


def _references(store: BlobStore, digest: str) -> list[str]:
    try:
        stored = store.manifest_path(Digest.parse(digest)).read_bytes()
    except (OSError, DigestInvalid):
        return []  # not stored (or not a manifest): nothing more to learn from it
    return referenced_digests(stored.partition(b"\n")[2])


def _tag_digest(path: Path) -> str | None:
    try:
        return str(Digest.parse(json.loads(path.read_bytes())["digest"]))
    except (OSError, ValueError, KeyError, TypeError, DigestInvalid):
        return None


def _dirs(path: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []

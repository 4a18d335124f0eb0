"""Request paths parsed into validated routes, before anything is opened or fetched.

The raw path is used as sent: no percent-decoding, no dot-segment removal. Anything outside the
grammar is refused, so a name can never become a path on disk or a different upstream URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from edgecache import errors
from edgecache.errors import NameInvalid
from edgecache.oci import MAX_NAME_LENGTH, Digest, Reference, parse_reference


class Kind(Enum):
    BASE = "base"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"
    UPLOAD = "upload"
    CATALOG = "catalog"


@dataclass(frozen=True)
class Route:
    """A matched API route. `name` is still raw: it may carry a registry prefix (`ghcr.io/owner/app`)
    that only the upstream choice can tell from a repository name, so it is validated after that."""

    kind: Kind
    name: str = ""
    reference: Reference | None = None
    digest: Digest | None = None


_PATTERNS: tuple[tuple[Kind, re.Pattern[str]], ...] = (
    (Kind.BASE, re.compile(r"/v2/?")),
    (Kind.CATALOG, re.compile(r"/v2/_catalog")),
    (Kind.UPLOAD, re.compile(r"/v2/(?P<name>.+)/blobs/uploads(?:/.*)?")),
    (Kind.MANIFEST, re.compile(r"/v2/(?P<name>.+)/manifests/(?P<ref>[^/]*)")),
    (Kind.BLOB, re.compile(r"/v2/(?P<name>.+)/blobs/(?P<ref>[^/]*)")),
    (Kind.TAGS, re.compile(r"/v2/(?P<name>.+)/tags/list")),
    (Kind.REFERRERS, re.compile(r"/v2/(?P<name>.+)/referrers/(?P<ref>[^/]*)")),
)


def parse_route(raw_path: str) -> Route:
    """Match the raw request path (query already removed) against the distribution API routes."""
    for kind, pattern in _PATTERNS:
        match = pattern.fullmatch(raw_path)
        if match is None:
            continue
        if kind in (Kind.BASE, Kind.CATALOG):
            return Route(kind)
        name = match["name"]
        if len(name) > 2 * MAX_NAME_LENGTH:
            raise NameInvalid("repository name too long")
        if kind is Kind.MANIFEST:
            return Route(kind, name, reference=parse_reference(match["ref"]))
        if kind in (Kind.BLOB, Kind.REFERRERS):
            return Route(kind, name, digest=Digest.parse(match["ref"]))
        return Route(kind, name)
    raise errors.RouteUnknown("not a distribution API path")

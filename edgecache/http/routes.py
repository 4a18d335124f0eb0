"""Request paths parsed into validated routes, before anything is opened or fetched.

The raw path is used as sent: no percent-decoding, no dot-segment removal. Anything outside the
grammar is refused, so a name can never become a path on disk or a different upstream URL.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import Enum

from edgecache import errors
from edgecache.errors import NameInvalid, TagInvalid
from edgecache.oci import MAX_NAME_LENGTH, Digest, Reference, parse_reference


class Kind(Enum):
    BASE = "base"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"
    UPLOAD = "upload"
    CATALOG = "catalog"
    TOKEN = "token"  # the token service's endpoint (answered only with access.token on)


@dataclass(frozen=True)
class Route:
    """A matched API route. `name` is still raw: it may carry a registry prefix (`ghcr.io/owner/app`)
    that only the upstream choice can tell from a repository name, so it is validated after that.
    A manifest route's `reference` is None when it is neither a tag nor a digest: the front answers
    404 for it once the name is checked (nothing can be stored under it)."""

    kind: Kind
    name: str = ""
    reference: Reference | None = None
    digest: Digest | None = None


# DOTALL: a control character (CR, LF, NUL) in a name must reach the name check (400 NAME_INVALID),
# not make the route unknown (404), whatever an adapter lets through.
_PATTERNS: tuple[tuple[Kind, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern, re.DOTALL))
    for kind, pattern in (
        (Kind.BASE, r"/v2/?"),
        (Kind.TOKEN, r"/token"),
        (Kind.CATALOG, r"/v2/_catalog"),
        (Kind.UPLOAD, r"/v2/(?P<name>.+)/blobs/uploads(?:/.*)?"),
        (Kind.MANIFEST, r"/v2/(?P<name>.+)/manifests/(?P<ref>[^/]*)"),
        (Kind.BLOB, r"/v2/(?P<name>.+)/blobs/(?P<ref>[^/]*)"),
        (Kind.TAGS, r"/v2/(?P<name>.+)/tags/list"),
        (Kind.REFERRERS, r"/v2/(?P<name>.+)/referrers/(?P<ref>[^/]*)"),
    )
)


REMEMBERED_PATH_LENGTH = 512


def parse_route(raw_path: str) -> Route:
    """Match the raw request path (query already removed) against the distribution API routes.

    The last 4,096 paths of up to REMEMBERED_PATH_LENGTH are remembered (a Route is immutable; a
    refusal raises and is not kept): clients ask the same few paths over and over, and matching
    costs a few regexes each time. Longer paths are matched every time, so at most ~2 MiB is kept."""
    if len(raw_path) <= REMEMBERED_PATH_LENGTH:
        return _remembered_route(raw_path)
    return _match_route(raw_path)


@functools.lru_cache(maxsize=4096)
def _remembered_route(raw_path: str) -> Route:
    return _match_route(raw_path)


def _match_route(raw_path: str) -> Route:
    for kind, pattern in _PATTERNS:
        match = pattern.fullmatch(raw_path)
        if match is None:
            continue
        if kind in (Kind.BASE, Kind.CATALOG, Kind.TOKEN):
            return Route(kind)
        name = match["name"]
        if len(name) > 2 * MAX_NAME_LENGTH:
            raise NameInvalid("repository name too long")
        if kind is Kind.MANIFEST:
            return Route(kind, name, reference=_manifest_reference(match["ref"]))
        if kind in (Kind.BLOB, Kind.REFERRERS):
            return Route(kind, name, digest=Digest.parse(match["ref"]))
        return Route(kind, name)
    raise errors.RouteUnknown("not a distribution API path")


def _manifest_reference(text: str) -> Reference | None:
    """A digest (malformed: DIGEST_INVALID), a tag, or None for what can be neither."""
    try:
        return parse_reference(text)
    except TagInvalid:
        return None

"""OCI distribution vocabulary: digests, repository names, tags and pages of tag lists, media types,
Accept sets, ranges.

Everything a request carries is parsed here into a validated value object before anything is opened or
fetched. The grammars are distribution's (reference/regexp.go) and the OCI distribution spec's.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from edgecache.errors import DigestInvalid, ManifestInvalid, NameInvalid, RangeInvalid, TagInvalid

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# Every manifest type we ask upstream for: we cache what upstream holds, whatever the client accepts.
MANIFEST_MEDIA_TYPES: tuple[str, ...] = (
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST,
)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

_ALGORITHMS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_NAME_LENGTH = 255
# Tags that hold an artifact about another manifest, not an image of their own: cosign's signature,
# attestation and SBOM tags (`sha256-<hex>.sig`) and the referrers API's tag-schema fallback.
ATTACHMENT_TAG = re.compile(r"(sha256-[0-9a-f]{64}|sha512-[0-9a-f]{128})(\.(sig|att|sbom))?")


def hex_pattern(algorithm: str) -> re.Pattern[str] | None:
    """What the encoded part of a digest of `algorithm` must match (None: not one we verify); for
    checking a million file names without a Digest each."""
    length = _ALGORITHMS.get(algorithm)
    return re.compile(rf"[0-9a-f]{{{length}}}") if length else None


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest `algorithm:hex` whose algorithm we can verify (sha256, sha512)."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        algorithm, sep, encoded = text.partition(":")
        length = _ALGORITHMS.get(algorithm)
        if not sep or length is None:
            raise DigestInvalid("unsupported digest algorithm" if sep else "malformed digest")
        if len(encoded) != length or not _HEX.fullmatch(encoded):
            raise DigestInvalid(f"malformed {algorithm} digest")
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    @classmethod
    async def of_async(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """Digest.of, in a worker thread unless the data is small enough to hash at once (a 4 MiB
        manifest is ~2 ms of CPU: not on the event loop)."""
        if len(data) <= INLINE_HASH_LIMIT:
            return cls.of(data, algorithm)
        return await asyncio.to_thread(cls.of, data, algorithm)

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


@dataclass(frozen=True, slots=True)
class RepoName:
    """A repository name in distribution's grammar (lowercase components separated by `/`)."""

    value: str

    @classmethod
    def parse(cls, text: str) -> RepoName:
        if len(text) > MAX_NAME_LENGTH:
            raise NameInvalid("repository name too long")
        if not _NAME.fullmatch(text):
            raise NameInvalid("repository name must match [a-z0-9]+([._-][a-z0-9]+)*(/...)*")
        return cls(text)

    def with_library_prefix(self) -> RepoName:
        """Docker Hub keeps official images under `library/`: `alpine` means `library/alpine`."""
        return self if "/" in self.value else RepoName(f"library/{self.value}")

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Tag:
    value: str

    @classmethod
    def parse(cls, text: str) -> Tag:
        if not _TAG.fullmatch(text):
            raise TagInvalid("tag must match [A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
        return cls(text)

    def __str__(self) -> str:
        return self.value


Reference = Tag | Digest
DOCKER_HUB = "docker.io"
# A registry as clients name it: host name labels and an optional port (docker.io, registry.corp:5000).
REGISTRY_HOST = re.compile(
    r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::\d{1,5})?"
)
INLINE_HASH_LIMIT = 64 * 1024


def split_image_name(name: str) -> tuple[str, str]:
    """(registry, repository) of an image name, the way docker reads it: a first component with a
    dot, a colon or `localhost` is a registry, anything else is on Docker Hub, where single-component
    names live under `library/`. The repository is not validated here."""
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return DOCKER_HUB, name if "/" in name else f"library/{name}"


def parse_reference(text: str) -> Reference:
    """A manifest reference is a digest when it has a colon, a tag otherwise (as distribution does)."""
    return Digest.parse(text) if ":" in text else Tag.parse(text)


@dataclass(frozen=True, slots=True)
class TagPage:
    """One page of a repository's tags; `more` when tags remain after it (a `Link` to the next page)."""

    tags: list[str]
    more: bool


def page_tags(tags: Iterable[str], n: int | None, last: str | None) -> TagPage:
    """The page the spec asks for: tags in lexical (byte) order, strictly after `last`, at most `n`;
    n=0 is an empty page with nothing more (the spec forbids a Link for it).

    Done here, not left to the upstream: some ignore n and last and list tags unsorted (distribution
    2.8 does). Tags outside the tag grammar are dropped: a page's last tag goes into a Link."""
    ordered = sorted({tag for tag in tags if _TAG.fullmatch(tag) and (last is None or tag > last)})
    if n is None:
        return TagPage(ordered, more=False)
    return TagPage(ordered[:n], more=0 < n < len(ordered))


def page_tag_list(body: bytes, n: int | None, last: str | None) -> TagPage:
    """`page_tags` of an upstream's tags/list body (at most MAX_MANIFEST_BYTES, read by the client).

    `"tags": null` is no tags (distribution's answer for a repository without any). Raises ValueError
    when the body is not a tag list."""
    doc = json.loads(body)
    tags = doc.get("tags") if isinstance(doc, dict) else None
    if tags is None and isinstance(doc, dict):
        tags = []
    if not isinstance(tags, list):
        raise ValueError("not a tag list")
    return page_tags((tag for tag in tags if isinstance(tag, str)), n, last)


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A single satisfiable byte range, both ends inclusive as in HTTP."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


_RANGE = re.compile(r"(\d{0,19})-(\d{0,19})")


def parse_range(headers: Sequence[str], size: int) -> ByteRange | None:
    """Every Range header of a request, against a body of `size` bytes: None for the whole body.

    One range is served (what registry clients send). Refused with RangeInvalid (416, with the size):
    more than one Range header, a `bytes` range that does not parse, and a range beyond the end.
    Served whole, as RFC 9110 says: a unit other than bytes, and several ranges in one header.
    """
    if not headers:
        return None
    if len(headers) > 1:
        raise RangeInvalid("only one Range header is accepted", size=size)
    unit, sep, spec = headers[0].strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = _RANGE.fullmatch(spec.strip())
    first, last = (match.group(1), match.group(2)) if match else ("", "")
    if (not first and not last) or (first and last and int(last) < int(first)):
        raise RangeInvalid("malformed byte range", size=size)
    if not first:  # suffix range: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeInvalid("empty suffix range", size=size)
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    if start >= size:
        raise RangeInvalid("range starts beyond the end of the blob", size=size)
    end = int(last) if last else size - 1
    return ByteRange(start, min(end, size - 1))


def accepted_media_types(headers: Iterable[str]) -> frozenset[str] | None:
    """The media types a client accepts, from every Accept header and comma list; None means any.

    Remembered for the last 256 header sets of up to 2 KiB (a client sends the same ones on every
    request)."""
    values = tuple(headers)
    if sum(len(value) for value in values) <= 2048:
        return _remembered_media_types(values)
    return _media_types(values)


@functools.lru_cache(maxsize=256)
def _remembered_media_types(headers: tuple[str, ...]) -> frozenset[str] | None:
    return _media_types(headers)


def _media_types(headers: tuple[str, ...]) -> frozenset[str] | None:
    types: set[str] = set()
    for header in headers:
        for item in header.split(","):
            media_type = item.split(";", 1)[0].strip().lower()
            if media_type:
                types.add(media_type)
    if not types or "*/*" in types:
        return None
    return frozenset(types)


# Content-Types that say nothing about which manifest this is: the body's own mediaType decides.
_GENERIC_TYPES = frozenset({"", "application/octet-stream", "text/plain", "application/json"})


def declared_media_type(declared: str | None) -> str | None:
    """The manifest type a Content-Type names, without parameters; None when it names none."""
    media_type = (declared or "").split(";", 1)[0].strip().lower()
    return None if media_type in _GENERIC_TYPES else media_type


def manifest_media_type(body: bytes, declared: str | None) -> str:
    """The media type to serve a manifest with, after checking the body agrees with the answer.

    The body must be a JSON object; when it names its own mediaType and the Content-Type names
    another, the answer contradicts itself (a proxy's error page, a mislabelled artifact) and is
    refused: such a manifest would be cached and served as what it is not. Without a usable
    Content-Type the body's mediaType decides, then its shape (an index has `manifests`).
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise ManifestInvalid("upstream manifest is not JSON") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid("upstream manifest is not a JSON object")
    own = doc.get("mediaType")
    own = own if isinstance(own, str) and own else None
    named = declared_media_type(declared)
    if named is not None and own is not None and named != own.lower():
        raise ManifestInvalid("upstream manifest's Content-Type contradicts its mediaType")
    if named is not None:
        return named
    if own is not None:
        return own
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST


async def manifest_media_type_async(body: bytes, declared: str | None) -> str:
    """manifest_media_type, parsing a large body in a worker thread, not on the event loop."""
    if len(body) <= INLINE_HASH_LIMIT:
        return manifest_media_type(body, declared)
    return await asyncio.to_thread(manifest_media_type, body, declared)


def referenced_digests(body: bytes) -> list[str]:
    """Digests a manifest or index points at: its config, layers, and child manifests.

    Unparseable bodies and malformed descriptors give nothing, never an error: this feeds membership
    and pins, which must not fail a pull that the client can still use."""
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    if not isinstance(doc, dict):
        return []
    found: list[str] = []
    descriptors = [doc.get("config"), *(doc.get("layers") or []), *(doc.get("manifests") or [])]
    for descriptor in descriptors:
        if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str):
            try:
                found.append(str(Digest.parse(descriptor["digest"])))
            except DigestInvalid:
                continue
    return found


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A blob or child manifest a manifest names, with its announced size (and, for an index's
    child, its platform as `os/architecture[/variant]`)."""

    digest: Digest
    size: int
    platform: str | None = None


@dataclass(frozen=True, slots=True)
class ManifestParts:
    """What a manifest points at: an image's config and layers (`blobs`), an index's `children`."""

    blobs: tuple[Descriptor, ...] = ()
    children: tuple[Descriptor, ...] = ()


def manifest_parts(body: bytes) -> ManifestParts:
    """The blobs (config first, then layers in order) and child manifests of a manifest.

    Malformed descriptors are left out and an unparseable body gives nothing, never an error: this
    feeds prefetch, which must never fail a pull. Foreign layers (with `urls`: Windows base layers)
    are not on the registry and are left out too."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return ManifestParts()
    if not isinstance(doc, dict):
        return ManifestParts()
    layers = doc.get("layers")
    manifests = doc.get("manifests")
    blobs = [doc.get("config"), *(layers if isinstance(layers, list) else [])]
    children = manifests if isinstance(manifests, list) else []
    return ManifestParts(
        tuple(d for d in map(_descriptor, blobs) if d is not None),
        tuple(d for d in map(_descriptor, children) if d is not None),
    )


async def manifest_parts_async(body: bytes) -> ManifestParts:
    """manifest_parts, parsing a large body in a worker thread, not on the event loop."""
    if len(body) <= INLINE_HASH_LIMIT:
        return manifest_parts(body)
    return await asyncio.to_thread(manifest_parts, body)


# Layer media types registries never hold (docker's foreign and OCI's nondistributable layers).
FOREIGN_LAYER_WORDS = ("nondistributable", "foreign")


def foreign_layer(item: dict[str, object]) -> bool:
    """A layer the registry does not serve (fetched from its `urls`: Windows base layers): nothing
    to prefetch, export or expect in a bundle."""
    media_type = str(item.get("mediaType", ""))
    return bool(item.get("urls")) or any(word in media_type for word in FOREIGN_LAYER_WORDS)


def _descriptor(item: object) -> Descriptor | None:
    if not isinstance(item, dict) or foreign_layer(item):
        return None
    digest, size = item.get("digest"), item.get("size")
    if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    try:
        parsed = Digest.parse(digest)
    except DigestInvalid:
        return None
    return Descriptor(parsed, size, _platform(item.get("platform")))


def _platform(item: object) -> str | None:
    if not isinstance(item, dict):
        return None
    parts = [item.get("os"), item.get("architecture"), item.get("variant")]
    if not all(isinstance(p, str) for p in parts[:2]):
        return None
    return "/".join(str(p) for p in parts if isinstance(p, str) and p)

"""The signature policy: which repositories' manifests must carry a sigstore/cosign signature by a
trusted key, and whether one does. Pure: no network, no store; key files are read when the policy is
built or reloaded (SIGHUP), like the htpasswd file.

A signature in the cosign "simple signing" format lives in the same repository as the image, in a
manifest tagged `sha256-<hex>.sig` (the signed manifest's digest, `:` made `-`). Each layer of it is a
small JSON payload:

    {"critical": {"identity": {"docker-reference": "registry.example/team/app:1.0"},
                  "image": {"docker-manifest-digest": "sha256:..."},
                  "type": "cosign container image signature"},
     "optional": {...}}

with the base64 signature of those exact bytes in the layer annotation
`dev.cosignproject.cosign/signature`. A payload vouches for a manifest when its signature verifies
with a trusted key, its digest is the manifest's, and its docker-reference names this repository.

The reference is compared on the repository only: the registry host is ignored (a mirror, or
edgecache itself, serves the image under other hosts than it was signed for, and skopeo writes the
host it pushed to) and so is the tag or digest part (the digest check is the one that binds). A
one-component Docker Hub name (`alpine`) is read as `library/alpine`, as docker does.

Keys: ECDSA (P-256, SHA-256; what cosign makes), RSA (PKCS#1 v1.5 with SHA-256, as cosign verifies)
and Ed25519 (over the payload bytes).
"""

from __future__ import annotations

import base64
import binascii
import enum
import fnmatch
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from edgecache.config import TrustConfig, TrustRule
from edgecache.errors import ConfigError, DigestInvalid
from edgecache.oci import Digest, RepoName, split_image_name
from edgecache.sizes import parse_size

SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIMPLE_SIGNING_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
# The tags cosign and skopeo attach to a manifest digest: signatures, attestations, SBOMs, and the
# referrers tag-schema fallback (`sha256-<hex>`). They are not themselves subject to the policy.
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


class Result(enum.StrEnum):
    """What the policy decided about one manifest: the closed label set of
    edgecache_trust_decisions_total{result}."""

    ACCEPTED = "accepted"  # no rule, or an accept rule: served without looking for a signature
    VERIFIED = "verified"  # a require rule, and a trusted signature vouches for it
    REJECTED = "rejected"  # a reject rule
    UNSIGNED = "unsigned"  # a require rule, and no signature manifest
    UNTRUSTED = "untrusted"  # signatures, but none by a trusted key that vouches for this digest here
    UNAVAILABLE = "unavailable"  # a require rule, and the signature could not be fetched


@dataclass(frozen=True)
class Rule:
    """One [[trust.rules]] entry with its keys loaded; `index` is its place in the file."""

    index: int
    pattern: str
    action: str
    keys: tuple[PublicKey, ...]

    @property
    def name(self) -> str:
        return f"trust.rules[{self.index}] ({self.pattern})"

    def refusal(self, result: Result) -> str:
        """The message a client sees (it names the rule, never a key or a path)."""
        if self.action == "reject":
            return f"{self.name} rejects this repository"
        if result is Result.UNAVAILABLE:
            return f"{self.name} requires a signature, and it cannot be fetched from upstream now"
        return f"{self.name} requires a signature by a trusted key"


def load_public_key(path: str, where: str) -> PublicKey:
    """A PEM public key (SubjectPublicKeyInfo) of a supported kind; ConfigError naming `where`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path} ({exc.strerror})") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ConfigError(f"{where}: {path} is not a PEM public key") from None
    if isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"{where}: {path} is an ECDSA key on {key.curve.name}; only P-256 is supported")
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise ConfigError(f"{where}: {path} is not an ECDSA P-256, RSA or Ed25519 public key")
    return key


def load_rules(rules: Sequence[TrustRule]) -> tuple[Rule, ...]:
    return tuple(
        Rule(
            i,
            rule.pattern,
            rule.action,
            tuple(load_public_key(path, f"trust.rules[{i}].keys") for path in rule.keys),
        )
        for i, rule in enumerate(rules)
    )


def verify_signature(key: PublicKey, payload: bytes, signature: bytes) -> bool:
    """Does `signature` over `payload` verify with `key` (cosign's choice of hash and padding)?"""
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.verify(signature, payload)
    except InvalidSignature:
        return False
    return True


def decode_signature(annotation: str) -> bytes | None:
    try:
        return base64.b64decode(annotation, validate=True)
    except (binascii.Error, ValueError):
        return None


def payload_mismatch(payload: bytes, digest: Digest, repo: RepoName) -> str | None:
    """Why a (verified) simple-signing payload does not vouch for `digest` in `repo`; None if it does."""
    try:
        document = json.loads(payload)
        critical = document["critical"]
        signed_digest = critical["image"]["docker-manifest-digest"]
        reference = critical["identity"]["docker-reference"]
    except (ValueError, KeyError, TypeError):
        return "the payload is not a simple-signing document"
    if not isinstance(signed_digest, str) or signed_digest != str(digest):
        return "the payload signs another manifest digest"
    if not isinstance(reference, str) or reference_repository(reference) != str(repo):
        return "the payload names another repository"
    return None


def reference_repository(reference: str) -> str:
    """The repository of a docker reference: without registry host, tag or digest, read the way
    docker reads an image name (`oci.split_image_name`).

    `registry.example:5000/team/app:1.0` → `team/app`; `registry.example:5000/app` → `app`;
    `docker.io/library/alpine@sha256:..` → `library/alpine`; `alpine` → `library/alpine`."""
    name = reference.partition("@")[0]
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name = name[:colon]
    return split_image_name(name)[1]


def signature_tag(digest: Digest) -> str:
    """`sha256-<hex>.sig`: where cosign and skopeo put a manifest's signatures."""
    return f"{digest.algorithm}-{digest.hex}.sig"


class TrustPolicy:
    """The rules, and the verdicts remembered for (digest, rule, repository).

    The repository is part of the key because a signature vouches for a digest in one repository:
    the same bytes verified under `acme/debug` are not thereby vouched for under `acme/prod`.

    Only verified verdicts are remembered: a refusal is decided again next time, so a signature pushed
    after a refused pull counts as soon as the signature tag's cache entry expires."""

    def __init__(self, config: TrustConfig) -> None:
        self._rules = load_rules(config.rules)
        self._verified: LRUCache[tuple[Digest, int, str], bool] = LRUCache(config.cache_size)
        self.max_signature_bytes = parse_size(config.max_signature_bytes, "trust.max_signature_bytes")

    @property
    def active(self) -> bool:
        return bool(self._rules)

    def rule_for(self, upstream: str, repo: RepoName) -> Rule | None:
        """The first rule whose pattern matches UPSTREAM/REPOSITORY (None: accepted by default)."""
        target = f"{upstream}/{repo}"
        return next((r for r in self._rules if fnmatch.fnmatchcase(target, r.pattern)), None)

    def remembered(self, digest: Digest, rule: Rule, target: str) -> bool:
        """Verified before for this rule and `target` (UPSTREAM/REPOSITORY)?"""
        return self._verified.get((digest, rule.index, target), False)

    def remember(self, digest: Digest, rule: Rule, target: str) -> None:
        self._verified[(digest, rule.index, target)] = True

    def vouches(
        self, rule: Rule, digest: Digest, repo: RepoName, payload: bytes, annotation: str
    ) -> str | None:
        """None when this payload and its signature vouch for `digest` in `repo` under `rule`; else
        why not (for the log)."""
        signature = decode_signature(annotation)
        if signature is None:
            return "the signature is not base64"
        if not any(verify_signature(key, payload, signature) for key in rule.keys):
            return "no trusted key verifies the signature"
        return payload_mismatch(payload, digest, repo)


def signature_layers(body: bytes) -> list[tuple[Digest, int, str]] | None:
    """(digest, size, signature annotation) of each simple-signing layer of a signature manifest;
    None when `body` is not a signature manifest (some layer is not a simple-signing payload)."""
    try:
        document = json.loads(body)
        layers = document["layers"]
        if not isinstance(layers, list) or not layers:
            return None
        found = []
        for layer in layers:
            if layer.get("mediaType") != SIMPLE_SIGNING_TYPE:
                return None
            annotation = (layer.get("annotations") or {}).get(SIGNATURE_ANNOTATION, "")
            size = layer.get("size")
            if not isinstance(annotation, str) or not isinstance(size, int):
                return None
            found.append((Digest.parse(str(layer["digest"])), size, annotation))
    except (ValueError, KeyError, TypeError, AttributeError, DigestInvalid):
        return None
    return found


def has_image_layers(body: bytes) -> bool:
    """Does this manifest carry filesystem layers (something a runtime would unpack and run)?

    Attachments (signatures, attestations, SBOMs) carry payloads of other types; an image tagged
    like an attachment (`sha256-<hex>.sig`) to slip past the policy carries tar layers. What does not
    parse counts as an image: the policy then applies."""
    try:
        layers = json.loads(body).get("layers") or []
        return any(
            "image.layer" in str(layer.get("mediaType")) or "image.rootfs" in str(layer.get("mediaType"))
            for layer in layers
        )
    except (ValueError, AttributeError, TypeError):
        return True


def index_children(body: bytes) -> list[Digest]:
    """The manifests an index lists (none for an image manifest or what does not parse)."""
    try:
        document = json.loads(body)
        entries = document.get("manifests") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            return []
        return [Digest.parse(str(entry["digest"])) for entry in entries]
    except (ValueError, KeyError, TypeError, DigestInvalid):
        return []

"""Content trust at the edge (issue 18): the pull use case's signature gate.

The policy (`access.trust`) says what a repository requires; this gate fetches what it needs to decide
(the `sha256-<hex>.sig` signature manifest and its payload blobs) through the pull service itself, so
they are fetched, verified against their digests, size-capped, cached and coalesced like any manifest
and blob, and a cached signature still verifies while the upstream is down.

Decisions, for a rule that requires a signature:
- An image manifest is served when a payload signed by a trusted key names its digest and repository.
- An index is served when it is signed itself (cosign signs the index; skopeo `copy --all` signs the
  index and each platform manifest). Its platform manifests are then covered by that signature (the
  signed index pins their digests) and are served without signatures of their own; a platform
  manifest asked for by digest before its index was verified needs its own signature.
- Signature manifests and other cosign attachments (`sha256-<hex>.sig`, `.att`, `.sbom`, and the
  referrers tag fallback `sha256-<hex>`) are not themselves subject to the policy: clients (cosign,
  podman) fetch them to verify for themselves. A manifest with image layers under such a tag is an
  image all the same, and checked.
- No signature manifest upstream: refused (403). Signatures, none valid: refused (403). The signature
  cannot be fetched (upstream down, 5xx, rate-limited): refused with 503 (fail closed, never an
  unverified serve).
Only verified verdicts are remembered (`TrustPolicy`), so a refusal never outlives the fix.
"""

from __future__ import annotations

import asyncio
import logging
import os

from edgecache import errors
from edgecache.access.trust import (
    Result,
    Rule,
    TrustPolicy,
    has_image_layers,
    index_children,
    signature_layers,
    signature_tag,
)
from edgecache.metrics import Metrics
from edgecache.oci import ATTACHMENT_TAG, Digest, Tag
from edgecache.pull import (
    BlobQuery,
    BytesBody,
    FileBody,
    ManifestAnswer,
    ManifestQuery,
    PullService,
    SpoolBody,
    Target,
)

log = logging.getLogger(__name__)
MAX_SIGNATURES = 16  # payloads looked at per signature manifest; more is not a signature, it is noise


class SignatureGate:
    """`pull.TrustGate` in service: one policy, the pull service to fetch signatures through."""

    def __init__(self, policy: TrustPolicy, pull: PullService, metrics: Metrics) -> None:
        self.policy = policy
        self._pull = pull
        self._metrics = metrics

    async def check(self, target: Target, query: ManifestQuery, answer: ManifestAnswer) -> None:
        policy = self.policy
        if not policy.active or _is_attachment(query, answer):
            return
        rule = policy.rule_for(target.upstream_name, target.repo)
        if rule is None or rule.action == "accept":
            self._count(Result.ACCEPTED)
            return
        if rule.action == "reject":
            self._refuse(target, answer.digest, rule, Result.REJECTED, "a reject rule")
        where = f"{target.upstream_name}/{target.repo}"
        if policy.remembered(answer.digest, rule, where):
            result, reason = Result.VERIFIED, ""
        else:
            result, reason = await self._verify(target, rule, answer.digest)
        if result is not Result.VERIFIED:
            self._refuse(target, answer.digest, rule, result, reason)
        policy.remember(answer.digest, rule, where)
        if answer.manifest is not None:
            for child in index_children(answer.manifest.body):
                policy.remember(child, rule, where)  # covered by the signed index that lists it
        self._count(Result.VERIFIED)

    async def _verify(self, target: Target, rule: Rule, digest: Digest) -> tuple[Result, str]:
        """Fetch the signature manifest and its payloads; VERIFIED once one vouches for `digest`."""
        signatures = ManifestQuery(Tag.parse(signature_tag(digest)), None, head=False)
        try:
            reply = await self._pull.signature_manifest(target, signatures)
        except (errors.NotFound, errors.UpstreamDenied):
            return Result.UNSIGNED, "no signature manifest upstream"
        except (errors.UpstreamError, errors.UpstreamRateLimited) as exc:
            return Result.UNAVAILABLE, f"signature manifest: {exc.message}"
        try:
            body = reply.body.data if isinstance(reply.body, BytesBody) else b""
        finally:
            reply.close()
        layers = signature_layers(body)
        if not layers:
            return Result.UNTRUSTED, "the signature manifest holds no simple-signing payload"
        unavailable = ""
        reasons = []
        for layer_digest, size, annotation in layers[:MAX_SIGNATURES]:
            if size > self.policy.max_signature_bytes:
                reasons.append("a payload over trust.max_signature_bytes")
                continue
            try:
                payload = await self._read_blob(target, layer_digest, size)
            except (errors.UpstreamError, errors.UpstreamRateLimited) as exc:
                unavailable = f"signature payload: {exc.message}"
                continue
            except (errors.NotFound, errors.UpstreamDenied):
                reasons.append("a payload missing upstream")
                continue
            why = self.policy.vouches(rule, digest, target.repo, payload, annotation)
            if why is None:
                return Result.VERIFIED, ""
            reasons.append(why)
        if unavailable:
            return Result.UNAVAILABLE, unavailable
        return Result.UNTRUSTED, "; ".join(sorted(set(reasons)))

    async def _read_blob(self, target: Target, digest: Digest, size: int) -> bytes:
        """A small blob's bytes, through the pull service (stored, or filled and verified first).

        A blob longer than its descriptor says is refused before it is read: a signature manifest
        naming a multi-GB layer's digest with a small size must not bring that layer into memory."""
        mismatch = errors.UpstreamDigestMismatch("signature payload does not match its descriptor")
        reply = await self._pull.blob(target, BlobQuery(digest, head=False))
        try:
            body = reply.body
            if isinstance(body, FileBody | SpoolBody) and body.length is not None and body.length != size:
                raise mismatch
            if isinstance(body, BytesBody):
                data = body.data
            elif isinstance(body, FileBody):
                data = await asyncio.to_thread(os.pread, body.blob.file.fileno(), body.length, body.offset)
            elif isinstance(body, SpoolBody) and body.cursor is None and body.flight.spool is not None:
                flight = body.flight
                while not flight.done:  # the whole payload, verified against its digest
                    if flight.error is not None:
                        raise flight.error
                    if flight.written > size:  # no length announced, and already too long
                        raise mismatch
                    await flight.wait_change()
                spool = flight.spool
                assert spool is not None
                data = await asyncio.to_thread(os.pread, spool.fd, flight.written, 0)
            else:
                raise errors.UpstreamUnavailable("the signature payload could not be stored")
        finally:
            reply.close()
        if len(data) != size or Digest.of(data, digest.algorithm) != digest:
            raise mismatch
        return data

    def _refuse(self, target: Target, digest: Digest, rule: Rule, result: Result, reason: str) -> None:
        self._count(result)
        log.warning(
            "trust: refused %s/%s@%s by %s: %s (%s)",
            target.upstream_name,
            target.repo,
            digest,
            rule.name,
            result.value,
            reason,
        )
        if result is Result.UNAVAILABLE:
            raise errors.SignatureUnavailable(rule.refusal(result))
        raise errors.SignatureRefused(rule.refusal(result))

    def _count(self, result: Result) -> None:
        self._metrics.trust_decisions.labels(result.value).inc()


def _is_attachment(query: ManifestQuery, answer: ManifestAnswer) -> bool:
    """A signature (or other cosign attachment) manifest: by its tag unless it carries image layers
    (an image tagged `sha256-<hex>.sig` is still an image), or by digest by its content. A HEAD by such
    a tag serves no content; whatever a client then fetches by digest is checked."""
    manifest = answer.manifest
    if isinstance(query.reference, Tag) and ATTACHMENT_TAG.fullmatch(str(query.reference)):
        return manifest is None or not has_image_layers(manifest.body)
    return manifest is not None and signature_layers(manifest.body) is not None

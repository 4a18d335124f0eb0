"""The signature policy, pure: rule matching, the payload checks, signature verification for each key
kind, reading signature manifests, and the [trust] config's validation. No sockets."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgecache.access.trust import (
    Result,
    TrustPolicy,
    has_image_layers,
    index_children,
    load_public_key,
    payload_mismatch,
    reference_repository,
    signature_layers,
    signature_tag,
)
from edgecache.config import TrustConfig, TrustRule, load_config
from edgecache.errors import ConfigError
from edgecache.metrics import TRUST_RESULTS
from edgecache.oci import ATTACHMENT_TAG, Digest, RepoName
from tests.support.cosign import SIMPLE_SIGNING, make_key_pair, sign_payload, simple_signing_payload

DIGEST = Digest.of(b"a manifest")
OTHER = Digest.of(b"another manifest")
REPO = RepoName.parse("library/alpine")
HERE = "docker.io/library/alpine"


def test_first_matching_rule_wins_and_nothing_matching_is_accepted(tmp_path: Path) -> None:
    keys = make_key_pair(tmp_path, "k")
    policy = TrustPolicy(
        TrustConfig(
            rules=(
                TrustRule("docker.io/library/alpine", "accept"),
                TrustRule("docker.io/library/*", "require", (str(keys.public_pem),)),
                TrustRule("*", "reject"),
            )
        )
    )
    alpine = policy.rule_for("docker.io", REPO)
    assert alpine is not None and alpine.action == "accept"
    busybox = policy.rule_for("docker.io", RepoName.parse("library/busybox"))
    assert busybox is not None and busybox.action == "require" and busybox.index == 1
    assert busybox.name == "trust.rules[1] (docker.io/library/*)"
    assert "trust.rules[1] (docker.io/library/*) requires a signature by a trusted key" in busybox.refusal(
        Result.UNSIGNED
    )
    # `*` spans slashes, as in access rules; the upstream is part of what is matched
    other = policy.rule_for("ghcr.io", RepoName.parse("owner/app/sub"))
    assert other is not None and other.action == "reject"
    assert TrustPolicy(TrustConfig()).rule_for("docker.io", REPO) is None


@pytest.mark.parametrize("kind", ["ecdsa", "rsa", "ed25519"])
def test_each_key_kind_verifies_its_own_signatures_and_no_other(tmp_path: Path, kind: str) -> None:
    mine, theirs = make_key_pair(tmp_path, "mine", kind), make_key_pair(tmp_path, "theirs", kind)
    policy = TrustPolicy(TrustConfig(rules=(TrustRule("*", "require", (str(mine.public_pem),)),)))
    rule = policy.rule_for("docker.io", REPO)
    assert rule is not None
    payload = simple_signing_payload(str(DIGEST), "docker.io/library/alpine:3.19")
    good = base64.b64encode(sign_payload(mine.key, payload)).decode()
    assert policy.vouches(rule, DIGEST, REPO, payload, good) is None
    by_other = base64.b64encode(sign_payload(theirs.key, payload)).decode()
    assert policy.vouches(rule, DIGEST, REPO, payload, by_other) == "no trusted key verifies the signature"
    # the signature covers the exact bytes: a payload changed after signing does not verify
    changed = payload.replace(b"3.19", b"3.20")
    assert policy.vouches(rule, DIGEST, REPO, changed, good) == "no trusted key verifies the signature"
    assert policy.vouches(rule, DIGEST, REPO, payload, "not base64!") == "the signature is not base64"


def test_a_verified_payload_must_name_this_digest_and_this_repository() -> None:
    def payload(digest: Digest, reference: str) -> bytes:
        return simple_signing_payload(str(digest), reference)

    assert payload_mismatch(payload(DIGEST, "docker.io/library/alpine"), DIGEST, REPO) is None
    assert "another manifest digest" in str(payload_mismatch(payload(OTHER, "alpine"), DIGEST, REPO))
    evil = payload(DIGEST, "docker.io/evil/alpine")
    assert "another repository" in str(payload_mismatch(evil, DIGEST, REPO))
    assert "not a simple-signing" in str(payload_mismatch(b"{}", DIGEST, REPO))
    assert "not a simple-signing" in str(payload_mismatch(b"\xff", DIGEST, REPO))


@pytest.mark.parametrize(
    ("reference", "repository"),
    [
        ("registry.example:5000/team/app:1.0", "team/app"),
        ("docker.io/library/alpine@sha256:" + "a" * 64, "library/alpine"),
        ("index.docker.io/library/alpine", "library/alpine"),
        ("alpine", "library/alpine"),
        ("alpine:3.19", "library/alpine"),
        ("localhost/team/app", "team/app"),
        ("team/app:latest", "team/app"),  # no host: the first component is a namespace
        ("127.0.0.1:5000/a/b/c", "a/b/c"),
        ("registry.example:5000/app:1.0", "app"),  # library/ is Docker Hub's, no other registry's
        ("ghcr.io/app@sha256:" + "b" * 64, "app"),
    ],
)
def test_the_reference_is_compared_on_its_repository(reference: str, repository: str) -> None:
    assert reference_repository(reference) == repository


def test_signature_manifests_and_attachment_tags_are_recognised() -> None:
    assert signature_tag(DIGEST) == f"sha256-{DIGEST.hex}.sig"
    assert ATTACHMENT_TAG.fullmatch(signature_tag(DIGEST))
    assert ATTACHMENT_TAG.fullmatch(f"sha256-{DIGEST.hex}")  # the referrers tag-schema fallback
    assert not ATTACHMENT_TAG.fullmatch("latest")
    layer = {
        "mediaType": SIMPLE_SIGNING,
        "size": 10,
        "digest": str(OTHER),
        "annotations": {"dev.cosignproject.cosign/signature": "c2ln"},
    }
    body = json.dumps({"schemaVersion": 2, "layers": [layer]}).encode()
    assert signature_layers(body) == [(OTHER, 10, "c2ln")]
    image = json.dumps({"layers": [{**layer, "mediaType": "application/vnd.oci.image.layer.v1.tar"}]})
    assert signature_layers(image.encode()) is None
    assert signature_layers(b"[]") is None
    index = json.dumps({"manifests": [{"digest": str(DIGEST)}, {"digest": str(OTHER)}]}).encode()
    assert index_children(index) == [DIGEST, OTHER]
    assert index_children(body) == []


def test_verdicts_are_remembered_per_rule_and_repository_and_forgotten_on_reload(tmp_path: Path) -> None:
    keys = make_key_pair(tmp_path, "k")
    config = TrustConfig(rules=(TrustRule("*", "require", (str(keys.public_pem),)),), cache_size=2)
    policy = TrustPolicy(config)
    rule = policy.rule_for("docker.io", REPO)
    assert rule is not None
    policy.remember(DIGEST, rule, HERE)
    assert policy.remembered(DIGEST, rule, HERE)
    assert not policy.remembered(OTHER, rule, HERE)
    assert not policy.remembered(DIGEST, rule, "docker.io/library/other")  # vouched for in one repository
    for i in range(3):  # bounded: the oldest goes
        policy.remember(Digest.of(str(i).encode()), rule, HERE)
    assert not policy.remembered(DIGEST, rule, HERE)


def test_results_are_the_metric_label_set() -> None:
    assert tuple(r.value for r in Result) == TRUST_RESULTS


def test_trust_config_is_parsed_and_checked(tmp_path: Path) -> None:
    keys = make_key_pair(tmp_path, "k")

    def load(text: str) -> TrustConfig:
        path = tmp_path / "edgecache.toml"
        path.write_text(text)
        return load_config(str(path), env={}).trust

    trust = load(
        f"""
[trust]
cache_size = 100
[[trust.rules]]
pattern = "docker.io/library/*"
action = "require"
keys = ["{keys.public_pem}"]
[[trust.rules]]
pattern = "*"
action = "accept"
"""
    )
    assert trust.cache_size == 100
    assert trust.rules == (
        TrustRule("docker.io/library/*", "require", (str(keys.public_pem),)),
        TrustRule("*", "accept"),
    )
    bad = {
        'pattern = "*"\naction = "maybe"': "trust.rules[0].action",
        'pattern = "*"\naction = "require"': "trust.rules[0].keys",
        f'pattern = "*"\naction = "accept"\nkeys = ["{keys.public_pem}"]': "trust.rules[0].keys",
        'action = "accept"': "trust.rules[0].pattern",
        'pattern = "*"\naction = "accept"\ncolour = "red"': "trust.rules[0].colour",
    }
    for rule, named in bad.items():
        with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
            load(f"[[trust.rules]]\n{rule}\n")


def test_keys_that_cannot_be_used_are_refused_naming_the_rule(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a key")
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    (tmp_path / "p384.pem").write_bytes(
        p384.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    refusals = (("junk.pem", "not a PEM public key"), ("p384.pem", "only P-256"), ("gone.pem", "read"))
    for name, says in refusals:
        with pytest.raises(ConfigError, match=says):
            load_public_key(str(tmp_path / name), "trust.rules[0].keys")
    with pytest.raises(ConfigError, match=r"trust.rules\[0\].keys"):
        TrustPolicy(TrustConfig(rules=(TrustRule("*", "require", (str(tmp_path / "junk.pem"),)),)))


def test_image_layers_tell_an_image_from_an_attachment() -> None:
    image = {"layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}]}
    docker = {"layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip"}]}
    signature = {"layers": [{"mediaType": SIMPLE_SIGNING}]}
    attestation = {"layers": [{"mediaType": "application/vnd.dsse.envelope.v1+json"}]}
    assert has_image_layers(json.dumps(image).encode())
    assert has_image_layers(json.dumps(docker).encode())
    assert not has_image_layers(json.dumps(signature).encode())
    assert not has_image_layers(json.dumps(attestation).encode())
    assert not has_image_layers(json.dumps({"manifests": []}).encode())  # an index: its children are checked
    assert has_image_layers(b"not json")

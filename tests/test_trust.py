"""Content trust at the edge (issue 18): a real edgecache in front of the real origin registry, with
[[trust.rules]] requiring cosign signatures for `docker.io/trust/*` and rejecting `docker.io/banned/*`.

How the signatures are made: Debian's skopeo 1.9 has `--sign-by-sigstore-private-key`, but its
sigstore support is patched out ("creating signature: Debian-local change: sigstore disabled"), and
neither cosign nor a sigstore-enabled podman is packaged. So the key pairs are made with
`cryptography` in cosign's encrypted format (tests/support/cosign.py, the format skopeo and cosign
read), and each signature is written the way containers/image and cosign write them: the
simple-signing payload and a config pushed as blobs, an OCI manifest listing the payload with the
base64 signature in `dev.cosignproject.cosign/signature`, tagged `sha256-<hex>.sig`, all through the
origin's real push API. Upstream work is counted in the origin's access log.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from edgecache.config import Config, TrustConfig, TrustRule
from edgecache.errors import ConfigError
from edgecache.ops import warm
from tests.conftest import Edge, Seeded, edge_config, running_edge, spawn_edge
from tests.support.clients import ClientError, Containerd, Dockerd, require_clients, require_root
from tests.support.cosign import KeyPair, make_key_pair, sign_image
from tests.support.faults import FaultProxy
from tests.support.images import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Blob,
    Image,
    Index,
    Pusher,
    build_image,
    build_index,
)
from tests.support.registry import Registry
from tests.support.waiting import wait_until

ACCEPT = {
    "Accept": ", ".join(
        [
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json",
        ]
    )
}
REQUIRE_MESSAGE = "trust.rules[0] (docker.io/trust/*) requires a signature by a trusted key"


@dataclass
class Signed:
    keys: KeyPair  # the trusted key
    other: KeyPair  # a key nobody trusts
    signed: Image
    unsigned: Image
    other_key: Image
    wrong_digest: Image
    wrong_repo: Image
    moved: Image
    multi: Index
    unsigned_multi: Index
    banned: Image
    signature: Blob  # the signature manifest of `signed`


@pytest.fixture(scope="module")
def signed(origin: Registry, tmp_path_factory: pytest.TempPathFactory) -> Signed:
    keys_dir = tmp_path_factory.mktemp("keys")
    keys, other = make_key_pair(keys_dir, "trusted"), make_key_pair(keys_dir, "other")
    pusher = Pusher(origin.url)
    images = {
        name: build_image(f"trust-{name}") for name in ("signed", "unsigned", "other", "digest", "repo")
    }
    images["moved"] = build_image("trust-moved")
    images["banned"] = build_image("trust-banned")
    for name, image in images.items():
        pusher.push_image("banned/app" if name == "banned" else f"trust/{name}", "1", image)

    def sign(repo: str, image_digest: str, key: KeyPair = keys, **tamper: str) -> Blob:
        return sign_image(
            pusher, repo, image_digest, key.key, reference=f"registry.test:5000/{repo}:1", **tamper
        )

    signature = sign("trust/signed", images["signed"].manifest.digest)
    sign("trust/other", images["other"].manifest.digest, other)
    sign("trust/digest", images["digest"].manifest.digest, signed_digest=images["signed"].manifest.digest)
    # a valid signature of this very digest, for another repository
    sign_image(
        pusher, "trust/repo", images["repo"].manifest.digest, keys.key, reference="evil.test/trust/other"
    )
    sign("trust/moved", images["moved"].manifest.digest)
    multi, unsigned_multi = build_index("trust-multi"), build_index("trust-unsigned-multi")
    pusher.push_index("trust/multi", "v1", multi)
    sign("trust/multi", multi.manifest.digest)  # the index only, as cosign signs by default
    pusher.push_index("trust/unsigned-multi", "v1", unsigned_multi)
    return Signed(
        keys,
        other,
        images["signed"],
        images["unsigned"],
        images["other"],
        images["digest"],
        images["repo"],
        images["moved"],
        multi,
        unsigned_multi,
        images["banned"],
        signature,
    )


def trust_config(base: Config, signed: Signed) -> Config:
    rules = (
        TrustRule("docker.io/trust/*", "require", (str(signed.keys.public_pem),)),
        TrustRule("docker.io/banned/*", "reject"),
    )
    return dataclasses.replace(base, trust=TrustConfig(rules=rules))


@pytest.fixture
async def trusted_edge(
    tmp_path: Path, origin: Registry, seeded: Seeded, signed: Signed
) -> AsyncIterator[Edge]:
    # Prefetch on (the default in service): a refused manifest must not have its blobs prefetched.
    config = trust_config(edge_config(tmp_path / "cache", origin.url, prefetch=True, tag_ttl=0.0), signed)
    async with running_edge(config) as running:
        yield running


async def get(edge: Edge, path: str, method: str = "GET") -> tuple[int, dict[str, object], bytes]:
    async with edge.http.request(method, path, headers=ACCEPT) as resp:
        body = await resp.read()
        document = json.loads(body) if body and resp.content_type == "application/json" else {}
        return resp.status, document, body


def refusal(document: dict[str, object]) -> tuple[str, str]:
    """(code, message) of an OCI error; the signature policy's message is its detail, naming the rule."""
    error = document["errors"][0]  # type: ignore[index]
    assert error["message"] == error["detail"]
    return error["code"], error["message"]


def blob_gets(origin: Registry, image: Image) -> int:
    return sum(origin.count("GET", f"/blobs/{blob.digest}") for blob in image.blobs)


async def test_a_signed_image_is_served_by_tag_and_digest_with_head_too(
    trusted_edge: Edge, signed: Signed
) -> None:
    image = signed.signed
    for method in ("HEAD", "GET"):
        for reference in ("1", image.manifest.digest):
            status, _, body = await get(trusted_edge, f"/v2/trust/signed/manifests/{reference}", method)
            assert status == 200, (method, reference)
            if method == "GET":
                assert body == image.manifest.data
    status, _, body = await get(trusted_edge, f"/v2/trust/signed/blobs/{image.layers[0].digest}")
    assert (status, body) == (200, image.layers[0].data)
    assert await trusted_edge.metric("edgecache_trust_decisions_total", result="verified") >= 4
    # the signature itself is served like any tag (cosign and podman fetch it to verify themselves)
    sig_tag = image.manifest.digest.replace(":", "-") + ".sig"
    status, _, body = await get(trusted_edge, f"/v2/trust/signed/manifests/{sig_tag}")
    assert status == 200 and b"dev.cosignproject.cosign/signature" in body
    # a repository no rule names is accepted without looking for a signature
    status, _, _ = await get(trusted_edge, "/v2/library/alpine/manifests/latest")
    assert status == 200
    assert await trusted_edge.metric("edgecache_trust_decisions_total", result="accepted") >= 1


async def test_checking_a_signature_is_not_a_pull_so_nothing_is_prefetched_for_it(
    trusted_edge: Edge, signed: Signed
) -> None:
    """The policy reads the signature manifest and its payload to decide on an image. Those reads
    are not a client's pull: no prefetch starts for the payload (which the check's own read would
    then count as a prefetch used), however the image itself is asked for."""
    status, _, _ = await get(trusted_edge, "/v2/trust/signed/manifests/1", "HEAD")
    assert status == 200
    assert await trusted_edge.metric("edgecache_trust_decisions_total", result="verified") == 1
    assert await trusted_edge.metric("edgecache_prefetch_started_total", upstream="docker.io") == 0
    assert await trusted_edge.metric("edgecache_prefetch_used_total", upstream="docker.io") == 0
    # A client's GET of the image still prefetches its blobs (the manifest is verified and served).
    status, _, _ = await get(trusted_edge, "/v2/trust/signed/manifests/1")
    assert status == 200
    await wait_until(
        lambda: trusted_edge.metric("edgecache_prefetch_started_total", upstream="docker.io"),
        message="the image's blobs were not prefetched",
    )


@pytest.mark.parametrize(
    ("repo", "attribute", "result"),
    [
        ("trust/unsigned", "unsigned", "unsigned"),
        ("trust/other", "other_key", "untrusted"),  # signed, by a key nobody trusts
        ("trust/digest", "wrong_digest", "untrusted"),  # a trusted payload naming another digest
        ("trust/repo", "wrong_repo", "untrusted"),  # a trusted payload naming another repository
    ],
)
async def test_a_manifest_without_a_trusted_signature_is_refused_naming_the_rule(
    trusted_edge: Edge, origin: Registry, signed: Signed, repo: str, attribute: str, result: str
) -> None:
    image: Image = getattr(signed, attribute)
    for reference in ("1", image.manifest.digest):
        status, document, _ = await get(trusted_edge, f"/v2/{repo}/manifests/{reference}")
        assert status == 403, reference
        assert refusal(document) == ("DENIED", REQUIRE_MESSAGE)
        status, _, body = await get(trusted_edge, f"/v2/{repo}/manifests/{reference}", "HEAD")
        assert (status, body) == (403, b"")
    assert await trusted_edge.metric("edgecache_trust_decisions_total", result=result) == 4
    # nothing of the refused image was fetched because of it (no prefetch, no fill)
    assert blob_gets(origin, image) == 0


async def test_a_digest_verified_in_one_repository_is_not_thereby_trusted_in_another(
    trusted_edge: Edge, origin: Registry, signed: Signed
) -> None:
    Pusher(origin.url).push_image("trust/copy", "1", signed.signed)  # the same bytes, unsigned there
    digest = signed.signed.manifest.digest
    status, _, _ = await get(trusted_edge, f"/v2/trust/signed/manifests/{digest}")
    assert status == 200
    status, document, _ = await get(trusted_edge, f"/v2/trust/copy/manifests/{digest}")
    assert status == 403 and refusal(document) == ("DENIED", REQUIRE_MESSAGE)


async def test_an_image_tagged_like_a_signature_is_still_checked(
    trusted_edge: Edge, origin: Registry, signed: Signed
) -> None:
    image = signed.unsigned
    disguise = "sha256-" + "e" * 64 + ".sig"
    Pusher(origin.url).push_manifest("trust/unsigned", disguise, image.manifest)
    status, document, _ = await get(trusted_edge, f"/v2/trust/unsigned/manifests/{disguise}")
    assert status == 403 and refusal(document) == ("DENIED", REQUIRE_MESSAGE)
    assert blob_gets(origin, image) == 0


async def test_a_reject_rule_refuses_without_asking_for_signatures(
    trusted_edge: Edge, origin: Registry, signed: Signed
) -> None:
    status, document, _ = await get(trusted_edge, "/v2/banned/app/manifests/1")
    assert status == 403
    assert refusal(document) == ("DENIED", "trust.rules[1] (docker.io/banned/*) rejects this repository")
    assert origin.count("GET", "/v2/banned/app/manifests/sha256-") == 0
    assert await trusted_edge.metric("edgecache_trust_decisions_total", result="rejected") == 1


async def test_a_signed_tag_moved_to_an_unsigned_digest_is_refused(
    trusted_edge: Edge, origin: Registry, signed: Signed
) -> None:
    status, _, body = await get(trusted_edge, "/v2/trust/moved/manifests/1")
    assert (status, body) == (200, signed.moved.manifest.data)
    unsigned = build_image("trust-moved-unsigned")
    Pusher(origin.url).push_image("trust/moved", "1", unsigned)  # tag_ttl 0: revalidated at once
    try:
        status, document, _ = await get(trusted_edge, "/v2/trust/moved/manifests/1")
        assert status == 403 and refusal(document) == ("DENIED", REQUIRE_MESSAGE)
        assert blob_gets(origin, unsigned) == 0
    finally:
        Pusher(origin.url).push_image("trust/moved", "1", signed.moved)


async def test_a_signed_index_covers_its_platform_manifests_and_an_unsigned_one_is_refused(
    trusted_edge: Edge, signed: Signed
) -> None:
    status, _, body = await get(trusted_edge, "/v2/trust/multi/manifests/v1")
    assert (status, body) == (200, signed.multi.manifest.data)
    for image in signed.multi.images:  # not signed themselves: the signed index lists their digests
        status, _, body = await get(trusted_edge, f"/v2/trust/multi/manifests/{image.manifest.digest}")
        assert (status, body) == (200, image.manifest.data)
    status, document, _ = await get(trusted_edge, "/v2/trust/unsigned-multi/manifests/v1")
    assert status == 403 and refusal(document) == ("DENIED", REQUIRE_MESSAGE)
    child = signed.unsigned_multi.images[0].manifest.digest
    status, _, _ = await get(trusted_edge, f"/v2/trust/unsigned-multi/manifests/{child}")
    assert status == 403


async def test_a_signature_that_cannot_be_fetched_fails_closed_with_503(
    tmp_path: Path, origin: Registry, seeded: Seeded, signed: Signed
) -> None:
    proxy = await FaultProxy(origin.url).start()
    try:
        config = trust_config(edge_config(tmp_path / "cache", proxy.url), signed)
        async with running_edge(config) as edge:
            proxy.rules.status[".sig"] = 503  # the image is there; its signature fails upstream
            digest = signed.signed.manifest.digest
            status, document, _ = await get(edge, f"/v2/trust/signed/manifests/{digest}")
            assert status == 503
            code, detail = refusal(document)
            assert code == "UNAVAILABLE"
            assert detail == (
                "trust.rules[0] (docker.io/trust/*) requires a signature, and it cannot be fetched "
                "from upstream now"
            )
            # the upstream down altogether: the manifest is in the cache now, and still not served
            await proxy.stop()
            status, document, _ = await get(edge, f"/v2/trust/signed/manifests/{digest}")
            assert status == 503 and refusal(document)[0] == "UNAVAILABLE"
            assert await edge.metric("edgecache_trust_decisions_total", result="unavailable") == 2
            assert proxy.count("GET", f"/blobs/{signed.signed.layers[0].digest}") == 0
            # back up, signature readable: served
            proxy.rules.status.clear()
            await proxy.start(port=int(proxy.url.rsplit(":", 1)[1]))
            status, _, body = await get(edge, f"/v2/trust/signed/manifests/{digest}")
            assert (status, body) == (200, signed.signed.manifest.data)
    finally:
        await proxy.stop()


async def test_a_watched_tag_moved_to_an_unsigned_image_is_not_prefetched(
    tmp_path: Path, origin: Registry, signed: Signed
) -> None:
    pusher = Pusher(origin.url)
    pusher.push_image("trust/watched", "1", signed.signed)
    sign_image(
        pusher, "trust/watched", signed.signed.manifest.digest, signed.keys.key,
        reference="registry.test:5000/trust/watched:1",
    )  # fmt: skip
    base = edge_config(tmp_path / "cache", origin.url, prefetch=True, tag_ttl=1.0)
    async with running_edge(trust_config(base, signed)) as edge:
        status, _, _ = await get(edge, "/v2/trust/watched/manifests/1")
        assert status == 200
        await edge.instance.flights.settled()
        started = await edge.metric("edgecache_prefetch_started_total", upstream="docker.io")
        unsigned = build_image("trust-watched-unsigned")
        pusher.push_image("trust/watched", "1", unsigned)  # the tag moves to an unsigned image
        # The background watch sees the move, asks the policy first, and is refused: nothing of
        # the unsigned image is prefetched.
        await wait_until(
            lambda: edge.metric("edgecache_prefetch_tags_moved_total", upstream="docker.io"),
        )
        await wait_until(lambda: edge.metric("edgecache_trust_decisions_total", result="unsigned"))
        await edge.instance.front.pull.settled()
        await edge.instance.flights.settled()
        assert blob_gets(origin, unsigned) == 0
        assert await edge.metric("edgecache_prefetch_started_total", upstream="docker.io") == started


async def test_reload_rereads_the_keys_and_forgets_verdicts(trusted_edge: Edge, signed: Signed) -> None:
    status, _, _ = await get(trusted_edge, "/v2/trust/signed/manifests/1")
    assert status == 200
    other_key = dataclasses.replace(
        trusted_edge.instance.config,
        trust=TrustConfig(
            rules=(TrustRule("docker.io/trust/*", "require", (str(signed.other.public_pem),)),)
        ),
    )
    trusted_edge.instance.apply(other_key)
    status, document, _ = await get(trusted_edge, "/v2/trust/signed/manifests/1")
    assert status == 403 and refusal(document) == ("DENIED", REQUIRE_MESSAGE)
    status, _, _ = await get(trusted_edge, "/v2/trust/other/manifests/1")  # signed by that key
    assert status == 200


async def test_a_reload_refused_for_its_access_settings_leaves_the_trust_rules_too(
    trusted_edge: Edge, signed: Signed, tmp_path: Path
) -> None:
    config = trusted_edge.instance.config
    broken = dataclasses.replace(
        config,
        trust=TrustConfig(rules=(TrustRule("docker.io/trust/*", "reject"),)),
        access=dataclasses.replace(config.access, token=True, token_key=str(tmp_path / "missing.pem")),
    )
    with pytest.raises(ConfigError):
        trusted_edge.instance.apply(broken)
    status, _, _ = await get(trusted_edge, "/v2/trust/signed/manifests/1")  # the old rules still hold
    assert status == 200


async def test_warm_reports_a_refused_image_and_caches_none_of_its_blobs(
    trusted_edge: Edge, origin: Registry, signed: Signed
) -> None:
    refs = [warm.parse_ref("docker.io/trust/signed:1"), warm.parse_ref("docker.io/trust/unsigned:1")]
    summary = await warm.run(
        refs, url=trusted_edge.url, config=trusted_edge.instance.config, platforms=["all"], concurrency=2
    )
    assert summary.images == 1
    assert len(summary.failures) == 1
    assert summary.failed == {"docker.io/trust/unsigned:1"}
    assert "trust/unsigned" in summary.failures[0] and "403" in summary.failures[0]
    assert blob_gets(origin, signed.unsigned) == 0
    cached = trusted_edge.cached_files()
    assert not any(blob.digest.split(":")[1] in path for blob in signed.unsigned.blobs for path in cached)


def test_warm_pin_with_the_policy_pins_only_what_it_could_warm(
    tmp_path: Path, origin: Registry, seeded: Seeded, signed: Signed
) -> None:
    cache = tmp_path / "cache"
    config = tmp_path / "edgecache.toml"
    config.write_text(
        f"""
[cache]
dir = "{cache}"

[[upstream]]
name = "docker.io"
url = "{origin.url}"

[[trust.rules]]
pattern = "docker.io/trust/*"
action = "require"
keys = ["{signed.keys.public_pem}"]
"""
    )
    refs = ["docker.io/trust/signed:1", "docker.io/trust/unsigned:1"]
    warmed = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgecache",
            "warm",
            "--config",
            str(config),
            "--pin",
            "--platform",
            "all",
            *refs,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert warmed.returncode == 1, warmed.stderr  # one image refused
    assert "warmed 1/2 images" in warmed.stdout
    assert "docker.io/trust/unsigned:1: manifest 1: HTTP 403" in warmed.stderr
    assert REQUIRE_MESSAGE in warmed.stderr
    assert "docker.io/trust/unsigned:1 not pinned: it was not warmed" in warmed.stderr
    pins = subprocess.run(
        [sys.executable, "-m", "edgecache", "pin", "ls", "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert pins.stdout.split() == ["docker.io/trust/signed:1"]
    assert blob_gets(origin, signed.unsigned) == 0


SIG_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM_TYPE = "application/spdx+json"


async def test_referrers_come_from_the_tag_schema_fallback_filtered_and_cached(
    tmp_path: Path, origin: Registry, seeded: Seeded, signed: Signed
) -> None:
    subject = signed.signed.manifest.digest
    pusher = Pusher(origin.url)
    # the registry checks that an index's manifests exist: the signature, and the image standing in
    # for an SBOM
    signature = {
        "mediaType": OCI_MANIFEST,
        "size": len(signed.signature.data),
        "digest": signed.signature.digest,
    }
    sbom = {"mediaType": DOCKER_MANIFEST, "size": len(signed.signed.manifest.data), "digest": subject}
    fallback = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{**signature, "artifactType": SIG_TYPE}, {**sbom, "artifactType": SBOM_TYPE}],
    }
    pusher.push_manifest(
        "trust/signed", subject.replace(":", "-"), Blob(json.dumps(fallback).encode(), OCI_INDEX)
    )
    config = trust_config(edge_config(tmp_path / "cache", origin.url, tag_ttl=0.0), signed)
    async with running_edge(config) as edge:
        before = origin.count("GET", f"/v2/trust/signed/referrers/{subject}")
        async with edge.http.get(f"/v2/trust/signed/referrers/{subject}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == OCI_INDEX
            assert "OCI-Filters-Applied" not in resp.headers
            listing = await resp.json(content_type=None)
        assert [m["artifactType"] for m in listing["manifests"]] == [SIG_TYPE, SBOM_TYPE]
        async with edge.http.get(
            f"/v2/trust/signed/referrers/{subject}", params={"artifactType": SBOM_TYPE}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["OCI-Filters-Applied"] == "artifactType"
            listing = await resp.json(content_type=None)
        assert [m["artifactType"] for m in listing["manifests"]] == [SBOM_TYPE]
        # the listing is kept (cache.referrers_ttl): asked again, upstream is not
        asked = origin.count("GET", f"/v2/trust/signed/referrers/{subject}")
        assert asked == before + 2  # one per artifactType
        async with edge.http.get(f"/v2/trust/signed/referrers/{subject}") as resp:
            assert resp.status == 200 and resp.headers["X-Cache"] == "HIT"
        assert origin.count("GET", f"/v2/trust/signed/referrers/{subject}") == asked


@pytest.mark.clients
def test_dockerd_is_refused_an_unsigned_image_and_pulls_a_signed_one(
    tmp_path: Path, origin: Registry, seeded: Seeded, signed: Signed
) -> None:
    """The real client: dockerd (vfs, its own containerd) pulls a signed image through a
    policy-enforcing `edgecache serve`, and is refused an unsigned one with the rule in its error."""
    require_root()
    require_clients()
    config = f"""
[[trust.rules]]
pattern = "docker.io/trust/*"
action = "require"
keys = ["{signed.keys.public_pem}"]
"""
    with (
        spawn_edge(tmp_path, origin.url, config=config) as edge,
        Containerd() as containerd,
        Dockerd(registry_mirrors=[edge.url], containerd=containerd) as dockerd,
    ):
        host = edge.url.removeprefix("http://")  # loopback: dockerd speaks plain HTTP to it
        dockerd.pull(f"{host}/trust/signed:1")
        assert dockerd.image_id(f"{host}/trust/signed:1") == signed.signed.config.digest
        with pytest.raises(ClientError) as refused:
            dockerd.pull(f"{host}/trust/unsigned:1")
        assert REQUIRE_MESSAGE in str(refused.value)
        # Through registry-mirrors, dockerd is refused the same way, logs it, and then falls back to
        # Docker Hub (out of reach here): a mirror's policy binds dockerd only where Hub is not
        # reachable from the nodes (the README says so).
        with pytest.raises(ClientError):
            dockerd.pull("trust/unsigned:1")
        assert f"after error: denied: {REQUIRE_MESSAGE}" in dockerd.log_path.read_text()
        assert blob_gets(origin, signed.unsigned) == 0


async def test_sighup_rereads_the_key_files_of_a_running_server(
    tmp_path: Path, origin: Registry, seeded: Seeded, signed: Signed
) -> None:
    key_file = tmp_path / "trusted.pub"
    key_file.write_bytes(signed.keys.public_pem.read_bytes())
    config = f"""
[[trust.rules]]
pattern = "docker.io/trust/*"
action = "require"
keys = ["{key_file}"]
"""
    with spawn_edge(tmp_path, origin.url, config=config) as edge:
        async with aiohttp.ClientSession(edge.url, headers=ACCEPT) as http:

            async def status_of(repo: str) -> int:
                async with http.get(f"/v2/{repo}/manifests/1") as resp:
                    return resp.status

            assert await status_of("trust/signed") == 200
            assert await status_of("trust/other") == 403
            key_file.write_bytes(signed.other.public_pem.read_bytes())  # the same path, another key
            edge.proc.send_signal(signal.SIGHUP)

            async def swapped() -> bool:
                return await status_of("trust/other") == 200

            await wait_until(swapped, message="the reloaded key was not used")
            assert await status_of("trust/signed") == 403  # its verdict was forgotten with the old key
            # a key file that cannot be read refuses the reload and keeps the rules in force
            key_file.write_text("not a key")
            edge.proc.send_signal(signal.SIGHUP)
            await wait_until(
                lambda: "reload refused" in edge.log_path.read_text(), message="the bad key was not refused"
            )
            assert await status_of("trust/other") == 200

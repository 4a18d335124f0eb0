"""The shared tier's decisions against an in-memory bucket (obstore's MemoryStore, through the same
Bucket code) and an in-memory upstream: a verified hit feeds the fill, a corrupt object is deleted
and the upstream asked within the same fill, uploads go up once, are skipped when the bucket already
holds them, when the queue is full or the tier down; the tier goes down and skips itself. No
sockets; a real store in a temporary directory."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import obstore
import pytest
from obstore.store import MemoryStore

from edgecache import errors
from edgecache.config import Config, SharedConfig, load_config
from edgecache.errors import ConfigError
from edgecache.fill.coalesce import Coalescer
from edgecache.fill.flights import Flights
from edgecache.metrics import Metrics
from edgecache.oci import Digest, RepoName
from edgecache.pull import BlobQuery, PullService, Target
from edgecache.shared.bucket import Bucket, TierError, blob_key, load_credentials, start_up_refusal
from edgecache.shared.tier import SharedTier
from edgecache.store.blobs import BlobStore
from edgecache.store.keeper import CacheKeeper
from edgecache.store.manifests import ManifestCache
from edgecache.store.membership import Membership
from tests.support.clock import Clock
from tests.support.memory_upstream import MemoryUpstream

REPO = RepoName.parse("team/app")
BLOB = os.urandom(2 * 1024 * 1024 + 5)


class Parts:
    def __init__(self, root: Path, **shared: object) -> None:
        self.metrics = Metrics(["mem"])
        self.store = BlobStore(root)
        self.store.prepare()
        self.keeper = CacheKeeper(self.store, self.metrics, max_size=1 << 30)
        self.flights = Flights(self.store, self.metrics, self.keeper)
        self.upstream = MemoryUpstream()
        self.memory = MemoryStore()
        self.clock = Clock()
        config = SharedConfig(endpoint="http://bucket.invalid", bucket="b", prefix="dc1/", **shared)  # type: ignore[arg-type]
        self.bucket = Bucket(config, None, store=self.memory)
        self.tier = SharedTier(
            self.bucket, self.metrics, self.store.tmp, self.store.blob_path, config, self.clock
        )
        self.flights.on_kept = self.tier.blob_kept

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def fill(self, digest: Digest) -> bytes:
        flight, _ = self.flights.blob(self.tier.source(self.upstream), REPO, digest)
        await self.flights.settled()
        assert flight.error is None, flight.error
        return self.store.blob_path(digest).read_bytes()


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    built = Parts(tmp_path)
    await built.keeper.start()
    await built.tier.start()
    yield built
    await built.tier.close()
    await built.flights.close(grace=1)
    await built.keeper.close()


async def test_a_fill_from_upstream_is_uploaded_once_by_digest(parts: Parts) -> None:
    digest = parts.upstream.add_blob(str(REPO), BLOB)
    assert await parts.fill(digest) == BLOB
    await parts.tier.uploads.settled()
    assert blob_key("dc1/", digest) == f"dc1/blobs/sha256/{digest.hex}"
    stored = await obstore.get_async(parts.memory, blob_key("dc1/", digest))
    assert bytes(await stored.bytes_async()) == BLOB
    assert parts.sample("edgecache_shared_uploads_total", kind="blob", result="done") == 1
    assert parts.sample("edgecache_shared_upload_backlog") == 0


async def test_a_held_blob_fills_from_the_bucket_without_the_upstream(parts: Parts) -> None:
    digest = Digest.of(BLOB)
    await obstore.put_async(parts.memory, blob_key("dc1/", digest), BLOB)
    assert await parts.fill(digest) == BLOB
    assert parts.upstream.count("open_blob") == 0
    assert parts.sample("edgecache_shared_hits_total", kind="blob") == 1
    assert parts.sample("edgecache_upstream_blob_bytes_total", upstream="mem") == 0
    await parts.tier.uploads.settled()
    assert parts.sample("edgecache_shared_uploads_total", kind="blob", result="done") == 0  # not sent back
    assert not list(parts.store.tmp.iterdir()), "the verified temp copy was left behind"


async def test_a_corrupt_object_is_deleted_and_the_upstream_fills_the_same_flight(parts: Parts) -> None:
    digest = parts.upstream.add_blob(str(REPO), BLOB)
    await obstore.put_async(parts.memory, blob_key("dc1/", digest), BLOB[:-1] + b"\0")
    assert await parts.fill(digest) == BLOB
    assert parts.upstream.count("open_blob") == 1
    assert parts.sample("edgecache_shared_errors_total", kind="corrupt") == 1
    assert parts.tier.usable(), "a corrupt object is the object's fault, not the tier's"
    await parts.tier.uploads.settled()  # replaced by the verified fill
    stored = await obstore.get_async(parts.memory, blob_key("dc1/", digest))
    assert bytes(await stored.bytes_async()) == BLOB


async def test_a_truncated_or_longer_object_is_corrupt_too(parts: Parts) -> None:
    digest = parts.upstream.add_blob(str(REPO), BLOB)
    await obstore.put_async(parts.memory, blob_key("dc1/", digest), BLOB + b"x")
    assert await parts.fill(digest) == BLOB
    assert parts.sample("edgecache_shared_errors_total", kind="corrupt") == 1


async def test_an_upload_the_bucket_already_holds_is_skipped(parts: Parts) -> None:
    digest = parts.upstream.add_blob(str(REPO), BLOB)
    await obstore.put_async(parts.memory, blob_key("dc1/", digest), b"another node was first")
    parts.tier.blob_kept(digest, len(BLOB))
    await parts.tier.uploads.settled()
    assert parts.sample("edgecache_shared_uploads_total", kind="blob", result="exists") == 1


async def test_a_full_queue_skips_and_counts(tmp_path: Path) -> None:
    parts = Parts(tmp_path, upload_queue=1)
    # Not started: nothing takes jobs off the queue.
    parts.tier.manifest_fetched(Digest.of(b"{}"), "application/json", b"{}")
    parts.tier.manifest_fetched(Digest.of(b"{ }"), "application/json", b"{ }")
    parts.tier.manifest_fetched(Digest.of(b"{}"), "application/json", b"{}")  # queued already: once
    assert parts.sample("edgecache_shared_uploads_total", kind="manifest", result="queue_full") == 1
    assert parts.sample("edgecache_shared_upload_backlog") == 1


async def test_failures_take_the_tier_down_and_misses_skip_it(parts: Parts) -> None:
    for _ in range(3):  # down_after
        parts.tier._failed(TierError("unavailable", "refused"))
    assert not parts.tier.usable()
    assert parts.sample("edgecache_shared_up") == 0
    digest = parts.upstream.add_blob(str(REPO), BLOB)
    await obstore.put_async(parts.memory, blob_key("dc1/", digest), BLOB)
    assert await parts.fill(digest) == BLOB
    assert parts.upstream.count("open_blob") == 1  # the bucket was not asked
    assert parts.sample("edgecache_shared_uploads_total", kind="blob", result="down") == 1
    parts.tier._succeeded()  # what the probe does when the bucket answers
    assert parts.tier.usable() and parts.sample("edgecache_shared_up") == 1


async def test_a_missed_deadline_takes_it_down_at_once(parts: Parts) -> None:
    parts.tier._failed(TierError("timeout", "slow", deadline=True))
    assert not parts.tier.usable()


async def test_manifests_from_the_bucket_are_verified(parts: Parts) -> None:
    body = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}'
    digest = Digest.of(body)
    parts.tier.manifest_fetched(digest, "application/vnd.oci.image.manifest.v1+json", body)
    await parts.tier.uploads.settled()
    assert await parts.tier.manifest(digest) == ("application/vnd.oci.image.manifest.v1+json", body)
    wrong = Digest.of(b"other")
    await obstore.put_async(parts.memory, f"dc1/manifests/sha256/{wrong.hex}", body)
    assert await parts.tier.manifest(wrong) is None
    assert parts.sample("edgecache_shared_errors_total", kind="corrupt") == 1
    with pytest.raises(FileNotFoundError):
        await obstore.head_async(parts.memory, f"dc1/manifests/sha256/{wrong.hex}")


def test_credentials_come_from_a_file_or_the_environment_and_never_print(tmp_path: Path) -> None:
    path = tmp_path / "creds"
    path.write_text("[default]\naws_access_key_id = AKID\naws_secret_access_key = s3cr3t\n")
    from_file = load_credentials(SharedConfig(credentials_file=str(path)), env={})
    assert from_file is not None and from_file.access_key_id == "AKID"
    assert "s3cr3t" not in repr(from_file) and "AKID" not in repr(from_file)
    env = {"AWS_ACCESS_KEY_ID": "E", "AWS_SECRET_ACCESS_KEY": "S"}
    from_env = load_credentials(SharedConfig(), env=env)
    assert from_env is not None and from_env.secret_access_key == "S"
    assert load_credentials(SharedConfig(), env={}) is None


# -- configuration ------------------------------------------------------------------------------


def load(tmp_path: Path, toml: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "edgecache.toml"
    path.write_text(toml)
    return load_config(str(path), env=env or {}, cache_dir=str(tmp_path / "cache"))


def test_shared_is_off_by_default_and_read_from_toml_and_environment(tmp_path: Path) -> None:
    assert not load(tmp_path, "").shared.enabled
    config = load(
        tmp_path,
        '[shared]\nendpoint = "https://rgw.dc1:7480"\nbucket = "edge"\nprefix = "dc1"\n',
        env={"EDGECACHE_SHARED_UPLOAD_CONCURRENCY": "4", "EDGECACHE_SHARED_BUCKET": "other"},
    )
    assert config.shared.enabled and config.shared.endpoint == "https://rgw.dc1:7480"
    assert config.shared.bucket == "other" and config.shared.upload_concurrency == 4
    assert Bucket(config.shared, None, store=MemoryStore()).prefix == "dc1/"


@pytest.mark.parametrize(
    ("toml", "named"),
    [('endpoint = "https://rgw"', "shared.bucket"), ('endpoint = "rgw.dc1"\nbucket = "b"', "shared.endpoint"),
     ('endpoint = "http://rgw"\nbucket = "b"\ncredentials_file = "/nonexistent"', "shared.credentials_file"),
     ('endpoint = "http://rgw"\nbucket = "b"\nheader_timeout = 0', "shared.header_timeout"),
     ('endpoint = "http://rgw"\nbucket = "b"\nsecret = "x"', "shared.secret")],
)  # fmt: skip
def test_shared_mistakes_stop_the_start_with_one_line(tmp_path: Path, toml: str, named: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, f"[shared]\n{toml}\n")
    assert named in str(raised.value) and "\n" not in str(raised.value)


# -- the pull use case with the tier: the bucket knows no repositories ----------------------------


async def test_the_bucket_serves_a_digest_only_to_a_repository_known_to_hold_it(tmp_path: Path) -> None:
    """Repository checks on (the default in PullService): a digest in the bucket is not served under
    a repository that does not hold it upstream; under one that does, a HEAD confirms it first."""
    parts = Parts(tmp_path)
    await parts.keeper.start()
    await parts.tier.start()
    members = Membership(parts.keeper.worker)
    pull = PullService(
        parts.store, ManifestCache(parts.store), parts.flights, Coalescer(), parts.metrics, parts.keeper,
        members, tag_ttl=60.0, max_stale=3600.0,
    )  # fmt: skip
    pull.set_shared(parts.tier)
    try:
        digest = parts.upstream.add_blob("team/app", BLOB)  # held upstream by team/app only
        await obstore.put_async(parts.memory, blob_key("dc1/", digest), BLOB)
        other = RepoName.parse("team/other")
        with pytest.raises(errors.BlobUnknown):
            await pull.blob(Target(parts.upstream, other, other), BlobQuery(digest, head=False))
        assert parts.sample("edgecache_shared_hits_total", kind="blob") == 0
        reply = await pull.blob(Target(parts.upstream, REPO, REPO), BlobQuery(digest, head=False))
        reply.close()
        await parts.flights.settled()
        assert parts.upstream.count("head_blob") == 2 and parts.upstream.count("open_blob") == 0
        assert parts.sample("edgecache_shared_hits_total", kind="blob") == 1
    finally:
        await parts.tier.close()
        await parts.flights.close(grace=1)
        await members.flush()
        await parts.keeper.close()


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        (
            "Server returned non-2xx status code: 404 Not Found: <Error><Code>NoSuchBucket</Code></Error>",
            "no such bucket on the endpoint",
        ),
        (
            "HTTP status client error (404 Not Found) for url (http://s3:7480/b)",
            "no such bucket on the endpoint",
        ),
        ("Server returned non-2xx status code: 403 Forbidden: ", "the endpoint refused our credentials"),
        ("<Code>SignatureDoesNotMatch</Code>", "the endpoint refused our credentials"),
        # Outages, whatever digits their text holds: the endpoint's port, a bucket's name.
        (
            "error sending request for url (http://127.0.0.1:40412/t-2c8a?list-type=2): Connection refused",
            None,
        ),
        ("error sending request for url (http://127.0.0.1:14040/logs-404?list-type=2)", None),
        ("error sending request for url (http://127.0.0.1:8403/team-403/x): timed out", None),
    ],
)
def test_a_refusal_at_start_up_is_told_from_an_outage_by_its_status_not_its_digits(
    text: str, refusal: str | None
) -> None:
    """At start-up a refusal stops edgecache (a mistake in the config) and an outage does not (the
    tier starts down): an unreachable endpoint on port 40412 was taken for a 404 and stopped it."""
    assert start_up_refusal(text) == refusal

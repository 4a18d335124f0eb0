"""The pull use case against an in-memory upstream (tests/support/memory_upstream.py): what it asks
upstream, and what it answers, for tags (fresh, revalidated, stale, gone), digests and membership.
A real store in a temporary directory and an injected clock; no sockets."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgecache import errors
from edgecache.fill.coalesce import Coalescer
from edgecache.fill.flights import Flights
from edgecache.metrics import Metrics
from edgecache.oci import Digest, RepoName, Tag
from edgecache.outcomes import CacheResult
from edgecache.pull import BlobQuery, BytesBody, FileBody, ManifestQuery, PullService, Target
from edgecache.store.blobs import BlobStore
from edgecache.store.keeper import CacheKeeper
from edgecache.store.manifests import ManifestCache
from edgecache.store.membership import Membership
from edgecache.upstream.client import Passthrough
from tests.support.clock import Clock
from tests.support.memory_upstream import MemoryUpstream
from tests.support.waiting import wait_until

TAG_TTL = 60.0
MAX_STALE = 3600.0


class World:
    """The parts the app wires, around one in-memory upstream."""

    def __init__(self, root: Path) -> None:
        self.clock = Clock(1_700_000_000.0)
        self.upstream = MemoryUpstream()
        metrics = Metrics([self.upstream.name])
        self.metrics = metrics
        self.store = BlobStore(root)
        self.store.prepare()
        self.keeper = CacheKeeper(self.store, metrics, max_size=1 << 30)
        self.flights = Flights(self.store, metrics, self.keeper)
        self.members = Membership(self.keeper.worker)
        self.pull = PullService(
            self.store,
            ManifestCache(self.store, clock=self.clock),
            self.flights,
            Coalescer(),
            metrics,
            self.keeper,
            self.members,
            tag_ttl=TAG_TTL,
            max_stale=MAX_STALE,
        )

    def target(self, repo: str) -> Target:
        name = RepoName.parse(repo)
        return Target(self.upstream, name, name)

    async def get_tag(
        self, repo: str, tag: str, *, head: bool = False
    ) -> tuple[int, CacheResult, dict[str, str]]:
        reply = await self.pull.manifest(self.target(repo), ManifestQuery(Tag.parse(tag), None, head))
        return reply.status, reply.cache, reply.headers


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    built = World(tmp_path)
    await built.keeper.start()
    yield built
    await built.pull.settled()
    await built.flights.close(grace=1)
    await built.members.flush()
    await built.keeper.close()


def image(upstream: MemoryUpstream, repo: str, tag: str) -> tuple[Digest, Digest]:
    """A one-layer image in `repo` under `tag`: (manifest digest, layer digest)."""
    layer = upstream.add_blob(repo, os.urandom(4096))
    config = upstream.add_blob(repo, b'{"architecture":"amd64","os":"linux"}')
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": str(config),
                "size": 37,
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": str(layer), "size": 4096}
            ],
        }
    ).encode()
    return upstream.add_manifest(repo, manifest, tag), layer


async def test_a_tag_is_fetched_once_then_hit_within_its_ttl(world: World) -> None:
    digest, _ = image(world.upstream, "team/app", "v1")
    status, cache, headers = await world.get_tag("team/app", "v1")
    assert (status, cache, headers["Docker-Content-Digest"]) == (200, CacheResult.MISS, str(digest))
    world.clock.now += TAG_TTL - 1
    status, cache, _ = await world.get_tag("team/app", "v1")
    assert (status, cache) == (200, CacheResult.HIT)
    assert world.upstream.count("get_manifest") == 1 and world.upstream.count("head_manifest") == 0


async def test_an_expired_tag_is_revalidated_with_a_head(world: World) -> None:
    image(world.upstream, "team/app", "v1")
    await world.get_tag("team/app", "v1")
    world.clock.now += TAG_TTL + 1
    _, cache, _ = await world.get_tag("team/app", "v1")
    assert cache is CacheResult.REVALIDATED
    assert world.upstream.count("head_manifest") == 1 and world.upstream.count("get_manifest") == 1


async def test_a_moved_tag_is_fetched_again(world: World) -> None:
    image(world.upstream, "team/app", "v1")
    await world.get_tag("team/app", "v1")
    moved, _ = image(world.upstream, "team/app", "v1")
    world.clock.now += TAG_TTL + 1
    _, cache, headers = await world.get_tag("team/app", "v1")
    assert cache is CacheResult.MISS and headers["Docker-Content-Digest"] == str(moved)


async def test_an_expired_tag_is_served_stale_while_upstream_is_down_within_max_stale(world: World) -> None:
    digest, _ = image(world.upstream, "team/app", "v1")
    await world.get_tag("team/app", "v1")
    world.upstream.down = True
    world.clock.now += TAG_TTL + 1
    status, cache, headers = await world.get_tag("team/app", "v1")
    assert (status, cache, headers["Docker-Content-Digest"]) == (200, CacheResult.STALE, str(digest))
    assert "Stale" in headers["Warning"]
    world.clock.now += MAX_STALE
    with pytest.raises(errors.UpstreamDown):
        await world.get_tag("team/app", "v1")


async def test_a_missing_tag_is_remembered_briefly(world: World) -> None:
    with pytest.raises(errors.ManifestUnknown) as first:
        await world.get_tag("team/app", "nope")
    assert not first.value.negative
    with pytest.raises(errors.ManifestUnknown) as second:
        await world.get_tag("team/app", "nope")
    assert second.value.negative and second.value.cache_result is CacheResult.NEGATIVE
    assert world.upstream.count("get_manifest") == 1


async def test_layers_of_a_served_manifest_need_no_confirmation_in_that_repository(world: World) -> None:
    _, layer = image(world.upstream, "team/app", "v1")
    await world.get_tag("team/app", "v1")
    first = await world.pull.blob(world.target("team/app"), BlobQuery(layer, head=False))
    await world.flights.settled()
    assert first.cache is CacheResult.MISS
    first.close()
    hit = await world.pull.blob(world.target("team/app"), BlobQuery(layer, head=False))
    assert hit.cache is CacheResult.HIT and isinstance(hit.body, FileBody)
    hit.close()
    assert world.upstream.count("head_blob") == 0 and world.upstream.count("open_blob") == 1


async def test_a_stored_blob_is_served_to_another_repository_only_if_upstream_says_it_holds_it(
    world: World,
) -> None:
    _, layer = image(world.upstream, "team/app", "v1")
    await world.get_tag("team/app", "v1")
    (await world.pull.blob(world.target("team/app"), BlobQuery(layer, head=False))).close()
    await world.flights.settled()
    with pytest.raises(errors.BlobUnknown):
        await world.pull.blob(world.target("other/repo"), BlobQuery(layer, head=False))
    assert ("head_blob", "other/repo", str(layer)) in world.upstream.requests
    world.upstream.blobs[("shared/repo", layer)] = world.upstream.blobs[("team/app", layer)]
    reply = await world.pull.blob(world.target("shared/repo"), BlobQuery(layer, head=False))
    reply.close()
    assert reply.cache is CacheResult.HIT and world.upstream.count("open_blob") == 1


async def test_a_manifest_by_digest_from_another_repository_is_confirmed_upstream(world: World) -> None:
    digest, _ = image(world.upstream, "team/app", "v1")
    await world.get_tag("team/app", "v1")
    query = ManifestQuery(digest, None, head=False)
    with pytest.raises(errors.ManifestUnknown):
        await world.pull.manifest(world.target("other/repo"), query)
    reply = await world.pull.manifest(world.target("team/app"), query)
    assert reply.cache is CacheResult.HIT and isinstance(reply.body, BytesBody)
    assert Digest.of(reply.body.data) == digest


async def test_a_manifest_fetch_is_not_shared_across_repositories(world: World) -> None:
    """Concurrent misses of one digest from two repositories: the fetch under one must not stand
    in for the other repository holding it."""
    digest, _ = image(world.upstream, "team/app", "v1")
    world.upstream.manifest_gate = asyncio.Event()
    query = ManifestQuery(digest, None, head=False)
    held = asyncio.create_task(world.pull.manifest(world.target("team/app"), query))
    other = asyncio.create_task(world.pull.manifest(world.target("other/repo"), query))
    await wait_until(lambda: world.upstream.count("get_manifest") == 2, timeout=5)
    world.upstream.manifest_gate.set()
    assert (await held).cache is CacheResult.MISS
    with pytest.raises(errors.ManifestUnknown):
        await other


# -- tags/list: paged by edgecache whether or not the upstream pages -------------------------------


def tag_list(tags: list[str], link: str | None = None, name: str = "library/x") -> Passthrough:
    return Passthrough(200, "application/json", json.dumps({"name": name, "tags": tags}).encode(), link)


async def list_tags(
    world: World, params: dict[str, str], *, name: str = "x", ns: str | None = None
) -> tuple[list[str], str | None]:
    """(tags, Link) of a tags/list answer, checking the body names the repository as the client did."""
    reply = await world.pull.tags_list(world.target("library/x"), params, name, ns)
    assert reply.status == 200 and isinstance(reply.body, BytesBody)
    doc = json.loads(reply.body.data)
    assert doc["name"] == name and reply.headers["Content-Type"] == "application/json"
    return doc["tags"], reply.headers.get("Link")


async def test_an_upstream_that_ignores_n_and_last_is_paged_here(world: World) -> None:
    world.upstream.listing = tag_list(["latest", "1.0", "b", "a", "2"])
    tags, link = await list_tags(world, {"n": "2", "last": "1.0"}, ns="docker.io")
    assert tags == ["2", "a"]
    assert link == '</v2/x/tags/list?last=a&n=2&ns=docker.io>; rel="next"'
    assert world.upstream.listing_queries == [{"n": "2", "last": "1.0"}]  # still passed on
    tags, link = await list_tags(world, {"n": "2", "last": "a"})
    assert (tags, link) == (["b", "latest"], None)


async def test_an_upstream_that_pages_keeps_its_next_page(world: World) -> None:
    """The upstream honoured n: its page is all we have, and its Link leads on (pointed at us)."""
    world.upstream.listing = tag_list(
        ["b", "a"], '<https://up.example/v2/library/x/tags/list?n=2&last=b&x=1>; rel="next"'
    )
    tags, link = await list_tags(world, {"n": "2"}, name="docker.io/x")
    assert tags == ["a", "b"]
    assert link == '</v2/docker.io/x/tags/list?n=2&last=b>; rel="next"'


async def test_n_zero_has_no_link_even_when_the_upstream_sends_one(world: World) -> None:
    world.upstream.listing = tag_list(
        ["a", "b"], '<https://up.example/v2/library/x/tags/list?n=1&last=a>; rel="next"'
    )
    assert await list_tags(world, {"n": "0", "last": "a"}) == ([], None)
    assert world.upstream.listing_queries == [{"n": "1", "last": "a"}]  # a page size any upstream takes


async def test_a_large_tag_list_is_paged_off_the_event_loop(world: World) -> None:
    tags = [f"v{i}" for i in range(20_000, 0, -1)]  # ~200 KiB of JSON
    world.upstream.listing = tag_list(tags)
    page, link = await list_tags(world, {"n": "3", "last": "v9"})
    assert page == ["v90", "v900", "v9000"]
    assert link == '</v2/x/tags/list?last=v9000&n=3>; rel="next"'


async def test_a_tag_list_that_does_not_parse_is_an_upstream_failure(world: World) -> None:
    world.upstream.listing = Passthrough(200, "application/json", b"<html>busy</html>", None)
    with pytest.raises(errors.UpstreamUnavailable):
        await world.pull.tags_list(world.target("library/x"), {}, "x", None)


async def test_referrers_from_an_upstream_api_are_filtered_here_unless_it_did_and_kept_briefly(
    world: World,
) -> None:
    subject = Digest.of(b"subject")
    listing = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "digest": str(Digest.of(b"sig")),
                "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
            },
            {"digest": str(Digest.of(b"sbom")), "artifactType": "application/spdx+json"},
        ],
    }
    index_type = "application/vnd.oci.image.index.v1+json"
    world.upstream.listing = Passthrough(200, index_type, json.dumps(listing).encode(), None)
    target = world.target("library/x")
    reply = await world.pull.referrers(target, subject, {"artifactType": "application/spdx+json"})
    assert reply.headers == {"Content-Type": index_type, "OCI-Filters-Applied": "artifactType"}
    assert isinstance(reply.body, BytesBody)
    assert [m["artifactType"] for m in json.loads(reply.body.data)["manifests"]] == ["application/spdx+json"]
    # an upstream that filtered (it says so) is believed; its listing is passed on as it is
    world.upstream.listing = Passthrough(200, index_type, json.dumps(listing).encode(), None, "artifactType")
    other = Digest.of(b"other subject")
    reply = await world.pull.referrers(target, other, {"artifactType": "application/spdx+json"})
    assert isinstance(reply.body, BytesBody) and len(json.loads(reply.body.data)["manifests"]) == 2
    assert reply.headers["OCI-Filters-Applied"] == "artifactType"
    # kept: asked again, upstream is not
    asked = len(world.upstream.requests)
    reply = await world.pull.referrers(target, subject, {"artifactType": "application/spdx+json"})
    assert reply.cache is CacheResult.HIT and len(world.upstream.requests) == asked

"""Prefetch against an in-memory upstream (tests/support/memory_upstream.py): which blobs a served
manifest starts fills for, the per-upstream bound, the byte cap, a client joining or overtaking a
prefetch, the tally of used and wasted prefetches, and tags that move. A real store and keeper in a
temporary directory, an injected clock for the watch window; no sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgecache.fill.coalesce import Coalescer
from edgecache.fill.flights import Flights
from edgecache.fill.prefetch import Prefetcher, PulledTags
from edgecache.metrics import Metrics
from edgecache.oci import OCI_INDEX, Digest, RepoName, Tag
from edgecache.outcomes import CacheResult
from edgecache.pull import BlobQuery, ManifestQuery, PullService, SpoolBody, Target
from edgecache.store.blobs import BlobStore
from edgecache.store.keeper import CacheKeeper
from edgecache.store.manifests import ManifestCache
from edgecache.store.membership import Membership
from tests.support.clock import Clock
from tests.support.memory_upstream import MemoryUpstream
from tests.support.waiting import wait_until

TAG_TTL = 60.0
WINDOW = 3600.0
REPO = "team/app"


class World:
    """The parts the app wires, prefetch on, around one in-memory upstream."""

    def __init__(
        self,
        root: Path,
        *,
        concurrency: int = 4,
        max_bytes: int = 1 << 30,
        max_size: int = 1 << 30,
        down: set[str] | None = None,  # upstreams whose health says down (the app asks the client's)
    ) -> None:
        self.clock = Clock(1_700_000_000.0)
        self.upstream = MemoryUpstream()
        self.metrics = Metrics([self.upstream.name])
        self.store = BlobStore(root)
        self.store.prepare()
        self.keeper = CacheKeeper(self.store, self.metrics, max_size=max_size)
        self.flights = Flights(self.store, self.metrics, self.keeper)
        self.members = Membership(self.keeper.worker)
        self.prefetcher = Prefetcher(
            self.flights,
            self.keeper,
            self.metrics,
            concurrency=concurrency,
            queue_limit=100,
            max_bytes=max_bytes,
            usable=lambda name: name not in (down or set()),
        )
        self.keeper.on_evicted = self.prefetcher.evicted
        self.pull = PullService(
            self.store,
            ManifestCache(self.store, clock=self.clock),
            self.flights,
            Coalescer(),
            self.metrics,
            self.keeper,
            self.members,
            tag_ttl=TAG_TTL,
            max_stale=3600.0,
            prefetcher=self.prefetcher,
            watch_window=WINDOW,
        )
        self.pull.pulled_tags = PulledTags(WINDOW, self.clock)
        self.target = Target(self.upstream, RepoName.parse(REPO), RepoName.parse(REPO))

    async def manifest(self, reference: str, *, head: bool = False) -> str:
        parsed = Digest.parse(reference) if reference.startswith("sha256:") else Tag.parse(reference)
        reply = await self.pull.manifest(self.target, ManifestQuery(parsed, None, head))
        reply.close()
        return reply.headers["Docker-Content-Digest"]

    async def blob(self, digest: Digest) -> CacheResult:
        """A client's GET of the blob, read to its end (as a front sends it)."""
        reply = await self.pull.blob(self.target, BlobQuery(digest, head=False))
        try:
            body = reply.body
            if isinstance(body, SpoolBody):
                async for _ in body.flight.segments(body.start, body.end):
                    pass
            return reply.cache
        finally:
            reply.close()

    def fetched(self) -> list[str]:
        """Digests the upstream was asked for (blob GETs), in order."""
        return [ref.split("@")[0] for op, _, ref in self.upstream.requests if op == "open_blob"]

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def started(world: World) -> AsyncIterator[World]:
    await world.keeper.start()
    yield world
    await world.prefetcher.close()
    await world.pull.close()
    await world.flights.close(grace=1)
    await world.members.flush()
    await world.keeper.close()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with started(World(tmp_path)) as built:
        yield built


def image(upstream: MemoryUpstream, sizes: list[int], *tags: str) -> tuple[Digest, list[Digest]]:
    """An image in REPO: (manifest digest, [config, layers...] digests)."""
    config = upstream.add_blob(REPO, json.dumps({"os": "linux", "nonce": os.urandom(8).hex()}).encode())
    layers = [upstream.add_blob(REPO, os.urandom(size)) for size in sizes]
    size_of = {d: len(upstream.blobs[(REPO, d)]) for d in [config, *layers]}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": str(config),
            "size": size_of[config],
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": str(d), "size": size_of[d]}
            for d in layers
        ],
    }
    return upstream.add_manifest(REPO, json.dumps(manifest).encode(), *tags), [config, *layers]


def index(upstream: MemoryUpstream, platforms: dict[str, Digest], *tags: str) -> Digest:
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": str(digest),
                "size": len(upstream.manifests[(REPO, str(digest))][0]),
                "platform": dict(zip(("os", "architecture"), platform.split("/"), strict=True)),
            }
            for platform, digest in platforms.items()
        ],
    }
    return upstream.add_manifest(REPO, json.dumps(body).encode(), *tags, media_type=OCI_INDEX)


async def test_a_served_manifest_prefetches_its_config_and_layers_which_clients_then_hit(
    world: World,
) -> None:
    digest, blobs = image(world.upstream, [4096, 5000, 6000], "v1")
    assert await world.manifest("v1") == str(digest)
    await wait_until(
        lambda: (
            world.sample("edgecache_prefetch_bytes_total", upstream="mem") > 0
            and not world.flights.in_flight()
        )
    )
    assert world.fetched() == [str(d) for d in blobs]  # in the manifest's order, each once
    assert all(world.store.blob_path(d).is_file() for d in blobs)
    results = [await world.blob(d) for d in blobs]
    assert results == [CacheResult.HIT] * 4  # the config and three layers
    assert world.fetched() == [str(d) for d in blobs]  # nothing fetched again
    assert world.sample("edgecache_prefetch_started_total", upstream="mem") == 4
    assert world.sample("edgecache_prefetch_used_total", upstream="mem") == 4
    sizes = sum(len(world.upstream.blobs[(REPO, d)]) for d in blobs)
    assert world.sample("edgecache_prefetch_bytes_total", upstream="mem") == sizes


async def test_a_head_or_a_stored_image_prefetches_nothing(world: World) -> None:
    _, blobs = image(world.upstream, [4096], "v1")
    await world.manifest("v1", head=True)
    await world.flights.settled()
    assert world.fetched() == []
    for digest in blobs:
        await world.blob(digest)
    await world.flights.settled()
    await world.manifest("v1")
    await world.manifest("v1")
    await world.flights.settled()
    assert world.fetched() == [str(d) for d in blobs]  # the client's own fills only
    assert world.sample("edgecache_prefetch_skipped_total", upstream="mem", reason="cached") == 2
    assert world.sample("edgecache_prefetch_used_total", upstream="mem") == 0


async def test_a_client_joins_a_prefetch_in_flight_and_overtakes_a_queued_one(tmp_path: Path) -> None:
    async with started(World(tmp_path, concurrency=2)) as world:
        _, blobs = image(world.upstream, [70_000] * 5, "v1")
        world.upstream.gate = asyncio.Event()  # bodies wait: prefetches stay in flight
        await world.manifest("v1")
        await wait_until(lambda: len(world.fetched()) == 2)
        assert len([f for f in world.flights.in_flight() if f.prefetched]) == 2
        assert world.sample("edgecache_prefetch_queued", upstream="mem") == 4
        # The client asks for the config (being prefetched) and the last layer (still queued).
        joined = asyncio.create_task(world.blob(blobs[0]))
        overtook = asyncio.create_task(world.blob(blobs[-1]))
        await wait_until(lambda: str(blobs[-1]) in world.fetched())  # started at once, not queued
        assert len(world.fetched()) == 3
        world.upstream.gate.set()
        assert await joined == CacheResult.JOINED
        assert await overtook == CacheResult.MISS
        await wait_until(
            lambda: (
                not world.flights.in_flight()
                and not world.sample("edgecache_prefetch_queued", upstream="mem")
            )
        )
        await world.flights.settled()
        assert sorted(world.fetched()) == sorted(str(d) for d in blobs)  # never a second fill
        # The queued one the client got to first was dropped (filling, or stored by then).
        skipped = [
            world.sample("edgecache_prefetch_skipped_total", upstream="mem", reason=reason)
            for reason in ("filling", "cached")
        ]
        assert sum(skipped) == 1
        assert world.sample("edgecache_prefetch_started_total", upstream="mem") == 5


async def test_prefetch_fills_of_one_upstream_stay_within_the_bound(tmp_path: Path) -> None:
    async with started(World(tmp_path, concurrency=2)) as world:
        _, blobs = image(world.upstream, [70_000] * 6, "v1")
        world.upstream.gate = asyncio.Event()
        await world.manifest("v1")
        await wait_until(lambda: len(world.fetched()) == 2)
        most = 0
        world.upstream.gate.set()
        while world.flights.in_flight() or world.sample("edgecache_prefetch_queued", upstream="mem"):
            most = max(most, len(world.flights.in_flight()))
            await asyncio.sleep(0)
        assert most <= 2
        assert world.fetched() == [str(d) for d in blobs]


async def test_the_byte_cap_bounds_what_one_manifest_prefetches(tmp_path: Path) -> None:
    async with started(World(tmp_path, max_bytes=150_000)) as world:
        _, blobs = image(world.upstream, [60_000, 60_000, 60_000, 60_000], "v1")
        await world.manifest("v1")
        await wait_until(lambda: world.sample("edgecache_prefetch_started_total", upstream="mem") == 3)
        await world.flights.settled()
        assert world.fetched() == [str(d) for d in blobs[:3]]  # config + two layers fit in 150 kB
        assert world.sample("edgecache_prefetch_skipped_total", upstream="mem", reason="cap") == 2


async def test_no_prefetch_without_room_and_unused_prefetches_evicted_are_counted(tmp_path: Path) -> None:
    async with started(World(tmp_path, max_size=2 * 1024 * 1024)) as world:
        _, big = image(world.upstream, [3 * 1024 * 1024], "big")
        await world.manifest("big")
        await world.flights.settled()
        assert world.fetched() == [str(big[0])]  # the config fits; a layer larger than the cache does not
        assert world.sample("edgecache_prefetch_skipped_total", upstream="mem", reason="no_room") == 1
        # A prefetched layer nobody asks for is the first to go when the cache fills up.
        _, small = image(world.upstream, [900_000], "small")
        await world.manifest("small")
        await wait_until(lambda: world.store.blob_path(small[1]).is_file())
        await world.flights.settled()
        _, other = image(world.upstream, [900_000], "other")
        for digest in other:
            world.clock.advance(1)
            await world.blob(digest)
        await world.flights.settled()
        _, third = image(world.upstream, [900_000], "third")
        for digest in third:
            await world.blob(digest)
        await world.flights.settled()
        assert not world.store.blob_path(small[1]).exists()
        assert world.sample("edgecache_prefetch_evicted_unused_total") >= 1


async def test_an_index_prefetches_only_the_platform_a_client_takes(world: World) -> None:
    amd, amd_blobs = image(world.upstream, [4096])
    arm, arm_blobs = image(world.upstream, [4096])
    index(world.upstream, {"linux/amd64": amd, "linux/arm64": arm}, "v1")
    await world.manifest("v1")
    await world.flights.settled()
    assert world.fetched() == []
    await world.manifest(str(arm))
    await wait_until(lambda: len(world.fetched()) == 2 and not world.flights.in_flight())
    assert world.fetched() == [str(d) for d in arm_blobs]
    assert not set(world.fetched()) & {str(d) for d in amd_blobs}


async def test_a_watched_tag_that_moves_has_its_new_image_prefetched(world: World) -> None:
    _, old_blobs = image(world.upstream, [4096], "v1")
    await world.manifest("v1")
    await world.flights.settled()
    new, new_blobs = image(world.upstream, [5000, 6000], "v1")  # pushed upstream: the tag moved
    assert await world.pull.revalidate_pulled_tags() == 0  # within its TTL: not asked
    world.clock.advance(TAG_TTL + 1)
    assert await world.pull.revalidate_pulled_tags() == 1
    await wait_until(lambda: world.sample("edgecache_prefetch_tags_moved_total", upstream="mem") == 1)
    await wait_until(lambda: all(world.store.blob_path(d).is_file() for d in new_blobs))
    assert world.upstream.count("head_manifest") == 1
    # The next pull of the tag is all hits: nothing left to fetch.
    fetched = len(world.fetched())
    assert await world.manifest("v1") == str(new)
    assert [await world.blob(d) for d in new_blobs] == [CacheResult.HIT] * 3
    assert len(world.fetched()) == fetched == len(old_blobs) + len(new_blobs)


async def test_a_tag_pulled_before_the_window_is_not_watched(world: World) -> None:
    image(world.upstream, [4096], "v1")
    await world.manifest("v1")
    image(world.upstream, [5000], "v1")
    world.clock.advance(WINDOW + 1)
    assert await world.pull.revalidate_pulled_tags() == 0
    assert world.upstream.count("head_manifest") == 0


async def test_a_moved_index_prefetches_the_platforms_clients_took(world: World) -> None:
    amd, _ = image(world.upstream, [4096])
    arm, _ = image(world.upstream, [4096])
    index(world.upstream, {"linux/amd64": amd, "linux/arm64": arm}, "v1")
    await world.manifest("v1")
    await world.manifest(str(arm))
    await world.flights.settled()
    new_amd, new_amd_blobs = image(world.upstream, [4096])
    new_arm, new_arm_blobs = image(world.upstream, [4096])
    index(world.upstream, {"linux/amd64": new_amd, "linux/arm64": new_arm}, "v1")
    world.clock.advance(TAG_TTL + 1)
    assert await world.pull.revalidate_pulled_tags() == 1
    await wait_until(lambda: all(world.store.blob_path(d).is_file() for d in new_arm_blobs))
    await world.pull.settled()
    await world.flights.settled()
    assert not set(world.fetched()) & {str(d) for d in new_amd_blobs}


async def test_nothing_is_prefetched_from_an_upstream_that_is_down(tmp_path: Path) -> None:
    down = {"mem"}
    async with started(World(tmp_path, down=down)) as world:
        _, blobs = image(world.upstream, [4096, 4096], "v1")
        await world.manifest("v1")
        await world.flights.settled()
        assert world.fetched() == []
        assert world.sample("edgecache_prefetch_skipped_total", upstream="mem", reason="unavailable") == 3
        down.clear()  # back up: the next serve prefetches
        await world.manifest("v1")
        await wait_until(lambda: len(world.fetched()) == len(blobs))


async def test_attachment_tags_are_not_watched(world: World) -> None:
    image(world.upstream, [4096], "v1")
    image(world.upstream, [64], "sha256-" + "ab" * 32 + ".sig")  # a cosign signature's tag
    await world.manifest("sha256-" + "ab" * 32 + ".sig")
    await world.manifest("v1")
    world.clock.advance(TAG_TTL + 1)
    assert await world.pull.revalidate_pulled_tags() == 1  # v1 only

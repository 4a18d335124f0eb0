"""Prefetch against the real registry: a served manifest has its blobs fetched ahead of the client,
once each; a client joins a prefetch in flight; a real client (skopeo) pulls through with prefetch
on and every blob crosses the upstream once; a tag pushed again while it is watched is prefetched
before anyone pulls it. The slow upstream is the fault proxy (a fault: it cannot be a real WAN here)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from edgecache.oci import Digest
from tests.conftest import Seeded, blob_path, edge_config, running_edge
from tests.support.clients import skopeo_copy_all
from tests.support.faults import FaultProxy
from tests.support.images import Pusher, build_image
from tests.support.registry import Registry
from tests.support.waiting import wait_until

ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
OCI_ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"}


async def test_a_manifest_pull_has_its_blobs_stored_before_the_client_asks(
    tmp_path: Path, origin: Registry, seeded: Seeded
) -> None:
    image = seeded.alpine
    blobs = [image.config, *image.layers]
    async with running_edge(edge_config(tmp_path / "cache", origin.url, prefetch=True)) as edge:
        before = {b.digest: origin.count("GET", f"/blobs/{b.digest}") for b in blobs}
        async with edge.http.get("/v2/library/alpine/manifests/latest", headers=ACCEPT) as resp:
            assert resp.status == 200
        # Nobody asked for a blob, and yet every one lands on disk, verified.
        await wait_until(lambda: all(blob_path(edge.cache_dir, b.digest).is_file() for b in blobs))
        for blob in blobs:
            async with edge.http.get(f"/v2/library/alpine/blobs/{blob.digest}") as resp:
                assert resp.headers["X-Cache"] == "HIT"
                assert await resp.read() == blob.data
        assert {b.digest: origin.count("GET", f"/blobs/{b.digest}") - before[b.digest] for b in blobs} == {
            b.digest: 1 for b in blobs
        }
        assert await edge.metric("edgecache_prefetch_started_total", upstream="docker.io") == len(blobs)
        assert await edge.metric("edgecache_prefetch_used_total", upstream="docker.io") == len(blobs)
        assert await edge.metric("edgecache_prefetch_bytes_total", upstream="docker.io") == sum(
            len(b.data) for b in blobs
        )


async def test_a_head_does_not_prefetch_and_an_index_waits_for_its_platform(
    tmp_path: Path, origin: Registry, seeded: Seeded
) -> None:
    multi = seeded.multi
    async with running_edge(edge_config(tmp_path / "cache", origin.url, prefetch=True)) as edge:
        async with edge.http.head("/v2/library/alpine/manifests/latest", headers=ACCEPT) as resp:
            assert resp.status == 200
        async with edge.http.get("/v2/library/multi/manifests/v1", headers=OCI_ACCEPT) as resp:
            index = json.loads(await resp.read())
        assert await edge.metric("edgecache_prefetch_started_total", upstream="docker.io") == 0
        arm = next(m for m in index["manifests"] if m["platform"]["architecture"] == "arm64")
        async with edge.http.get(f"/v2/library/multi/manifests/{arm['digest']}", headers=OCI_ACCEPT) as resp:
            assert resp.status == 200
        chosen = next(i for i in multi.images if i.platform["architecture"] == "arm64")
        other = next(i for i in multi.images if i.platform["architecture"] != "arm64")
        wanted = [chosen.config, *chosen.layers]
        await wait_until(lambda: all(blob_path(edge.cache_dir, b.digest).is_file() for b in wanted))
        await edge.instance.flights.settled()
        other_only = {b.digest for b in [other.config, *other.layers]} - {
            b.digest for b in [chosen.config, *chosen.layers]
        }
        assert not any(blob_path(edge.cache_dir, d).exists() for d in other_only)


async def test_a_client_joins_a_prefetch_in_flight_and_the_upstream_sends_the_blob_once(
    tmp_path: Path, proxy: FaultProxy, seeded: Seeded
) -> None:
    layer = seeded.big.layers[-1]  # ~24 MiB
    proxy.rules.throttle = 0.002  # a slow link: the prefetch is still running when the client asks
    async with running_edge(edge_config(tmp_path / "cache", proxy.url, prefetch=True)) as edge:
        async with edge.http.get("/v2/library/big/manifests/latest", headers=ACCEPT) as resp:
            assert resp.status == 200
        digest = Digest.parse(layer.digest)
        await wait_until(lambda: edge.instance.flights.running("docker.io", digest) is not None)
        async with edge.http.get(f"/v2/library/big/blobs/{layer.digest}") as resp:
            assert resp.headers["X-Cache"] == "JOINED"
            assert await resp.read() == layer.data
        assert proxy.count("GET", f"/blobs/{layer.digest}") == 1
        assert await edge.metric("edgecache_prefetch_used_total", upstream="docker.io") >= 1


async def test_skopeo_pulls_through_with_prefetch_and_each_blob_crosses_the_upstream_once(
    tmp_path: Path, proxy: FaultProxy, seeded: Seeded
) -> None:
    proxy.rules.throttle = 0.001
    async with running_edge(edge_config(tmp_path / "cache", proxy.url, prefetch=True)) as edge:
        host = edge.url.removeprefix("http://")
        copied = await asyncio.to_thread(skopeo_copy_all, f"{host}/library/big:latest", tmp_path / "big")
        image = seeded.big
        assert copied.blobs == {b.digest for b in [image.config, *image.layers]}
        for blob in [image.config, *image.layers]:
            assert proxy.count("GET", f"/blobs/{blob.digest}") == 1
        fills = await edge.metric("edgecache_fills_started_total", upstream="docker.io")
        assert fills == 1 + len(image.layers)


async def test_a_watched_tag_pushed_again_is_prefetched_before_anyone_pulls_it(
    tmp_path: Path, origin: Registry, seeded: Seeded
) -> None:
    pusher = Pusher(origin.url)
    first = build_image("watched-1")
    pusher.push_image("team/watched", "stable", first)
    config = edge_config(tmp_path / "cache", origin.url, prefetch=True, tag_ttl=1.0)
    async with running_edge(config) as edge:
        async with edge.http.get("/v2/team/watched/manifests/stable", headers=ACCEPT) as resp:
            assert resp.status == 200
        second = build_image("watched-2", random_bytes=256 * 1024)
        pusher.push_image("team/watched", "stable", second)  # a new release under the same tag
        new_blobs = [second.config, *second.layers]
        # The background watch revalidates the tag once its TTL has run out, sees it moved, and
        # prefetches the new image: no client asks for anything meanwhile.
        await wait_until(lambda: all(blob_path(edge.cache_dir, b.digest).is_file() for b in new_blobs))
        assert await edge.metric("edgecache_prefetch_tags_moved_total", upstream="docker.io") == 1
        gets = origin.count("GET", "/v2/team/watched/blobs/")
        async with edge.http.get("/v2/team/watched/manifests/stable", headers=ACCEPT) as resp:
            assert resp.headers["Docker-Content-Digest"] == second.manifest.digest
        for blob in new_blobs:
            async with edge.http.get(f"/v2/team/watched/blobs/{blob.digest}") as resp:
                assert resp.headers["X-Cache"] == "HIT"
        assert origin.count("GET", "/v2/team/watched/blobs/") == gets

"""Single-flight fills seen from the clients: one upstream GET, everyone streaming, nobody owning the fill.

The origin is the real registry behind the fault proxy, which here only slows blob bodies down (a WAN
link) so that clients can join, leave and ask for ranges while a fill is still running.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgecache.oci import Digest
from tests.conftest import Edge, Seeded, edge_config, running_edge
from tests.support.faults import FaultProxy
from tests.support.images import Blob
from tests.support.registry import Registry
from tests.support.waiting import wait_until

SLOW = 0.002  # seconds per 64 KiB: the 24 MiB layer takes about a second to arrive


@pytest.fixture
async def slow_origin(origin: Registry, seeded: Seeded) -> AsyncIterator[FaultProxy]:
    proxy = await FaultProxy(origin.url).start()
    proxy.rules.throttle = SLOW
    yield proxy
    await proxy.stop()


def edge_for(tmp_path: Path, upstream: str, **cache: object) -> contextlib.AbstractAsyncContextManager[Edge]:
    return running_edge(edge_config(tmp_path / "cache", upstream, **cache))


def stored(edge: Edge, blob: Blob) -> Path:
    hex_ = blob.digest.split(":", 1)[1]
    return edge.cache_dir / "blobs" / "sha256" / hex_[:2] / hex_


async def read_some(edge: Edge, blob: Blob, fraction: float) -> None:
    """A client that reads part of the blob and hangs up."""
    async with edge.http.get(f"/v2/library/big/blobs/{blob.digest}") as resp:
        got = 0
        async for chunk in resp.content.iter_chunked(64 * 1024):
            got += len(chunk)
            if got >= len(blob.data) * fraction:
                break
        resp.close()


async def test_leader_leaving_at_10_percent_does_not_stop_the_others(
    tmp_path: Path, slow_origin: FaultProxy, seeded: Seeded
) -> None:
    layer = seeded.big.layers[-1]
    async with edge_for(tmp_path, slow_origin.url) as edge:
        leader = asyncio.create_task(read_some(edge, layer, 0.10))
        await wait_until(lambda: slow_origin.count("GET", layer.digest) == 1)

        async def follower() -> tuple[str, bytes]:
            async with edge.http.get(f"/v2/big/blobs/{layer.digest}") as resp:
                return resp.headers["X-Cache"], await resp.read()

        followers = [asyncio.create_task(follower()) for _ in range(4)]
        await leader
        results = await asyncio.gather(*followers)
        assert all(body == layer.data for _, body in results)
        assert {cache for cache, _ in results} == {"JOINED"}
        assert slow_origin.count("GET", layer.digest) == 1
        await wait_until(lambda: stored(edge, layer).exists())
        assert stored(edge, layer).read_bytes() == layer.data
        # The same story in the metrics: one fill, four joiners, the blob once from upstream.
        assert await edge.metric("edgecache_fills_started_total", upstream="docker.io") == 1
        assert await edge.metric("edgecache_fills_completed_total", upstream="docker.io") == 1
        assert await edge.metric("edgecache_fill_readers_joined_total", upstream="docker.io") == 4
        assert await edge.metric("edgecache_upstream_blob_bytes_total", upstream="docker.io") == len(
            layer.data
        )
        assert await edge.metric("edgecache_served_bytes_total", source="fill") >= 4 * len(layer.data)
        assert await edge.metric("edgecache_fills_in_flight", upstream="docker.io") == 0


async def test_fill_finishes_when_every_reader_has_gone_by_default(
    tmp_path: Path, slow_origin: FaultProxy, seeded: Seeded
) -> None:
    layer = seeded.big.layers[-1]
    async with edge_for(tmp_path, slow_origin.url) as edge:
        await read_some(edge, layer, 0.10)
        await wait_until(lambda: stored(edge, layer).exists())
        async with edge.http.get(f"/v2/library/big/blobs/{layer.digest}") as resp:
            assert resp.headers["X-Cache"] == "HIT"
            assert await resp.read() == layer.data
        assert slow_origin.count("GET", layer.digest) == 1


async def test_fill_is_cancelled_when_every_reader_has_gone_if_configured(
    tmp_path: Path, slow_origin: FaultProxy, seeded: Seeded
) -> None:
    layer = seeded.big.layers[-1]
    async with edge_for(tmp_path, slow_origin.url, abandoned_fills="cancel") as edge:
        await read_some(edge, layer, 0.10)
        await wait_until(lambda: edge.instance.flights.running("docker.io", _digest(layer)) is None)
        await wait_until(lambda: not any(edge.cache_dir.joinpath("tmp").iterdir()))
        assert not stored(edge, layer).exists()
        assert (
            await edge.metric("edgecache_fills_failed_total", upstream="docker.io", reason="cancelled") == 1
        )
        slow_origin.rules.throttle = 0
        async with edge.http.get(f"/v2/library/big/blobs/{layer.digest}") as resp:
            assert resp.headers["X-Cache"] == "MISS"
            assert await resp.read() == layer.data
        assert slow_origin.count("GET", layer.digest) == 2


async def test_ranges_on_a_blob_being_filled_are_answered_from_the_fill(
    tmp_path: Path, slow_origin: FaultProxy, seeded: Seeded
) -> None:
    layer = seeded.big.layers[-1]
    size = len(layer.data)
    async with edge_for(tmp_path, slow_origin.url) as edge:
        path = f"/v2/library/big/blobs/{layer.digest}"
        leader = asyncio.create_task(edge.http.get(path))
        await wait_until(lambda: slow_origin.count("GET", layer.digest) == 1)
        # containerd fetches a layer in parallel ranges; dockerd resumes with bytes=N-.
        async with edge.http.get(path, headers={"Range": "bytes=0-65535"}) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes 0-65535/{size}"
            assert await resp.read() == layer.data[:65536]
        # The first bytes came from the fill while it was still running.
        assert edge.instance.flights.running("docker.io", _digest(layer)) is not None

        async def ranged(header: str, start: int, end: int) -> None:
            async with edge.http.get(path, headers={"Range": header}) as resp:
                assert resp.status == 206
                assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{size}"
                assert await resp.read() == layer.data[start : end + 1]

        await asyncio.gather(
            ranged(f"bytes={size // 2}-", size // 2, size - 1),
            ranged(f"bytes={size // 3}-{size // 3 + 999_999}", size // 3, size // 3 + 999_999),
            ranged("bytes=-100", size - 100, size - 1),
        )
        response = await leader
        assert await response.read() == layer.data
        response.release()
        assert slow_origin.count("GET", layer.digest) == 1


def _digest(blob: Blob) -> Digest:
    return Digest.parse(blob.digest)


async def test_concurrent_manifest_requests_make_one_upstream_request(
    tmp_path: Path, origin: Registry, seeded: Seeded
) -> None:
    async with edge_for(tmp_path, origin.url) as edge:
        index = seeded.multi
        child = index.images[0].manifest
        tag_path, child_path = "/v2/library/multi/manifests/v1", f"/v2/library/multi/manifests/{child.digest}"
        tag_before = origin.count("GET", tag_path) + origin.count("HEAD", tag_path)
        child_before = origin.count("GET", child_path)
        accept = {
            "Accept": "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"
        }

        async def get(path: str) -> bytes:
            async with edge.http.get(path, headers=accept) as resp:
                assert resp.status == 200
                return await resp.read()

        bodies = await asyncio.gather(
            *(get(tag_path) for _ in range(10)), *(get(child_path) for _ in range(10))
        )
        assert bodies[:10] == [index.manifest.data] * 10
        assert bodies[10:] == [child.data] * 10
        assert origin.count("GET", tag_path) + origin.count("HEAD", tag_path) == tag_before + 1
        assert origin.count("GET", child_path) == child_before + 1


async def test_a_slow_reader_does_not_hold_back_the_fill_or_the_others(
    tmp_path: Path, origin: Registry, seeded: Seeded
) -> None:
    layer = seeded.big.layers[-1]
    async with edge_for(tmp_path, origin.url) as edge:
        path = f"/v2/library/big/blobs/{layer.digest}"
        async with edge.http.get(path) as slow:
            first = await slow.content.readexactly(64 * 1024)  # ...then it stops reading for a while
            async with edge.http.get(path) as fast:
                assert await fast.read() == layer.data
            await wait_until(lambda: stored(edge, layer).exists())  # the fill did not wait for it either
            assert first + await slow.read() == layer.data

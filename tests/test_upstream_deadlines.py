"""Broken upstreams never hang a pull: deadlines by phase, stalls and trickles, fast recovery.

The faults (a black hole, a stalled or trickling body) come from the fault-injecting proxy in front of
the real origin registry (tests/support/faults.py); they cannot be had from the registry itself. Times
are asserted only as upper bounds on a hang, generous for a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Edge, Seeded, edge_config, running_edge
from tests.support.faults import FaultProxy
from tests.support.images import DOCKER_MANIFEST, OCI_MANIFEST
from tests.support.waiting import wait_until

ACCEPT = {"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"}


async def error_code(resp: aiohttp.ClientResponse) -> str:
    return str(json.loads(await resp.read())["errors"][0]["code"])


def stored(edge: Edge) -> list[str]:
    return [f for f in edge.cached_files() if f.startswith(("blobs/", "tmp/"))]


async def timed_get(edge: Edge, path: str) -> tuple[int, str, float, dict[str, str]]:
    started = time.monotonic()
    async with edge.http.get(path, headers=ACCEPT) as resp:
        body = await resp.read()
        code = json.loads(body)["errors"][0]["code"] if resp.status >= 400 else ""
        return resp.status, code, time.monotonic() - started, dict(resp.headers)


async def test_black_hole_with_the_default_configuration(
    tmp_path: Path, proxy: FaultProxy, seeded: Seeded
) -> None:
    """An upstream that accepts connections and never answers, with every deadline at its default:
    a miss gets 504 within the header deadline, a cached tag past its TTL is served stale in the same
    time, later misses fail at once while it is down, and it is back within seconds of answering."""
    config = edge_config(tmp_path / "cache", proxy.url, tag_ttl=0.0)  # every tag hit revalidates
    assert config.upstreams[0].header_timeout == 10.0 and config.upstreams[0].connect_timeout == 5.0
    async with running_edge(config) as edge:
        async with edge.http.get("/v2/team/app/manifests/1.0", headers=ACCEPT) as resp:
            assert resp.status == 200  # cached while the upstream was fine
        proxy.rules.hang = True

        miss, stale = await asyncio.gather(
            timed_get(edge, "/v2/library/alpine/manifests/latest"),
            timed_get(edge, "/v2/team/app/manifests/1.0"),
        )
        assert miss[:2] == (504, "UNAVAILABLE") and miss[2] < 20.0
        assert stale[0] == 200 and stale[3]["X-Cache"] == "STALE" and stale[2] < 20.0
        assert "Warning" in stale[3]

        # Marked down by the missed deadline: the next misses fail at once, and say when to retry.
        asked = len(proxy.seen)
        status, code, took, headers = await timed_get(
            edge, f"/v2/library/alpine/blobs/{seeded.alpine.config.digest}"
        )
        assert (status, code) == (503, "UNAVAILABLE") and took < 3.0
        assert int(headers["Retry-After"]) >= 1
        status, _, took, headers = await timed_get(edge, "/v2/team/app/manifests/1.0")
        assert status == 200 and headers["X-Cache"] == "STALE" and took < 3.0
        assert [s.path_qs for s in proxy.seen[asked:]] in ([], ["/v2/"])  # at most the probe

        proxy.rules.hang = False
        back = time.monotonic()

        async def served() -> bool:
            async with edge.http.get("/v2/library/alpine/manifests/latest", headers=ACCEPT) as resp:
                return resp.status == 200

        await wait_until(served, timeout=30.0, interval=0.2)
        # Probes back off from 1 s; the one in flight when it came back waits out its own 3 s cap.
        assert time.monotonic() - back < 15.0
        assert await edge.metric("edgecache_upstream_health", upstream="docker.io", state="up") == 1.0


@pytest.fixture
async def fast_deadlines(tmp_path: Path, proxy: FaultProxy) -> AsyncIterator[Edge]:
    """Deadlines of about a second, so stalls and trickles are seen quickly."""
    upstream = {"stall_timeout": 1.0, "header_timeout": 2.0, "min_rate": "64K", "rate_window": 1.5}
    async with running_edge(edge_config(tmp_path / "cache", proxy.url, upstream=upstream)) as edge:
        yield edge


def blob_gets(proxy: FaultProxy, digest: str) -> list[str | None]:
    """The Range header of every blob GET that reached the upstream for `digest`."""
    return [s.headers.get("Range") for s in proxy.seen if s.method == "GET" and digest in s.path_qs]


async def test_a_trickling_body_is_a_stall_and_the_fill_resumes(
    fast_deadlines: Edge, proxy: FaultProxy, seeded: Seeded
) -> None:
    layer = seeded.big.layers[-1]
    proxy.rules.trickle_blobs = 1  # half the body, then a byte every 0.2 s: never silent for 1 s
    started = time.monotonic()
    async with fast_deadlines.http.get(f"/v2/library/big/blobs/{layer.digest}") as resp:
        assert resp.status == 200
        assert await resp.read() == layer.data
    assert time.monotonic() - started < 30.0
    ranges = blob_gets(proxy, layer.digest)
    assert len(ranges) == 2 and ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")


async def test_a_body_that_keeps_stalling_fails_its_readers_cut_short_and_stores_nothing(
    fast_deadlines: Edge, proxy: FaultProxy, seeded: Seeded
) -> None:
    layer = seeded.big.layers[-1]
    proxy.rules.stall_blobs = 100  # every attempt stalls half-way
    started = time.monotonic()
    async with fast_deadlines.http.get(f"/v2/library/big/blobs/{layer.digest}") as resp:
        assert resp.status == 200  # the headers went out before the body stalled
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()  # never a clean end of a short body
    assert time.monotonic() - started < 30.0
    assert len(blob_gets(proxy, layer.digest)) == 2  # resumed once, then given up
    await fast_deadlines.instance.flights.settled()
    assert stored(fast_deadlines) == []


async def test_a_body_that_keeps_trickling_fails_its_readers(
    fast_deadlines: Edge, proxy: FaultProxy, seeded: Seeded
) -> None:
    layer = seeded.big.layers[-1]
    proxy.rules.trickle_blobs = 100
    async with fast_deadlines.http.get(f"/v2/library/big/blobs/{layer.digest}") as first:
        assert first.status == 200
        # A second client joins the same fill; both are cut, neither gets a complete wrong body.
        async with fast_deadlines.http.get(f"/v2/library/big/blobs/{layer.digest}") as second:
            for resp in (first, second):
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
    assert len(blob_gets(proxy, layer.digest)) == 2
    await fast_deadlines.instance.flights.settled()
    assert stored(fast_deadlines) == []


async def test_response_headers_that_never_come_for_a_blob_are_a_504(
    fast_deadlines: Edge, proxy: FaultProxy, seeded: Seeded
) -> None:
    proxy.rules.hang = True
    status, code, took, _ = await timed_get(
        fast_deadlines, f"/v2/library/alpine/blobs/{seeded.alpine.config.digest}"
    )
    assert (status, code) == (504, "UNAVAILABLE") and took < 15.0
    assert stored(fast_deadlines) == []


async def test_a_slow_reader_of_a_pass_through_fill_is_not_mistaken_for_a_trickling_upstream(
    tmp_path: Path, proxy: FaultProxy, seeded: Seeded
) -> None:
    """A 24 MiB blob that cannot be stored (max_size 1M) streams through a 4 MiB window, so the fill
    waits for its reader; that wait is not the upstream's slowness, and nothing is resumed or cut."""
    # The minimum rate is above the reader's pace: counted against the upstream, the waits would
    # make this a trickle; the upstream itself (loopback) is far faster.
    upstream = {"stall_timeout": 1.0, "header_timeout": 2.0, "min_rate": "8M", "rate_window": 1.0}
    config = edge_config(tmp_path / "cache", proxy.url, upstream=upstream, max_size="1M")
    layer = seeded.big.layers[-1]
    async with running_edge(config) as edge:
        async with edge.http.get(f"/v2/library/big/blobs/{layer.digest}") as resp:
            assert resp.status == 200
            received = bytearray()
            async for chunk in resp.content.iter_chunked(256 * 1024):
                received += chunk
                await asyncio.sleep(0.04)  # the client reads at about 6 MiB/s
        assert bytes(received) == layer.data
        assert blob_gets(proxy, layer.digest) == [None]  # one GET, never resumed
        await edge.instance.flights.settled()
        assert stored(edge) == []

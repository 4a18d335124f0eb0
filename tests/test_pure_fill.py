"""Fills against an in-memory source (tests/support/memory_upstream.py): single flight, the last
byte held back until verified, resume, abandonment and the brief refusal after a mismatch. The
store is a real one in a temporary directory; no sockets, each test runs in milliseconds."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgecache import errors
from edgecache.fill.flights import BlobFlight, Flights
from edgecache.metrics import Metrics
from edgecache.oci import Digest, RepoName
from edgecache.store.blobs import BlobStore
from edgecache.store.keeper import CacheKeeper
from tests.support.clock import Clock
from tests.support.memory_upstream import MemoryUpstream

REPO = RepoName.parse("team/app")
BLOB = os.urandom(3 * 1024 * 1024 + 17)  # several write batches and an odd tail


class Parts:
    def __init__(self, root: Path, **flight_options: object) -> None:
        self.metrics = Metrics(["mem"])
        self.store = BlobStore(root)
        self.store.prepare()
        self.keeper = CacheKeeper(self.store, self.metrics, max_size=1 << 30)
        self.clock = Clock()
        self.flights = Flights(self.store, self.metrics, self.keeper, clock=self.clock, **flight_options)  # type: ignore[arg-type]
        self.upstream = MemoryUpstream()

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    built = Parts(tmp_path)
    await built.keeper.start()
    yield built
    await built.flights.close(grace=1)
    await built.keeper.close()


async def read_flight(flight: BlobFlight, start: int = 0, end: int | None = None) -> bytes:
    """What a front would send of [start, end]: the spool's bytes as they become readable (after the
    fill has started, as the pull path waits for it: the spool is chosen then)."""
    await flight.started
    last = (flight.size or 0) - 1 if end is None else end
    out = bytearray()
    with flight.open_file() as spool:
        async for offset, length in flight.segments(start, last):
            out += os.pread(spool.fileno(), length, offset)
    return bytes(out)


async def test_concurrent_readers_share_one_fetch_and_all_get_the_verified_blob(parts: Parts) -> None:
    digest = parts.upstream.add_blob(str(REPO), BLOB)
    parts.upstream.gate = asyncio.Event()  # hold the body until every reader has joined
    flights = [parts.flights.blob(parts.upstream, REPO, digest) for _ in range(8)]
    assert [led for _, led in flights] == [True] + [False] * 7
    assert len({id(flight) for flight, _ in flights}) == 1
    readers = [asyncio.create_task(read_flight(flight)) for flight, _ in flights]
    await flights[0][0].started
    parts.upstream.gate.set()
    bodies = await asyncio.gather(*readers)
    assert all(body == BLOB for body in bodies)
    assert parts.upstream.count("open_blob") == 1
    await parts.flights.settled()
    assert parts.store.blob_path(digest).read_bytes() == BLOB
    assert parts.sample("edgecache_fill_readers_joined_total", upstream="mem") == 7


async def test_a_range_reader_gets_exactly_its_span(parts: Parts) -> None:
    digest = parts.upstream.add_blob(str(REPO), BLOB)
    flight, _ = parts.flights.blob(parts.upstream, REPO, digest)
    await flight.started
    assert await read_flight(flight, 1_000_000, 2_500_000) == BLOB[1_000_000:2_500_001]


async def test_a_mismatching_body_is_never_delivered_whole_nor_stored(parts: Parts) -> None:
    digest = parts.upstream.add_blob(str(REPO), BLOB)
    parts.upstream.tampered.add(digest)
    flight, _ = parts.flights.blob(parts.upstream, REPO, digest)
    await flight.started
    received = bytearray()
    with pytest.raises(errors.UpstreamDigestMismatch), flight.open_file() as spool:
        async for offset, length in flight.segments(0, len(BLOB) - 1):
            received += os.pread(spool.fileno(), length, offset)
    assert len(received) < len(BLOB)  # the last byte was held back
    await parts.flights.settled()
    assert not parts.store.blob_path(digest).exists()
    assert not list((parts.store.root / "tmp").iterdir())  # the spool is gone too


async def test_after_a_mismatch_the_blob_is_refused_briefly_then_fetched_again(tmp_path: Path) -> None:
    parts = Parts(tmp_path, negative_ttl=30.0)
    await parts.keeper.start()
    try:
        digest = parts.upstream.add_blob(str(REPO), BLOB)
        parts.upstream.tampered.add(digest)
        flight, _ = parts.flights.blob(parts.upstream, REPO, digest)
        with pytest.raises(errors.UpstreamDigestMismatch):
            await read_flight(flight, 0, len(BLOB) - 1)
        await parts.flights.settled()
        with pytest.raises(errors.UpstreamDigestMismatch) as refused:
            parts.flights.blob(parts.upstream, REPO, digest)
        assert refused.value.negative and refused.value.cache_result == "NEGATIVE"
        assert parts.upstream.count("open_blob") == 1  # refused without asking upstream
        parts.clock.now += 31
        parts.upstream.tampered.clear()
        flight, led = parts.flights.blob(parts.upstream, REPO, digest)
        assert led and await read_flight(flight, 0, len(BLOB) - 1) == BLOB
    finally:
        await parts.flights.close(grace=1)
        await parts.keeper.close()


async def test_a_body_cut_mid_way_is_resumed_where_it_stopped(parts: Parts) -> None:
    digest = parts.upstream.add_blob(str(REPO), BLOB)
    parts.upstream.cut_once_at = 1_500_000
    flight, _ = parts.flights.blob(parts.upstream, REPO, digest)
    await flight.started
    assert await read_flight(flight) == BLOB
    opens = [ref for op, _, ref in parts.upstream.requests if op == "open_blob"]
    resumed_at = int(opens[1].rsplit("@", 1)[1])
    assert len(opens) == 2 and opens[0].endswith("@0") and 1_500_000 <= resumed_at < len(BLOB)
    assert parts.sample("edgecache_fill_resumes_total", upstream="mem") == 1


async def test_an_unknown_blob_fails_the_waiters_with_blob_unknown(parts: Parts) -> None:
    digest = Digest.of(b"nowhere")
    flight, _ = parts.flights.blob(parts.upstream, REPO, digest)
    with pytest.raises(errors.BlobUnknown):
        await flight.started
    await parts.flights.settled()
    assert parts.flights.running("mem", digest) is None


async def test_abandoned_fill_is_cancelled_when_configured(tmp_path: Path) -> None:
    parts = Parts(tmp_path, cancel_abandoned=True)
    await parts.keeper.start()
    try:
        digest = parts.upstream.add_blob(str(REPO), BLOB)
        parts.upstream.gate = asyncio.Event()
        flight, _ = parts.flights.blob(parts.upstream, REPO, digest)
        parts.upstream.gate.set()
        await flight.started
        segments = flight.segments(0, len(BLOB) - 1)
        await anext(segments)  # the reader got some bytes, then leaves
        parts.upstream.gate.clear()
        await segments.aclose()
        await parts.flights.settled()
        assert flight.error is not None and not flight.done
        assert not parts.store.blob_path(digest).exists()
        assert parts.sample("edgecache_fills_failed_total", upstream="mem", reason="cancelled") == 1
    finally:
        await parts.flights.close(grace=1)
        await parts.keeper.close()


async def test_abandoned_fill_completes_and_is_stored_by_default(parts: Parts) -> None:
    digest = parts.upstream.add_blob(str(REPO), BLOB)
    flight, _ = parts.flights.blob(parts.upstream, REPO, digest)
    await flight.started
    segments = flight.segments(0, len(BLOB) - 1)
    await anext(segments)
    await segments.aclose()
    await parts.flights.settled()
    assert flight.done and parts.store.blob_path(digest).read_bytes() == BLOB

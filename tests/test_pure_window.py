"""The pass-through window and the fills that use it, against an in-memory upstream: bounded memory,
the slowest reader pacing the fill, late readers refused by the window (and given a fill of their
own by the pull path), the digest still checked. No sockets, no disk for the window."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgecache import errors
from edgecache.fill.flights import BlobFlight, Flights
from edgecache.fill.window import StreamWindow
from edgecache.metrics import Metrics
from edgecache.oci import Digest, RepoName
from edgecache.store.blobs import BlobStore
from edgecache.store.keeper import CacheKeeper
from tests.support.memory_upstream import MemoryUpstream
from tests.support.waiting import wait_until

MiB = 1024 * 1024
REPO = RepoName.parse("team/app")


def test_the_window_holds_back_nothing_a_reader_still_needs() -> None:
    data = os.urandom(3 * MiB)
    window = StreamWindow(Digest.of(data), capacity=2 * MiB)
    window.append(data[:MiB])
    slow = window.claim(0, pending=True)  # the reader the window was made for
    assert slow is not None
    window.append(data[MiB : 2 * MiB])
    done = threading.Event()

    def third_block() -> None:
        window.append(data[2 * MiB :])  # the window is full of bytes `slow` has not sent
        done.set()

    thread = threading.Thread(target=third_block)
    thread.start()
    assert not done.wait(0.2)  # waits for the reader, however long (up to its give-up deadline)
    assert slow.read(0, MiB) == data[:MiB]
    slow.advance(MiB)
    assert done.wait(5)
    thread.join()
    assert window.low == MiB  # the sent block left
    assert window.claim(0) is None  # a reader from 0 is too late now
    late = window.claim(MiB)
    assert late is not None and late.read(MiB, 10) == data[MiB : MiB + 10]
    window.verify()


def test_a_window_that_does_not_match_its_digest_fails_verification() -> None:
    window = StreamWindow(Digest.of(b"expected"))
    window.append(b"something else")
    with pytest.raises(errors.UpstreamDigestMismatch):
        window.verify()


def test_closing_the_window_wakes_a_waiting_fill() -> None:
    window = StreamWindow(Digest.of(b"x"), capacity=4)
    cursor = window.claim(0)
    assert cursor is not None
    window.append(b"abcd")
    failed: list[BaseException] = []

    def blocked() -> None:
        try:
            window.append(b"efgh")
        except errors.EdgecacheError as exc:
            failed.append(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    window.close()
    thread.join(5)
    assert not thread.is_alive() and failed


def test_a_reader_that_stops_reading_fails_the_fill_after_the_deadline() -> None:
    window = StreamWindow(Digest.of(b"x"), capacity=4, full_for=0.05)
    assert window.claim(0) is not None
    window.append(b"abcd")
    with pytest.raises(errors.UpstreamUnavailable):
        window.append(b"efgh")


class Parts:
    def __init__(self, root: Path) -> None:
        self.metrics = Metrics(["mem"])
        self.store = BlobStore(root)
        self.store.prepare()
        self.keeper = CacheKeeper(self.store, self.metrics, max_size=2 * MiB)  # smaller than the blob
        self.flights = Flights(self.store, self.metrics, self.keeper)
        self.upstream = MemoryUpstream()


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    built = Parts(tmp_path)
    await built.keeper.start()
    yield built
    await built.flights.close(grace=1)
    await built.keeper.close()


async def read_window(flight: BlobFlight, start: int = 0) -> bytes:
    """What the pull and send paths do for a pass-through reader."""
    _, waited = await flight.wait_started()
    cursor = flight.claim(start, waited=waited)
    assert cursor is not None
    out = bytearray()
    try:
        async for offset, length in flight.segments(start, (flight.size or 0) - 1):
            end = offset + length
            while offset < end:
                chunk = cursor.read(offset, end - offset)
                out += chunk
                offset += len(chunk)
                cursor.advance(offset)
    finally:
        cursor.release()
    return bytes(out)


async def test_a_blob_bigger_than_the_limit_passes_through_to_every_reader(parts: Parts) -> None:
    blob = os.urandom(20 * MiB)
    digest = parts.upstream.add_blob(str(REPO), blob)
    parts.upstream.gate = asyncio.Event()
    flight, led = parts.flights.blob(parts.upstream, REPO, digest)
    joined, _ = parts.flights.blob(parts.upstream, REPO, digest)
    readers = [asyncio.create_task(read_window(f)) for f in (flight, joined)]
    await flight.started
    assert led and joined is flight and flight.passing
    parts.upstream.gate.set()
    bodies = await asyncio.gather(*readers)
    assert all(hashlib.sha256(b).hexdigest() == digest.hex for b in bodies)
    assert parts.upstream.count("open_blob") == 1
    await parts.flights.settled()
    assert not parts.store.blob_path(digest).exists()
    assert not any((parts.store.root / "tmp").iterdir())
    assert parts.keeper.used == 0  # nothing stored, nothing left reserved


async def test_a_pass_through_fill_stops_when_its_last_reader_leaves(parts: Parts) -> None:
    blob = os.urandom(20 * MiB)
    digest = parts.upstream.add_blob(str(REPO), blob)
    flight, _ = parts.flights.blob(parts.upstream, REPO, digest)
    await flight.started
    cursor = flight.claim(0)
    assert cursor is not None
    segments = flight.segments(0, len(blob) - 1)
    await anext(segments)  # reading, then gone without reading more
    await segments.aclose()
    cursor.release()
    await wait_until(lambda: flight.finished)
    assert flight.error is not None  # cancelled: nothing to keep


def test_readers_that_came_together_keep_their_place_until_they_claim_it() -> None:
    data = os.urandom(3 * MiB)
    window = StreamWindow(Digest.of(data), capacity=2 * MiB, pending=2)
    first = window.claim(0, pending=True)
    assert first is not None
    window.append(data[:MiB])
    first.advance(MiB)  # the first reader is fast ...
    window.append(data[MiB : 2 * MiB])
    assert window.low == 0  # ... but the second has not claimed yet: nothing left the window
    second = window.claim(100, pending=True)
    assert second is not None and second.read(100, 10) == data[100:110]
    second.advance(MiB)
    window.append(data[2 * MiB :])
    assert window.low == MiB
    third = StreamWindow(Digest.of(data), pending=1)
    third.release_pending()  # the reader it waited for was refused (a bad Range): nothing is held
    third.append(data[:MiB])
    assert third.claim(0) is not None  # (no reader had moved on yet)

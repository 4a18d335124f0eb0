"""The one send path (http/send.py) and the aiohttp internals it and the plain listener rely on.

Three parts: send_reply against a recording Wire (what goes out for each body kind, HEAD, 304, a
failed fill, a departed client); the same requests against the plain aiohttp listener and the TLS
granian listener, which must answer with the same status, headers and bytes; and a contract for the
private parts of aiohttp that http/aiohttp_server.py subclasses, so an aiohttp upgrade that changes
them fails here, loudly, instead of in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp
import pytest
from aiohttp import web, web_protocol
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDictProxy

from edgecache import errors
from edgecache.http.aiohttp_server import (
    ConnectionLimits,
    OciRequestHandler,
    OciServer,
    OciServerRunner,
    OciSite,
)
from edgecache.http.send import content_length, send_reply
from edgecache.metrics import Metrics
from edgecache.pull import BytesBody, FileBody, Reply, SpoolBody
from edgecache.store.blobs import OpenBlob
from edgecache.trace import RequestTrace
from tests.conftest import Edge, Seeded, edge_config, running_edge, tls_edge_in_process
from tests.support.registry import Registry

# -- send_reply over a recording wire -------------------------------------------------------------


@dataclass
class RecordingWire:
    """A Wire that records what send_reply asked of it; `kernel` says whether sendfile works."""

    kernel: bool = True
    gone_after: int | None = None  # raise ConnectionResetError on this write (a departed client)
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    sendfiles: list[tuple[int, int, bool]] = field(default_factory=list)
    writes: int = 0
    ended: bool = False
    aborted: bool = False

    async def start(self, status: int, headers: dict[str, str]) -> None:
        self.status, self.headers = status, headers

    async def write(self, data: bytes) -> None:
        self.writes += 1
        if self.gone_after is not None and self.writes >= self.gone_after:
            raise ConnectionResetError("client went away")
        self.body += data

    async def sendfile(self, file: IO[bytes], offset: int, length: int, *, whole_file: bool) -> int | None:
        if not self.kernel:
            return None
        self.sendfiles.append((offset, length, whole_file))
        file.seek(offset)
        data = file.read(length)
        self.body += data
        return len(data)

    async def end(self, data: bytes = b"") -> None:
        assert not self.ended
        self.ended = True
        self.body += data

    def abort(self) -> None:
        self.aborted = True


class FailingFlight:
    """A fill whose spool holds `data`, landing in `segments` pieces, then failing if `fail`."""

    def __init__(self, spool: Path, segments: list[tuple[int, int]], fail: bool) -> None:
        self._spool, self._segments, self._fail = spool, segments, fail

        self.replies = 0

    def open_file(self) -> IO[bytes]:
        return self._spool.open("rb")

    def drop_reply(self) -> None:
        self.replies -= 1  # the reply let go of the fill once sent (or failed)

    async def segments(self, start: int, end: int) -> AsyncIterator[tuple[int, int]]:
        for segment in self._segments:
            yield segment
        if self._fail:
            raise errors.UpstreamInterrupted("upstream closed mid-body")


@pytest.fixture
def blob_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = bytes(range(256)) * 12  # 3 KiB
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


def served(metrics: Metrics, source: str) -> float:
    return metrics.registry.get_sample_value("edgecache_served_bytes_total", {"source": source}) or 0.0


def file_reply(path: Path, offset: int, length: int, status: int = 200) -> tuple[Reply, IO[bytes]]:
    file = path.open("rb")
    blob = OpenBlob(file, path.stat().st_size)
    headers = {"Content-Type": "application/octet-stream", "Content-Length": "999999"}
    return Reply(status, headers, FileBody(blob, offset, length), "HIT"), file


async def test_bytes_get_and_head_send_the_same_head() -> None:
    metrics, data = Metrics(["docker.io"]), b'{"a": 1}'
    heads = []
    for head in (False, True):
        wire, trace = RecordingWire(), RequestTrace("rid-1")
        reply = Reply(200, {"Content-Type": "application/json"}, BytesBody(data), "PASS")
        await send_reply(reply, wire, trace, metrics, head=head, path="/v2/")
        assert wire.ended and wire.body == (b"" if head else data)
        assert trace.bytes_sent == (0 if head else len(data))
        heads.append(wire.headers)
    assert heads[0] == heads[1]
    assert heads[0] == {
        "Docker-Distribution-API-Version": "registry/2.0",
        "Content-Type": "application/json",
        "X-Cache": "PASS",
        "X-Request-Id": "rid-1",
        "Content-Length": str(len(data)),
    }
    assert served(metrics, "memory") == len(data)  # the HEAD sent no body bytes


async def test_whole_file_goes_to_the_kernel_and_is_released(blob_file: tuple[Path, bytes]) -> None:
    path, data = blob_file
    metrics, wire, trace = Metrics(["docker.io"]), RecordingWire(), RequestTrace("r")
    reply, file = file_reply(path, 0, len(data))
    await send_reply(reply, wire, trace, metrics, head=False, path="/b")
    assert wire.sendfiles == [(0, len(data), True)] and wire.body == data and wire.ended
    assert wire.headers["Content-Length"] == str(len(data))  # from the body, not the stale header
    assert wire.headers["X-Cache"] == "HIT" and trace.cache == "HIT"
    assert served(metrics, "disk") == len(data) == trace.bytes_sent
    assert file.closed


async def test_a_range_is_never_offered_as_the_whole_file(blob_file: tuple[Path, bytes]) -> None:
    """granian sends a whole-file span by its path: a range (even one reaching the end) must not be."""
    path, data = blob_file
    metrics, wire, trace = Metrics(["docker.io"]), RecordingWire(), RequestTrace("r")
    reply, _ = file_reply(path, 100, len(data) - 100, status=206)
    await send_reply(reply, wire, trace, metrics, head=False, path="/b")
    assert wire.sendfiles == [(100, len(data) - 100, False)] and wire.body == data[100:]


async def test_file_range_falls_back_to_chunks_where_the_kernel_cannot(
    blob_file: tuple[Path, bytes],
) -> None:
    path, data = blob_file
    metrics, wire, trace = Metrics(["docker.io"]), RecordingWire(kernel=False), RequestTrace("r")
    reply, file = file_reply(path, 100, 1000, status=206)
    await send_reply(reply, wire, trace, metrics, head=False, path="/b")
    assert wire.status == 206 and wire.body == data[100:1100] and wire.ended
    assert wire.headers["Content-Length"] == "1000"
    assert served(metrics, "disk") == 1000 == trace.bytes_sent
    assert file.closed


async def test_a_failed_fill_cuts_the_response_before_its_last_byte(
    blob_file: tuple[Path, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    path, data = blob_file
    metrics, wire, trace = Metrics(["docker.io"]), RecordingWire(kernel=False), RequestTrace("r")
    flight = FailingFlight(path, [(0, 1000)], fail=True)
    reply = Reply(200, {}, SpoolBody(flight, 0, len(data)), "MISS")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="edgecache.http.send"):
        await send_reply(reply, wire, trace, metrics, head=False, path="/v2/x/blobs/sha256:1")
    assert wire.aborted and not wire.ended
    assert wire.body == data[:1000] and wire.headers["Content-Length"] == str(len(data))
    assert served(metrics, "fill") == 1000 == trace.bytes_sent
    assert metrics.registry.get_sample_value("edgecache_fill_readers") == 0
    assert "aborting response for /v2/x/blobs/sha256:1: upstream closed mid-body" in caplog.text


async def test_a_spool_shorter_than_its_fill_said_is_cut(blob_file: tuple[Path, bytes]) -> None:
    path, data = blob_file
    metrics, wire, trace = Metrics(["docker.io"]), RecordingWire(), RequestTrace("r")
    flight = FailingFlight(path, [(0, 1000), (len(data) - 10, 100)], fail=False)  # past the end
    reply = Reply(200, {}, SpoolBody(flight, 0, len(data) + 90), "MISS")  # type: ignore[arg-type]
    await send_reply(reply, wire, trace, metrics, head=False, path="/b")
    assert wire.aborted and not wire.ended


async def test_a_fill_of_unknown_length_is_sent_without_content_length(
    blob_file: tuple[Path, bytes],
) -> None:
    path, data = blob_file
    metrics, wire, trace = Metrics(["docker.io"]), RecordingWire(), RequestTrace("r")
    flight = FailingFlight(path, [(0, 1000), (1000, len(data) - 1000)], fail=False)
    reply = Reply(200, {}, SpoolBody(flight, 0, None), "MISS")  # type: ignore[arg-type]
    await send_reply(reply, wire, trace, metrics, head=False, path="/b")
    assert "Content-Length" not in wire.headers
    assert wire.body == data and wire.ended and not wire.aborted
    assert [s[2] for s in wire.sendfiles] == [False, False]  # a spool never ends with pathsend


async def test_a_departed_client_stops_the_body_quietly(blob_file: tuple[Path, bytes]) -> None:
    path, _ = blob_file
    metrics, trace = Metrics(["docker.io"]), RequestTrace("r")
    wire = RecordingWire(kernel=False, gone_after=1)
    reply, file = file_reply(path, 0, path.stat().st_size)
    await send_reply(reply, wire, trace, metrics, head=False, path="/b")
    assert not wire.aborted and not wire.ended and file.closed


def test_content_length_is_decided_in_one_place(blob_file: tuple[Path, bytes]) -> None:
    path, _ = blob_file
    declared = {"Content-Length": "42"}
    assert content_length(Reply(304, declared, None), head=False) is None
    assert content_length(Reply(204, {}, None), head=False) is None
    assert content_length(Reply(200, declared, None), head=True) == 42  # HEAD: what the GET sends
    assert content_length(Reply(200, {}, None), head=True) is None  # HEAD of unknown size
    assert content_length(Reply(200, {}, None), head=False) == 0
    assert content_length(Reply(404, declared, BytesBody(b"abc")), head=True) == 3
    reply, _ = file_reply(path, 5, 10, status=206)
    assert content_length(reply, head=False) == 10
    reply.close()


# -- the same replies over both listeners ------------------------------------------------------

# Headers each server adds of its own accord; everything else must be identical.
TRANSPORT_HEADERS = frozenset({"date", "server", "connection", "keep-alive"})


@dataclass(frozen=True)
class Seen:
    status: int
    headers: dict[str, str]
    body: bytes


async def exchange(edge: Edge, method: str, path: str, number: int, **headers: str) -> Seen:
    sent = {"X-Request-Id": f"same-{number}", **headers}
    async with edge.http.request(method, path, headers=sent) as resp:
        body = await resp.read()
        return Seen(resp.status, normalized(resp.headers), body)


def normalized(headers: CIMultiDictProxy[str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower() not in TRANSPORT_HEADERS}


async def conversation(edge: Edge, seeded: Seeded) -> list[Seen]:
    """One request of each reply kind, in an order that takes the same path through either cache."""
    manifest = "/v2/library/alpine/manifests/latest"
    layer = seeded.alpine.layers[0]
    blob = f"/v2/library/alpine/blobs/{layer.digest}"
    other = f"/v2/library/alpine/blobs/{seeded.alpine.layers[-1].digest}"
    accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    steps: list[tuple[str, str, dict[str, str]]] = [
        ("GET", "/v2/", {}),  # bytes
        ("HEAD", "/v2/", {}),  # bytes, HEAD
        ("HEAD", manifest, accept),  # no body, a declared length (upstream's HEAD)
        ("GET", manifest, accept),  # bytes
        ("HEAD", manifest, accept),  # bytes, HEAD
        ("GET", manifest, {**accept, "If-None-Match": f'"{seeded.alpine.manifest.digest}"'}),  # 304
        ("GET", blob, {}),  # spool, whole
        ("GET", other, {"Range": "bytes=1000-300000"}),  # spool, a range
        ("SETTLE", "", {}),
        ("GET", blob, {}),  # file, whole (sendfile / pathsend)
        ("GET", blob, {"Range": "bytes=10-99"}),  # file, a range (sendfile / chunks)
        ("HEAD", blob, {}),  # no body, a declared length
        ("GET", blob, {"If-None-Match": f'"{layer.digest}"'}),  # 304
        ("GET", blob, {"Range": f"bytes={len(layer.data)}-"}),  # 416, error
        ("GET", "/v2/library/nothere/manifests/latest", accept),  # 404, error
        ("HEAD", "/v2/library/nothere/manifests/latest", accept),  # 404, error, HEAD
        ("DELETE", manifest, {}),  # 405, error
    ]
    seen = []
    for number, (method, path, headers) in enumerate(steps):
        if method == "SETTLE":
            await edge.instance.flights.settled()
            continue
        seen.append(await exchange(edge, method, path, number, **headers))
    return seen


def served_by_source(edge: Edge) -> dict[str, float]:
    return {source: served(edge.instance.metrics, source) for source in ("memory", "disk", "fill")}


async def test_both_listeners_send_the_same_replies_alike(
    tmp_path: Path, origin: Registry, seeded: Seeded
) -> None:
    async with running_edge(edge_config(tmp_path / "plain", origin.url)) as plain:
        before = served_by_source(plain)
        by_aiohttp = await conversation(plain, seeded)
        counted_by_aiohttp = {k: v - before[k] for k, v in served_by_source(plain).items()}
    async with tls_edge_in_process(edge_config(tmp_path / "tls", origin.url), tmp_path / "pki") as tls:
        before = served_by_source(tls)  # the fixture's readiness probe is not part of it
        by_granian = await conversation(tls, seeded)
        counted_by_granian = {k: v - before[k] for k, v in served_by_source(tls).items()}
    # Error bodies are counted, a HEAD's body is not, on either listener.
    assert counted_by_aiohttp == counted_by_granian
    assert sum(counted_by_aiohttp.values()) == sum(len(s.body) for s in by_aiohttp)
    for a, g in zip(by_aiohttp, by_granian, strict=True):
        assert a == g
        if a.status in (204, 304):
            assert "content-length" not in a.headers and a.body == b""
        else:
            assert a.headers.get("x-request-id", "").startswith("same-")
            assert "content-length" in a.headers
            if a.body:
                assert int(a.headers["content-length"]) == len(a.body)
    statuses = [s.status for s in by_aiohttp]
    assert statuses == [200, 200, 200, 200, 200, 304, 200, 206, 200, 206, 200, 304, 416, 404, 404, 405]


# -- the aiohttp internals aiohttp_server.py relies on -------------------------------------------


def parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_request_handler_hooks_we_override_keep_their_signatures() -> None:
    handler = web_protocol.RequestHandler
    assert parameters(handler.data_received) == ["self", "data"]
    assert parameters(handler.connection_made) == ["self", "transport"]
    assert parameters(handler.connection_lost) == ["self", "exc"]
    assert parameters(handler.handle_error) == ["self", "request", "status", "exc", "message"]
    # handle_error's refusal checks whether bytes went out already
    assert isinstance(inspect.getattr_static(BaseRequest, "writer"), property)


async def test_request_handler_state_we_read_is_set_at_init() -> None:
    async def handle(request: BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web.Server(handle)
    assert hasattr(server, "_loop") and isinstance(server._kwargs, dict)
    handler = server()
    assert isinstance(handler, web_protocol.RequestHandler)
    assert handler._request_count == 0
    assert handler._manager is server
    assert isinstance(server.connections, list)


async def test_the_server_runner_serves_with_the_hardened_handler() -> None:
    async def hello(request: web.BaseRequest) -> web.Response:
        return web.Response(text="hello")

    runner = OciServerRunner(hello, limits=ConnectionLimits(7, 2.0))
    await runner.setup()
    try:
        server = runner.server
        assert type(server) is OciServer and isinstance(server, web.Server)
        assert server.limits == ConnectionLimits(7, 2.0)
        handler = server()
        assert isinstance(handler, OciRequestHandler)
        assert handler._manager is server
    finally:
        await runner.cleanup()


async def test_tcp_site_state_oci_site_reads_is_set_at_init() -> None:
    runner = web.AppRunner(web.Application())
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=16)
        for name in ("_runner", "_host", "_port", "_ssl_context", "_backlog", "_server"):
            assert hasattr(site, name), name
        assert inspect.iscoroutinefunction(web.BaseSite.start)
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def hardened_hello_server() -> AsyncIterator[tuple[str, int]]:
    """A one-route app ("hello") on the hardened runner, with a 0.5 s header deadline."""

    async def hello(request: web.BaseRequest) -> web.Response:
        return web.Response(text="hello")

    runner = OciServerRunner(hello, limits=ConnectionLimits(max_connections=8, header_timeout=0.5))
    await runner.setup()
    try:
        await OciSite(runner, "127.0.0.1", 0, ssl_context=None, handshake_timeout=5.0).start()
        host, port = runner.addresses[0][:2]
        yield host, port
    finally:
        await runner.cleanup()


async def test_slow_request_headers_get_the_oci_408() -> None:
    """The header deadline, for real: half a request line, then nothing; the 408 arrives as JSON."""
    async with hardened_hello_server() as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HT")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=30)  # until the server closes
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in head
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


async def test_a_complete_request_is_answered_normally() -> None:
    """The hardened handler still serves: the header timer is disarmed once a request head is in."""
    async with (
        hardened_hello_server() as (host, port),
        aiohttp.ClientSession() as http,
        http.get(f"http://{host}:{port}/") as resp,
    ):
        assert resp.status == 200 and await resp.text() == "hello"

"""A small fault-injecting proxy in front of the real origin registry (faults cannot be had otherwise).

It forwards to the origin and can, per request: demand Basic credentials, answer a fixed status,
redirect blob GETs to another host (as Docker Hub and ghcr do to their CDNs), cut a body short, stall
or trickle it half-way, compress it, or hang (accept the request and never answer: a black hole).
It records every request's method, path and headers so tests can check what reached "upstream".
"""

from __future__ import annotations

import asyncio
import base64
import gzip
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host", "authorization", "content-length"}


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]


@dataclass
class FaultRules:
    basic_auth: tuple[str, str] | None = None
    status: dict[str, int] = field(default_factory=dict)  # path substring → status to answer
    status_headers: dict[str, str] = field(default_factory=dict)  # sent with those statuses
    redirect_blobs_to: str | None = None  # base URL of another host
    truncate_blobs: int = 0  # how many blob bodies to cut off half-way from now on
    stall_blobs: int = 0  # how many blob bodies to stop sending half-way (connection left open)
    throttle: float = 0.0  # seconds to wait between 64 KiB chunks of blob bodies (a slow WAN link)
    trickle_blobs: int = 0  # how many blob bodies to trickle from half-way: a byte every trickle_gap
    trickle_gap: float = 0.2
    slow_blob_headers: float = 0.0  # seconds before answering a blob GET at all (a slow upstream)
    gzip: tuple[str, ...] = ()  # path substrings whose bodies are sent gzip-compressed
    hang: bool = False
    replace_body: dict[str, bytes] = field(default_factory=dict)  # path substring → body (sent chunked)
    add_headers: dict[str, dict[str, str]] = field(default_factory=dict)  # path substring → headers


class FaultProxy:
    def __init__(self, origin_url: str) -> None:
        self.origin_url = origin_url.rstrip("/")
        self.rules = FaultRules()
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests it was answering at once
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FaultProxy:
        """Listen on `port` (0: a free one); a stopped proxy started again on its old port is an
        upstream that refused connections for a while and came back."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{host}:{port}"
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def count(self, method: str, path_part: str) -> int:
        return sum(1 for s in self.seen if s.method == method and path_part in s.path_qs)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        rules = self.rules
        if rules.hang:
            await asyncio.sleep(3600)  # the fault itself: an upstream that never answers
        if rules.basic_auth is not None:
            expected = "Basic " + base64.b64encode(":".join(rules.basic_auth).encode()).decode()
            if request.headers.get("Authorization") != expected:
                return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="faults"'})
        for part, status in rules.status.items():
            if part in request.path_qs:
                return web.Response(status=status, text="injected fault", headers=rules.status_headers)
        if rules.slow_blob_headers and "/blobs/" in request.path and request.method == "GET":
            await asyncio.sleep(rules.slow_blob_headers)  # the fault itself: a slow first byte
        if rules.redirect_blobs_to and "/blobs/" in request.path:
            return web.Response(status=307, headers={"Location": rules.redirect_blobs_to + request.path_qs})
        return await self._forward(request)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(
            request.method, self.origin_url + request.path_qs, headers=headers, allow_redirects=False
        ) as upstream:
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
            for part, extra in self.rules.add_headers.items():
                if part in request.path_qs:
                    out_headers.update(extra)
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            for part, body in self.rules.replace_body.items():
                if part in request.path_qs:
                    response.enable_chunked_encoding()  # no Content-Length: the reader must count
                    await response.prepare(request)
                    for i in range(0, len(body), 256 * 1024):
                        await response.write(body[i : i + 256 * 1024])
                    await response.write_eof()
                    return response
            if any(part in request.path_qs for part in self.rules.gzip):
                # the fault itself: a coding the client asked not to get (Accept-Encoding: identity)
                body = gzip.compress(await upstream.read())
                response.headers["Content-Encoding"] = "gzip"
                response.content_length = len(body)
                await response.prepare(request)
                await response.write(body)
                await response.write_eof()
                return response
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            if request.method == "HEAD":
                await response.write_eof()
                return response
            sent = 0
            limit = (upstream.content_length or 0) // 2
            blob = "/blobs/" in request.path
            truncate = blob and self.rules.truncate_blobs > 0
            stall = blob and not truncate and self.rules.stall_blobs > 0
            trickle = blob and not (truncate or stall) and self.rules.trickle_blobs > 0
            self.rules.truncate_blobs -= truncate
            self.rules.stall_blobs -= stall
            self.rules.trickle_blobs -= trickle
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                if (truncate or stall or trickle) and sent + len(chunk) > limit:
                    await response.write(chunk[: max(limit - sent, 0)])
                    if stall:
                        await asyncio.sleep(3600)  # the fault itself: stalled until the reader gives up
                    if trickle:  # the fault itself: a byte at a time, never silent for long
                        await self._trickle(response, chunk[max(limit - sent, 0) :], upstream)
                        return response
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await response.write(chunk)
                sent += len(chunk)
                if blob and self.rules.throttle:
                    await asyncio.sleep(self.rules.throttle)  # the fault itself: a slow upstream
            await response.write_eof()
            return response

    async def _trickle(
        self, response: web.StreamResponse, first: bytes, upstream: aiohttp.ClientResponse
    ) -> None:
        """The rest of a body a byte at a time, until it ends or the reader hangs up."""
        rest = first
        while True:
            for i in range(len(rest)):
                await asyncio.sleep(self.rules.trickle_gap)
                try:
                    await response.write(rest[i : i + 1])
                except (ConnectionError, RuntimeError):
                    return  # the reader gave up on the trickle: the point of the fault
            rest = await upstream.content.read(64 * 1024)
            if not rest:
                await response.write_eof()
                return

"""Hostile clients against one real `edgecache serve`: TLS (granian, HTTP/2 + HTTP/1.1) on `listen` and
plain HTTP/1.1 (aiohttp) on `plain_listen`, header_timeout 1 s, 16 connections per listener.

1. A table of malformed, hostile or merely odd requests, each sent over plain HTTP/1.1 and over HTTP/2,
   with the status and OCI error code expected; afterwards nothing in the cache has changed on disk.
2. HTTP/1.1 framing attacks on raw sockets (absolute-form targets, CONNECT, request smuggling,
   oversized heads): every answer is a registry JSON error (or granian's bare refusal on the TLS
   listener) followed by a close, never the smuggled request's answer, never the client's bytes.
3. Slow clients: deadlines for request heads on both listeners, the TLS handshake, and the
   connection cap.
4. HTTP/2 abuse with a raw frame-level client (tests/support/h2raw.py): rapid reset, CONTINUATION
   flood, oversized header lists, more streams than SETTINGS_MAX_CONCURRENT_STREAMS.

Every wait is bounded; the slow TLS probes run in the background from the start of the module so
their waits overlap the rest.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import re
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hyperframe.frame import ContinuationFrame, HeadersFrame, RstStreamFrame, SettingsFrame

from tests.conftest import EdgeProcess, Seeded, spawn_edge
from tests.support.certs import TestCA
from tests.support.curl import curl
from tests.support.h2raw import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    MAX_WINDOW,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    H2Client,
    Stream,
)
from tests.support.images import DOCKER_MANIFEST
from tests.support.logs import access_records, wait_for_request
from tests.support.registry import Registry, free_port
from tests.support.waiting import wait_until_sync

HEADER_TIMEOUT = 1.0
MAX_CONNECTIONS = 16
# Applies to the mutual-TLS (aiohttp) listener only, as conf/edgecache.toml says; set low to show that
# the granian listener keeps its own deadline.
TLS_HANDSHAKE_TIMEOUT = 2.0
# What granian 2.8 allows a TCP connection that never sends a ClientHello: measured 10.0 s, fixed.
GRANIAN_HANDSHAKE_LIMIT = 10.0
SLACK = 2.0
# The TLS listener's guard closes connections silent both ways for this long (edgecache.http.connguard).
IDLE_TIMEOUT = 3.0
H2_MAX_STREAMS = 128  # edgecache.http.granian_front.MAX_STREAMS
H2_MAX_HEADER_LIST = 16 * 1024  # edgecache.http.granian_front.MAX_HEADER_BYTES
# A wait for the server's first SETTINGS frame: it returns as soon as they come, so it can be generous.
SETTINGS_WAIT = 10.0
MARKER = b"HOSTILE-ECHO-7c1e"  # put into hostile requests; must never come back

PROTOCOLS = ["h1-plain", "h2-tls"]
LISTENERS = ["plain", "tls-h1"]


# -- the edgecache under attack ------------------------------------------------------------------


@dataclass
class Hostile:
    edge: EdgeProcess
    origin: Registry
    ca: Path
    tls_port: int
    plain_port: int
    blob: str  # the alpine image's big layer, cached
    blob_size: int
    cache_snapshot: dict[str, tuple[int, int]]
    tls_probes: dict[str, concurrent.futures.Future[Closed]] = field(default_factory=dict)

    @property
    def plain_url(self) -> str:
        return f"http://127.0.0.1:{self.plain_port}"

    @property
    def tls_url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    def h2(self, **kwargs: int) -> H2Client:
        return H2Client("127.0.0.1", self.tls_port, self.ca, **kwargs)

    def alive(self) -> bool:
        return self.edge.proc.poll() is None


def snapshot(cache_dir: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under blobs/ and manifests/, by relative path."""
    files: dict[str, tuple[int, int]] = {}
    for top in ("blobs", "manifests"):
        for path in sorted((cache_dir / top).rglob("*")):
            if path.is_file():
                stat = path.stat()
                files[str(path.relative_to(cache_dir))] = (stat.st_size, stat.st_mtime_ns)
    return files


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, origin: Registry, seeded: Seeded) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("hostile")
    ca = TestCA(root / "ca")
    server = ca.issue("server")
    plain_port = free_port()
    config = f"""
[server]
tls_cert = "{server.cert}"
tls_key = "{server.key}"
plain_listen = "127.0.0.1:{plain_port}"
header_timeout = {HEADER_TIMEOUT}
idle_timeout = {IDLE_TIMEOUT}
max_connections = {MAX_CONNECTIONS}
tls_handshake_timeout = {TLS_HANDSHAKE_TIMEOUT}
"""
    with spawn_edge(root, origin.url, config=config, tls=True) as edge:
        tls_port = int(edge.url.rsplit(":", 1)[1])
        # Pull one image so the cache has content for the disk snapshot (and hits to serve).
        base = f"http://127.0.0.1:{plain_port}/v2/library/alpine"
        request = urllib.request.Request(f"{base}/manifests/latest", headers={"Accept": DOCKER_MANIFEST})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.read() == seeded.alpine.manifest.data
        for blob in seeded.alpine.blobs:
            with urllib.request.urlopen(f"{base}/blobs/{blob.digest}", timeout=10) as resp:
                assert resp.read() == blob.data
        layer = seeded.alpine.layers[-1]
        state = Hostile(edge, origin, ca.cert_path, tls_port, plain_port, layer.digest, len(layer.data), {})

        # Fills are committed to disk just after their last byte is served: wait for all of them.
        def all_filled() -> dict[str, tuple[int, int]]:
            files = snapshot(edge.cache_dir)
            return files if len(files) == 1 + len(seeded.alpine.blobs) else {}

        state.cache_snapshot = wait_until_sync(
            all_filled, message=lambda: f"fills not on disk: {snapshot(edge.cache_dir)}"
        )
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            state.tls_probes = start_tls_probes(pool, state)
            yield state


# -- raw HTTP/1.1 --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Closed:
    """How a connection ended: `closed` by the server (EOF or reset) after `elapsed` seconds, or
    still open when we stopped waiting; `data` is everything it sent."""

    closed: bool
    elapsed: float
    data: bytes


def connect(port: int, ca: Path | None = None, alpn: str = "http/1.1", timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if ca is None:
        return sock
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols([alpn])
    tls = context.wrap_socket(sock, server_hostname="127.0.0.1")
    assert tls.selected_alpn_protocol() == alpn
    return tls


def wait_closed(sock: socket.socket, limit: float, started: float | None = None) -> Closed:
    """Read until the server closes the connection or `limit` seconds pass."""
    start = time.monotonic() if started is None else started
    data = bytearray()
    try:
        while (remaining := limit - (time.monotonic() - start)) > 0:
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:  # reset, or a TLS error: closed all the same
                return Closed(True, time.monotonic() - start, bytes(data))
            if not chunk:
                return Closed(True, time.monotonic() - start, bytes(data))
            data += chunk
        return Closed(False, time.monotonic() - start, bytes(data))
    finally:
        sock.close()


def peer_closed(sock: socket.socket, drain: bool = False) -> bool:
    """Has the server closed this connection? (Leaves it open on our side.) With `drain`, whatever
    the server sent before closing (a 408) is read and dropped first."""
    sock.settimeout(0.02)
    try:
        while sock.recv(65536 if drain else 1):
            if not drain:
                return False
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def exchange(
    hostile: Hostile, listener: str, payload: bytes, timeout: float = 5.0, alpn: str = "http/1.1"
) -> Closed:
    """Send `payload` as is on a fresh connection and read until the server closes it."""
    tls = listener != "plain"
    # Timed from before the connection: the server's deadline cannot start earlier, so a lower
    # bound on `elapsed` holds however late this thread runs after connecting.
    start = time.monotonic()
    sock = connect(hostile.tls_port, hostile.ca, alpn) if tls else connect(hostile.plain_port)
    # Refused and closed before all of it was sent: read what the server answered all the same.
    with contextlib.suppress(OSError):
        sock.sendall(payload)
    return wait_closed(sock, timeout, start)


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def oci_code(self) -> str:
        return oci_code(self.headers, self.body)


def parse_responses(data: bytes) -> list[Response]:
    """Every HTTP/1.x response in `data` (bodies framed by Content-Length, else to the end)."""
    responses = []
    rest = data
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {head[:300]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        assert status_line.startswith("HTTP/1."), status_line
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", len(rest)))
        responses.append(Response(int(status_line.split()[1]), headers, rest[:length]))
        rest = rest[length:]
    return responses


def oci_code(headers: dict[str, str], body: bytes) -> str:
    """The code of a registry JSON error body; fails on anything else."""
    assert headers.get("content-type", "").startswith("application/json"), (headers, body[:200])
    document = json.loads(body)
    errors = document["errors"]
    assert isinstance(errors, list) and errors and set(errors[0]) >= {"code", "message"}, document
    return str(errors[0]["code"])


def assert_refused(listener: str, response: Response, status: int, code: str = "UNSUPPORTED") -> None:
    """A registry JSON error on the plain listener. On the TLS listener granian's own HTTP/1.1
    parser refuses bad framing before any ASGI call: the status, an empty body and a close (the
    app never sees the request, so it cannot answer in JSON)."""
    assert response.status == status, response
    assert MARKER not in response.body and MARKER.decode() not in str(response.headers)
    if listener == "plain" or response.body:
        assert response.oci_code() == code
    else:
        assert response.headers.get("content-length") == "0", response
        assert response.headers.get("connection") == "close", response


# -- 1. the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    status: int = 0  # 0: no response at all
    code: str | None = None  # OCI error code; None: not an error
    reset: int | None = None  # HTTP/2: the stream is reset with this code instead of answered


@dataclass(frozen=True)
class Case:
    id: str
    path: str  # as sent; {blob}, {size} and {sha512} are filled in
    expect: Expect
    headers: tuple[str, ...] = ()
    method: str = "GET"
    raw: bool = False  # curl would not send it as is: a raw socket (h1) or the raw HTTP/2 client
    h1: Expect | None = None  # where the protocols differ
    h2: Expect | None = None
    whole_blob: bool = False  # the answer is the whole blob: the header was ignored
    content_range: str | None = None
    reaches_upstream: bool = False
    allow: bool = False  # 405 names the methods that are allowed
    logged_peer: str | None = None  # the access log's peer for this request

    def expected(self, protocol: str) -> Expect:
        override = self.h1 if protocol == "h1-plain" else self.h2
        return override or self.expect


ALPINE = "/v2/library/alpine"
NAME_INVALID = Expect(400, "NAME_INVALID")
DIGEST_INVALID = Expect(400, "DIGEST_INVALID")
READ_ONLY = Expect(405, "UNSUPPORTED")
CASES = [
    Case("dot-segments", "/v2/library/../alpine/manifests/latest", NAME_INVALID),
    Case("pct-dot-segments", "/v2/library/%2e%2e/alpine/manifests/latest", NAME_INVALID),
    Case("pct-dot-segments-upper", "/v2/%2E%2E/%2E%2E/etc/manifests/latest", NAME_INVALID),
    Case("dot-segments-off-route", "/v2/../../etc/passwd", Expect(404, "UNSUPPORTED")),
    Case(
        "dot-segments-after-ref",
        f"{ALPINE}/manifests/latest/../../../../etc/passwd",
        Expect(404, "UNSUPPORTED"),
    ),
    Case("encoded-slash", "/v2/library%2Falpine/manifests/latest", NAME_INVALID),
    Case("encoded-backslash", "/v2/library%5Calpine/manifests/latest", NAME_INVALID),
    Case("literal-backslash", "/v2/library\\alpine/manifests/latest", NAME_INVALID),
    Case("pct-nul", "/v2/library/alp%00ine/manifests/latest", NAME_INVALID),
    # aiohttp routes on the percent-decoded path: its catch-all matches across a decoded line feed too,
    # so the front sees the raw path and refuses the name, as it does on granian.
    Case("pct-crlf", "/v2/library/alpine%0d%0aX-Injected:%201/manifests/latest", NAME_INVALID),
    Case("pct-lf", "/v2/library/alp%0aine/manifests/latest", NAME_INVALID),
    Case("pct-cr", "/v2/library/alp%0dine/tags/list", NAME_INVALID),
    # Raw control bytes in the target: aiohttp's parser refuses the request line (JSON 400); on
    # HTTP/2 hyper refuses the :path before the app and resets the stream.
    Case(
        "raw-tab",
        "/v2/library/al\tpine/manifests/latest",
        Expect(400, "UNSUPPORTED"),
        raw=True,
        h2=Expect(reset=PROTOCOL_ERROR),
    ),
    Case(
        "raw-nul",
        "/v2/library/al\x00pine/manifests/latest",
        Expect(400, "UNSUPPORTED"),
        raw=True,
        h2=Expect(reset=PROTOCOL_ERROR),
    ),
    Case(
        "raw-cr",
        "/v2/library/al\rpine/manifests/latest",
        Expect(400, "UNSUPPORTED"),
        raw=True,
        h2=Expect(reset=PROTOCOL_ERROR),
    ),
    Case(
        "raw-lf",
        "/v2/library/al\npine/manifests/latest",
        Expect(400, "UNSUPPORTED"),
        raw=True,
        h2=Expect(reset=PROTOCOL_ERROR),
    ),
    Case("pct-utf8", "/v2/library/%C3%A9/manifests/latest", NAME_INVALID),
    # Raw UTF-8: aiohttp's parser refuses it; on HTTP/2 the front refuses a non-ASCII :path.
    Case("raw-utf8", "/v2/library/é/manifests/latest", Expect(400, "UNSUPPORTED"), raw=True),
    Case("name-256", "/v2/" + "a" * 256 + "/manifests/latest", NAME_INVALID),
    Case("name-600", "/v2/" + "/".join(["abcdefghi"] * 60) + "/manifests/latest", NAME_INVALID),
    # Not a tag (nor a digest): no manifest can exist under it, so 404, without asking upstream.
    Case("tag-129", f"{ALPINE}/manifests/" + "t" * 129, Expect(404, "MANIFEST_UNKNOWN")),
    Case("tag-leading-dot", f"{ALPINE}/manifests/.INVALID_MANIFEST_NAME", Expect(404, "MANIFEST_UNKNOWN")),
    Case("tag-128", f"{ALPINE}/manifests/" + "t" * 128, Expect(404, "MANIFEST_UNKNOWN")),
    Case("digest-md5", f"{ALPINE}/blobs/md5:" + "0" * 32, DIGEST_INVALID),
    Case("manifest-md5", f"{ALPINE}/manifests/md5:" + "0" * 32, DIGEST_INVALID),
    Case("digest-short", f"{ALPINE}/blobs/sha256:" + "0" * 63, DIGEST_INVALID),
    Case("digest-long", f"{ALPINE}/blobs/sha256:" + "0" * 65, DIGEST_INVALID),
    Case("digest-no-algorithm", f"{ALPINE}/blobs/" + "0" * 64, DIGEST_INVALID),
    Case("digest-upper-hex", f"{ALPINE}/blobs/{{BLOB}}", DIGEST_INVALID),
    # sha512 is a digest edgecache can verify: valid, so it goes upstream, which has no such blob.
    Case("digest-sha512", f"{ALPINE}/blobs/{{sha512}}", Expect(404, "BLOB_UNKNOWN"), reaches_upstream=True),
    # A byte range that does not parse is refused (RFC 9110: SHOULD 416); several ranges in one
    # header are served whole, as RFC 9110 allows (registry clients send one).
    Case(
        "range-malformed",
        f"{ALPINE}/blobs/{{blob}}",
        Expect(416, "RANGE_INVALID"),
        ("Range: bytes=abc",),
        content_range="bytes */{size}",
    ),
    Case("range-multi", f"{ALPINE}/blobs/{{blob}}", Expect(200), ("Range: bytes=0-1,4-5",), whole_blob=True),
    Case(
        "range-beyond-end",
        f"{ALPINE}/blobs/{{blob}}",
        Expect(416, "RANGE_INVALID"),
        ("Range: bytes={size}-",),
        content_range="bytes */{size}",
    ),
    Case(
        "range-twice",
        f"{ALPINE}/blobs/{{blob}}",
        Expect(416, "RANGE_INVALID"),
        ("Range: bytes=0-1", "Range: bytes=2-3"),
        content_range="bytes */{size}",
    ),
    Case("put-manifest", f"{ALPINE}/manifests/latest", READ_ONLY, method="PUT", allow=True),
    Case("post-upload", f"{ALPINE}/blobs/uploads/", READ_ONLY, method="POST", allow=True),
    Case("delete-blob", f"{ALPINE}/blobs/{{blob}}", READ_ONLY, method="DELETE", allow=True),
    Case("patch-upload", f"{ALPINE}/blobs/uploads/0f1e2d", READ_ONLY, method="PATCH", allow=True),
    Case("delete-manifest", f"{ALPINE}/manifests/latest", READ_ONLY, method="DELETE", allow=True),
    Case("catalog", "/v2/_catalog", READ_ONLY, allow=True),
    Case("upload-path", f"{ALPINE}/blobs/uploads/", READ_ONLY, allow=True),
    Case("ns-unknown", f"{ALPINE}/manifests/latest?ns=evil.example", Expect(404, "NAME_UNKNOWN")),
    Case(
        "registry-prefix-unknown",
        "/v2/evil.example/library/alpine/manifests/latest",
        Expect(404, "NAME_UNKNOWN"),
    ),
    # From a peer that is not a trusted proxy, X-Forwarded-For is ignored.
    Case(
        "xff-untrusted",
        f"{ALPINE}/manifests/latest",
        Expect(200),
        ("X-Forwarded-For: 203.0.113.9",),
        logged_peer="127.0.0.1",
    ),
]


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    reset: int | None = None


def fill(text: str, hostile: Hostile, protocol: str) -> str:
    digest = hostile.blob
    return (
        text.replace("{blob}", digest)
        .replace("{BLOB}", f"sha256:{digest.removeprefix('sha256:').upper()}")
        .replace("{size}", str(hostile.blob_size))
        .replace("{sha512}", "sha512:" + hashlib.sha512(protocol.encode()).hexdigest())
    )


def send(
    hostile: Hostile, protocol: str, method: str, path: str, headers: tuple[str, ...], raw: bool
) -> Answer:
    if not raw:
        h2 = protocol == "h2-tls"
        base = hostile.tls_url if h2 else hostile.plain_url
        result = curl(base + path, http2=h2, cacert=hostile.ca, headers=headers, method=method, timeout=10)
        assert result.returncode == 0, result.stderr
        assert result.http_version == ("2" if h2 else "1.1")
        return Answer(result.status, result.headers, result.body)
    target = path.encode("utf-8")
    pairs = [
        (name.strip().lower().encode(), value.strip().encode())
        for name, _, value in (h.partition(":") for h in headers)
    ]
    if protocol == "h1-plain":
        head = b"".join(b"%s: %s\r\n" % pair for pair in pairs)
        payload = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sConnection: close\r\n\r\n" % (
            method.encode(),
            target,
            head,
        )
        ended = exchange(hostile, "plain", payload)
        assert ended.closed
        [response] = parse_responses(ended.data)
        return Answer(response.status, response.headers, response.body)
    with hostile.h2() as client:
        stream = client.response(client.request(target, method.encode(), pairs))
        assert stream.done, "no answer within 5 s"
        return Answer(stream.status or 0, dict(_decoded(stream)), bytes(stream.body), stream.reset)


def _decoded(stream: Stream) -> Iterator[tuple[str, str]]:
    for name, value in stream.headers:
        yield name.decode("latin-1"), value.decode("latin-1")


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request(hostile: Hostile, case: Case, protocol: str) -> None:
    expect = case.expected(protocol)
    request_id = f"hostile-{case.id}-{protocol}"
    headers = (*(fill(h, hostile, protocol) for h in case.headers), f"X-Request-Id: {request_id}")
    path = fill(case.path, hostile, protocol)
    answer = send(hostile, protocol, case.method, path, headers, case.raw)

    if expect.reset is not None:
        assert answer.reset == expect.reset and answer.status == 0, answer
        return
    assert answer.status == expect.status, (answer.status, answer.body[:300])
    if expect.code is not None:
        assert oci_code(answer.headers, answer.body) == expect.code
        assert answer.headers.get("docker-distribution-api-version") == "registry/2.0"
    if case.whole_blob:
        assert len(answer.body) == hostile.blob_size and "content-range" not in answer.headers
    if case.content_range is not None:
        assert answer.headers.get("content-range") == fill(case.content_range, hostile, protocol)
    if case.allow:
        assert answer.headers.get("allow") == "GET, HEAD"
    if case.reaches_upstream:
        digest = fill("{sha512}", hostile, protocol)
        wait_until_sync(
            lambda: any(digest in p for _m, p, _s in hostile.origin.access_log()),
            message="the upstream was never asked for the sha512 digest",
        )
    if case.logged_peer is not None:
        record = wait_for_request(hostile.edge.log_path, request_id)
        assert record["peer"] == case.logged_peer, record
        assert record["protocol"] == ("HTTP/2" if protocol == "h2-tls" else "HTTP/1.1")
        assert "203.0.113.9" not in json.dumps(record)


def test_table_left_the_cache_untouched(hostile: Hostile) -> None:
    """Runs after the table: no file under blobs/ or manifests/ appeared, vanished, grew or was
    rewritten (size and mtime as after the first pull)."""
    assert snapshot(hostile.edge.cache_dir) == hostile.cache_snapshot


# -- 2. HTTP/1.1 framing on raw sockets ----------------------------------------------------------


@pytest.mark.parametrize("listener", LISTENERS)
def test_absolute_form_target_is_not_proxied(hostile: Hostile, listener: str) -> None:
    """`GET http://evil.example/v2/`: edgecache never becomes a forward proxy. aiohttp keeps the
    absolute URI as the raw path, which is no API route (404). granian reduces it to its path, as
    RFC 9112 section 3.2.2 says a server MUST accept the absolute-form, so the TLS listener answers
    for its own /v2/ exactly as for `GET /v2/`: the authority is ignored, nothing is fetched."""
    payload = b"GET http://evil.example/v2/ HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    ended = exchange(hostile, listener, payload)
    assert ended.closed
    [response] = parse_responses(ended.data)
    assert b"evil.example" not in ended.data
    if listener == "plain":
        assert response.status == 404 and response.oci_code() == "UNSUPPORTED"
    else:
        same = parse_responses(
            exchange(
                hostile, listener, b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            ).data
        )[0]
        assert (response.status, response.body) == (same.status, same.body) == (200, b"{}")
        assert response.headers.get("docker-distribution-api-version") == "registry/2.0"


@pytest.mark.parametrize("listener", LISTENERS)
def test_connect_is_refused(hostile: Hostile, listener: str) -> None:
    payload = b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n"
    ended = exchange(hostile, listener, payload)
    assert ended.closed
    [response] = parse_responses(ended.data)
    assert response.status == 404 and response.oci_code() == "UNSUPPORTED"
    assert b"evil.example" not in ended.data


SMUGGLED = b"GET /v2/_catalog HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Marker: " + MARKER + b"\r\n\r\n"
SMUGGLING = {
    "te-and-cl": b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "two-cl": b"Content-Length: 0\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED),
    "cl-list": b"Content-Length: 0, %d\r\n\r\n" % len(SMUGGLED),
    "xchunked": b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te-space-before-colon": b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te-chunked-identity": b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te-obs-fold": b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
}
# granian (hyper) on the TLS listener: a bare 400 for ambiguous framing, except Transfer-Encoding with
# Content-Length, where RFC 9112 section 6.1 lets the server let chunked win and then close the
# connection: it answers the outer request (/v2/ -> {}) and never reads the smuggled one.
TLS_SMUGGLING_STATUS = {"te-and-cl": 200}


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("variant", list(SMUGGLING))
def test_request_smuggling_gets_one_answer_then_close(hostile: Hostile, listener: str, variant: str) -> None:
    payload = b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n" + SMUGGLING[variant] + SMUGGLED
    ended = exchange(hostile, listener, payload)
    assert ended.closed, "the connection must be closed after an ambiguous request"
    responses = parse_responses(ended.data)
    assert len(responses) == 1, [r.status for r in responses]  # the smuggled request is never answered
    response = responses[0]
    assert MARKER not in ended.data and b"_catalog" not in ended.data
    status = TLS_SMUGGLING_STATUS.get(variant, 400) if listener == "tls-h1" else 400
    if status == 200:
        assert (response.status, response.body, response.headers.get("connection")) == (200, b"{}", "close")
    else:
        assert_refused(listener, response, status)


def head_with(extra: bytes, target: bytes = b"/v2/") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"Connection: close\r\n\r\n"


OVERSIZED_PLAIN = {
    # aiohttp's limits: 8190 bytes per header field and for the request line, 128 fields (130 sent).
    "field-over-8k": (head_with(b"X-Big: " + MARKER + b"a" * 9000 + b"\r\n"), 431),
    "target-over-8k": (head_with(b"", b"/v2/" + MARKER + b"a" * 9000), 431),
    "over-128-fields": (head_with(b"".join(b"X-F%d: %s\r\n" % (i, MARKER) for i in range(128))), 431),
}


@pytest.mark.parametrize("variant", list(OVERSIZED_PLAIN))
def test_plain_oversized_head_is_refused_before_the_front(hostile: Hostile, variant: str) -> None:
    """Refused as OCI JSON by the HTTP layer: the request never reaches the front, so no identity is
    looked up and no access-log line is written for it."""
    payload, status = OVERSIZED_PLAIN[variant]
    # Every earlier request's line written first (a line comes one loop pass after its response).
    ready = f"before-oversized-{variant}"
    assert send(hostile, "h1-plain", "GET", "/v2/", (f"X-Request-Id: {ready}",), raw=False).status == 200
    wait_for_request(hostile.edge.log_path, ready)
    before = access_records(hostile.edge.log_path)
    ended = exchange(hostile, "plain", payload)
    assert ended.closed
    [response] = parse_responses(ended.data)
    assert_refused("plain", response, status)
    # A request sent after the refusal is logged: had the refused one been, its line would come first.
    marker = f"after-oversized-{variant}"
    answer = send(hostile, "h1-plain", "GET", "/v2/", (f"X-Request-Id: {marker}",), raw=False)
    assert answer.status == 200
    wait_for_request(hostile.edge.log_path, marker)
    after = access_records(hostile.edge.log_path)
    assert [r["request_id"] for r in after[len(before) :]] == [marker], after[len(before) :]


OVERSIZED_TLS = {
    # hyper's head buffer (max_buffer_size = 16 KiB + 4 KiB; measured: a 32 KB field still passes,
    # 48 KB does not) and its limit of 100 header fields.
    "field-64k": head_with(b"X-Big: " + MARKER + b"a" * 65536 + b"\r\n"),
    "over-100-fields": head_with(b"".join(b"X-F%d: %s\r\n" % (i, MARKER) for i in range(100))),
}


@pytest.mark.parametrize("variant", list(OVERSIZED_TLS))
def test_tls_h1_oversized_head_is_refused(hostile: Hostile, variant: str) -> None:
    ended = exchange(hostile, "tls-h1", OVERSIZED_TLS[variant])
    assert ended.closed
    [response] = parse_responses(ended.data)
    assert_refused("tls-h1", response, 431)


# -- 3. slow clients -----------------------------------------------------------------------------


def start_tls_probes(
    pool: concurrent.futures.ThreadPoolExecutor, hostile: Hostile
) -> dict[str, concurrent.futures.Future[Closed]]:
    """Connections to the TLS listener that stall, started at once so their waits overlap the rest
    of the module: one that never sends a ClientHello, and two that finish the handshake (ALPN
    http/1.1, h2) and then send nothing at all."""

    # Timed from before connecting, as in exchange(): lower bounds on `elapsed` stay sound.
    def no_client_hello() -> Closed:
        start = time.monotonic()
        return wait_closed(connect(hostile.tls_port), GRANIAN_HANDSHAKE_LIMIT + SLACK + 1, start)

    def silent_after_handshake(alpn: str) -> Closed:
        start = time.monotonic()
        return wait_closed(connect(hostile.tls_port, hostile.ca, alpn), IDLE_TIMEOUT + SLACK + 1.5, start)

    return {
        "no-client-hello": pool.submit(no_client_hello),
        "silent-http/1.1": pool.submit(silent_after_handshake, "http/1.1"),
        "silent-h2": pool.submit(silent_after_handshake, "h2"),
    }


def drip(sock: socket.socket, prefix: bytes, limit: float) -> Closed:
    """Send `prefix`, then one more header byte every 0.2 s, until the server closes or `limit`."""
    start = time.monotonic()
    sock.sendall(prefix)
    data = bytearray()
    try:
        while time.monotonic() - start < limit:
            sock.settimeout(0.2)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                chunk = None
            except OSError:
                return Closed(True, time.monotonic() - start, bytes(data))
            if chunk == b"":
                return Closed(True, time.monotonic() - start, bytes(data))
            if chunk:
                data += chunk
                continue
            try:
                sock.sendall(b"a")
            except OSError:
                return Closed(True, time.monotonic() - start, bytes(data))
        return Closed(False, time.monotonic() - start, bytes(data))
    finally:
        sock.close()


SLOW_PLAIN = {
    "half-request-line": b"GET /v2/library/alp",
    "half-headers": b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    "nothing": b"",
}


@pytest.mark.parametrize("variant", list(SLOW_PLAIN))
def test_plain_slow_client_gets_408_and_is_closed(hostile: Hostile, variant: str) -> None:
    ended = exchange(hostile, "plain", SLOW_PLAIN[variant], timeout=HEADER_TIMEOUT + SLACK + 2)
    assert ended.closed and HEADER_TIMEOUT - 0.1 <= ended.elapsed <= HEADER_TIMEOUT + SLACK, ended
    [response] = parse_responses(ended.data)
    assert response.status == 408 and response.oci_code() == "UNSUPPORTED"
    assert response.headers.get("connection") == "close"


def test_plain_drip_fed_headers_do_not_extend_the_deadline(hostile: Hostile) -> None:
    """One header byte every 0.2 s: the deadline counts from the connection, not from the last byte."""
    ended = drip(connect(hostile.plain_port), b"GET /v2/ HTTP/1.1\r\nX-Slow: ", HEADER_TIMEOUT + SLACK + 2)
    assert ended.closed and ended.elapsed <= HEADER_TIMEOUT + SLACK, ended
    [response] = parse_responses(ended.data)
    assert response.status == 408 and response.oci_code() == "UNSUPPORTED"


def test_tls_without_client_hello_is_closed(hostile: Hostile) -> None:
    """A TCP connection that never starts TLS is closed by edgecache's guard at idle_timeout (granian's
    own handshake deadline, 10 s and not configurable in granian 2.8, comes later)."""
    ended = hostile.tls_probes["no-client-hello"].result(timeout=GRANIAN_HANDSHAKE_LIMIT + 10)
    assert ended.closed and ended.elapsed <= IDLE_TIMEOUT + SLACK, ended
    assert ended.data == b""


@pytest.mark.parametrize("alpn", ["http/1.1", "h2"])
def test_tls_silent_connection_is_closed(hostile: Hostile, alpn: str) -> None:
    """granian never closes a connection that completes the handshake and then says nothing (hyper's
    header_read_timeout starts at the first byte; HTTP/2 pings start after the preface; measured open
    after 300 s): edgecache's guard closes it once it has been silent both ways for idle_timeout."""
    ended = hostile.tls_probes[f"silent-{alpn}"].result(timeout=IDLE_TIMEOUT + SLACK + 10)
    assert ended.closed and IDLE_TIMEOUT - 0.1 <= ended.elapsed <= IDLE_TIMEOUT + SLACK, ended


def test_tls_h1_half_header_is_closed(hostile: Hostile) -> None:
    """granian's header_read_timeout (set from header_timeout) cuts a half-sent head: the
    connection is closed at ~1 s, without a response."""
    ended = exchange(
        hostile, "tls-h1", b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n", timeout=HEADER_TIMEOUT + SLACK + 2
    )
    assert ended.closed and ended.elapsed <= HEADER_TIMEOUT + SLACK, ended
    assert ended.data == b"" or parse_responses(ended.data)[0].status == 408


def test_tls_h1_drip_fed_headers_do_not_extend_the_deadline(hostile: Hostile) -> None:
    sock = connect(hostile.tls_port, hostile.ca, "http/1.1")
    ended = drip(sock, b"GET /v2/ HTTP/1.1\r\nX-Slow: ", HEADER_TIMEOUT + SLACK + 2)
    assert ended.closed and ended.elapsed <= HEADER_TIMEOUT + SLACK, ended
    assert b"200 OK" not in ended.data


def test_connection_cap_per_listener(hostile: Hostile) -> None:
    """16 connections held with half a request each; the 17th is answered 503 TOOMANYREQUESTS and
    closed. The cap is per listener: the TLS listener still serves meanwhile. The held ones get their
    408 at the header deadline, and then the plain listener takes connections again."""
    held: list[socket.socket] = []
    start = time.monotonic()
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = connect(hostile.plain_port)
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            held.append(sock)
        over_tls = exchange(
            hostile, "tls-h1", b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        refused = exchange(hostile, "plain", b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout=3)
        # The 17th is refused, so the 16 held ones were still open then, and so all along the TLS
        # exchange before it: an ordering, not a stopwatch, shows the cap is per listener.
        assert refused.closed
        [response] = parse_responses(refused.data)
        assert response.status == 503 and response.oci_code() == "TOOMANYREQUESTS"
        assert response.headers.get("retry-after") == "1"
        assert parse_responses(over_tls.data)[0].status == 200
        for sock in held:
            ended = wait_closed(sock, HEADER_TIMEOUT + SLACK, start)
            assert ended.closed and parse_responses(ended.data)[0].status == 408
    finally:
        for sock in held:
            sock.close()
    again = exchange(hostile, "plain", b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert parse_responses(again.data)[0].status == 200


KEEPALIVE_REQUEST = b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def open_idle_keepalive(hostile: Hostile, listener: str) -> socket.socket:
    """A connection that made one complete keep-alive request, read its answer, and went quiet."""
    tls = listener != "plain"
    sock = connect(hostile.tls_port, hostile.ca) if tls else connect(hostile.plain_port)
    sock.sendall(KEEPALIVE_REQUEST)
    data = b""
    while not data.endswith(b"{}"):
        chunk = sock.recv(65536)
        assert chunk, "closed before answering"
        data += chunk
    assert parse_responses(data)[0].status == 200
    return sock


def test_tls_connections_over_the_cap_are_closed_idle_longest_first(tmp_path: Path, origin: Registry) -> None:
    """granian accepts every connection; edgecache's guard brings the count back to max_connections
    by closing the connections silent the longest (long before their idle_timeout, 60 s here), and a
    working client is served meanwhile. Its own edgecache: the module's has a short idle_timeout."""
    ca = TestCA(tmp_path / "ca")
    server = ca.issue("server")
    config = f'[server]\ntls_cert = "{server.cert}"\ntls_key = "{server.key}"\nmax_connections = 8\n'
    with spawn_edge(tmp_path, origin.url, config=config, tls=True) as edge:
        port = int(edge.url.rsplit(":", 1)[1])
        held = []
        for _ in range(20):  # one at a time, so "idle the longest" is "opened first"; granian takes 16
            held.append(connect(port, ca.cert_path))
            # Not a wait for anything: the gap between connections IS the input (distinct idle times).
            time.sleep(0.05)
        try:
            still = [True] * len(held)

            def down_to_the_cap() -> bool:
                still[:] = [
                    is_open and not peer_closed(sock) for sock, is_open in zip(held, still, strict=True)
                ]
                return sum(still) <= 8

            wait_until_sync(down_to_the_cap, message=lambda: f"over the cap: {still}")
            assert all(still[-6:]), still  # the newest stay; the oldest went first
            assert curl(f"{edge.url}/v2/", cacert=ca.cert_path, http2=True).status == 200
        finally:
            for sock in held:
                sock.close()
        metrics = curl(f"{edge.url}/metrics", cacert=ca.cert_path).body.decode()
        over_cap = re.search(r'edgecache_connections_closed_total\{reason="over_cap"\} (\S+)', metrics)
        assert over_cap and float(over_cap.group(1)) >= 12


def test_tls_h1_idle_keepalive_connection_is_closed(hostile: Hostile) -> None:
    """After a response, hyper's header_read_timeout covers the wait for the next request's head."""
    ended = wait_closed(open_idle_keepalive(hostile, "tls-h1"), HEADER_TIMEOUT + SLACK + 2)
    assert ended.closed and ended.elapsed <= HEADER_TIMEOUT + SLACK, ended
    assert ended.data == b""


def test_plain_idle_keepalive_connections_do_not_hold_the_cap(hostile: Hostile) -> None:
    """16 clients each make one request and keep the connection open without a word: after the header
    deadline (the TLS listener closes such connections at ~1 s), a newcomer must be served, not 503."""
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            held.append(open_idle_keepalive(hostile, "plain"))
        # The server closes the idle ones (keep-alive timeout: 1.5 x header_timeout), freeing the cap.
        wait_until_sync(
            lambda: all(peer_closed(sock, drain=True) for sock in held),
            timeout=HEADER_TIMEOUT * 1.5 + SLACK + 5,
            message="idle keep-alive connections are held open",
        )
        newcomer = exchange(
            hostile, "plain", KEEPALIVE_REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        )
        [response] = parse_responses(newcomer.data)
        assert response.status == 200, (response.status, response.body)
    finally:
        for sock in held:
            sock.close()


# -- 4. HTTP/2 abuse -----------------------------------------------------------------------------


# How long a new connection may take to get a cached manifest after an attack: the point is that the
# server is not stuck or starved, not its speed, so the bound is wide enough for a loaded machine.
PROMPTLY = 10.0


def assert_still_serving(hostile: Hostile) -> None:
    """A new connection gets a cached manifest promptly, and the process is alive."""
    start = time.monotonic()
    with hostile.h2() as client:
        stream = client.response(
            client.request(f"{ALPINE}/manifests/latest", extra=[(b"accept", DOCKER_MANIFEST.encode())]),
            PROMPTLY,
        )
    assert stream.status == 200 and stream.ended, stream
    assert time.monotonic() - start < PROMPTLY
    assert hostile.alive()


def test_h2_rapid_reset(hostile: Hostile) -> None:
    """2000 streams, each opened and reset at once (CVE-2023-44487), in bursts of 100 per write, on
    as many connections as it takes. Measured with granian 2.8.9 (hyper/h2): after ~20 reset streams
    that it had not yet handed to the app, the server sends GOAWAY ENHANCE_YOUR_CALM
    ("too_many_resets") and closes the connection, so each connection carries ~20 of them."""
    total, connections, goaways = 0, 0, []
    deadline = time.monotonic() + 20
    while total < 2000 and connections < 200 and time.monotonic() < deadline:
        connections += 1
        with hostile.h2() as client:
            client.pump(lambda c=client: bool(c.server_settings), SETTINGS_WAIT)
            try:
                while total < 2000 and not (client.closed or client.goaway):
                    frames = []
                    for _ in range(100):
                        stream_id = client.new_stream_id()
                        block = client.encode(client.request_headers("/v2/"))
                        frames += [
                            HeadersFrame(stream_id, data=block, flags={"END_HEADERS", "END_STREAM"}),
                            RstStreamFrame(stream_id, error_code=CANCEL),
                        ]
                    client.send(*frames)
                    total += 100
                    client.pump(lambda: False, 0.01)
            except OSError:
                pass  # the server closed while we were still writing
            client.wait_closed(3.0)
            goaways.append(client.goaway)
            assert client.goaway is not None or client.closed, "server kept a rapid-reset connection"
    assert total >= 2000, f"only {total} streams in 20 s"
    assert all(g is not None and g.error_code == ENHANCE_YOUR_CALM for g in goaways), goaways
    # At most 200 reset streams per connection (stream ids are odd); measured: ~20.
    assert max(g.last_stream_id for g in goaways if g) < 2 * 200, "too many reset streams accepted"
    assert_still_serving(hostile)


def test_h2_continuation_flood(hostile: Hostile) -> None:
    """HEADERS without END_HEADERS, then CONTINUATION frames of 16 KiB each, up to 4 MiB, never
    ending the block. Measured: GOAWAY ENHANCE_YOUR_CALM ("too_many_continuations") after ~144 KB,
    then a close; the server does not buffer the block."""
    with hostile.h2() as client:
        client.pump(lambda: bool(client.server_settings), SETTINGS_WAIT)
        client.answer_pings = False  # nothing may come between HEADERS and its CONTINUATIONs
        stream_id = client.new_stream_id()
        client.send(
            HeadersFrame(stream_id, data=client.encode(client.request_headers("/v2/")), flags={"END_STREAM"})
        )
        sent = 0
        try:
            for index in range(256):
                block = client.encode([(b"x-fill-%d" % index, MARKER + b"a" * 16000)])
                client.send(ContinuationFrame(stream_id, data=block))
                sent += len(block)
                client.pump(lambda: False, 0.002)
                if client.closed or client.goaway:
                    break
        except OSError:
            pass
        client.wait_closed(5.0)
        assert client.closed and client.goaway is not None, "the flood was not cut"
        assert client.goaway.error_code in (ENHANCE_YOUR_CALM, PROTOCOL_ERROR), client.goaway
        assert sent < 1024 * 1024, f"{sent} header bytes buffered before the cut"
        assert client.streams.get(stream_id, Stream()).status is None
    assert_still_serving(hostile)


def test_h2_header_block_that_never_ends_is_not_held(hostile: Hostile) -> None:
    """HEADERS without END_HEADERS and one CONTINUATION, then silence (PINGs unanswered, since no
    frame may interleave): the keep-alive ping (interval header_timeout, timeout 1 s) closes it."""
    with hostile.h2() as client:
        client.pump(lambda: bool(client.server_settings), SETTINGS_WAIT)
        client.answer_pings = False
        stream_id = client.new_stream_id()
        client.send(
            HeadersFrame(stream_id, data=client.encode(client.request_headers("/v2/")), flags={"END_STREAM"}),
            ContinuationFrame(stream_id, data=client.encode([(b"x-slow", b"a" * 1000)])),
        )
        start = time.monotonic()
        assert client.wait_closed(2 * HEADER_TIMEOUT + 1 + SLACK), "a never-ending header block is held"
        assert time.monotonic() - start <= 2 * HEADER_TIMEOUT + 1 + SLACK
        assert client.streams.get(stream_id, Stream()).status is None


def test_h2_oversized_header_list_is_refused(hostile: Hostile) -> None:
    """Under SETTINGS_MAX_HEADER_LIST_SIZE (16 KiB) is served; over it gets granian's 431 (no body) on
    that stream and the connection stays usable; a block several times the limit (measured: from
    64 KiB) ends the connection with GOAWAY ENHANCE_YOUR_CALM ("header_list_way_too_large")."""
    with hostile.h2() as client:
        client.pump(lambda: bool(client.server_settings), SETTINGS_WAIT)
        assert client.server_settings.get(SettingsFrame.MAX_HEADER_LIST_SIZE) == H2_MAX_HEADER_LIST
        small = client.response(client.request("/v2/", extra=[(b"x-big", b"a" * 15000)]))
        assert (small.status, bytes(small.body)) == (200, b"{}")
        for size in (H2_MAX_HEADER_LIST + 100, 3 * H2_MAX_HEADER_LIST):
            big = client.response(client.request("/v2/", extra=[(b"x-big", MARKER + b"a" * size)]))
            assert (big.status, bytes(big.body), big.ended) == (431, b"", True), big
        assert client.goaway is None and not client.closed
        after = client.response(client.request("/v2/"))
        assert (after.status, bytes(after.body)) == (200, b"{}")
    with hostile.h2() as client:
        huge = client.response(client.request("/v2/", extra=[(b"x-big", MARKER + b"a" * 100_000)]))
        assert huge.status is None and client.goaway is not None, (huge, client.goaway)
        assert client.goaway.error_code == ENHANCE_YOUR_CALM, client.goaway
    assert_still_serving(hostile)


def test_h2_streams_over_the_concurrency_limit_are_refused(hostile: Hostile) -> None:
    """With the client's stream windows at 0, every answer stays open (its body cannot be sent), so
    128 streams are in flight; 32 more are reset REFUSED_STREAM. Opening the windows then lets all
    128 finish, and the connection takes new requests."""
    extra = 32
    with hostile.h2(initial_window=0) as client:
        client.pump(lambda: bool(client.server_settings), SETTINGS_WAIT)
        assert client.server_settings.get(SettingsFrame.MAX_CONCURRENT_STREAMS) == H2_MAX_STREAMS
        ids = [client.request("/v2/") for _ in range(H2_MAX_STREAMS + extra)]
        streams = [client.streams[i] for i in ids]
        settled = client.pump(
            lambda: sum(s.status is not None or s.reset is not None for s in streams) == len(ids), 5.0
        )
        assert settled, "not every stream was answered or refused within 5 s"
        refused = [i for i, s in zip(ids, streams, strict=True) if s.reset is not None]
        assert len(refused) == extra and all(client.streams[i].reset == REFUSED_STREAM for i in refused)
        assert sum(s.status == 200 for s in streams) == H2_MAX_STREAMS
        assert client.goaway is None and not client.closed
        client.send(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: MAX_WINDOW}))
        answered = [s for s in streams if s.status == 200]
        assert client.pump(lambda: all(s.ended for s in answered), 5.0)
        assert {bytes(s.body) for s in answered} == {b"{}"}
        after = client.response(client.request(f"{ALPINE}/manifests/latest"))
        assert after.status == 200 and after.ended
    assert hostile.alive()


def test_nothing_changed_on_disk_after_all_of_it(hostile: Hostile) -> None:
    assert snapshot(hostile.edge.cache_dir) == hostile.cache_snapshot
    assert hostile.alive()

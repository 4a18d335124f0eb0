"""A raw HTTP/2 client for hostile tests: frames built by hand (hyperframe) and header blocks encoded
with hpack, with no validation of what is sent, so a test can send what no polite client would
(control bytes in :path, header blocks that never end, streams reset as soon as they open).

It reads what the server answers frame by frame: responses per stream, RST_STREAM codes, GOAWAY,
and whether the connection was closed. Every wait is bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Error codes (RFC 9113 section 7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB
ERROR_NAMES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}
MAX_WINDOW = 2**31 - 1

Header = tuple[bytes, bytes]


@dataclass
class Stream:
    headers: list[Header] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False  # END_STREAM seen from the server
    reset: int | None = None  # RST_STREAM error code from the server

    @property
    def status(self) -> int | None:
        for name, value in self.headers:
            if name == b":status":
                return int(value)
        return None

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name.encode():
                return value.decode("latin-1")
        return None

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None


@dataclass(frozen=True)
class GoAway:
    last_stream_id: int
    error_code: int
    debug: bytes

    @property
    def error_name(self) -> str:
        return ERROR_NAMES.get(self.error_code, hex(self.error_code))


class H2Client:
    """One TLS connection negotiated to h2 by ALPN, spoken frame by frame."""

    def __init__(
        self,
        host: str,
        port: int,
        cafile: Path,
        *,
        timeout: float = 5.0,
        initial_window: int = MAX_WINDOW,
        authority: str | None = None,
    ) -> None:
        context = ssl.create_default_context(cafile=str(cafile))
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname=host)
        assert self.sock.selected_alpn_protocol() == "h2", self.sock.selected_alpn_protocol()
        self.authority = (authority or f"{host}:{port}").encode()
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.decoder.max_allowed_table_size = 65536
        self.streams: dict[int, Stream] = {}
        self.server_settings: dict[int, int] = {}
        self.goaway: GoAway | None = None
        self.closed = False  # the server closed the TCP connection (EOF or reset)
        self.frames_received = 0
        # Answer the server's PINGs (keep-alive). Off while a header block is deliberately left
        # open: no other frame may come between HEADERS and its last CONTINUATION.
        self.answer_pings = True
        self.pings_received = 0
        self._next_stream = 1
        self._buffer = bytearray()
        self._header_block: tuple[int, bytearray, bool] | None = None
        self.send(
            PREFACE,
            SettingsFrame(
                0, settings={SettingsFrame.ENABLE_PUSH: 0, SettingsFrame.INITIAL_WINDOW_SIZE: initial_window}
            ),
            WindowUpdateFrame(0, window_increment=MAX_WINDOW - 65535),
        )

    # -- sending -------------------------------------------------------------------------------

    def send(self, *parts: bytes | Frame) -> None:
        data = b"".join(p if isinstance(p, bytes) else p.serialize() for p in parts)
        self.sock.sendall(data)

    def new_stream_id(self) -> int:
        stream_id = self._next_stream
        self._next_stream += 2
        return stream_id

    def request_headers(
        self, path: bytes | str, method: bytes | str = b"GET", extra: Iterable[Header] = ()
    ) -> list[Header]:
        as_bytes = [v.encode("utf-8") if isinstance(v, str) else v for v in (method, path)]
        return [
            (b":method", as_bytes[0]),
            (b":scheme", b"https"),
            (b":authority", self.authority),
            (b":path", as_bytes[1]),
            *extra,
        ]

    def encode(self, headers: Iterable[Header]) -> bytes:
        """An hpack block; literal never-indexed, so the server's dynamic table is left alone even
        when the block is refused or never finished."""
        return bytes(self.encoder.encode([(n, v, True) for n, v in headers], huffman=False))

    def send_headers(self, stream_id: int, headers: Iterable[Header], *, end_stream: bool = True) -> None:
        """HEADERS (+ CONTINUATION as needed for the default 16 KiB frame size), END_HEADERS at the end."""
        block = self.encode(headers)
        chunk = 16384
        pieces = [block[i : i + chunk] for i in range(0, len(block), chunk)] or [b""]
        flags = {"END_STREAM"} if end_stream else set()
        frames: list[Frame] = []
        first = HeadersFrame(
            stream_id, data=pieces[0], flags=flags | ({"END_HEADERS"} if len(pieces) == 1 else set())
        )
        frames.append(first)
        for index, piece in enumerate(pieces[1:], start=2):
            last = index == len(pieces)
            frames.append(ContinuationFrame(stream_id, data=piece, flags={"END_HEADERS"} if last else set()))
        self.streams.setdefault(stream_id, Stream())
        self.send(*frames)

    def request(
        self,
        path: bytes | str,
        method: bytes | str = b"GET",
        extra: Iterable[Header] = (),
        *,
        end_stream: bool = True,
    ) -> int:
        stream_id = self.new_stream_id()
        self.send_headers(stream_id, self.request_headers(path, method, extra), end_stream=end_stream)
        return stream_id

    def reset(self, stream_id: int, code: int = CANCEL) -> None:
        self.send(RstStreamFrame(stream_id, error_code=code))

    # -- receiving -----------------------------------------------------------------------------

    def pump(self, until: Callable[[], bool], timeout: float) -> bool:
        """Read and handle frames until `until()` holds, the connection closes or `timeout` passes;
        returns whether `until()` held."""
        deadline = time.monotonic() + timeout
        while not until():
            if self.closed:
                return until()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._read_some(remaining)
        return True

    def response(self, stream_id: int, timeout: float = 5.0) -> Stream:
        stream = self.streams.setdefault(stream_id, Stream())
        self.pump(lambda: stream.done or self.goaway_covers(stream_id), timeout)
        return stream

    def goaway_covers(self, stream_id: int) -> bool:
        """The server said, by GOAWAY, that it will not process this stream."""
        return self.goaway is not None and stream_id > self.goaway.last_stream_id

    def wait_closed(self, timeout: float) -> bool:
        return self.pump(lambda: self.closed, timeout)

    def _read_some(self, timeout: float) -> None:
        self.sock.settimeout(max(0.01, min(timeout, 1.0)))
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return
        except (ConnectionError, ssl.SSLError, OSError):
            self.closed = True
            return
        if not data:
            self.closed = True
            return
        self._buffer += data
        while len(self._buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._buffer[:9]))
            if len(self._buffer) < 9 + length:
                break
            frame.parse_body(memoryview(bytes(self._buffer[9 : 9 + length])))
            del self._buffer[: 9 + length]
            self.frames_received += 1
            self._handle(frame)

    def _handle(self, frame: Frame) -> None:
        if isinstance(frame, SettingsFrame):
            if "ACK" not in frame.flags:
                self.server_settings.update(frame.settings)
                self._send_quietly(SettingsFrame(0, flags={"ACK"}))
        elif isinstance(frame, PingFrame):
            self.pings_received += "ACK" not in frame.flags
            if "ACK" not in frame.flags and self.answer_pings:
                self._send_quietly(PingFrame(0, opaque_data=frame.opaque_data, flags={"ACK"}))
        elif isinstance(frame, GoAwayFrame):
            self.goaway = GoAway(frame.last_stream_id, frame.error_code, bytes(frame.additional_data))
        elif isinstance(frame, HeadersFrame):
            self._header_block = (frame.stream_id, bytearray(frame.data), "END_STREAM" in frame.flags)
            if "END_HEADERS" in frame.flags:
                self._finish_header_block()
        elif isinstance(frame, ContinuationFrame):
            assert self._header_block is not None and self._header_block[0] == frame.stream_id
            self._header_block[1].extend(frame.data)
            if "END_HEADERS" in frame.flags:
                self._finish_header_block()
        elif isinstance(frame, DataFrame):
            stream = self.streams.setdefault(frame.stream_id, Stream())
            stream.body += frame.data
            stream.ended = stream.ended or "END_STREAM" in frame.flags
            if frame.flow_controlled_length:
                # Keep the connection window open (stream windows start at `initial_window`).
                self._send_quietly(WindowUpdateFrame(0, window_increment=frame.flow_controlled_length))
        elif isinstance(frame, RstStreamFrame):
            self.streams.setdefault(frame.stream_id, Stream()).reset = frame.error_code

    def _finish_header_block(self) -> None:
        assert self._header_block is not None
        stream_id, block, end_stream = self._header_block
        self._header_block = None
        headers = self.decoder.decode(bytes(block), raw=True)
        stream = self.streams.setdefault(stream_id, Stream())
        if stream.status is None or stream.status < 200:
            stream.headers = list(headers)
        stream.ended = stream.ended or end_stream

    def _send_quietly(self, frame: Frame) -> None:
        try:
            self.send(frame)
        except (ConnectionError, ssl.SSLError, OSError):
            self.closed = True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The access log and the per-request metrics, both written by each adapter once its response is sent.

One JSON object per line for log shippers (time, peer, identity, protocol, method, path, route,
status, bytes, duration, cache result, upstream and its status, request id), or a short readable line
for a terminal (peer, method, path, status, cache result, bytes, duration, upstream, request id).
Headers are never logged, so credentials cannot appear; the path is logged as sent (percent-encoded),
clipped and with control characters escaped, so hostile input cannot forge log lines.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from typing import TextIO

from edgecache.metrics import Metrics
from edgecache.trace import RequestTrace

log = logging.getLogger("edgecache.access")
# One encoder for every line: json.dumps with non-default separators builds a new one per call.
_COMPACT = json.JSONEncoder(separators=(",", ":"))
MAX_PENDING_LINES = 512  # written at once at most: a busy loop pass does not hold more than this


class AccessLog:
    """Each finished request: counted in the metrics, and its access line written (at level info).

    Lines go to the `edgecache.access` logger as records, unless `serve` hands over its JSON handler:
    then each line is encoded here and the lines of one event-loop pass are written together, under
    the handler's lock. A record through logging (make, handle, format, one write and flush per
    line) cost a third of the manifest hits a server could answer; this way they keep 90-100%
    of them. Access lines reach the stream one loop pass late (microseconds when idle), in order
    among themselves; another log line of that moment (a warning) may come before them."""

    def __init__(
        self,
        metrics: Metrics | None,
        log_format: str = "text",
        handler: logging.StreamHandler[TextIO] | None = None,
    ) -> None:
        self._metrics = metrics
        self._format = log_format
        self._handler = handler if log_format == "json" else None
        self._pending: list[str] = []

    def record(
        self,
        trace: RequestTrace,
        method: str,
        path: str,
        status: int,
        sent: int,
        *,
        peer: str,
        protocol: str = "HTTP/1.1",
    ) -> None:
        """Count one finished request in the metrics and write its access log line."""
        duration = time.perf_counter() - trace.started
        if self._metrics is not None:
            self._metrics.observe_request(trace.route, method, status, trace.cache, duration)
        if not log.isEnabledFor(logging.INFO):
            return
        path = loggable(path)
        if self._format != "json":
            upstream = f" upstream={trace.upstream}:{trace.upstream_status}" if trace.upstream else ""
            _emit(
                "%s %s %s %d %s %dB %.1fms%s id=%s",
                (
                    peer,
                    loggable(method),
                    path,
                    status,
                    trace.cache,
                    sent,
                    duration * 1000,
                    upstream,
                    trace.request_id,
                ),
                None,
            )
            return
        access = {
            "time": _timestamp(int(time.time())),
            "peer": peer,
            "identity": trace.identity or None,
            "protocol": protocol,
            "method": method,
            "path": path,
            "route": trace.route,
            "status": status,
            "bytes": sent,
            "duration_ms": round(duration * 1000, 2),
            "cache": trace.cache,
            "upstream": trace.upstream or None,
            "upstream_status": trace.upstream_status,
            "request_id": trace.request_id,
        }
        if self._handler is None:
            _emit("access", (), {"access": access})
            return
        self._pending.append(_COMPACT.encode(access) + "\n")
        if len(self._pending) >= MAX_PENDING_LINES:
            self.flush()
        elif len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop running: nothing would come back for them
                self.flush()

    def flush(self) -> None:
        """Write the lines waiting (the loop calls this after the pass that queued them; closing does)."""
        handler, pending = self._handler, self._pending
        if handler is None or not pending:
            return
        text = "".join(pending)
        pending.clear()
        handler.acquire()  # other log lines (any thread) go through this handler: whole lines each
        try:
            handler.stream.write(text)
            handler.flush()
        except (OSError, ValueError):  # a full disk or a closed stderr must not fail requests
            # Reported as logging reports a line it cannot write (once per failed write, on stderr).
            handler.handleError(logging.makeLogRecord({"msg": "access log lines lost"}))
        finally:
            handler.release()


def _emit(message: str, args: tuple[object, ...], extra: dict[str, object] | None) -> None:
    """One access record to the access logger's handlers, as `log.info` would hand it, less the
    search of the call stack for the caller's file and line (no access line shows them; it was a
    tenth of a logged request's cost)."""
    log.handle(log.makeRecord(log.name, logging.INFO, "", 0, message, args, None, extra=extra))


@functools.lru_cache(maxsize=2)
def _timestamp(second: int) -> str:
    """The local time of `second` as the access log writes it (formatted once per second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))


def loggable(text: str, limit: int = 512) -> str:
    """A client-chosen string made safe for a log line: bounded, ASCII, control characters escaped."""
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text  # the usual case, at C speed: nothing to clip or escape
    clipped = text[:limit].encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if " " <= c < "\x7f" else f"\\x{ord(c):02x}" for c in clipped)


class JsonFormatter(logging.Formatter):
    """Every log line as one JSON object: access records as they are, other records as
    time, level, logger and message."""

    def format(self, record: logging.LogRecord) -> str:
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            return _COMPACT.encode(access)
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _COMPACT.encode(entry)

"""The access log and the per-request metrics, both written by each adapter once its response is sent.

One JSON object per line for log shippers (time, peer, identity, protocol, method, path, route,
status, bytes, duration, cache result, upstream and its status, request id), or a short readable line
for a terminal (peer, method, path, status, cache result, bytes, duration, upstream, request id).
Headers are never logged, so credentials cannot appear; the path is logged as sent (percent-encoded),
clipped and with control characters escaped, so hostile input cannot forge log lines.
"""

from __future__ import annotations

import functools
import json
import logging
import time

from edgecache.metrics import Metrics
from edgecache.trace import RequestTrace

log = logging.getLogger("edgecache.access")
# One encoder for every line: json.dumps with non-default separators builds a new one per call.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def record_request(
    metrics: Metrics | None,
    log_format: str,
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
    if metrics is not None:
        metrics.observe_request(trace.route, method, status, trace.cache, duration)
    if not log.isEnabledFor(logging.INFO):
        return
    path = loggable(path)
    if log_format == "json":
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
        _emit("access", (), {"access": access})
    else:
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

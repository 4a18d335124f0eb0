"""The access log and the per-request metrics, both written by each adapter once its response is sent.

One JSON object per line for log shippers, or a short readable line for a terminal. Fields: time,
peer, method, path, route, status, bytes, duration, cache result, upstream and its status, request id.
Headers are never logged, so credentials cannot appear; the path is logged as sent (percent-encoded),
clipped and with control characters escaped, so hostile input cannot forge log lines.
"""

from __future__ import annotations

import json
import logging
import time

from edgecache.metrics import Metrics
from edgecache.trace import RequestTrace

log = logging.getLogger("edgecache.access")


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
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "peer": peer,
        "identity": trace.identity or None,
        "protocol": protocol,
        "method": method,
        "path": loggable(path),
        "route": trace.route,
        "status": status,
        "bytes": sent,
        "duration_ms": round(duration * 1000, 2),
        "cache": trace.cache,
        "upstream": trace.upstream or None,
        "upstream_status": trace.upstream_status,
        "request_id": trace.request_id,
    }
    if log_format == "json":
        log.info("access", extra={"access": record})
    else:
        upstream = f" upstream={trace.upstream}:{trace.upstream_status}" if trace.upstream else ""
        log.info(
            "%s %s %s %d %s %dB %.1fms%s id=%s",
            peer,
            loggable(method),
            loggable(path),
            status,
            trace.cache,
            sent,
            duration * 1000,
            upstream,
            trace.request_id,
        )


def loggable(text: str, limit: int = 512) -> str:
    """A client-chosen string made safe for a log line: bounded, ASCII, control characters escaped."""
    clipped = text[:limit].encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if " " <= c < "\x7f" else f"\\x{ord(c):02x}" for c in clipped)


class JsonFormatter(logging.Formatter):
    """Every log line as one JSON object: access records as they are, other records as
    time, level, logger and message."""

    def format(self, record: logging.LogRecord) -> str:
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            return json.dumps(access, separators=(",", ":"))
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))

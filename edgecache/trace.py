"""What one client request did, gathered while it runs: for the access log, metrics and X-Request-Id.

The front puts a RequestTrace in a context variable at the start of each request; code below it
(the upstream client) notes what it did there without knowing about the front. Tasks started from a
request (a fill it leads) inherit it, so the leader's trace also shows the fill's upstream status.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
from contextvars import ContextVar
from dataclasses import dataclass, field

from edgecache.outcomes import CacheResult

CURRENT: ContextVar[RequestTrace | None] = ContextVar("edgecache_request_trace", default=None)
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


_ID_PREFIX = secrets.token_hex(4)  # this process; a counter after it makes ids unique and cheap
_ID_COUNTER = itertools.count(1)


def request_id(offered: str | None) -> str:
    """The client's X-Request-Id when it is a safe token (it ends up in logs), else a new one
    (a random per-process prefix and a counter: no syscall per request, unlike secrets.token_hex)."""
    if offered and _CLIENT_ID.fullmatch(offered):
        return offered
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


@dataclass
class RequestTrace:
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    route: str = "unknown"
    cache: CacheResult = CacheResult.PASS
    upstream: str = ""
    upstream_status: int | None = None
    bytes_sent: int = 0
    identity: str = ""
    peer: str = ""


def note_upstream_status(status: int) -> None:
    trace = CURRENT.get()
    if trace is not None:
        trace.upstream_status = status

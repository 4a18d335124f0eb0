"""Per-upstream health, kept pure: when to stop asking an upstream that is failing or rate limiting.

After `down_after` consecutive failures (refused, reset, timeouts, 5xx) the upstream is down for
`down_for` seconds: requests that need it fail at once (503) and cached content is served instead of
hanging on it. When the period ends the next request tries again; one success brings it back up, one
more failure takes it down again. A 429 with Retry-After blocks it until then (429 to clients at once).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable

from edgecache import errors

MAX_RETRY_AFTER = 3600.0
DEFAULT_RETRY_AFTER = 30.0


class UpstreamHealth:
    def __init__(self, down_after: int, down_for: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._down_after = down_after
        self._down_for = down_for
        self._clock = clock
        self.failures = 0
        self._down_until = 0.0
        self._limited_until = 0.0

    def reconfigure(self, down_after: int, down_for: float) -> None:
        self._down_after, self._down_for = down_after, down_for

    @property
    def state(self) -> str:
        now = self._clock()
        if now < self._limited_until:
            return "rate_limited"
        if self.failures >= self._down_after and now < self._down_until:
            return "down"
        return "up"

    def check(self, name: str) -> None:
        """Raise at once instead of contacting an upstream known to be down or rate limiting."""
        now = self._clock()
        if now < self._limited_until:
            raise errors.UpstreamRateLimited(
                f"upstream {name} is rate limiting; retry later", retry_after=self._limited_until - now
            )
        if self.failures >= self._down_after and now < self._down_until:
            raise errors.UpstreamDown(
                f"upstream {name} is down; retrying it in {self._down_until - now:.0f}s"
            )

    def succeeded(self) -> None:
        self.failures = 0

    def failed(self) -> None:
        self.failures += 1
        if self.failures >= self._down_after:
            self._down_until = self._clock() + self._down_for

    def rate_limited(self, retry_after: float) -> None:
        self._limited_until = self._clock() + retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), bounded."""
    if not value:
        return DEFAULT_RETRY_AFTER
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER
        seconds = when - (time.time() if now is None else now)
    return min(max(seconds, 1.0), MAX_RETRY_AFTER)


def parse_ratelimit(value: str | None) -> float | None:
    """Docker Hub's `ratelimit-remaining: 76;w=21600` → 76."""
    if not value:
        return None
    head = value.split(";", 1)[0].strip()
    try:
        return float(head)
    except ValueError:
        return None

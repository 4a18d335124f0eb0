"""Per-upstream health, kept pure: when to stop asking an upstream that is failing or rate limiting,
and when to ask again.

After `down_after` consecutive failures (refused, reset, 5xx, a body cut short) the upstream is down;
a missed deadline (no connection, no response headers in time) takes it down at once, since every
later request would wait out the same deadline. While it is down, requests that need it fail at once
(503) and cached content is served instead of hanging on it; a single probe at a time
(`probe_until_up`, which UpstreamClient and the shared tier run with their own question) asks whether
it is back, first after PROBE_FIRST seconds, then after growing waits capped at
`down_for`. The first success, a probe's or a request's still in flight, brings it back up for every
request. An upstream that goes down again soon after recovering resumes the back-off where it left
off, so a flapping upstream is not probed every second for ever. A 429 with Retry-After blocks it
until then (429 to clients at once).
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Awaitable, Callable

from edgecache import errors

MAX_RETRY_AFTER = 3600.0
DEFAULT_RETRY_AFTER = 30.0
PROBE_FIRST = 1.0  # seconds from going down to the first probe


class UpstreamHealth:
    def __init__(self, down_after: int, down_for: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._down_after = down_after
        self._down_for = down_for  # the longest wait between two probes
        self._clock = clock
        self.failures = 0
        self._down = False
        self._backoff = PROBE_FIRST
        self._next_probe = 0.0
        self._recovered_at = -1e18
        self._limited_until = 0.0

    def reconfigure(self, down_after: int, down_for: float) -> None:
        self._down_after, self._down_for = down_after, down_for
        self._backoff = min(self._backoff, self._ceiling)
        self._next_probe = min(self._next_probe, self._clock() + self._backoff)

    @property
    def _ceiling(self) -> float:
        return max(self._down_for, PROBE_FIRST)

    @property
    def state(self) -> str:
        if self._clock() < self._limited_until:
            return "rate_limited"
        return "down" if self._down else "up"

    def check(self, name: str) -> None:
        """Raise at once instead of contacting an upstream known to be down or rate limiting."""
        now = self._clock()
        if now < self._limited_until:
            raise errors.UpstreamRateLimited(
                f"upstream {name} is rate limiting; retry later", retry_after=self._limited_until - now
            )
        if self._down:
            wait = max(self._next_probe - now, 0.0)
            raise errors.UpstreamDown(
                f"upstream {name} is down; checking it again in {wait:.0f}s", retry_after=max(wait, 1.0)
            )

    def succeeded(self) -> None:
        """An answer came (a probe's, or a request's started before the upstream went down)."""
        self.failures = 0
        if self._down:
            self._down = False
            self._recovered_at = self._clock()

    def failed(self, *, deadline: bool = False) -> None:
        """A failure; `deadline` when the upstream missed a deadline (down at once)."""
        self.failures = self._down_after if deadline else self.failures + 1
        if self.failures >= self._down_after and not self._down:
            now = self._clock()
            # Down again soon after recovering: keep backing off rather than start over at a second.
            recent = now - self._recovered_at < self._ceiling
            self._backoff = min(self._backoff * 2, self._ceiling) if recent else PROBE_FIRST
            self._down = True
            self._next_probe = now + self._backoff

    def probe_in(self) -> float | None:
        """Seconds until the next probe is due, or None when the upstream is not down."""
        return max(self._next_probe - self._clock(), 0.0) if self._down else None

    def probe_failed(self) -> None:
        """The probe found it still down: wait longer before the next one."""
        if self._down:
            self._backoff = min(self._backoff * 2, self._ceiling)
            self._next_probe = self._clock() + self._backoff

    def rate_limited(self, retry_after: float) -> None:
        self._limited_until = self._clock() + retry_after


async def probe_until_up(
    health: UpstreamHealth, answers: Callable[[], Awaitable[bool]], back: Callable[[], None]
) -> None:
    """While `health` is down: wait until its next probe is due, ask `answers()`, and on a yes call
    `back()` (which marks it up); on a no, wait longer. Ends as soon as it is not down, also when a
    request still in flight found it back first (then nothing is asked)."""
    while (wait := health.probe_in()) is not None:
        await asyncio.sleep(wait)
        if health.probe_in() is None:
            return
        if await answers():
            back()
        else:
            health.probe_failed()


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

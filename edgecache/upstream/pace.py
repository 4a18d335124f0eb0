"""Deadlines by phase for one upstream request, kept pure: the numbers, and the trickle check.

A socket timeout catches a body that sends nothing (a stall), but not one that sends a byte every
few seconds: each read returns in time and the transfer never ends. `BodyPace` watches the rate over
a window instead; a body slower than the minimum for a whole window is treated like a stall (the
fill resumes it with a Range, or fails its readers). Both transports call it after every read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from edgecache import errors
from edgecache.config import UpstreamConfig
from edgecache.sizes import parse_size


@dataclass(frozen=True, slots=True)
class Deadlines:
    """The phases of one upstream request (seconds; `min_rate` in bytes per second, 0 = no check)."""

    connect: float
    headers: float  # from sending the request to the whole of the response headers
    stall: float  # the longest silence inside a body
    min_rate: int
    rate_window: float

    @classmethod
    def of(cls, config: UpstreamConfig) -> Deadlines:
        """The deadlines an upstream's configuration asks for (validated when it was loaded)."""
        return cls(
            connect=config.connect_timeout,
            headers=config.header_timeout,
            stall=config.stall_timeout,
            min_rate=parse_size(config.min_rate, "min_rate"),
            rate_window=config.rate_window,
        )


class BodyPace:
    """The trickle check of one body: call `note(n)` after each read (any thread, one at a time)."""

    def __init__(self, deadlines: Deadlines, clock: Callable[[], float] = time.monotonic) -> None:
        self._min_rate = deadlines.min_rate
        self._window = deadlines.rate_window
        self._clock = clock
        self._window_start = clock()
        self._window_bytes = 0

    def note(self, received: int) -> None:
        """Count `received` bytes; raises UpstreamStalled when a whole window ran below the rate."""
        if self._min_rate <= 0:
            return
        self._window_bytes += received
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed < self._window:
            return
        if self._window_bytes < self._min_rate * elapsed:
            rate = self._window_bytes / elapsed
            raise errors.UpstreamStalled(f"upstream body trickled at {rate:.0f} B/s")
        self._window_start, self._window_bytes = now, 0

    def exclude(self, seconds: float) -> None:
        """Time spent not reading (the consumer was busy, or waiting for its readers to make room)
        does not count against the upstream's rate."""
        self._window_start += seconds

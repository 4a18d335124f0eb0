"""Wait for a condition, never for a length of time.

`wait_until` (async) and `wait_until_sync` (blocking) call `predicate` every `interval` seconds until
it returns something truthy, and return that value. While the thing waited for is not ready the
predicate may also raise (connection refused, a non-JSON body from a server still starting, a 503
turned into an exception, an assertion): any Exception counts as "not yet". When `timeout` passes,
`WaitTimeout` is raised with `message`, the last value or exception seen, and the number of tries;
the last exception is also its __cause__. The timeout is generous on purpose: a condition that
holds returns at once, so a long timeout costs nothing when the test passes and keeps a loaded
machine from failing it.

A predicate that knows waiting longer is pointless (the process it waits for has exited) raises
`StopWaiting`, which is passed on at once.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0

Message = str | Callable[[], str]


class WaitTimeout(AssertionError):
    """The condition did not hold within the timeout (an AssertionError: pytest shows it as a failure)."""


class StopWaiting(Exception):
    """Raised by a predicate to end the wait at once: what it waits for can no longer happen."""


def _describe(message: Message, timeout: float, tries: int, last: object, error: BaseException | None) -> str:
    text = message() if callable(message) else message
    seen = f"last value: {last!r}" if error is None else f"last error: {type(error).__name__}: {error}"
    return f"{text} (not within {timeout:g} s, {tries} tries; {seen})"


async def wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    # The bound of the whole wait, beside the sync twin's: not a cancellation the caller could
    # place with asyncio.timeout, since on expiry the message and the last error are what count.
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
    interval: float = 0.05,
    message: Message = "condition not met",
) -> T:
    """Await `predicate()` (sync or async) until it is truthy; exceptions mean "not yet"."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    tries, last, error = 0, None, None
    while True:
        tries += 1
        try:
            async with asyncio.timeout_at(deadline + interval):  # a predicate that hangs is bounded too
                result = predicate()
                if inspect.isawaitable(result):
                    result = await result
            if result:
                return result  # type: ignore[return-value]
            last, error = result, None
        except StopWaiting:
            raise
        except Exception as exc:  # not ready yet, e.g. connection refused
            last, error = None, exc
        if loop.time() >= deadline:
            raise WaitTimeout(_describe(message, timeout, tries, last, error)) from error
        await asyncio.sleep(interval)


def wait_until_sync(
    predicate: Callable[[], T],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = 0.05,
    message: Message = "condition not met",
) -> T:
    """Call `predicate()` until it is truthy; exceptions mean "not yet". For blocking code (fixtures
    that start processes, threads): the predicate must bound its own I/O (socket timeouts)."""
    deadline = time.monotonic() + timeout
    tries, last, error = 0, None, None
    while True:
        tries += 1
        try:
            result = predicate()
            if result:
                return result
            last, error = result, None
        except StopWaiting:
            raise
        except Exception as exc:  # not ready yet, e.g. connection refused
            last, error = None, exc
        if time.monotonic() >= deadline:
            raise WaitTimeout(_describe(message, timeout, tries, last, error)) from error
        time.sleep(interval)

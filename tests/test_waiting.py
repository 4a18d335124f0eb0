"""The tests' own wait helper (tests/support/waiting.py): conditions, not lengths of time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from tests.support.waiting import StopWaiting, WaitTimeout, wait_until, wait_until_sync


def counting(
    ready_after: int, fail_with: Exception | None = None
) -> tuple[list[int], Callable[[], str | bool]]:
    """A predicate that is falsy (or raises `fail_with`) for its first `ready_after` calls."""
    calls: list[int] = []

    def predicate() -> str | bool:
        calls.append(1)
        if len(calls) <= ready_after:
            if fail_with is not None:
                raise fail_with
            return False
        return "ready"

    return calls, predicate


def test_sync_returns_the_first_truthy_value_and_treats_exceptions_as_not_yet() -> None:
    calls, predicate = counting(3, ConnectionRefusedError("refused"))
    assert wait_until_sync(predicate, interval=0) == "ready"
    assert len(calls) == 4


def test_sync_timeout_reports_the_message_and_the_last_error() -> None:
    def not_json() -> object:
        return json.loads("<html>Service Unavailable</html>")

    with pytest.raises(WaitTimeout, match=r"prometheus not ready .*JSONDecodeError") as caught:
        wait_until_sync(not_json, timeout=0.2, interval=0.01, message=lambda: "prometheus not ready")
    assert isinstance(caught.value.__cause__, json.JSONDecodeError)


def test_sync_timeout_reports_the_last_falsy_value() -> None:
    with pytest.raises(WaitTimeout, match=r"empty .*last value: \[\]"):
        wait_until_sync(list, timeout=0.1, interval=0.01, message="empty")


def test_stop_waiting_ends_the_wait_at_once() -> None:
    calls: list[int] = []

    def exited() -> bool:
        calls.append(1)
        raise StopWaiting("the process exited with 1")

    with pytest.raises(StopWaiting, match="exited"):
        wait_until_sync(exited, timeout=30)
    assert len(calls) == 1


async def test_async_takes_sync_and_async_predicates() -> None:
    calls, predicate = counting(2, OSError("not yet"))
    assert await wait_until(predicate, interval=0) == "ready"
    assert len(calls) == 3
    event = asyncio.Event()
    asyncio.get_running_loop().call_soon(event.set)

    async def is_set() -> bool:
        return event.is_set()

    assert await wait_until(is_set) is True


async def test_async_bounds_a_predicate_that_hangs() -> None:
    async def hangs() -> bool:
        await asyncio.Event().wait()  # never set
        return True

    with pytest.raises(WaitTimeout, match=r"hangs .*TimeoutError"):
        await wait_until(hangs, timeout=0.2, message="hangs")


async def test_async_stop_waiting_and_timeout() -> None:
    async def exited() -> bool:
        raise StopWaiting("gone")

    with pytest.raises(StopWaiting):
        await wait_until(exited)
    with pytest.raises(WaitTimeout, match="never"):
        await wait_until(lambda: False, timeout=0.1, message="never")

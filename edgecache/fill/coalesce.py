"""Single-flight for small answers (manifests, tag look-ups): concurrent callers of one key share
one call, and a caller that goes away does not cancel it for the others."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class Coalescer:
    def __init__(self) -> None:
        self._calls: dict[Hashable, asyncio.Future[Any]] = {}

    async def run(self, key: Hashable, factory: Callable[[], Awaitable[T]]) -> T:
        """Run factory() once for concurrent callers of `key`; each gets its result or its error."""
        task = self._calls.get(key)
        if task is None:
            task = asyncio.ensure_future(factory())
            self._calls[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(task)

    def _finished(self, key: Hashable, task: asyncio.Future[Any]) -> None:
        self._calls.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here: callers that went away must not leave it unread

    def __len__(self) -> int:
        return len(self._calls)

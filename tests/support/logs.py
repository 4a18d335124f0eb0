"""Reading a running server's access log (its JSON lines in the log file a test gave it).

A server writes a request's line one event-loop pass after the response (accesslog.AccessLog), so
a test that needs the line of the request it just made waits for it (`wait_for_access`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.support.waiting import wait_until, wait_until_sync

Record = dict[str, object]


def access_records(log_path: Path) -> list[Record]:
    """Every access line written so far, parsed (other log lines skipped)."""
    return [
        json.loads(line)
        for line in log_path.read_text(errors="replace").splitlines()
        if line.startswith("{") and '"request_id"' in line
    ]


def wait_for_access(log_path: Path, done: Callable[[list[Record]], bool], message: str) -> list[Record]:
    """The access records, once `done(records)` holds."""

    def records_if_done() -> list[Record] | None:
        records = access_records(log_path)
        return records if done(records) else None

    found = wait_until_sync(records_if_done, message=message)
    assert found is not None
    return found


async def access_written(log_path: Path, done: Callable[[list[Record]], bool], message: str) -> list[Record]:
    """`wait_for_access` for async tests (the loop goes on meanwhile: it may run servers they use)."""

    def records_if_done() -> list[Record] | None:
        records = access_records(log_path)
        return records if done(records) else None

    found = await wait_until(records_if_done, message=message)
    assert found is not None
    return found


def wait_for_request(log_path: Path, request_id: str) -> Record:
    """The access record of the request that sent `X-Request-Id: request_id`."""
    found = wait_for_access(
        log_path,
        lambda records: any(r["request_id"] == request_id for r in records),
        f"no access log line for {request_id}",
    )
    return next(r for r in found if r["request_id"] == request_id)

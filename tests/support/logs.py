"""Reading a running server's access log (its JSON lines in the log file a test gave it).

A server writes a request's line one event-loop pass after the response (accesslog.AccessLog), so
a test that needs the line of the request it just made waits for it (`wait_for_access`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.support.waiting import wait_until_sync

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

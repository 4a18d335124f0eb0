"""Verified upstream fills go up to the bucket in the background: a bounded queue and a few workers,
so uploads never delay a reader (a blob is read from its stored file after the fill was kept) and a
slow or failing bucket costs memory for at most `upload_queue` small jobs. A full queue, or a tier
that is down, skips the upload and counts it; the next node to fill the blob uploads it then.

Two nodes filling the same blob upload the same bytes to the same key, which is harmless (objects
are named by digest, a PUT replaces the object whole). A HEAD first (`head_before_upload`) skips the
PUT when another node was first: one small request against re-sending the blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgecache.metrics import Metrics
from edgecache.shared.bucket import Bucket, TierError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UploadJob:
    kind: str  # "blob" or "manifest"
    key: str
    size: int
    path: Path | None = None  # a blob: its stored file
    body: bytes | None = None  # a manifest: its bytes
    content_type: str | None = None


class Uploader:
    def __init__(
        self,
        bucket: Bucket,
        metrics: Metrics,
        *,
        concurrency: int,
        queue_limit: int,
        head_first: bool,
        usable: Callable[[], bool],
        failed: Callable[[TierError], None],
        succeeded: Callable[[], None],
    ) -> None:
        self._bucket = bucket
        self._metrics = metrics
        self._queue: asyncio.Queue[UploadJob] = asyncio.Queue(maxsize=queue_limit)
        self._concurrency = concurrency
        self._head_first = head_first
        self._usable = usable
        self._failed = failed
        self._succeeded = succeeded
        self._workers: list[asyncio.Task[None]] = []
        self._pending: set[str] = set()  # keys queued or uploading: offered twice, uploaded once
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(), name=f"shared upload {i}") for i in range(self._concurrency)
        ]

    def offer(self, job: UploadJob) -> None:
        """Queue an upload (never waits): skipped and counted when the queue is full or the tier down."""
        if job.key in self._pending:
            return
        if not self._usable():
            self._metrics.shared_uploads.labels(job.kind, "down").inc()
            return
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._metrics.shared_uploads.labels(job.kind, "queue_full").inc()
            return
        self._pending.add(job.key)
        self._idle.clear()
        self._metrics.shared_backlog.set(len(self._pending))

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                result = await self._upload(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the worker
                log.exception("shared tier upload of %s failed unexpectedly", job.key)
                result = "failed"
            finally:
                self._pending.discard(job.key)
                self._metrics.shared_backlog.set(len(self._pending))
                if not self._pending:
                    self._idle.set()
            self._metrics.shared_uploads.labels(job.kind, result).inc()

    async def _upload(self, job: UploadJob) -> str:
        if not self._usable():
            return "down"
        try:
            if self._head_first and await self._bucket.exists(job.key):
                self._succeeded()
                return "exists"
            if job.path is not None:
                await self._bucket.put_file(job.key, job.path, job.size)
            else:
                assert job.body is not None
                await self._bucket.put_bytes(job.key, job.body, job.content_type)
        except FileNotFoundError:  # the stored file was evicted before its turn
            return "failed"
        except TierError as exc:
            log.warning("shared tier upload failed: %s", exc)
            self._failed(exc)
            return "failed"
        self._succeeded()
        self._metrics.shared_upload_bytes.inc(job.size)
        return "done"

    async def settled(self) -> None:
        """Wait until every upload offered so far has ended (tests, shutdown)."""
        await self._idle.wait()

    async def close(self, grace: float = 5.0) -> None:
        """Let the uploads under way end for `grace` seconds, then cancel the workers; never waits
        longer than that again (a bucket that hangs must not hang the shutdown)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        for task in self._workers:
            task.cancel()
        if self._workers:
            await asyncio.wait(self._workers, timeout=grace)

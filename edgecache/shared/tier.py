"""The shared tier as the rest of edgecache sees it: what a miss asks of the bucket (blobs into a
verified temp file, manifests verified in memory), what goes up after a verified upstream fill, and
the tier's health.

The bucket is a cache, not a source of truth: an object that does not hash to its digest is deleted
and counted (`errors{kind="corrupt"}`), and the caller goes on to the upstream. A bucket that fails
(refused, reset, 5xx; a missed deadline at once) is skipped after `down_after` failures in a row:
misses go straight to the upstream, uploads are skipped, and one probe at a time (a HEAD, after 1 s,
then doubling up to `down_for`) brings it back (the upstream's health rules, upstream.health).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cachetools import TTLCache

from edgecache.config import SharedConfig
from edgecache.fill.source import BlobSource
from edgecache.metrics import Metrics
from edgecache.oci import MAX_MANIFEST_BYTES, Digest
from edgecache.shared.bucket import Bucket, TierError, blob_key, load_credentials, manifest_key
from edgecache.shared.source import TieredSource
from edgecache.shared.uploads import Uploader, UploadJob
from edgecache.upstream.health import UpstreamHealth, probe_until_up

log = logging.getLogger(__name__)
MAX_BUCKET_RESUMES = 1  # a bucket body that breaks off is resumed once with a Range, then skipped
SERVED_KEPT = 10_000


class SharedTier:
    def __init__(
        self,
        bucket: Bucket,
        metrics: Metrics,
        tmp: Path,
        blob_path: Callable[[Digest], Path],
        config: SharedConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bucket = bucket
        self._metrics = metrics
        self._tmp = tmp
        self._blob_path = blob_path
        self.health = UpstreamHealth(config.down_after, config.down_for, clock)
        self._probe: asyncio.Task[None] | None = None
        self._sources: dict[str, TieredSource] = {}
        # Blobs this node just took from the bucket: their fills are not uploaded back.
        self._from_bucket: TTLCache[Digest, bool] = TTLCache(maxsize=SERVED_KEPT, ttl=3600, timer=clock)
        self.uploads = Uploader(
            bucket,
            metrics,
            concurrency=config.upload_concurrency,
            queue_limit=config.upload_queue,
            head_first=config.head_before_upload,
            usable=self.usable,
            failed=self._failed,
            succeeded=self._succeeded,
        )

    @classmethod
    def build(
        cls, config: SharedConfig, metrics: Metrics, tmp: Path, blob_path: Callable[[Digest], Path]
    ) -> SharedTier:
        return cls(Bucket(config, load_credentials(config)), metrics, tmp, blob_path, config)

    async def start(self) -> None:
        """Check the bucket (a ConfigError when it is missing or refuses us), then start uploading.
        A bucket that cannot be reached now does not stop the node: the tier starts down, misses go
        to the upstream, and the probe brings it up when it answers."""
        self._metrics.shared_enabled.set(1)
        self._metrics.shared_up.set(1)
        try:
            await self.bucket.check()
        except TierError as exc:
            self._failed(exc)
        self.uploads.start()
        log.info("shared tier: bucket %s (prefix %r)", self.bucket.name, self.bucket.prefix)

    async def close(self) -> None:
        await self.uploads.close()
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe

    @property
    def state(self) -> str:
        return "down" if self.health.state == "down" else "up"

    def usable(self) -> bool:
        return self.state == "up"

    def source(self, upstream: BlobSource) -> BlobSource:
        """The bucket in front of `upstream`, for fills (one per upstream)."""
        source = self._sources.get(upstream.name)
        if source is None or source.upstream is not upstream:
            source = self._sources[upstream.name] = TieredSource(self, upstream)
        return source

    # -- reads ---------------------------------------------------------------------------------

    async def fetch_blob(self, digest: Digest) -> tuple[Path, int] | None:
        if not self.usable():
            self._metrics.shared_misses.labels("blob").inc()
            return None
        key = blob_key(self.bucket.prefix, digest)
        try:
            fd, name = tempfile.mkstemp(dir=self._tmp, prefix="shared-")
        except OSError:
            self._metrics.shared_misses.labels("blob").inc()
            return None
        path = Path(name)
        keep = False
        try:
            size = await self._download(key, fd, digest)
            if size is None:
                self._metrics.shared_misses.labels("blob").inc()
                return None
            self._succeeded()
            self._metrics.shared_hits.labels("blob").inc()
            self._from_bucket[digest] = True
            keep = True
            return path, size
        except TierError as exc:
            if exc.kind == "corrupt":
                await self._drop_corrupt(key, digest)
            else:
                log.warning("shared tier read of %s failed, asking the upstream: %s", digest, exc)
                self._failed(exc)
            self._metrics.shared_misses.labels("blob").inc()
            return None
        except OSError as exc:  # our own disk (ENOSPC, EIO) while copying: not the bucket's fault
            log.warning(
                "shared tier read of %s failed on disk (%s): asking the upstream", digest, exc.strerror
            )
            self._metrics.shared_misses.labels("blob").inc()
            return None
        finally:
            os.close(fd)
            if not keep:
                with contextlib.suppress(OSError):
                    os.unlink(name)

    async def _download(self, key: str, fd: int, digest: Digest) -> int | None:
        """The object into `fd`, hashed as it comes, resumed once with a Range if it breaks off;
        its size, None when the bucket does not hold it; TierError("corrupt") when it is wrong."""
        hasher = digest.hasher()
        written, resumes, size = 0, 0, None
        read_bytes = self._metrics.shared_bytes

        def land(data: bytes, offset: int) -> None:
            os.pwrite(fd, data, offset)
            hasher.update(data)

        while True:
            try:
                opened = await self.bucket.open(key, written)
                if opened is None:
                    if written:
                        raise TierError("other", "object vanished while being read")
                    return None
                total, chunks = opened
                if size is None:
                    size = total if not written else size
                async for chunk in chunks:
                    if written + len(chunk) > (size or 0):
                        raise TierError("corrupt", "object longer than it said")
                    await asyncio.to_thread(land, chunk, written)
                    written += len(chunk)
                    read_bytes.inc(len(chunk))
                break
            except TierError as exc:
                if exc.kind == "corrupt" or not written or resumes >= MAX_BUCKET_RESUMES:
                    raise
                resumes += 1
                log.info("resuming shared tier read of %s at byte %d", digest, written)
        if written != size or hasher.hexdigest() != digest.hex:
            raise TierError("corrupt", "object does not match its digest")
        return size

    async def manifest(self, digest: Digest) -> tuple[str | None, bytes] | None:
        """A manifest from the bucket, verified (with the Content-Type it was uploaded with), or None."""
        if not self.usable():
            self._metrics.shared_misses.labels("manifest").inc()
            return None
        key = manifest_key(self.bucket.prefix, digest)
        try:
            got = await self.bucket.get_small(key, MAX_MANIFEST_BYTES)
            if got is None:
                self._metrics.shared_misses.labels("manifest").inc()
                return None
            self._metrics.shared_bytes.inc(len(got[1]))
            if await Digest.of_async(got[1], digest.algorithm) != digest:
                raise TierError("corrupt", "manifest does not match its digest")
        except TierError as exc:
            if exc.kind == "corrupt":
                await self._drop_corrupt(key, digest)
            else:
                self._failed(exc)
            self._metrics.shared_misses.labels("manifest").inc()
            return None
        self._succeeded()
        self._metrics.shared_hits.labels("manifest").inc()
        return got

    async def _drop_corrupt(self, key: str, digest: Digest) -> None:
        """A cache, not a source of truth: the wrong object goes, the upstream is asked instead."""
        log.error("shared tier object for %s failed verification: deleted, asking the upstream", digest)
        self._metrics.shared_errors.labels("corrupt").inc()
        try:
            await self.bucket.delete(key)
        except TierError as exc:
            self._failed(exc)

    # -- writes --------------------------------------------------------------------------------

    def blob_kept(self, digest: Digest, size: int) -> None:
        """A verified fill was stored: upload it, unless it came from the bucket."""
        if digest in self._from_bucket:
            return
        key = blob_key(self.bucket.prefix, digest)
        self.uploads.offer(UploadJob("blob", key, size, path=self._blob_path(digest)))

    def manifest_fetched(self, digest: Digest, media_type: str, body: bytes) -> None:
        """A manifest verified from the upstream: upload it (by digest; tags never go up)."""
        key = manifest_key(self.bucket.prefix, digest)
        self.uploads.offer(UploadJob("manifest", key, len(body), body=body, content_type=media_type))

    # -- health --------------------------------------------------------------------------------

    def _succeeded(self) -> None:
        self.health.succeeded()
        self._metrics.shared_up.set(1)

    def _failed(self, exc: TierError) -> None:
        self._metrics.shared_errors.labels(exc.kind).inc()
        was = self.usable()
        self.health.failed(deadline=exc.deadline)
        if was and not self.usable():
            log.warning("shared tier is down (%s): misses go to the upstream until a probe answers", exc)
            self._metrics.shared_up.set(0)
            if self._probe is None or self._probe.done():
                self._probe = asyncio.create_task(self._probe_until_up(), name="shared tier probe")

    async def _probe_until_up(self) -> None:
        """One probe at a time while down: a HEAD of a key that need not exist; any answer is up."""

        async def answers() -> bool:
            try:
                await self.bucket.exists(f"{self.bucket.prefix}probe")
            except TierError:
                return False
            return True

        def back() -> None:
            log.info("shared tier is back")
            self._succeeded()

        await probe_until_up(self.health, answers, back)

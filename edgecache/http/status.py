"""What the status page shows, gathered without any HTTP framework: a `Status` value built from the
same collectors /metrics exports and from the parts themselves (flights, keeper, upstream health,
usage). `status_page` renders it as HTML; the front serves it as HTML or JSON.

Windows (last 5 minutes, last hour) and the sparklines need the counters as they were a while ago:
a `Sampler` keeps a bounded ring of them (one every SAMPLE_SECONDS, SAMPLES_KEPT kept), taken by a
task the instance starts and stops, never by a request. Gathering is in-memory work bounded by what
is shown (the top repositories come from a heap, the lists are cut), so a page load stays short for
the event loop however many repositories are known.

Nothing here names a client: the page shows no client addresses, and an upstream is shown by name
and scheme://host:port, never its credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import shutil
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.registry import Collector

from edgecache import __version__
from edgecache.config import StatusConfig
from edgecache.fill.flights import BlobFlight, Flights
from edgecache.metrics import Metrics
from edgecache.outcomes import HIT_RESULTS
from edgecache.store.keeper import CacheKeeper
from edgecache.upstream.client import UpstreamClient
from edgecache.usage import Usage

log = logging.getLogger(__name__)
SAMPLE_SECONDS = 10.0
SAMPLES_KEPT = 361  # an hour of samples, and the one the hour starts from
TOP_REPOSITORIES = 20
MAX_FILLS_SHOWN = 50
MAX_PINS_SHOWN = 50


@dataclass(frozen=True)
class Counts:
    """The counters the windows are computed from, at one moment (`at`: the monotonic clock)."""

    at: float
    hits: float = 0.0
    lookups: float = 0.0  # manifest and blob GETs answered 2xx from the cache or a fill (PASS excluded)
    served: float = 0.0
    upstream: float = 0.0
    prefetch_started: float = 0.0
    prefetch_bytes: float = 0.0


@dataclass(frozen=True)
class Window:
    """What happened between two samples. `seconds` is the span covered: shorter than asked while the
    process is younger than the window."""

    seconds: float
    requests: int
    hits: int
    hit_ratio: float | None
    bytes_served: int
    bytes_from_upstream: int
    bytes_saved: int  # served beyond what came from upstream: the WAN traffic avoided
    prefetch_started: int
    prefetch_bytes: int


@dataclass(frozen=True)
class TrendPoint:
    """One interval between samples: `ago` seconds before now at its end."""

    ago: float
    hit_ratio: float | None
    bytes_per_second: float


class Sampler:
    """A bounded ring of counter samples; windows and trends are differences against it."""

    def __init__(
        self,
        read: Callable[[float], Counts],
        clock: Callable[[], float] = time.monotonic,
        *,
        interval: float = SAMPLE_SECONDS,
        keep: int = SAMPLES_KEPT,
    ) -> None:
        self._read = read
        self._clock = clock
        self.interval = interval
        self._ring: deque[Counts] = deque(maxlen=keep)

    def __len__(self) -> int:
        return len(self._ring)

    def sample(self) -> Counts:
        """Take one sample into the ring (the oldest drops out once it is full)."""
        counts = self._read(self._clock())
        self._ring.append(counts)
        return counts

    def now(self) -> Counts:
        """The counters now, not kept."""
        return self._read(self._clock())

    def _base(self, seconds: float, now: Counts) -> Counts:
        """The oldest kept sample no older than `seconds` (half an interval of slack, so a window
        of five minutes starts at the sample taken about five minutes ago)."""
        earliest = now.at - seconds - self.interval / 2
        for counts in self._ring:
            if counts.at >= earliest:
                return counts
        return now

    def window(self, seconds: float, now: Counts) -> Window:
        return difference(self._base(seconds, now), now)

    def trend(self, seconds: float, now: Counts) -> list[TrendPoint]:
        """Per-interval hit ratio and bytes per second over the last `seconds`, oldest first."""
        earliest = now.at - seconds - self.interval / 2
        points = [c for c in self._ring if c.at >= earliest and c.at < now.at]
        points.append(now)
        trend = []
        for before, after in itertools.pairwise(points):
            span = after.at - before.at
            if span <= 0:
                continue
            lookups = after.lookups - before.lookups
            ratio = (after.hits - before.hits) / lookups if lookups > 0 else None
            trend.append(TrendPoint(now.at - after.at, ratio, (after.served - before.served) / span))
        return trend


def difference(before: Counts, after: Counts) -> Window:
    lookups = int(after.lookups - before.lookups)
    hits = int(after.hits - before.hits)
    served = int(after.served - before.served)
    upstream = int(after.upstream - before.upstream)
    return Window(
        seconds=max(after.at - before.at, 0.0),
        requests=lookups,
        hits=hits,
        hit_ratio=hits / lookups if lookups > 0 else None,
        bytes_served=served,
        bytes_from_upstream=upstream,
        bytes_saved=max(served - upstream, 0),
        prefetch_started=int(after.prefetch_started - before.prefetch_started),
        prefetch_bytes=int(after.prefetch_bytes - before.prefetch_bytes),
    )


def _samples(collector: Collector, suffix: str = "") -> Iterator[tuple[dict[str, str], float]]:
    """(labels, value) of a collector's samples whose name ends with `suffix` (`_total` for a
    counter's running total, not its `_created` time)."""
    for family in collector.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix):
                yield sample.labels, sample.value


def _total(collector: Collector, suffix: str = "_total") -> float:
    return sum(value for _, value in _samples(collector, suffix))


def _by_upstream(collector: Collector, suffix: str = "") -> dict[str, float]:
    found: dict[str, float] = {}
    for labels, value in _samples(collector, suffix):
        name = labels.get("upstream", "")
        found[name] = found.get(name, 0.0) + value
    return found


def read_counts(metrics: Metrics, at: float) -> Counts:
    """The windowed counters from the collectors /metrics exports (a few hundred series at most)."""
    hits = lookups = 0.0
    for labels, value in _samples(metrics.http_requests, "_total"):
        if labels.get("route") not in ("manifest", "blob") or labels.get("method") != "GET":
            continue
        if labels.get("status_class") != "2xx" or labels.get("cache") == "PASS":
            continue
        lookups += value
        if labels.get("cache") in HIT_RESULTS:
            hits += value
    return Counts(
        at=at,
        hits=hits,
        lookups=lookups,
        served=_total(metrics.served_bytes),
        upstream=_total(metrics.upstream_bytes),
        prefetch_started=_total(metrics.prefetch_started),
        prefetch_bytes=_total(metrics.prefetch_bytes),
    )


@dataclass(frozen=True)
class FillStatus:
    upstream: str
    repository: str
    digest: str
    size: int | None  # None until upstream announced it
    written: int
    progress: float | None
    readers: int  # client responses sending from it now
    prefetched: bool
    passing: bool  # passed through without being stored (no room for it)


@dataclass(frozen=True)
class UpstreamStatus:
    name: str
    address: str  # scheme://host:port of its URL: never credentials, a path or a query
    state: str  # up, down, rate_limited
    failures: int  # in a row
    next_probe_in: float | None  # seconds, while down
    ratelimit_remaining: float | None  # None until the upstream sent one
    ratelimit_limit: float | None
    fills_in_flight: int
    prefetch_queued: int


@dataclass(frozen=True)
class PrefetchStatus:
    started: int
    bytes: int
    used: int
    evicted_unused: int
    queued: int
    started_last_hour: int
    bytes_last_hour: int


@dataclass(frozen=True)
class DiskStatus:
    used: int  # stored plus reserved for fills in flight
    limit: int  # cache.max_size; 0: none
    high_watermark: float
    low_watermark: float
    reserved: int
    blob_bytes: int
    manifest_bytes: int
    blobs: int
    manifests: int
    pinned_bytes: int
    filesystem_free: int | None
    filesystem_total: int | None

    @property
    def fraction(self) -> float | None:
        return self.used / self.limit if self.limit else None


@dataclass(frozen=True)
class RepositoryStatus:
    upstream: str
    repository: str
    pulls: int
    bytes_served: int


@dataclass(frozen=True)
class Status:
    version: str
    generated_at: str  # UTC, ISO 8601
    uptime_seconds: float
    sample_seconds: float
    last_5m: Window
    last_1h: Window
    since_start: Window
    trend: list[TrendPoint]
    fills: list[FillStatus]
    fills_total: int
    prefetch: PrefetchStatus
    upstreams: list[UpstreamStatus]
    disk: DiskStatus
    pins: list[str]
    pins_total: int
    repositories: list[RepositoryStatus]
    repositories_known: int


class StatusBoard:
    """Gathers a `Status` on demand and samples the counters in the background (`start`/`close`)."""

    def __init__(
        self,
        config: StatusConfig,
        metrics: Metrics,
        keeper: CacheKeeper,
        flights: Flights,
        clients: Mapping[str, UpstreamClient],
        usage: Usage,
        root: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        interval: float = SAMPLE_SECONDS,
        keep: int = SAMPLES_KEPT,
    ) -> None:
        self.config = config
        self.usage = usage
        self._metrics = metrics
        self._keeper = keeper
        self._flights = flights
        self._clients = clients
        self._root = root
        self._clock = clock
        self._wall = wall
        self.sampler = Sampler(lambda at: read_counts(metrics, at), clock, interval=interval, keep=keep)
        self._started_at = clock()
        self._first = self.sampler.sample()  # since-start figures count from here
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def reconfigure(self, config: StatusConfig) -> None:
        self.config = config

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._sample_forever(), name="status sampler")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sampler.interval)
            try:
                self.sampler.sample()
            except Exception:  # a bug here must not end the sampling for good
                log.exception("sampling the counters for the status page failed")

    async def status(self) -> Status:
        """The status now; the file system's free space is read off the event loop."""
        disk = await asyncio.to_thread(_disk_usage, self._root)
        return self.gather(disk)

    def gather(self, filesystem: tuple[int, int] | None = None) -> Status:
        """Everything the page shows, from memory (`filesystem`: (free, total) bytes, if known)."""
        metrics = self._metrics
        now = self.sampler.now()
        last_hour = self.sampler.window(3600.0, now)
        flights = self._flights.in_flight()
        queued = _by_upstream(metrics.prefetch_queued)
        remaining = _by_upstream(metrics.ratelimit_remaining)
        limits = _by_upstream(metrics.ratelimit_limit)
        fills_by_upstream: dict[str, int] = {}
        for flight in flights:
            fills_by_upstream[flight.key[0]] = fills_by_upstream.get(flight.key[0], 0) + 1
        upstreams = [
            UpstreamStatus(
                name=name,
                address=_address(client.config.url),
                state=client.health.state,
                failures=client.health.failures,
                next_probe_in=client.health.probe_in(),
                ratelimit_remaining=_number(remaining.get(name)),
                ratelimit_limit=_number(limits.get(name)),
                fills_in_flight=fills_by_upstream.get(name, 0),
                prefetch_queued=int(queued.get(name, 0.0)),
            )
            for name, client in self._clients.items()
        ]
        pins = [str(pin) for pin in self._keeper.pins]
        high, low = self._keeper.watermarks
        cache_bytes = _by_label(metrics.cache_bytes, "kind")
        cache_entries = _by_label(metrics.cache_entries, "kind")
        disk = DiskStatus(
            used=self._keeper.used,
            limit=self._keeper.max_size,
            high_watermark=high,
            low_watermark=low,
            reserved=int(_total(metrics.cache_reserved_bytes, "")),
            blob_bytes=int(cache_bytes.get("blob", 0.0)),
            manifest_bytes=int(cache_bytes.get("manifest", 0.0)),
            blobs=int(cache_entries.get("blob", 0.0)),
            manifests=int(cache_entries.get("manifest", 0.0)),
            pinned_bytes=int(_total(metrics.pinned_bytes, "")),
            filesystem_free=filesystem[0] if filesystem else None,
            filesystem_total=filesystem[1] if filesystem else None,
        )
        prefetch = PrefetchStatus(
            started=int(_total(metrics.prefetch_started)),
            bytes=int(_total(metrics.prefetch_bytes)),
            used=int(_total(metrics.prefetch_used)),
            evicted_unused=int(_total(metrics.prefetch_evicted_unused)),
            queued=int(sum(queued.values())),
            started_last_hour=last_hour.prefetch_started,
            bytes_last_hour=last_hour.prefetch_bytes,
        )
        return Status(
            version=__version__,
            generated_at=datetime.fromtimestamp(self._wall(), UTC).isoformat(timespec="seconds"),
            uptime_seconds=max(now.at - self._started_at, 0.0),
            sample_seconds=self.sampler.interval,
            last_5m=self.sampler.window(300.0, now),
            last_1h=last_hour,
            since_start=difference(self._first, now),
            trend=self.sampler.trend(3600.0, now),
            fills=[_fill(flight) for flight in flights[:MAX_FILLS_SHOWN]],
            fills_total=len(flights),
            prefetch=prefetch,
            upstreams=upstreams,
            disk=disk,
            pins=pins[:MAX_PINS_SHOWN],
            pins_total=len(pins),
            repositories=[
                RepositoryStatus(e.upstream, e.repository, e.pulls, e.bytes_served)
                for e in self.usage.by_bytes(TOP_REPOSITORIES)
            ],
            repositories_known=len(self.usage),
        )


def _fill(flight: BlobFlight) -> FillStatus:
    size, written = flight.size, flight.written
    return FillStatus(
        upstream=flight.key[0],
        repository=str(flight.repo),
        digest=str(flight.digest),
        size=size,
        written=written,
        progress=min(written / size, 1.0) if size else None,
        readers=flight.readers,
        prefetched=flight.prefetched,
        passing=flight.passing,
    )


def _by_label(collector: Collector, label: str) -> dict[str, float]:
    return {labels.get(label, ""): value for labels, value in _samples(collector)}


def _number(value: float | None) -> float | None:
    """NaN (a gauge not seen yet) as None: JSON has no NaN."""
    return None if value is None or math.isnan(value) else value


def _address(url: str) -> str:
    """scheme://host[:port] of an upstream URL: whatever credentials, path or query it carries stay out."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def _disk_usage(root: Path) -> tuple[int, int] | None:
    try:
        usage = shutil.disk_usage(root)
    except OSError:
        return None
    return usage.free, usage.total


def document(status: Status) -> dict[str, object]:
    """The status as JSON-ready data (/_edgecache/status.json): the same figures the page shows."""
    data = dataclasses.asdict(status)
    data["disk"]["fraction"] = status.disk.fraction
    return data

"""Every Prometheus collector edgecache exports, in one place and one registry per instance.

Names follow `edgecache_<subsystem>_<what>_<unit>`; counters end in `_total`. Labels come from closed
sets only (upstream names from the config, fixed reasons and sources), never a repository, tag, digest
or user, so the number of series is bounded. Every series exists at zero from start-up.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

FILL_FAILURE_REASONS = ("upstream", "digest_mismatch", "cancelled", "disk")
SERVED_SOURCES = ("disk", "fill", "memory")


class Metrics:
    def __init__(self, upstreams: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.fills_started = Counter(
            "edgecache_fills_started_total",
            "Blob fills started (one upstream fetch each)",
            ["upstream"],
            registry=r,
        )
        self.fills_completed = Counter(
            "edgecache_fills_completed_total",
            "Blob fills verified against their digest",
            ["upstream"],
            registry=r,
        )
        self.fills_failed = Counter(
            "edgecache_fills_failed_total",
            "Blob fills that ended without a verified blob",
            ["upstream", "reason"],
            registry=r,
        )
        self.fill_resumes = Counter(
            "edgecache_fill_resumes_total",
            "Upstream bodies resumed with a Range after breaking off",
            ["upstream"],
            registry=r,
        )
        self.fill_joins = Counter(
            "edgecache_fill_readers_joined_total",
            "Requests that joined a fill another request started",
            ["upstream"],
            registry=r,
        )
        self.fills_in_flight = Gauge(
            "edgecache_fills_in_flight", "Blob fills running now", ["upstream"], registry=r
        )
        self.negative_hits = Counter(
            "edgecache_fill_negative_hits_total",
            "Requests refused because the blob just failed verification",
            ["upstream"],
            registry=r,
        )
        self.upstream_bytes = Counter(
            "edgecache_upstream_blob_bytes_total",
            "Blob bytes received from upstream",
            ["upstream"],
            registry=r,
        )
        self.served_bytes = Counter(
            "edgecache_served_bytes_total",
            "Body bytes sent to clients, by where they came from (disk: cached blob, fill: a fill's "
            "spool, memory: manifests)",
            ["source"],
            registry=r,
        )
        for name in upstreams:
            for metric in (
                self.fills_started,
                self.fills_completed,
                self.fill_resumes,
                self.fill_joins,
                self.fills_in_flight,
                self.negative_hits,
                self.upstream_bytes,
            ):
                metric.labels(name)
            for reason in FILL_FAILURE_REASONS:
                self.fills_failed.labels(name, reason)
        for source in SERVED_SOURCES:
            self.served_bytes.labels(source)

    def render(self) -> bytes:
        return generate_latest(self.registry)

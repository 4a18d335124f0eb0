"""Every Prometheus collector edgecache exports, in one place and one registry per instance.

Names follow `edgecache_<subsystem>_<what>_<unit>`; counters end in `_total`. Labels come from closed
sets only (upstream names from the config, fixed reasons and sources), never a repository, tag, digest
or user, so the number of series is bounded. Every series exists at zero from start-up.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

FILL_FAILURE_REASONS = ("upstream", "digest_mismatch", "cancelled", "disk")
SERVED_SOURCES = ("disk", "fill", "memory")
UPSTREAM_KINDS = ("manifest", "blob", "tags", "referrers", "token")
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "error")
HEALTH_STATES = ("up", "down", "rate_limited")
STALE_REASONS = ("down", "error", "rate_limited")
ROUTES = (
    "base",
    "manifest",
    "blob",
    "tags",
    "referrers",
    "upload",
    "catalog",
    "metrics",
    "health",
    "stats",
    "status",
    "token",
    "unknown",
)
METHODS = ("GET", "HEAD", "other")
CACHE_RESULTS = ("HIT", "MISS", "JOINED", "REVALIDATED", "STALE", "NEGATIVE", "PASS")
MISMATCH_KINDS = ("blob", "manifest")
QUARANTINE_REASONS = ("changed", "corrupt")
SCRUB_RESULTS = ("ok", "changed", "corrupt", "gone")
# Why a blob of a served manifest was not prefetched: already stored, already filling, past the
# manifest's byte cap, the upstream's queue full, no room in the cache for it, or the upstream down
# or rate limited (a prefetch would only fail, or spend its budget).
PREFETCH_SKIPS = ("cached", "filling", "cap", "queue_full", "no_room", "unavailable")
# What the signature policy decided about a manifest (access.trust.Result): a closed set, no repository.
TRUST_RESULTS = ("accepted", "verified", "rejected", "unsigned", "untrusted", "unavailable")
# How a request's credentials were checked (a password by htpasswd or LDAP, one of our tokens, an
# outside OIDC token, a client certificate) and what came of it: closed sets, never a user name.
CREDENTIAL_KINDS = ("password", "token", "oidc", "certificate")
CREDENTIAL_RESULTS = ("ok", "remembered", "refused", "unavailable", "limited")
# The shared object-storage tier (edgecache.shared): what it is asked for, how uploads end, how it fails.
SHARED_KINDS = ("blob", "manifest")
SHARED_UPLOAD_RESULTS = ("done", "failed", "exists", "queue_full", "down")
SHARED_ERRORS = ("timeout", "unavailable", "denied", "corrupt", "other")
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)
_API_ROUTES = ("base", "manifest", "blob", "tags", "referrers")
_CACHED_ROUTES = ("manifest", "blob")


class Metrics:
    def __init__(self, upstreams: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._request_children: dict[tuple[str, str, int, str], tuple[Any, Any]] = {}
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
        self.upstream_requests = Counter(
            "edgecache_upstream_requests_total",
            "Requests sent to upstream registries, by kind and status class (error: no HTTP answer)",
            ["upstream", "kind", "status_class"],
            registry=r,
        )
        self.upstream_health = Gauge(
            "edgecache_upstream_health",
            "1 for the state each upstream is in (up, down after repeated failures, rate_limited)",
            ["upstream", "state"],
            registry=r,
        )
        self.ratelimit_remaining = Gauge(
            "edgecache_upstream_ratelimit_remaining",
            "Pulls left in the upstream's rate-limit window (Docker Hub's ratelimit-remaining); "
            "NaN until seen",
            ["upstream"],
            registry=r,
        )
        self.ratelimit_limit = Gauge(
            "edgecache_upstream_ratelimit_limit",
            "The upstream's rate-limit window size (ratelimit-limit); NaN until seen",
            ["upstream"],
            registry=r,
        )
        self.stale_served = Counter(
            "edgecache_stale_served_total",
            "Tags served past their TTL because upstream could not confirm them",
            ["upstream", "reason"],
            registry=r,
        )
        self.http_requests = Counter(
            "edgecache_http_requests_total",
            "Client requests by route, method, status class and cache result",
            ["route", "method", "status_class", "cache"],
            registry=r,
        )
        self.http_duration = Histogram(
            "edgecache_http_request_duration_seconds",
            "Time from request to the last byte sent, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "edgecache_upstream_request_duration_seconds",
            "Upstream request latency: phase first_byte (response headers) and total (body read)",
            ["upstream", "kind", "phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.connections_closed = Counter(
            "edgecache_connections_closed_total",
            "TLS connections closed by edgecache's guard: silent both ways for server.idle_timeout "
            "(idle), or idle the longest while over server.max_connections (over_cap)",
            ["reason"],
            registry=r,
        )
        for reason in ("idle", "over_cap"):
            self.connections_closed.labels(reason)
        self.fill_readers = Gauge(
            "edgecache_fill_readers", "Client responses reading from fills in progress now", registry=r
        )
        self.digest_mismatches = Counter(
            "edgecache_digest_mismatches_total",
            "Upstream content that did not hash to its digest (never stored, never served whole)",
            ["upstream", "kind"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            "edgecache_cache_bytes", "Bytes of verified content on disk", ["kind"], registry=r
        )
        self.cache_entries = Gauge(
            "edgecache_cache_entries", "Verified blobs and manifests on disk", ["kind"], registry=r
        )
        self.evictions = Counter(
            "edgecache_evictions_total",
            "Entries evicted, by reason (size: over the high watermark; free_space: below min_free)",
            ["reason"],
            registry=r,
        )
        self.pinned_bytes = Gauge("edgecache_pinned_bytes", "Bytes of pinned content on disk", registry=r)
        self.passthrough = Counter(
            "edgecache_passthrough_total",
            "Content served without being stored: no room for it (pinned or in-use content fills the limit, "
            "or the disk is too small), or its last fill ran out of disk",
            ["kind"],
            registry=r,
        )
        self.index_rebuilds = Counter(
            "edgecache_index_rebuilds_total",
            "Start-ups that rebuilt the index from the store: missing (lost while stopped) or corrupt "
            "(moved aside as index.db.corrupt-<time>)",
            ["reason"],
            registry=r,
        )
        self.unheld_digests = Gauge(
            "edgecache_unheld_digests",
            "Stored digests no repository is known to hold after the last index rebuild (their "
            "repository facts were lost); served under any name or confirmed upstream, per the README",
            registry=r,
        )
        self.reconcile_seconds = Gauge(
            "edgecache_reconcile_seconds",
            "How long the last check of the index against the disk took (in the background at start-up)",
            registry=r,
        )
        for reason in ("missing", "corrupt"):
            self.index_rebuilds.labels(reason)
        for reason in ("size", "free_space"):
            self.evictions.labels(reason)
        for kind in ("blob", "manifest"):
            self.passthrough.labels(kind)
        self.store_quarantined = Counter(
            "edgecache_store_quarantined_total",
            "Stored files moved to quarantine/ and fetched again: changed (size, mtime or inode not "
            "the admitted file's, seen by a hit or the scrubber) or corrupt (bytes that no longer hash "
            "to the digest: the scrubber, or a manifest read from disk)",
            ["reason"],
            registry=r,
        )
        self.scrub_bytes = Counter(
            "edgecache_scrub_bytes_total", "Stored bytes the background scrubber re-hashed", registry=r
        )
        self.scrub_files = Counter(
            "edgecache_scrub_files_total",
            "Stored files the background scrubber checked, by result (ok, changed, corrupt, gone: "
            "evicted or removed before it got there)",
            ["result"],
            registry=r,
        )
        for reason in QUARANTINE_REASONS:
            self.store_quarantined.labels(reason)
        for result in SCRUB_RESULTS:
            self.scrub_files.labels(result)
        self.cache_limit_bytes = Gauge(
            "edgecache_cache_limit_bytes", "The cache's size limit in bytes (0: none configured)", registry=r
        )
        self.cache_reserved_bytes = Gauge(
            "edgecache_cache_reserved_bytes",
            "Bytes reserved for fills in flight (their spools count against the size limit)",
            registry=r,
        )
        self.prefetch_started = Counter(
            "edgecache_prefetch_started_total",
            "Blob fills started ahead of the client, from a manifest it was served",
            ["upstream"],
            registry=r,
        )
        self.prefetch_bytes = Counter(
            "edgecache_prefetch_bytes_total",
            "Bytes of blobs prefetched and stored (counted once stored; a blob passed through is not)",
            ["upstream"],
            registry=r,
        )
        self.prefetch_used = Counter(
            "edgecache_prefetch_used_total",
            "Prefetched blobs a client asked for afterwards (joined the fill or hit the stored blob)",
            ["upstream"],
            registry=r,
        )
        self.prefetch_evicted_unused = Counter(
            "edgecache_prefetch_evicted_unused_total",
            "Prefetched blobs evicted before any client asked for them",
            registry=r,
        )
        self.prefetch_skipped = Counter(
            "edgecache_prefetch_skipped_total",
            "Blobs of a served manifest not prefetched, by reason",
            ["upstream", "reason"],
            registry=r,
        )
        self.prefetch_queued = Gauge(
            "edgecache_prefetch_queued",
            "Blobs waiting for a prefetch slot",
            ["upstream"],
            registry=r,
        )
        self.prefetch_tags_moved = Counter(
            "edgecache_prefetch_tags_moved_total",
            "Watched tags (pulled recently) that a background revalidation found moved to a new digest",
            ["upstream"],
            registry=r,
        )
        self.trust_decisions = Counter(
            "edgecache_trust_decisions_total",
            "Manifests the signature policy decided on, by result (refusals: rejected, unsigned, "
            "untrusted, unavailable)",
            ["result"],
            registry=r,
        )
        for result in TRUST_RESULTS:
            self.trust_decisions.labels(result)
        self.credential_checks = Counter(
            "edgecache_access_credential_checks_total",
            "Credentials checked, by kind (password, token, oidc, certificate) and result (ok, "
            "remembered: a recent password or token check reused; refused; unavailable: the directory or "
            "OIDC issuer could not tell; limited: too many failures from the client)",
            ["kind", "result"],
            registry=r,
        )
        for kind in CREDENTIAL_KINDS:
            for result in CREDENTIAL_RESULTS:
                self.credential_checks.labels(kind, result)
        self.shared_hits = Counter(
            "edgecache_shared_hits_total",
            "Local misses answered from the shared object-storage tier (verified), by kind",
            ["kind"],
            registry=r,
        )
        self.shared_misses = Counter(
            "edgecache_shared_misses_total",
            "Local misses the shared tier did not hold (or could not serve): asked of the upstream",
            ["kind"],
            registry=r,
        )
        self.shared_bytes = Counter(
            "edgecache_shared_read_bytes_total",
            "Bytes read from the shared tier (blobs and manifests, before verification)",
            registry=r,
        )
        self.shared_uploads = Counter(
            "edgecache_shared_uploads_total",
            "Uploads to the shared tier of verified upstream fills, by result (done, failed; skipped: "
            "exists, queue_full, down)",
            ["kind", "result"],
            registry=r,
        )
        self.shared_upload_bytes = Counter(
            "edgecache_shared_upload_bytes_total",
            "Bytes uploaded to the shared tier",
            registry=r,
        )
        self.shared_backlog = Gauge(
            "edgecache_shared_upload_backlog",
            "Uploads to the shared tier waiting or running",
            registry=r,
        )
        self.shared_errors = Counter(
            "edgecache_shared_errors_total",
            "Failed requests to the shared tier, by kind (corrupt: an object that failed verification)",
            ["kind"],
            registry=r,
        )
        self.shared_up = Gauge(
            "edgecache_shared_up",
            "1 while the shared tier is used, 0 while it is skipped as down (or not configured)",
            registry=r,
        )
        self.shared_enabled = Gauge(
            "edgecache_shared_enabled",
            "1 when a shared tier is configured ([shared] endpoint)",
            registry=r,
        )
        for kind in SHARED_KINDS:
            self.shared_hits.labels(kind)
            self.shared_misses.labels(kind)
            for result in SHARED_UPLOAD_RESULTS:
                self.shared_uploads.labels(kind, result)
        for kind in SHARED_ERRORS:
            self.shared_errors.labels(kind)
        # The series dashboards and alerts read exist from start-up (not every combination: a
        # label set first seen later appears then, and sums over it stay right).
        for route in _API_ROUTES:
            self.http_duration.labels(route)
            for status_class in ("2xx", "4xx", "5xx"):
                self.http_requests.labels(route, "GET", status_class, "PASS")
        for route in _CACHED_ROUTES:
            for method in ("GET", "HEAD"):
                for cache in CACHE_RESULTS:
                    self.http_requests.labels(route, method, "2xx", cache)
                self.http_requests.labels(route, method, "5xx", "MISS")
        for kind in ("blob", "manifest"):
            self.cache_bytes.labels(kind)
            self.cache_entries.labels(kind)
        upstreams = list(upstreams)
        for name in upstreams:
            for kind in UPSTREAM_KINDS:
                for status_class in STATUS_CLASSES:
                    self.upstream_requests.labels(name, kind, status_class)
            for state in HEALTH_STATES:
                self.upstream_health.labels(name, state).set(1 if state == "up" else 0)
            self.ratelimit_remaining.labels(name).set(float("nan"))
            self.ratelimit_limit.labels(name).set(float("nan"))
            for reason in STALE_REASONS:
                self.stale_served.labels(name, reason)
            for kind in MISMATCH_KINDS:
                self.digest_mismatches.labels(name, kind)
            for kind in ("manifest", "blob"):
                for phase in ("first_byte", "total"):
                    self.upstream_duration.labels(name, kind, phase)

            for metric in (
                self.fills_started,
                self.fills_completed,
                self.fill_resumes,
                self.fill_joins,
                self.fills_in_flight,
                self.negative_hits,
                self.upstream_bytes,
                self.prefetch_started,
                self.prefetch_bytes,
                self.prefetch_used,
                self.prefetch_queued,
                self.prefetch_tags_moved,
            ):
                metric.labels(name)
            for reason in PREFETCH_SKIPS:
                self.prefetch_skipped.labels(name, reason)
            for reason in FILL_FAILURE_REASONS:
                self.fills_failed.labels(name, reason)
        # served_bytes' children, looked up once: send_reply counts every body by its source.
        self.served: dict[str, Counter] = {
            source: self.served_bytes.labels(source) for source in SERVED_SOURCES
        }

    def set_health(self, upstream: str, state: str) -> None:
        for each in HEALTH_STATES:
            self.upstream_health.labels(upstream, each).set(1 if each == state else 0)

    def observe_request(self, route: str, method: str, status: int, cache: str, seconds: float) -> None:
        """Count one finished request. Runs for every request: the labelled children are looked up
        once per label set and kept (prometheus-client's labels() takes a lock each time)."""
        key = (route, method, status // 100, cache)
        children = self._request_children.get(key)
        if children is None:
            method = method if method in METHODS else "other"
            route = route if route in ROUTES else "unknown"
            cache = cache if cache in CACHE_RESULTS else "PASS"
            status_class = f"{min(max(status // 100, 1), 5)}xx"
            children = (
                self.http_requests.labels(route, method, status_class, cache),
                self.http_duration.labels(route),
            )
            if len(self._request_children) < 4096:  # label sets are closed: this stays small
                self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

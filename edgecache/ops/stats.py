"""`edgecache stats`: the hit-rate picture of a running instance, from its /metrics and /stats."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from edgecache.outcomes import HIT_RESULTS
from edgecache.sizes import human_size


@dataclass
class Snapshot:
    requests_by_cache: dict[str, float]
    served_bytes: dict[str, float]
    upstream_bytes: float
    fills_in_flight: float
    upstream_states: dict[str, str]
    top: list[dict[str, object]]
    shared: dict[str, float] = field(default_factory=dict)  # the shared tier's figures (SHARED_SERIES)

    @property
    def hit_ratio(self) -> float | None:
        """Manifest and blob GETs answered without upstream, over all of them."""
        hits = sum(v for k, v in self.requests_by_cache.items() if k in HIT_RESULTS)
        total = sum(v for k, v in self.requests_by_cache.items() if k != "PASS")
        return hits / total if total else None

    @property
    def bytes_saved(self) -> float:
        """Bytes clients got beyond what came from upstream: the WAN traffic a mirror avoided."""
        return max(sum(self.served_bytes.values()) - self.upstream_bytes, 0.0)


# The shared tier's series, summed over their labels (or by the label in the key's second part).
SHARED_SERIES = {
    "edgecache_shared_enabled": "enabled",
    "edgecache_shared_up": "up",
    "edgecache_shared_read_bytes_total": "read_bytes",
    "edgecache_shared_upload_backlog": "backlog",
    "edgecache_shared_errors_total": "errors",
    "edgecache_shared_misses_total": "misses",
}


def _shared_sample(shared: dict[str, float], name: str, labels: dict[str, str], value: float) -> None:
    if name in SHARED_SERIES:
        key = SHARED_SERIES[name]
        shared[key] = shared.get(key, 0.0) + value
    elif name == "edgecache_shared_hits_total":
        key = f"hits_{labels.get('kind', '')}"
        shared[key] = shared.get(key, 0.0) + value
    elif name == "edgecache_shared_uploads_total":
        result = labels.get("result", "")
        key = f"uploads_{result if result in ('done', 'failed') else 'skipped'}"
        shared[key] = shared.get(key, 0.0) + value


def _shared_line(shared: dict[str, float]) -> str:
    if not shared.get("enabled"):
        return "shared tier: off"
    state = "up" if shared.get("up") else "DOWN (misses go to the upstream)"
    return (
        f"shared tier: {state}; hits {shared.get('hits_blob', 0):.0f} blobs, "
        f"{shared.get('hits_manifest', 0):.0f} manifests ({human_size(shared.get('read_bytes', 0))} read), "
        f"misses {shared.get('misses', 0):.0f}; uploads done {shared.get('uploads_done', 0):.0f}, "
        f"failed {shared.get('uploads_failed', 0):.0f}, skipped {shared.get('uploads_skipped', 0):.0f}, "
        f"backlog {shared.get('backlog', 0):.0f}; errors {shared.get('errors', 0):.0f}"
    )


def fetch(url: str, timeout: float = 10.0) -> Snapshot:
    base = url.rstrip("/")
    with urllib.request.urlopen(f"{base}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    with urllib.request.urlopen(f"{base}/stats", timeout=timeout) as resp:
        top = json.loads(resp.read())["top_repositories"]
    by_cache: dict[str, float] = defaultdict(float)
    served: dict[str, float] = defaultdict(float)
    upstream_bytes = in_flight = 0.0
    states: dict[str, str] = {}
    shared: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "edgecache_http_requests_total" and labels.get("route") in ("manifest", "blob"):
                if labels.get("method") == "GET" and labels.get("status_class") == "2xx":
                    by_cache[labels["cache"]] += sample.value
            elif sample.name == "edgecache_served_bytes_total":
                served[labels["source"]] += sample.value
            elif sample.name == "edgecache_upstream_blob_bytes_total":
                upstream_bytes += sample.value
            elif sample.name == "edgecache_fills_in_flight":
                in_flight += sample.value
            elif sample.name == "edgecache_upstream_health" and sample.value == 1:
                states[labels["upstream"]] = labels["state"]
            elif sample.name.startswith("edgecache_shared_"):
                _shared_sample(shared, sample.name, labels, sample.value)
    return Snapshot(dict(by_cache), dict(served), upstream_bytes, in_flight, states, top, shared)


def render(snapshot: Snapshot) -> str:
    ratio = snapshot.hit_ratio
    lines = [
        f"hit ratio (manifest+blob GETs): {'n/a' if ratio is None else f'{ratio:.1%}'}",
        "requests by cache result: "
        + (", ".join(f"{k} {v:.0f}" for k, v in sorted(snapshot.requests_by_cache.items())) or "none yet"),
        f"bytes served: {human_size(sum(snapshot.served_bytes.values()))} "
        f"({', '.join(f'{k} {human_size(v)}' for k, v in sorted(snapshot.served_bytes.items()))})",
        f"bytes from upstream: {human_size(snapshot.upstream_bytes)}; "
        f"saved: {human_size(snapshot.bytes_saved)}",
        f"fills in flight: {snapshot.fills_in_flight:.0f}",
        "upstreams: "
        + ", ".join(f"{name} {state}" for name, state in sorted(snapshot.upstream_states.items())),
        _shared_line(snapshot.shared),
        "",
        "top repositories (pulls, bytes served):",
    ]
    for entry in snapshot.top[:10]:
        lines.append(
            f"  {entry['upstream']}/{entry['repository']}: {entry['pulls']} pulls, "
            f"{human_size(float(entry['bytes_served']))}"  # type: ignore[arg-type]
        )
    if not snapshot.top:
        lines.append("  (none yet)")
    return "\n".join(lines)


def main(url: str) -> int:
    try:
        print(render(fetch(url)))
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"edgecache stats: cannot read {url}: {reason}")
        return 1
    return 0

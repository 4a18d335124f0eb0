"""`edgecache stats`: the hit-rate picture of a running instance, from its /metrics and /stats."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from edgecache.sizes import human_size


@dataclass
class Snapshot:
    requests_by_cache: dict[str, float]
    served_bytes: dict[str, float]
    upstream_bytes: float
    fills_in_flight: float
    upstream_states: dict[str, str]
    top: list[dict[str, object]]

    @property
    def hit_ratio(self) -> float | None:
        """Manifest and blob GETs answered without upstream, over all of them."""
        hits = sum(v for k, v in self.requests_by_cache.items() if k in ("HIT", "REVALIDATED", "STALE"))
        total = sum(v for k, v in self.requests_by_cache.items() if k != "PASS")
        return hits / total if total else None

    @property
    def bytes_saved(self) -> float:
        """Bytes clients got beyond what came from upstream: the WAN traffic a mirror avoided."""
        return max(sum(self.served_bytes.values()) - self.upstream_bytes, 0.0)


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
    return Snapshot(dict(by_cache), dict(served), upstream_bytes, in_flight, states, top)


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

"""The status page as HTML: one server-rendered document, no script, refreshing itself.

Everything that comes from outside (repository names, upstream names and addresses, pins, digests)
passes through `_e` (html.escape, quotes included) on its way into text or attributes; the reply
also carries a Content-Security-Policy that allows no script at all, so an escaping slip would still
not run. Figures carry `id`s (and exact values in `data-value`) so tests and scrapers can read them.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

from edgecache.http.status import DiskStatus, Status, TrendPoint, Window
from edgecache.sizes import human_size

REFRESH_SECONDS = 10
SPARK_WIDTH = 360
SPARK_HEIGHT = 48
# No script, no outside fetches; the inline <style> only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f0f0f0;white-space:nowrap}td.t,th.t{text-align:left}
.meta{color:#666}.up{color:#17702a}.down{color:#b00020}.rate_limited{color:#a05a00}
.none{color:#888;font-style:italic}svg{background:#fff;border:1px solid #ddd;vertical-align:middle}
code{font-size:.9em}.spark{display:inline-block;margin-right:2em}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _size(value: float | None) -> str:
    return "n/a" if value is None else human_size(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s"


def _figure(ident: str, text: str, value: object) -> str:
    raw = "" if value is None else f' data-value="{_e(value)}"'
    return f'<td id="{_e(ident)}"{raw}>{_e(text)}</td>'


def render(status: Status) -> str:
    """The whole page for `status`."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>edgecache status</title><style>{_STYLE}</style></head><body>",
        "<h1>edgecache status</h1>",
        f'<p class="meta">version <span id="version">{_e(status.version)}</span> · up '
        f'<span id="uptime" data-value="{status.uptime_seconds:.0f}">{_e(_duration(status.uptime_seconds))}'
        f'</span> · generated <span id="generated">{_e(status.generated_at)}</span> · '
        f'refreshes every {REFRESH_SECONDS} s · <a href="status.json">JSON</a></p>',
        _traffic(status),
        _trends(status.trend),
        _fills(status),
        _prefetch(status),
        _upstreams(status),
        _disk(status.disk, status.pins, status.pins_total),
        _repositories(status),
        "</body></html>",
    ]
    return "\n".join(parts)


def _traffic(status: Status) -> str:
    windows: list[tuple[str, str, Window]] = [
        ("5m", "last 5 min", status.last_5m),
        ("1h", "last hour", status.last_1h),
        ("all", "since start", status.since_start),
    ]
    rows: list[tuple[str, str, Sequence[tuple[str, object]]]] = [
        ("requests", "manifest and blob GETs", [(f"{w.requests}", w.requests) for _, _, w in windows]),
        ("hit-ratio", "hit ratio", [(_ratio(w.hit_ratio), w.hit_ratio) for _, _, w in windows]),
        ("served", "bytes served", [(_size(w.bytes_served), w.bytes_served) for _, _, w in windows]),
        (
            "upstream",
            "bytes from upstream",
            [(_size(w.bytes_from_upstream), w.bytes_from_upstream) for _, _, w in windows],
        ),
        ("saved", "bytes saved", [(_size(w.bytes_saved), w.bytes_saved) for _, _, w in windows]),
    ]
    head = "".join(f"<th>{_e(label)}</th>" for _, label, _ in windows)
    body = []
    for key, label, cells in rows:
        tds = "".join(
            _figure(f"{key}-{suffix}", text, value)
            for (suffix, _, _), (text, value) in zip(windows, cells, strict=True)
        )
        body.append(f'<tr><th class="t">{_e(label)}</th>{tds}</tr>')
    return (
        '<h2>Traffic</h2><table id="traffic"><tr><th class="t"></th>'
        + head
        + "</tr>"
        + "".join(body)
        + "</table>"
    )


def _trends(trend: list[TrendPoint]) -> str:
    ratios = [(p.ago, p.hit_ratio) for p in trend]
    rates = [(p.ago, p.bytes_per_second) for p in trend]
    top = max((rate for _, rate in rates), default=0.0)
    return (
        "<h2>Last hour</h2>"
        + '<div class="spark">hit ratio<br>'
        + sparkline("spark-hit-ratio", "hit ratio over the last hour, 0 to 100%", ratios, 1.0)
        + "</div>"
        + '<div class="spark">bytes served per second (peak '
        + f'<span id="served-peak">{_e(_size(top))}/s</span>)<br>'
        + sparkline("spark-served", "bytes served per second over the last hour", rates, top)
        + "</div>"
    )


def sparkline(
    ident: str, label: str, points: Sequence[tuple[float, float | None]], top: float, span: float = 3600.0
) -> str:
    """An inline SVG line of (seconds ago, value) over the last `span` seconds, scaled to `top`;
    a None value breaks the line (no requests in that interval)."""
    width, height = SPARK_WIDTH, SPARK_HEIGHT
    lines: list[list[str]] = [[]]
    for ago, value in points:
        if value is None:
            if lines[-1]:
                lines.append([])
            continue
        x = width * (1 - min(max(ago, 0.0), span) / span)
        y = height - 2 - (height - 4) * (min(value / top, 1.0) if top > 0 else 0.0)
        lines[-1].append(f"{x:.1f},{y:.1f}")
    shapes = []
    for line in lines:
        if len(line) == 1:
            cx, cy = line[0].split(",")
            shapes.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="#1f6feb"/>')
        elif line:
            shapes.append(
                f'<polyline fill="none" stroke="#1f6feb" stroke-width="1.5" points="{" ".join(line)}"/>'
            )
    if not shapes:
        shapes.append(f'<text x="8" y="{height // 2 + 4}" fill="#888" font-size="12">no data yet</text>')
    return (
        f'<svg id="{_e(ident)}" role="img" aria-label="{_e(label)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg"><title>{_e(label)}</title>'
        + "".join(shapes)
        + "</svg>"
    )


def _table(ident: str, headers: Iterable[str], rows: list[str], empty: str, text_columns: int = 1) -> str:
    if not rows:
        return f'<p id="{_e(ident)}" class="none">{_e(empty)}</p>'
    cells = "".join(
        f'<th class="t">{_e(h)}</th>' if i < text_columns else f"<th>{_e(h)}</th>"
        for i, h in enumerate(headers)
    )
    return f'<table id="{_e(ident)}"><tr>{cells}</tr>' + "".join(rows) + "</table>"


def _fills(status: Status) -> str:
    rows = []
    for fill in status.fills:
        progress = (
            f'<progress max="1" value="{fill.progress:.3f}"></progress> {fill.progress:.0%}'
            if fill.progress is not None
            else "size not known yet"
        )
        how = ["prefetch" if fill.prefetched else "client"]
        if fill.passing:
            how.append("passed through")
        rows.append(
            f'<tr class="fill" data-digest="{_e(fill.digest)}">'
            f'<td class="t">{_e(fill.upstream)}</td><td class="t">{_e(fill.repository)}</td>'
            f'<td class="t"><code title="{_e(fill.digest)}">{_e(fill.digest[:19])}…</code></td>'
            f'<td class="progress" data-value="{_e(fill.written)}">{progress}</td>'
            f"<td>{_e(_size(fill.written))} of {_e(_size(fill.size))}</td>"
            f'<td class="readers">{fill.readers}</td><td class="t how">{_e(", ".join(how))}</td></tr>'
        )
    more = status.fills_total - len(status.fills)
    note = f'<p class="meta">and {more} more</p>' if more > 0 else ""
    return (
        f'<h2>Fills in flight (<span id="fills-total">{status.fills_total}</span>)</h2>'
        + _table(
            "fills",
            ("upstream", "repository", "digest", "progress", "bytes", "readers", "started by"),
            rows,
            "no fills in flight",
            3,
        )
        + note
    )


def _prefetch(status: Status) -> str:
    p = status.prefetch
    useful = _ratio(p.used / p.started if p.started else None)
    rows = [
        ("prefetch-started", "blobs prefetched", f"{p.started}", p.started),
        ("prefetch-bytes", "bytes prefetched", _size(p.bytes), p.bytes),
        ("prefetch-used", "asked for afterwards", f"{p.used} ({useful})", p.used),
        ("prefetch-evicted", "evicted unused", f"{p.evicted_unused}", p.evicted_unused),
        ("prefetch-queued", "waiting for a slot", f"{p.queued}", p.queued),
        ("prefetch-hour", "prefetched in the last hour", f"{p.started_last_hour}", p.started_last_hour),
    ]
    body = "".join(f'<tr><th class="t">{_e(label)}</th>{_figure(i, t, v)}</tr>' for i, label, t, v in rows)
    return f'<h2>Prefetch</h2><table id="prefetch">{body}</table>'


def _upstreams(status: Status) -> str:
    rows = []
    for u in status.upstreams:
        probe = f"next probe in {u.next_probe_in:.0f} s" if u.next_probe_in is not None else ""
        if u.ratelimit_remaining is None:
            headroom = "not reported"
        elif u.ratelimit_limit:
            headroom = f"{u.ratelimit_remaining:.0f} of {u.ratelimit_limit:.0f}"
        else:
            headroom = f"{u.ratelimit_remaining:.0f}"
        rows.append(
            f'<tr class="upstream" data-upstream="{_e(u.name)}">'
            f'<td class="t">{_e(u.name)}</td><td class="t">{_e(u.address)}</td>'
            f'<td class="t state {_e(u.state)}">{_e(u.state)}</td><td>{u.failures}</td>'
            f'<td class="t">{_e(probe)}</td><td class="ratelimit">{_e(headroom)}</td>'
            f"<td>{u.fills_in_flight}</td><td>{u.prefetch_queued}</td></tr>"
        )
    return "<h2>Upstreams</h2>" + _table(
        "upstreams",
        ("name", "address", "state", "failures", "probe", "rate limit left", "fills", "prefetch queued"),
        rows,
        "no upstreams",
        3,
    )


def _disk(disk: DiskStatus, pins: list[str], pins_total: int) -> str:
    limit = _size(disk.limit) if disk.limit else "no limit"
    rows = [
        ("disk-used", "used (stored + reserved)", _size(disk.used), disk.used),
        ("disk-limit", "limit (cache.max_size)", limit, disk.limit),
        ("disk-fraction", "of the limit", _ratio(disk.fraction), disk.fraction),
        (
            "disk-watermarks",
            "eviction from / down to",
            f"{disk.high_watermark:.0%} / {disk.low_watermark:.0%}",
            None,
        ),
        ("disk-reserved", "reserved for fills", _size(disk.reserved), disk.reserved),
        ("disk-blobs", "blobs", f"{disk.blobs} ({_size(disk.blob_bytes)})", disk.blobs),
        ("disk-manifests", "manifests", f"{disk.manifests} ({_size(disk.manifest_bytes)})", disk.manifests),
        ("disk-pinned", "pinned", _size(disk.pinned_bytes), disk.pinned_bytes),
        ("disk-free", "free on the file system", _size(disk.filesystem_free), disk.filesystem_free),
    ]
    body = "".join(f'<tr><th class="t">{_e(label)}</th>{_figure(i, t, v)}</tr>' for i, label, t, v in rows)
    pin_items = "".join(f"<li><code>{_e(pin)}</code></li>" for pin in pins)
    more = f"<li>and {pins_total - len(pins)} more</li>" if pins_total > len(pins) else ""
    pin_list = f'<ul id="pins">{pin_items}{more}</ul>' if pins else '<p id="pins" class="none">no pins</p>'
    return (
        f'<h2>Disk</h2>{_disk_bar(disk)}<table id="disk">{body}</table><h2>Pins ({pins_total})</h2>{pin_list}'
    )


def _disk_bar(disk: DiskStatus) -> str:
    """Use against the limit, with the watermarks marked; nothing without a limit."""
    if not disk.limit:
        return ""
    width, height = SPARK_WIDTH, 16
    used = min(disk.used / disk.limit, 1.0) * width
    marks = "".join(
        f'<line x1="{w * width:.1f}" x2="{w * width:.1f}" y1="0" y2="{height}" stroke="#b00020"/>'
        for w in (disk.high_watermark, disk.low_watermark)
    )
    label = f"disk use {_ratio(disk.fraction)} of the limit; watermarks marked"
    return (
        f'<svg id="disk-bar" role="img" aria-label="{_e(label)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg"><title>{_e(label)}</title>'
        f'<rect x="0" y="0" width="{used:.1f}" height="{height}" fill="#1f6feb"/>{marks}</svg>'
    )


def _repositories(status: Status) -> str:
    rows = [
        f'<tr class="repository"><td class="t">{_e(r.upstream)}</td><td class="t">{_e(r.repository)}</td>'
        f'<td data-value="{r.bytes_served}">{_e(_size(r.bytes_served))}</td><td>{r.pulls}</td></tr>'
        for r in status.repositories
    ]
    return (
        f"<h2>Top repositories by bytes served (of "
        f'<span id="repositories-known">{status.repositories_known}</span> seen since start)</h2>'
        + _table("repositories", ("upstream", "repository", "bytes served", "pulls"), rows, "none yet", 2)
    )

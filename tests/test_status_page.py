"""The status page (/_edgecache/status and status.json).

Pure tests: the sampler's windows and trend against an injected clock, the counters read from real
collectors, the page rendered from a gathered status (empty cache, 1,000 repositories, hostile
names escaped). Real tests: the real app in front of the real origin registry, real pulls through
it, and headless Chromium loading the page; its figures are read from the DOM Chromium built, and a
screenshot is kept (pytest's tmp dir, and test-artifacts/status.png in the repository).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import edgecache
from edgecache.config import StatusConfig, UpstreamConfig
from edgecache.fill.flights import Flights
from edgecache.http import status_page
from edgecache.http.status import (
    TOP_REPOSITORIES,
    Counts,
    DiskStatus,
    FillStatus,
    PrefetchStatus,
    RepositoryStatus,
    Sampler,
    Status,
    StatusBoard,
    TrendPoint,
    UpstreamStatus,
    Window,
    difference,
    document,
    read_counts,
)
from edgecache.metrics import Metrics
from edgecache.sizes import human_size
from edgecache.store.blobs import BlobStore
from edgecache.store.keeper import CacheKeeper
from edgecache.upstream.client import UpstreamClient
from edgecache.usage import Usage
from tests.conftest import (
    Edge,
    Seeded,
    edge_config,
    running_edge,
    serve_with_metrics_listener,
    tls_edge_in_process,
)
from tests.support.browser import dump_dom, screenshot
from tests.support.clock import Clock
from tests.support.dom import Element, nesting_problems, parse
from tests.support.faults import FaultProxy
from tests.support.images import DOCKER_MANIFEST, OCI_MANIFEST
from tests.support.registry import Registry, free_port, wait_http
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
ACCEPT = {"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"}
HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">\"'&"


# -- the sampler ---------------------------------------------------------------------------------


class Counters:
    """Counters a test moves by hand, read by the sampler as it would read the collectors."""

    def __init__(self) -> None:
        self.hits = self.lookups = self.served = self.upstream = 0.0

    def read(self, at: float) -> Counts:
        return Counts(at, self.hits, self.lookups, self.served, self.upstream)

    def requests(self, hits: int, misses: int, served: int, upstream: int) -> None:
        self.hits += hits
        self.lookups += hits + misses
        self.served += served
        self.upstream += upstream


def test_windows_are_differences_against_the_sample_taken_that_long_ago() -> None:
    clock, counters = Clock(), Counters()
    sampler = Sampler(counters.read, clock, interval=10.0, keep=361)
    sampler.sample()
    for minute in range(90):  # an hour and a half: one miss and three hits a minute, 1 MiB each
        for tick in range(6):
            clock.advance(10.0)
            sampler.sample()
            if tick == 2:  # between two samples, half a minute in
                counters.requests(hits=3, misses=1, served=4 << 20, upstream=(1 << 20) if minute % 2 else 0)
    now = sampler.now()
    five = sampler.window(300.0, now)
    assert five.seconds == 300.0
    assert (five.requests, five.hits, five.hit_ratio) == (20, 15, 0.75)
    assert five.bytes_served == 20 << 20
    hour = sampler.window(3600.0, now)
    assert hour.seconds == 3600.0 and hour.requests == 240 and hour.bytes_served == 240 << 20
    assert hour.bytes_from_upstream == 30 << 20 and hour.bytes_saved == 210 << 20
    assert len(sampler) == 361  # bounded: the ring keeps an hour and drops the rest


def test_a_young_process_covers_what_it_has_and_an_idle_one_reports_no_ratio() -> None:
    clock, counters = Clock(), Counters()
    sampler = Sampler(counters.read, clock, interval=10.0, keep=361)
    sampler.sample()
    clock.advance(25.0)
    counters.requests(hits=1, misses=1, served=10, upstream=30)
    window = sampler.window(300.0, sampler.now())
    assert window.seconds == 25.0 and window.hit_ratio == 0.5
    assert window.bytes_saved == 0  # never negative: more came from upstream than was served
    assert difference(sampler.now(), sampler.now()).hit_ratio is None


def test_trend_has_one_point_per_interval_and_gaps_where_nothing_was_asked() -> None:
    clock, counters = Clock(), Counters()
    sampler = Sampler(counters.read, clock, interval=10.0, keep=361)
    sampler.sample()
    for step in range(400):
        clock.advance(10.0)
        if step % 2:
            counters.requests(hits=1, misses=0, served=1000, upstream=0)
        sampler.sample()
    trend = sampler.trend(3600.0, sampler.now())
    assert len(trend) == 360
    assert [p.hit_ratio for p in trend[-4:]] == [None, 1.0, None, 1.0]
    assert [p.bytes_per_second for p in trend[-2:]] == [0.0, 100.0]
    assert trend[0].ago == 3590.0 and trend[-1].ago == 0.0


def test_counts_are_read_from_the_collectors_metrics_exports() -> None:
    metrics = Metrics(["docker.io"])
    for cache in ("HIT", "HIT", "STALE", "MISS", "JOINED", "PASS"):
        metrics.observe_request("blob", "GET", 200, cache, 0.01)
    metrics.observe_request("manifest", "GET", 200, "REVALIDATED", 0.01)
    metrics.observe_request("manifest", "HEAD", 200, "HIT", 0.01)  # not a GET
    metrics.observe_request("manifest", "GET", 404, "MISS", 0.01)  # not an answer
    metrics.observe_request("metrics", "GET", 200, "PASS", 0.01)  # not content
    metrics.served_bytes.labels("disk").inc(5000)
    metrics.served_bytes.labels("memory").inc(100)
    metrics.upstream_bytes.labels("docker.io").inc(700)
    metrics.prefetch_started.labels("docker.io").inc(3)
    counts = read_counts(metrics, 42.0)
    assert (counts.hits, counts.lookups) == (4, 6)
    assert (counts.served, counts.upstream, counts.prefetch_started) == (5100, 700, 3)


# -- gathering and rendering ---------------------------------------------------------------------


@dataclasses.dataclass
class Board:
    board: StatusBoard
    metrics: Metrics
    keeper: CacheKeeper
    flights: Flights
    usage: Usage


@pytest.fixture
async def board(tmp_path: Path) -> AsyncIterator[Board]:
    metrics = Metrics(["docker.io", "ghcr.io"])
    store = BlobStore(tmp_path)
    store.prepare()
    keeper = CacheKeeper(store, metrics, max_size=10 << 30, high_watermark=0.9, low_watermark=0.8)
    await keeper.start()
    flights = Flights(store, metrics, keeper)
    clients = {
        "docker.io": UpstreamClient(UpstreamConfig(), metrics),
        # credentials, a path and a query in a URL must never reach the page
        "ghcr.io": UpstreamClient(
            UpstreamConfig(name="ghcr.io", url="https://robot:s3cret@ghcr.example:8443/v2?token=t0k"), metrics
        ),
    }
    usage = Usage()
    status = StatusBoard(StatusConfig(), metrics, keeper, flights, clients, usage, tmp_path)
    yield Board(status, metrics, keeper, flights, usage)
    await status.close()
    await flights.close()
    await keeper.close()


async def test_an_empty_cache_renders_a_complete_page_and_json(board: Board) -> None:
    status = await board.board.status()
    page = status_page.render(status)
    assert nesting_problems(page) == []
    dom = parse(page)
    assert dom.by_id("hit-ratio-5m").text() == "n/a" and dom.by_id("requests-1h").text() == "0"
    assert dom.by_id("fills").text() == "no fills in flight"
    assert dom.by_id("repositories").text() == "none yet"
    assert dom.by_id("pins").text() == "no pins"
    assert dom.by_id("disk-limit").text() == "10.0 GiB"
    assert dom.by_id("disk-watermarks").text() == "90% / 80%"
    assert len(dom.by_id("disk-bar").all("line")) == 2  # the watermarks on the bar
    assert dom.by_id("spark-hit-ratio").text().endswith("no data yet")
    rows = {row.attrs["data-upstream"]: row for row in dom.all("tr", "upstream")}
    assert set(rows) == {"docker.io", "ghcr.io"}
    assert "https://ghcr.example:8443" in rows["ghcr.io"].text()
    assert "not reported" in rows["docker.io"].text()
    for secret in ("robot", "s3cret", "t0k", "/v2"):
        assert secret not in page
    data = json.loads(json.dumps(document(status), allow_nan=False))  # JSON has no NaN: None instead
    assert data["upstreams"][1]["address"] == "https://ghcr.example:8443"
    assert data["upstreams"][0]["ratelimit_remaining"] is None
    assert data["last_5m"]["hit_ratio"] is None and data["disk"]["fraction"] == 0.0
    assert "robot" not in json.dumps(data)


async def test_a_thousand_repositories_show_the_top_ones_by_bytes(board: Board) -> None:
    for i in range(1000):
        board.usage.record("docker.io", f"team/app-{i:04d}", pull=True, bytes_served=i * 1000)
    status = board.board.gather()
    assert status.repositories_known == 1000
    assert [r.repository for r in status.repositories] == [
        f"team/app-{i:04d}" for i in range(999, 999 - TOP_REPOSITORIES, -1)
    ]
    page = status_page.render(status)
    assert nesting_problems(page) == []
    dom = parse(page)
    assert len(dom.all("tr", "repository")) == TOP_REPOSITORIES
    assert dom.by_id("repositories-known").text() == "1000"
    assert len(page) < 64_000  # bounded by what is shown, not by what is known


async def test_prefetch_activity_is_read_from_its_collectors(board: Board) -> None:
    metrics = board.metrics
    metrics.prefetch_started.labels("docker.io").inc(6)
    metrics.prefetch_started.labels("ghcr.io").inc(2)
    metrics.prefetch_bytes.labels("docker.io").inc(3 << 20)
    metrics.prefetch_used.labels("docker.io").inc(4)
    metrics.prefetch_evicted_unused.inc(1)
    metrics.prefetch_queued.labels("ghcr.io").set(5)
    status = board.board.gather()
    assert status.prefetch == PrefetchStatus(8, 3 << 20, 4, 1, 5, 8, 3 << 20)
    assert [u.prefetch_queued for u in status.upstreams] == [0, 5]
    dom = parse(status_page.render(status))
    assert dom.by_id("prefetch-started").text() == "8"
    assert dom.by_id("prefetch-bytes").text() == "3.0 MiB"
    assert dom.by_id("prefetch-used").text() == "4 (50.0%)"
    assert dom.by_id("prefetch-evicted").text() == "1" and dom.by_id("prefetch-queued").text() == "5"


def test_long_lists_are_cut_and_say_how_many_more() -> None:
    status = dataclasses.replace(hostile_status(), fills_total=70, pins_total=51)
    dom = parse(status_page.render(status))
    assert dom.by_id("fills-total").text() == "70" and "and 69 more" in dom.text()
    assert dom.by_id("pins").all("li")[-1].text() == "and 50 more"


async def test_the_sampler_task_runs_with_the_board_and_stops_with_it(board: Board) -> None:
    board.board.sampler.interval = 0.01
    before = len(board.board.sampler)
    board.board.start()
    await wait_until(lambda: len(board.board.sampler) >= before + 3, message="the sampler took no samples")
    task = board.board._task
    await board.board.close()
    assert task is not None and task.done()


def hostile_status() -> Status:
    """A status whose every outside string is an attack on the page."""
    window = Window(300.0, 4, 3, 0.75, 1 << 20, 1 << 10, (1 << 20) - (1 << 10), 0, 0)
    return Status(
        version="0.3.0",
        generated_at="2026-12-01T00:00:00+00:00",
        uptime_seconds=3725.0,
        sample_seconds=10.0,
        last_5m=window,
        last_1h=window,
        since_start=window,
        trend=[TrendPoint(20.0, 0.5, 100.0), TrendPoint(10.0, None, 0.0), TrendPoint(0.0, 1.0, 50.0)],
        fills=[FillStatus(HOSTILE, HOSTILE, "sha256:" + "a" * 64 + HOSTILE, 100, 50, 0.5, 2, True, False)],
        fills_total=1,
        prefetch=PrefetchStatus(1, 2, 1, 0, 0, 1, 2),
        upstreams=[UpstreamStatus(HOSTILE, HOSTILE, HOSTILE, 1, 2.0, 5.0, 100.0, 1, 0)],
        disk=DiskStatus(50, 100, 0.95, 0.9, 0, 40, 10, 1, 1, 0, 1000, 2000),
        pins=[HOSTILE],
        pins_total=2,
        repositories=[RepositoryStatus(HOSTILE, HOSTILE, 1, 10)],
        repositories_known=1,
    )


def test_names_from_outside_are_escaped_everywhere() -> None:
    page = status_page.render(hostile_status())
    assert nesting_problems(page) == []
    dom = parse(page)
    tags = {element.tag for element in dom.iter()}
    assert "script" not in tags and "img" not in tags
    assert not [(e.tag, name) for e in dom.iter() for name in e.attrs if name.startswith("on")], (
        "an event handler attribute got in"
    )
    assert HOSTILE in dom.by_id("repositories").text()  # shown as text, exactly
    assert HOSTILE in dom.by_id("upstreams").text() and HOSTILE in dom.by_id("pins").text()
    assert [row.attrs["data-upstream"] for row in dom.all("tr", "upstream")] == [HOSTILE]
    assert "script" not in status_page.CONTENT_SECURITY_POLICY  # and no script would run anyway


def test_sparklines_break_where_nothing_was_asked() -> None:
    svg = status_page.sparkline("s", "label", [(30.0, 0.5), (20.0, 1.0), (10.0, None), (0.0, 0.25)], 1.0)
    dom = parse(svg)
    assert len(dom.all("polyline")) == 1 and len(dom.all("circle")) == 1
    assert dom.all("polyline")[0].attrs["points"] == "357.0,24.0 358.0,2.0"


# -- the real app, a real browser ------------------------------------------------------------------


async def browse(edge: Edge, tmp_path: Path, name: str) -> Element:
    """Chromium's DOM of the status page, with a screenshot kept beside it (and in test-artifacts/)."""
    url = f"{edge.url}/_edgecache/status"
    dom = await dump_dom(url, tmp_path / f"chromium-{name}")
    shot = await screenshot(url, tmp_path / f"status-{name}.png", tmp_path / f"chromium-{name}-shot")
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / ("status.png" if name == "pulls" else f"status-{name}.png"))
    return parse(dom)


async def get(edge: Edge, path: str, headers: dict[str, str] | None = None) -> bytes:
    async with edge.http.get(path, headers=headers) as resp:
        assert resp.status == 200, (path, resp.status, await resp.text())
        return await resp.read()


async def status_json(edge: Edge) -> dict[str, Any]:
    async with edge.http.get("/_edgecache/status.json") as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


async def test_chromium_shows_the_figures_of_real_pulls(edge: Edge, seeded: Seeded, tmp_path: Path) -> None:
    image = seeded.alpine
    served = 0
    for _ in range(2):  # a miss, then a hit, of every part of the image
        served += len(await get(edge, "/v2/library/alpine/manifests/latest", ACCEPT))
        for blob in (image.config, *image.layers):
            served += len(await get(edge, f"/v2/library/alpine/blobs/{blob.digest}"))
    from_upstream = len(image.config.data) + sum(len(layer.data) for layer in image.layers)
    # A pin added beside the server (the CLI on the cache directory), as an operator would.
    pin = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "edgecache", "pin", "add", "docker.io/library/alpine:latest",
         "--cache-dir", str(edge.cache_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert pin.returncode == 0, pin.stderr

    async def pinned() -> bool:
        return bool((await status_json(edge))["pins"] == ["docker.io/library/alpine:latest"])

    await wait_until(pinned, message="the running instance never showed the pin")

    dom = await browse(edge, tmp_path, "pulls")

    requests = 2 * (2 + len(image.layers))
    assert dom.by_id("requests-5m").text() == str(requests)
    assert dom.by_id("hit-ratio-5m").text() == "50.0%" and dom.by_id("hit-ratio-1h").text() == "50.0%"
    # Nothing else was sent before the page was built: every byte served is one the test received.
    assert dom.by_id("served-5m").attrs["data-value"] == str(served)
    assert dom.by_id("served-5m").text() == human_size(served)
    assert dom.by_id("upstream-1h").attrs["data-value"] == str(from_upstream)
    assert dom.by_id("saved-all").attrs["data-value"] == str(served - from_upstream)
    assert dom.by_id("disk-blobs").attrs["data-value"] == str(1 + len(image.layers))
    assert dom.by_id("fills").text() == "no fills in flight"
    assert [li.text() for li in dom.by_id("pins").all("li")] == ["docker.io/library/alpine:latest"]
    assert dom.by_id("disk-pinned").attrs["data-value"] == str(from_upstream + len(image.manifest.data))
    (upstream,) = dom.all("tr", "upstream")
    assert upstream.attrs["data-upstream"] == "docker.io"
    assert upstream.all("td", "state")[0].text() == "up"
    (repository,) = dom.all("tr", "repository")
    assert [td.text() for td in repository.all("td")][:2] == ["docker.io", "library/alpine"]
    assert repository.all("td")[2].attrs["data-value"] == str(served)
    assert dom.by_id("spark-hit-ratio").all("circle") or dom.by_id("spark-hit-ratio").all("polyline")
    assert dom.by_id("version").text() == edgecache.__version__


async def test_chromium_shows_a_fill_in_flight_with_its_progress_and_reader(
    tmp_path: Path, proxy: FaultProxy, seeded: Seeded
) -> None:
    config = edge_config(tmp_path / "cache", proxy.url, {"stall_timeout": 300.0})
    layer = seeded.big.layers[-1]
    proxy.rules.stall_blobs = 1  # the body stops half-way and the connection stays open
    # Docker Hub's rate-limit headers, on the manifest's answer
    proxy.rules.add_headers = {
        "/manifests/": {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "76;w=21600"}
    }
    async with running_edge(config) as edge:
        await get(edge, "/v2/library/big/manifests/latest", ACCEPT)
        async with edge.http.get(f"/v2/library/big/blobs/{layer.digest}") as resp:
            assert resp.status == 200
            first = await resp.content.readexactly(1 << 20)  # a reader that is reading

            async def stalled() -> bool:
                fills = (await status_json(edge))["fills"]
                assert len(fills) == 1
                return bool(fills[0]["written"] >= len(layer.data) // 2 - (1 << 16))

            await wait_until(stalled, message="the fill never reached the stall half-way")
            dom = await browse(edge, tmp_path, "fill")
            assert first == layer.data[: 1 << 20]
        assert dom.by_id("fills-total").text() == "1"
        (row,) = dom.all("tr", "fill")
        assert row.attrs["data-digest"] == layer.digest
        assert row.all("td", "readers")[0].text() == "1"
        assert row.all("td", "how")[0].text() == "client"
        written = int(row.all("td", "progress")[0].attrs["data-value"])
        assert len(layer.data) // 3 < written < len(layer.data)
        assert row.all("progress")  # the bar, drawn by the browser without any script
        assert f"of {human_size(len(layer.data))}" in row.text()
        (upstream,) = dom.all("tr", "upstream")
        assert upstream.all("td", "ratelimit")[0].text() == "76 of 100"


async def test_chromium_shows_an_empty_cache_and_a_down_upstream(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = edge_config(tmp_path / "cache", closed, {"down_after": 1})
    async with running_edge(config) as edge:
        async with edge.http.get("/v2/library/alpine/manifests/latest", headers=ACCEPT) as resp:
            assert resp.status >= 500

        async def down() -> bool:
            return bool((await status_json(edge))["upstreams"][0]["state"] == "down")

        await wait_until(down, message="the upstream was never reported down")
        dom = await browse(edge, tmp_path, "down")
    (upstream,) = dom.all("tr", "upstream")
    assert upstream.all("td", "state")[0].text() == "down"
    assert "next probe in" in upstream.text()
    assert dom.by_id("hit-ratio-5m").text() == "n/a" and dom.by_id("requests-all").text() == "0"
    assert dom.by_id("disk-blobs").text().startswith("0 ")
    assert dom.by_id("fills").text() == "no fills in flight"
    assert dom.by_id("repositories").text() == "none yet"


async def test_chromium_shows_a_thousand_repositories_and_runs_no_hostile_name(
    edge: Edge, tmp_path: Path
) -> None:
    board = edge.instance.front.status
    assert board is not None
    # Names a client could never get past RepoName, written straight into the usage table.
    for i in range(999):
        board.usage.record("docker.io", f"team/app-{i:04d}", pull=True, bytes_served=1000 + i)
    board.usage.record("docker.io", HOSTILE, pull=True, bytes_served=1 << 30)
    dom = await browse(edge, tmp_path, "many")
    assert dom.by_id("repositories-known").text() == "1000"
    rows = dom.all("tr", "repository")
    assert len(rows) == TOP_REPOSITORIES
    assert rows[0].all("td")[1].text() == HOSTILE  # shown as text...
    title = next(e for e in dom.iter() if e.tag == "title").text()
    assert title == "edgecache status"  # ...and never run: neither the script nor the onerror
    assert not [e for e in dom.iter() if e.tag in ("script", "img")]


async def test_the_page_is_off_when_disabled_and_a_reload_turns_it_on(
    tmp_path: Path, origin: Registry
) -> None:
    config = edge_config(tmp_path / "cache", origin.url)
    config = dataclasses.replace(config, status=StatusConfig(enabled=False))
    async with running_edge(config) as edge:
        for path in ("/_edgecache/status", "/_edgecache/status.json"):
            async with edge.http.get(path) as resp:
                assert resp.status == 404
                assert (await resp.json())["errors"][0]["code"] == "UNSUPPORTED"
        edge.instance.apply(dataclasses.replace(config, status=StatusConfig(enabled=True)))
        async with edge.http.get("/_edgecache/status") as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "text/html; charset=utf-8"
            assert "script-src" not in resp.headers["Content-Security-Policy"]
            assert "default-src 'none'" in resp.headers["Content-Security-Policy"]


@pytest.mark.parametrize("listener", ["plain", "tls"])
async def test_both_listeners_serve_the_page_and_its_json_with_the_same_figures(
    tmp_path: Path, origin: Registry, seeded: Seeded, listener: str
) -> None:
    config = edge_config(tmp_path / "cache", origin.url)
    running = running_edge(config) if listener == "plain" else tls_edge_in_process(config, tmp_path / "pki")
    async with running as edge:
        manifests = len(await get(edge, "/v2/library/alpine/manifests/latest", ACCEPT))
        manifests += len(await get(edge, "/v2/library/alpine/manifests/latest", ACCEPT))
        data = await status_json(edge)
        page = (await get(edge, "/_edgecache/status")).decode()
        async with edge.http.head("/_edgecache/status") as resp:
            assert resp.status == 200 and await resp.read() == b""
            assert int(resp.headers["Content-Length"]) > 0
        assert await edge.metric("edgecache_http_requests_total", route="status", method="GET") == 2
    assert nesting_problems(page) == []
    dom = parse(page)
    since_start = data["since_start"]
    assert since_start["requests"] == 2 and since_start["hit_ratio"] == 0.5
    assert dom.by_id("requests-all").text() == "2" and dom.by_id("hit-ratio-all").text() == "50.0%"
    # The JSON sent before the page is not content: loading the page does not add to bytes served.
    assert since_start["bytes_served"] == manifests
    assert dom.by_id("served-all").attrs["data-value"] == str(manifests)
    assert dom.by_id("version").text() == data["version"] == edgecache.__version__


def test_the_page_is_served_where_metrics_is(tmp_path: Path, origin: Registry) -> None:
    with serve_with_metrics_listener(tmp_path, origin.url) as (registry, metrics):
        wait_http(f"{metrics}/_edgecache/status", status=200)
        wait_http(f"{metrics}/_edgecache/status.json", status=200)
        wait_http(f"{registry}/_edgecache/status", status=404)


def test_the_documented_config_states_the_status_keys() -> None:
    text = (ROOT / "conf/edgecache.toml").read_text()
    section = text[text.index("\n[status]\n") :]
    for field in dataclasses.fields(StatusConfig):
        assert re.search(rf"^{field.name} = {str(field.default).lower()}$", section, re.MULTILINE), field.name

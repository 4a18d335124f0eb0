"""What operators see: metrics through real pulls, the access log, health checks, the dashboard and
alert rules (checked by promtool and by a real Prometheus scraping a real edgecache)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgecache.http.accesslog import MAX_PENDING_LINES, AccessLog, JsonFormatter, loggable
from edgecache.trace import RequestTrace
from tests.conftest import Edge, EdgeProcess, Seeded, serve_with_metrics_listener, spawn_edge
from tests.support.images import DOCKER_MANIFEST, OCI_MANIFEST
from tests.support.logs import access_records
from tests.support.registry import Registry, free_port, wait_http
from tests.support.waiting import wait_until_sync

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "conf/prometheus/edgecache-rules.yml"
ACCEPT = {"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"}


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


async def test_request_metrics_follow_real_pulls(edge: Edge, seeded: Seeded) -> None:
    def requests(route: str, cache: str) -> dict[str, str]:
        return {"route": route, "method": "GET", "status_class": "2xx", "cache": cache}

    layer = seeded.alpine.layers[0]
    for _ in range(2):
        async with edge.http.get("/v2/library/alpine/manifests/latest", headers=ACCEPT) as resp:
            await resp.read()
    async with edge.http.get(f"/v2/library/alpine/blobs/{layer.digest}") as resp:
        await resp.read()
    async with edge.http.get("/v2/library/alpine/manifests/nope", headers=ACCEPT) as resp:
        assert resp.status == 404 and resp.headers["X-Cache"] == "MISS"
        assert re.fullmatch(r"[0-9a-f]{16}", resp.headers["X-Request-Id"])
    metric = edge.metric
    assert await metric("edgecache_http_requests_total", **requests("manifest", "MISS")) == 1
    assert await metric("edgecache_http_requests_total", **requests("manifest", "HIT")) == 1
    assert await metric("edgecache_http_requests_total", **requests("blob", "MISS")) == 1
    assert (
        await metric("edgecache_http_requests_total", route="manifest", status_class="4xx", cache="MISS") == 1
    )
    assert await metric("edgecache_http_request_duration_seconds_count", route="manifest") == 3
    assert (
        await metric(
            "edgecache_upstream_requests_total", upstream="docker.io", kind="blob", status_class="2xx"
        )
        == 1
    )
    assert (
        await metric(
            "edgecache_upstream_request_duration_seconds_count",
            upstream="docker.io",
            kind="blob",
            phase="total",
        )
        == 1
    )
    assert await metric("edgecache_cache_entries", kind="manifest") >= 1


def test_access_log_is_json_lines_without_credentials(
    tmp_path: Path, origin: Registry, seeded: Seeded
) -> None:
    port = free_port()
    log_path = tmp_path / "edgecache.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgecache", "serve", "--listen", f"127.0.0.1:{port}",
             "--upstream", origin.url, "--cache-dir", str(tmp_path / "cache"), "--log-format", "json"],
            stderr=log,
        )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/", proc=proc)
        status, headers, _ = http_get(
            f"http://127.0.0.1:{port}/v2/library/alpine/blobs/{seeded.alpine.config.digest}",
            {"Authorization": "Basic c2VjcmV0OnBhc3N3b3Jk", "X-Request-Id": "trace-42"},
        )
        assert status == 200 and headers["X-Request-Id"] == "trace-42"
    finally:
        proc.terminate()
        proc.wait(15)
    access = [r for r in access_records(log_path) if r.get("request_id") == "trace-42"]
    assert len(access) == 1
    entry = access[0]
    assert entry["method"] == "GET" and entry["status"] == 200 and entry["route"] == "blob"
    assert entry["cache"] == "MISS" and entry["upstream"] == "docker.io" and entry["upstream_status"] == 200
    assert entry["bytes"] == len(seeded.alpine.config.data)
    assert {"time", "peer", "path", "duration_ms"} <= set(entry)
    assert "c2VjcmV0OnBhc3N3b3Jk" not in log_path.read_text()


def test_health_endpoints(edge_process: EdgeProcess) -> None:
    status, _, body = http_get(f"{edge_process.url}/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = http_get(f"{edge_process.url}/readyz")
    assert status == 200
    assert json.loads(body) == {"ready": True, "cache_writable": True, "upstreams": {"docker.io": "up"}}
    # A cache that cannot take writes is not ready; the registry health check (/v2/) stays up.
    tmp = edge_process.cache_dir / "tmp"
    shutil.rmtree(tmp)
    tmp.write_text("not a directory")
    try:
        status, _, body = http_get(f"{edge_process.url}/readyz")
        assert status == 503 and json.loads(body)["cache_writable"] is False
        assert http_get(f"{edge_process.url}/v2/")[0] == 200
    finally:
        tmp.unlink()
        tmp.mkdir()


def test_metrics_can_have_their_own_listener(tmp_path: Path, origin: Registry) -> None:
    with serve_with_metrics_listener(tmp_path, origin.url) as (registry, metrics):
        assert b"edgecache_fills_started_total" in http_get(f"{metrics}/metrics")[2]
        assert http_get(f"{registry}/metrics")[0] == 404  # not on the registry port
        assert http_get(f"{metrics}/v2/")[0] == 404  # and no registry here


def exported_names(edge_url: str) -> set[str]:
    text = http_get(f"{edge_url}/metrics")[2].decode()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_dashboard_and_rules_only_use_exported_metrics(edge_process: EdgeProcess) -> None:
    names = exported_names(edge_process.url)
    dashboard = json.loads((ROOT / "conf/grafana/edgecache-dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    queries.append(RULES.read_text())
    used = {m for q in queries for m in re.findall(r"\bedgecache_[a-z_]+", q)}
    assert used, "no metric found in the dashboard or rules"
    assert used <= names, f"not exported: {sorted(used - names)}"
    panels = {p["title"] for p in dashboard["panels"]}
    assert {"Hit ratio (requests)", "Hit ratio (bytes)", "Latency percentiles by route"} <= panels


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is needed: tests/run installs it"
    subprocess.run([promtool, "check", "rules", str(RULES)], check=True, capture_output=True)
    result = subprocess.run(
        [promtool, "test", "rules", "edgecache-rules.test.yml"],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def prometheus(tmp_path: Path, edge_process: EdgeProcess) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus (Debian package prometheus) is needed: tests/run installs it"
    port = free_port()
    shutil.copy(RULES, tmp_path / "rules.yml")
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files: [rules.yml]\n"
        "scrape_configs:\n  - job_name: edgecache\n    static_configs:\n"
        f"      - targets: ['{edge_process.url.removeprefix('http://')}']\n"
    )
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:  # the child has its own copy of the descriptor
        proc = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    try:
        # /-/ready answers 503 "Service Unavailable" (not JSON) until Prometheus has started: wait for 200.
        wait_http(f"http://127.0.0.1:{port}/-/ready", timeout=60, proc=proc, log_path=log_path, status=200)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(15)


def prom_query(prometheus: str, expr: str) -> list[dict[str, object]]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(http_get(url)[2])
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


def wait_for_value(prometheus: str, expr: str, within: float = 60.0) -> float:
    """The value of `expr` once Prometheus has one. An answer that is not JSON or not a success (a
    server still starting, a rule not yet evaluated) is "not yet"."""
    result = wait_until_sync(
        lambda: prom_query(prometheus, expr),
        timeout=within,
        interval=0.5,
        message=f"Prometheus never answered {expr}",
    )
    return float(result[0]["value"][1])  # type: ignore[index]


def test_a_real_prometheus_scrapes_edgecache_and_computes_the_hit_ratio(
    prometheus: str, edge_process: EdgeProcess, seeded: Seeded
) -> None:
    wait_for_value(prometheus, 'up{job="edgecache"} == 1')
    # A scrape before the pulls has stored the (pre-created) counters at 0, so their increase is seen.
    hits = 'edgecache_http_requests_total{route="blob", method="GET", status_class="2xx", cache="HIT"}'
    assert wait_for_value(prometheus, hits) == 0
    blobs = seeded.alpine.blobs
    for _ in range(4):  # one miss, then three hits of each blob
        for blob in blobs:
            assert http_get(f"{edge_process.url}/v2/library/alpine/blobs/{blob.digest}")[0] == 200
    ratio = wait_for_value(prometheus, "edgecache:hit_ratio:rate5m > 0.5")
    assert 0.5 < ratio <= 1.0
    total = wait_for_value(
        prometheus, 'sum(edgecache_http_requests_total{route="blob", cache="HIT"}) >= ' + str(3 * len(blobs))
    )
    assert total == 3 * len(blobs)


def test_stats_command_shows_the_picture(tmp_path: Path, origin: Registry, seeded: Seeded) -> None:
    # Prefetch off: a prefetched blob may be a HIT or JOINED on the first round, and the exact
    # ratio below is what this test checks.
    with spawn_edge(tmp_path, origin.url, config="[prefetch]\nenabled = false\n") as edge_process:
        for _ in range(2):
            http_get(f"{edge_process.url}/v2/library/alpine/manifests/latest", ACCEPT)
            for blob in seeded.alpine.blobs:
                http_get(f"{edge_process.url}/v2/library/alpine/blobs/{blob.digest}")
        assert_stats_picture(edge_process.url)


def assert_stats_picture(url: str) -> None:
    """`edgecache stats` against a node after two pulls of alpine, and against nothing."""
    result = subprocess.run(
        [sys.executable, "-m", "edgecache", "stats", "--url", url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "hit ratio (manifest+blob GETs): 50.0%" in result.stdout
    assert "docker.io/library/alpine: 2 pulls" in result.stdout
    assert "upstreams: docker.io up" in result.stdout
    down = subprocess.run(
        [sys.executable, "-m", "edgecache", "stats", "--url", f"http://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert down.returncode == 1 and "cannot read" in down.stdout and "Traceback" not in down.stderr


def test_access_lines_escape_what_clients_choose_and_keep_the_rest_as_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The access line of a request, in both formats: a client-chosen path with control characters,
    non-ASCII or DEL is escaped and clipped (no forged lines), a plain one is logged as sent."""
    hostile = "/v2/a\r\nFAKE 200 line\x7f/é/" + "x" * 600
    assert loggable("/v2/library/alpine/manifests/3.20") == "/v2/library/alpine/manifests/3.20"
    escaped = loggable(hostile)
    assert escaped.isascii() and escaped.isprintable() and "\r" not in escaped and "\n" not in escaped
    assert escaped.startswith("/v2/a\\x0d\\x0aFAKE 200 line\\x7f/\\xe9/") and len(escaped) <= 512 * 4
    trace = RequestTrace("req-1", route="manifest", identity="anonymous", upstream="docker.io")
    with caplog.at_level(logging.INFO, logger="edgecache.access"):
        AccessLog(None, "text").record(trace, "GET", hostile, 200, 12, peer="192.0.2.7")
        AccessLog(None, "json").record(trace, "GET", "/v2/a/manifests/1", 200, 12, peer="192.0.2.7")
    text, structured = caplog.records
    assert text.getMessage().startswith(f"192.0.2.7 GET {escaped} 200 ")
    assert text.getMessage().endswith(" id=req-1") and "\n" not in text.getMessage()
    line = JsonFormatter().format(structured)
    entry = json.loads(line)
    assert entry["path"] == "/v2/a/manifests/1" and entry["request_id"] == "req-1"
    assert entry["status"] == 200 and entry["bytes"] == 12 and entry["identity"] == "anonymous"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", entry["time"])


async def test_access_lines_written_straight_to_serves_handler_match_the_logged_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`serve` hands its JSON handler to the access log, which writes each loop pass's lines at once:
    the same lines logging would write (hostile paths included), after the pass that made them,
    at most MAX_PENDING_LINES per write, and none left behind by a flush."""
    writes: list[str] = []

    class Recording(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    handler: logging.StreamHandler[TextIO] = logging.StreamHandler(Recording())
    handler.setFormatter(JsonFormatter())
    direct, through_logging = AccessLog(None, "json", handler), AccessLog(None, "json")
    trace = RequestTrace('req-"1\\', route="manifest", identity="carol", upstream="docker.io")
    paths = ["/v2/a/manifests/1", '/v2/a"b\\c/manifests/é\x00' + "x" * 600]
    with caplog.at_level(logging.INFO, logger="edgecache.access"):
        for path in paths:
            direct.record(trace, "GET", path, 200, 12, peer="192.0.2.7")
            through_logging.record(trace, "GET", path, 200, 12, peer="192.0.2.7")
        assert writes == []  # not yet: the loop pass that made them is still running
        await asyncio.sleep(0)
        assert len(writes) == 1
        written = writes[0].splitlines(keepends=True)
        logged = [JsonFormatter().format(record) + "\n" for record in caplog.records]
        assert len(written) == len(logged) == 2

        def comparable(line: str) -> dict[str, object]:
            entry = json.loads(line)
            del entry["duration_ms"], entry["time"]  # measured per call
            return dict(entry)

        assert [comparable(line) for line in written] == [comparable(line) for line in logged]
        assert all(line.isascii() and line.count("\n") == 1 for line in written)

        writes.clear()
        for _ in range(MAX_PENDING_LINES + 3):
            direct.record(trace, "GET", paths[0], 200, 12, peer="192.0.2.7")
        assert [text.count("\n") for text in writes] == [MAX_PENDING_LINES]
        direct.flush()  # what closing the instance does
        assert [text.count("\n") for text in writes] == [MAX_PENDING_LINES, 3]
        await asyncio.sleep(0)  # the pass's own flush finds nothing left
        assert len(writes) == 2

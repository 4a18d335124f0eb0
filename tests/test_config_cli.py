"""Configuration and the command line, as an operator meets them: defaults, precedence, clear errors."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from edgecache.config import (
    DOCKER_HUB_URL,
    AccessConfig,
    AccessRule,
    CacheConfig,
    ServerConfig,
    SharedConfig,
    TrustConfig,
    TrustRule,
    UpstreamConfig,
    load_config,
)
from edgecache.errors import ConfigError
from tests.conftest import EdgeProcess
from tests.support.registry import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgecache", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_defaults_serve_docker_hub_on_loopback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = load_config(env={})
    assert config.server.host == "127.0.0.1" and config.server.port == 5000
    hub = config.upstream(config.default_upstream)
    assert hub is not None and hub.url == DOCKER_HUB_URL and hub.adds_library_prefix
    assert config.cache.dir == str(tmp_path / "edgecache")


def test_documented_config_file_states_the_defaults() -> None:
    assert load_config(str(ROOT / "conf/edgecache.toml"), env={}) == load_config(env={})
    # ...and documents every key there is (set, or commented out where the default is computed).
    text = (ROOT / "conf/edgecache.toml").read_text()
    classes = (ServerConfig, CacheConfig, UpstreamConfig, AccessConfig, AccessRule, TrustConfig, TrustRule)
    for cls in (*classes, SharedConfig):
        for field in dataclasses.fields(cls):
            assert re.search(rf"^#? ?{field.name} = ", text, re.MULTILINE), f"{field.name} undocumented"


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    config_file = tmp_path / "edgecache.toml"
    config_file.write_text(
        '[server]\nlisten = "127.0.0.1:6000"\n[cache]\ntag_ttl = 5\ndir = "/srv/a"\n'
        '[[upstream]]\nname = "docker.io"\nurl = "https://mirror.corp"\n'
        '[[upstream]]\nname = "ghcr.io"\nurl = "https://ghcr.io"\n'
    )
    env = {"EDGECACHE_CACHE_TAG_TTL": "7", "EDGECACHE_CACHE_DIR": "/srv/b"}
    config = load_config(str(config_file), env=env, cache_dir="/srv/c", upstreams=["http://127.0.0.1:1"])
    assert config.server.listen == "127.0.0.1:6000"  # file
    assert config.cache.tag_ttl == 7.0  # environment over file
    assert config.cache.dir == "/srv/c"  # flag over environment
    assert [u.name for u in config.upstreams] == ["docker.io", "ghcr.io"]
    assert config.upstream("docker.io").url == "http://127.0.0.1:1"  # type: ignore[union-attr]
    named = load_config(env={}, upstreams=["quay.io=https://quay.io"])
    assert named.upstream("quay.io") is not None and not named.upstream("quay.io").adds_library_prefix  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("toml", "env", "key"),
    [
        ('[server]\nlisten = "nonsense"\n', {}, "server.listen"),
        ("[cache]\ntag_ttl = -1\n", {}, "cache.tag_ttl"),
        ('[cache]\ntag_ttl = "soon"\n', {}, "cache.tag_ttl"),
        ("[cache]\nttl = 5\n", {}, "cache.ttl"),
        ("[serve]\nlisten = 1\n", {}, "serve"),
        ('[[upstream]]\nname = "x"\nurl = "ftp://x"\n', {}, "upstream 'x'"),
        ('[[upstream]]\nname = "x"\nurl = "https://x"\nmax_connections = 0\n', {}, "max_connections"),
        ('default_upstream = "nope"\n', {}, "default_upstream"),
        ("", {"EDGECACHE_CACHE_MAX_STALE": "forever"}, "cache.max_stale"),
        ("", {"EDGECACHE_UPSTREAM_STALL_TIMEOUT": "x"}, "upstream.stall_timeout"),
        ("this is = = not toml", {}, "not valid TOML"),
    ],
)
def test_wrong_config_names_the_key(tmp_path: Path, toml: str, env: dict[str, str], key: str) -> None:
    config_file = tmp_path / "bad.toml"
    config_file.write_text(toml)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(str(config_file), env=env)


def test_cli_reports_config_errors_without_a_traceback(tmp_path: Path) -> None:
    result = run_cli("serve", "--listen", "nowhere", "--cache-dir", str(tmp_path))
    assert result.returncode == 2
    assert "server.listen" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("serve", "--cache-dir", str(tmp_path), env={"EDGECACHE_CACHE_TAG_TTL": "abc"})
    assert result.returncode == 2
    assert "cache.tag_ttl" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("serve", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "missing.toml" in result.stderr and "Traceback" not in result.stderr


def test_second_process_on_the_same_cache_refuses_to_start(edge_process: EdgeProcess) -> None:
    result = run_cli(
        "serve", "--listen", f"127.0.0.1:{free_port()}", "--cache-dir", str(edge_process.cache_dir)
    )
    assert result.returncode == 2
    assert "in use by another edgecache process" in result.stderr
    assert "Traceback" not in result.stderr
    with urllib.request.urlopen(f"{edge_process.url}/v2/") as resp:  # the first one is unharmed
        assert resp.status == 200


def test_serve_from_environment_and_stop_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecache", "serve"],
        env={
            **os.environ,
            "EDGECACHE_SERVER_LISTEN": f"127.0.0.1:{port}",
            "EDGECACHE_CACHE_DIR": str(tmp_path / "cache"),
        },
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/", proc=proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/") as resp:
            assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        assert (tmp_path / "cache" / "blobs").is_dir()
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr


def test_console_script_is_installed() -> None:
    result = subprocess.run(["edgecache", "--help"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0 and "serve" in result.stdout

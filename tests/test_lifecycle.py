"""Run like infrastructure: the systemd unit, readiness notification, SIGHUP reload and SIGTERM drain of
a real `edgecache serve` process in the middle of pulls."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Seeded
from tests.support.faults import FaultProxy
from tests.support.images import DOCKER_MANIFEST
from tests.support.registry import Registry, free_port, wait_http
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd/edgecache.service"


def unit_with_local_binary(tmp_path: Path) -> Path:
    """The shipped unit, with ExecStart pointing at this environment's edgecache command."""
    binary = shutil.which("edgecache")
    assert binary, "the edgecache command is not installed"
    unit = tmp_path / "edgecache.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/edgecache", binary))
    return unit


def test_unit_file_verifies_and_is_hardened(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (Debian package systemd) is needed"
    unit = unit_with_local_binary(tmp_path)
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", str(unit)], capture_output=True, text=True
    )
    match = re.search(r"Overall exposure level for edgecache.service: ([\d.]+)", security.stdout)
    assert match, security.stdout[-500:]
    assert float(match.group(1)) <= 2.0  # systemd rates 0-2 as "OK"
    drop_in = (ROOT / "systemd/edgecache.service.d/port-443.conf.example").read_text()
    assert "CAP_NET_BIND_SERVICE" in drop_in


class Notifications:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    async def next(self, within: float = 20.0) -> str:
        loop = asyncio.get_running_loop()
        return (await asyncio.wait_for(loop.sock_recv(self.sock, 4096), within)).decode()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def slow_origin(origin: Registry, seeded: Seeded) -> AsyncIterator[FaultProxy]:
    proxy = await FaultProxy(origin.url).start()
    proxy.rules.throttle = 0.004  # the 24 MiB layer takes a couple of seconds
    yield proxy
    await proxy.stop()


async def start_process(
    tmp_path: Path, upstream: str, config: str = ""
) -> tuple[asyncio.subprocess.Process, str, Notifications]:
    port = free_port()
    config_file = tmp_path / "edgecache.toml"
    config_file.write_text(config)
    notifications = Notifications(tmp_path / "notify.sock")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgecache", "serve", "--config", str(config_file),
        "--listen", f"127.0.0.1:{port}", "--upstream", upstream, "--cache-dir", str(tmp_path / "cache"),
        env={**os.environ, "NOTIFY_SOCKET": str(notifications.path)},
    )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}", notifications


async def test_readiness_reload_and_stop_are_notified(
    tmp_path: Path, origin: Registry, seeded: Seeded
) -> None:
    proc, url, notifications = await start_process(tmp_path, origin.url)
    try:
        ready = await notifications.next()
        assert "READY=1" in ready
        await asyncio.to_thread(wait_http, f"{url}/v2/")  # ready means the listener accepts
        proc.send_signal(signal.SIGHUP)
        assert "RELOADING=1" in await notifications.next()
        assert "READY=1" in await notifications.next()
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in await notifications.next()
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        notifications.close()
        if proc.returncode is None:
            proc.kill()


async def test_sighup_reload_in_the_middle_of_pulls(
    tmp_path: Path, slow_origin: FaultProxy, origin: Registry, seeded: Seeded
) -> None:
    proc, url, notifications = await start_process(
        tmp_path,
        slow_origin.url,
        '[[upstream]]\nname = "docker.io"\nurl = "http://x"\ntag_ttls = { "latest" = 3600 }\n',
    )
    layer = seeded.big.layers[-1]
    tag = "/v2/library/alpine/manifests/latest"
    try:
        await notifications.next()
        async with aiohttp.ClientSession(url) as http:
            for _ in range(2):
                async with http.get(tag, headers={"Accept": DOCKER_MANIFEST}) as resp:
                    await resp.read()
            assert slow_origin.count("HEAD", tag) == 0  # fresh for an hour
            async with http.get(f"/v2/library/big/blobs/{layer.digest}") as pull:
                first = await pull.content.readexactly(1024 * 1024)
                (tmp_path / "edgecache.toml").write_text(
                    '[[upstream]]\nname = "docker.io"\nurl = "http://x"\ntag_ttls = { "latest" = 0 }\n'
                )
                proc.send_signal(signal.SIGHUP)
                await notifications.next()
                assert "READY=1" in await notifications.next()
                assert first + await pull.read() == layer.data  # the pull in flight is untouched
            async with http.get(tag, headers={"Accept": DOCKER_MANIFEST}) as resp:
                assert resp.status == 200
            assert slow_origin.count("HEAD", tag) == 1  # the reloaded TTL rule applies
    finally:
        notifications.close()
        proc.terminate()
        await proc.wait()


async def test_sigterm_drains_pulls_in_flight(
    tmp_path: Path, slow_origin: FaultProxy, seeded: Seeded
) -> None:
    proc, url, notifications = await start_process(tmp_path, slow_origin.url)
    layer = seeded.big.layers[-1]
    try:
        await notifications.next()
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{url}/v2/library/big/blobs/{layer.digest}") as pull,
        ):
            first = await pull.content.readexactly(1024 * 1024)
            proc.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in await notifications.next()

            async def refused() -> bool:  # the listener closes just after STOPPING=1 is sent
                try:
                    async with aiohttp.ClientSession() as other, other.get(f"{url}/v2/"):
                        return False
                except aiohttp.ClientConnectionError:
                    return True

            await wait_until(refused, message="new connections are still accepted after STOPPING=1")
            assert first + await pull.read() == layer.data  # but the pull in flight finishes
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        hex_ = layer.digest.split(":", 1)[1]
        stored = tmp_path / "cache/blobs/sha256" / hex_[:2] / hex_
        assert stored.read_bytes() == layer.data  # and its fill was stored before the exit
        assert not any((tmp_path / "cache/tmp").iterdir())
    finally:
        notifications.close()
        if proc.returncode is None:
            proc.kill()

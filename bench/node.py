"""What the benches that start edgecache nodes share: a node (`python -m edgecache serve` on a free
port, with its own environment and config, its metrics and CPU time read back), and the WAN-like
proxy (bench/wan_proxy.py) to put in front of an origin."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.support.registry import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent


class EdgeNode:
    """edgecache in front of `upstream`, its cache under `work`; ready when `ready` answers 200."""

    def __init__(
        self,
        upstream: str,
        work: Path,
        *,
        env: dict[str, str] | None = None,
        config: Path | None = None,
        ready: str = "/v2/",
    ) -> None:
        self.port = free_port()
        self.cache = work / f"cache-{self.port}"
        command = [sys.executable, "-m", "edgecache", "serve", "--listen", f"127.0.0.1:{self.port}",
                   "--upstream", upstream, "--cache-dir", str(self.cache),
                   "--log-level", "warning"]  # fmt: skip
        if config is not None:
            command += ["--config", str(config)]
        self.proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})})
        self.url = f"http://127.0.0.1:{self.port}"
        wait_http(f"{self.url}{ready}", proc=self.proc)

    def metric(self, name: str) -> float:
        """The sum of a metric's series, read from the node's own /metrics."""
        with urllib.request.urlopen(f"{self.url}/metrics") as resp:
            text = resp.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")
        )

    def cpu_seconds(self) -> float:
        """User + system CPU time of the node so far (/proc/PID/stat)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """Stop the node and remove its cache (a full run would leave a GiB of caches behind)."""
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.cache, ignore_errors=True)


def start_wan_proxy(origin_url: str, latency: float, rate: str) -> tuple[str, subprocess.Popen[bytes]]:
    """bench/wan_proxy.py in front of `origin_url`: (its URL, its process), ready to answer."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "wan_proxy.py"), "--listen", f"127.0.0.1:{port}",
         "--to", origin_url.removeprefix("http://"), "--latency", str(latency), "--rate", rate],
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/v2/", proc=proc)
    return url, proc

"""Run a real origin registry (Debian's `docker-registry`, CNCF distribution) on a free loopback port."""

from __future__ import annotations

import http.client
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(
    url: str,
    timeout: float = 20.0,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Wait until `url` answers (any status). For https only reachability is checked, not the
    certificate: tests check certificates themselves."""
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            detail = log_path.read_text(errors="replace")[-2000:] if log_path else ""
            raise RuntimeError(f"process for {url} exited with {proc.returncode}\n{detail}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is listening
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLError):
                return  # a TLS alert (e.g. a client certificate is required): it is listening
            time.sleep(0.05)
        except (ssl.SSLError, http.client.RemoteDisconnected):
            if context is None:
                raise
            return  # the handshake got far enough to be refused (mutual TLS): it is listening
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@dataclass
class Registry:
    url: str
    port: int
    root: Path
    log_path: Path
    proc: subprocess.Popen[bytes]

    def access_log(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request the origin has served so far."""
        pattern = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')
        text = self.log_path.read_text(errors="replace")
        return [(m[1], m[2], int(m[3])) for m in pattern.finditer(text)]

    def count(self, method: str, path_part: str) -> int:
        """How many times the origin served `method` on a path containing `path_part`."""
        return sum(1 for m, p, _ in self.access_log() if m == method and path_part in p)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_registry(root: Path, extra_config: str = "") -> Registry:
    """Start docker-registry with its storage and log under `root`; returns when it answers."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = root / "config.yml"
    config.write_text(
        f"""version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root / "data"}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
{extra_config}
"""
    )
    log_path = root / "registry.log"
    log = log_path.open("wb")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/v2/", proc=proc)
    return Registry(url, port, root, log_path, proc)

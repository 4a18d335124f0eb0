"""Run a real origin registry (Debian's `docker-registry`, CNCF distribution) on a free loopback port."""

from __future__ import annotations

import http.client
import re
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support.waiting import StopWaiting, wait_until_sync

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(
    url: str,
    timeout: float = 30.0,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
    status: int | None = None,
) -> None:
    """Wait until `url` answers: with any HTTP status, or with `status` when given (a server that
    says 503 while it starts is not ready). For https without `status` only reachability is
    checked, not the certificate: tests check certificates themselves. Fails at once if `proc`
    exits."""
    context = ssl._create_unverified_context() if url.startswith("https:") else None

    def answers() -> bool:
        if proc is not None and proc.poll() is not None:
            detail = log_path.read_text(errors="replace")[-2000:] if log_path else ""
            raise StopWaiting(f"process for {url} exited with {proc.returncode}\n{detail}")
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as resp:
                code = resp.status
        except urllib.error.HTTPError as exc:
            code = exc.code  # any HTTP answer means it is listening
            exc.close()
        except urllib.error.URLError as exc:
            if status is None and isinstance(exc.reason, ssl.SSLError):
                return True  # a TLS alert (e.g. a client certificate is required): it is listening
            raise
        except (ssl.SSLError, http.client.RemoteDisconnected):
            if context is None or status is not None:
                raise
            return True  # the handshake got far enough to be refused (mutual TLS): it is listening
        if status is not None and code != status:
            raise AssertionError(f"answered {code}, not {status}")
        return True

    wanted = "answer" if status is None else f"answer {status}"
    wait_until_sync(answers, timeout=timeout, message=f"{url} did not {wanted}")


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
    with log_path.open("wb") as log:  # the child has its own copy of the descriptor
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    scheme = "https" if "tls:" in extra_config else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    # /v2/ answers 200 once the registry serves; with an auth section, 401 to anyone not logged in.
    wait_http(f"{url}/v2/", proc=proc, log_path=log_path, status=401 if "auth:" in extra_config else 200)
    return Registry(url, port, root, log_path, proc)

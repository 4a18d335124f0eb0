"""curl as a test client: real HTTP/1.1 and HTTP/2 (ALPN) framing, requests sent exactly as written."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CurlResult:
    returncode: int
    status: int
    http_version: str
    headers: dict[str, str]
    body: bytes
    stderr: str

    def json(self) -> object:
        import json

        return json.loads(self.body)


def curl(
    url: str,
    *,
    http2: bool = False,
    cacert: Path | None = None,
    headers: tuple[str, ...] = (),
    method: str | None = None,
    user: str | None = None,
    cert: tuple[Path, Path] | None = None,
    extra: tuple[str, ...] = (),
    timeout: float = 60.0,
) -> CurlResult:
    """One request; the path is sent as written (--path-as-is), nothing is retried."""
    binary = shutil.which("curl")
    assert binary, "curl is needed (installed by tests/run)"
    with tempfile.TemporaryDirectory() as scratch:
        body_path, head_path = Path(scratch) / "body", Path(scratch) / "head"
        command = [
            binary, "-sS", "--path-as-is", "--max-time", str(timeout),
            "--http2" if http2 else "--http1.1",
            "-o", str(body_path), "-D", str(head_path), "-w", "%{http_code} %{http_version}",
        ]  # fmt: skip
        if cacert is not None:
            command += ["--cacert", str(cacert)]
        if method == "HEAD":
            command.append("--head")
        elif method:
            command += ["-X", method]
        if user is not None:
            command += ["-u", user]
        if cert is not None:
            command += ["--cert", str(cert[0]), "--key", str(cert[1])]
        for header in headers:
            command += ["-H", header]
        proc = subprocess.run([*command, *extra, url], capture_output=True, timeout=timeout + 10, check=False)
        status_text, _, version = proc.stdout.decode().partition(" ")
        parsed: dict[str, str] = {}
        if head_path.exists():
            for line in head_path.read_text(errors="replace").splitlines()[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    parsed[name.strip().lower()] = value.strip()
        # With --head curl writes the head to -o too; a HEAD response has no body to show.
        body = body_path.read_bytes() if body_path.exists() and method != "HEAD" else b""
        return CurlResult(
            proc.returncode, int(status_text or 0), version.strip(), parsed, body, proc.stderr.decode()
        )

"""Headless Chromium as a real browser for pages edgecache serves: the DOM after loading, and a
screenshot. Debian's `chromium`; missing, the test fails (never skips), as the client tests do."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support.clients import require_binary

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
TIMEOUT = 120.0


async def _chromium(profile: Path, *args: str) -> bytes:
    """Run chromium without blocking the event loop (the page may be served by this very loop)."""
    binary = require_binary("chromium", "/usr/bin/chromium")
    await asyncio.to_thread(profile.mkdir, parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        binary,
        *FLAGS,
        f"--user-data-dir={profile}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}"
    return out


async def dump_dom(url: str, profile: Path) -> str:
    """The DOM chromium built from `url`, serialized."""
    return (await _chromium(profile, "--dump-dom", url)).decode()


async def screenshot(url: str, path: Path, profile: Path, size: str = "1280,1600") -> Path:
    await _chromium(profile, f"--screenshot={path}", f"--window-size={size}", url)
    size_written = await asyncio.to_thread(lambda: path.stat().st_size if path.is_file() else 0)
    assert size_written > 0, f"chromium wrote no screenshot to {path}"
    return path

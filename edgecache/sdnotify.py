"""systemd's readiness protocol without a dependency: one datagram to $NOTIFY_SOCKET.

With `Type=notify`, systemd waits for READY=1 before it considers the unit started (so `systemctl
start` returns once the listeners accept), and RELOADING=1 / STOPPING=1 report the other phases.
Outside systemd (no NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=serving") to systemd; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
        except OSError:
            return False
    return True


def reloading() -> bool:
    """RELOADING=1 carries the monotonic time (Type=notify-reload wants it; others ignore it)."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

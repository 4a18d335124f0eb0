"""Sizes as operators write them (`20G`, `500M`) and as the commands print them (`1.5 GiB`)."""

from __future__ import annotations

import re

from edgecache.errors import ConfigError

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?", re.IGNORECASE)


def parse_size(text: str | int, key: str) -> int:
    """`20G`, `500M`, `1.5T`, `20GiB` or plain bytes; binary units (G = 1024³)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE.fullmatch(str(text).strip())
    if match is None:
        raise ConfigError(f"{key}: expected a size such as 20G, 500M or 1048576, got {text!r}")
    number, unit = float(match.group(1)), match.group(2).lower()
    multiplier = 1024 ** ("kmgtp".index(unit) + 1) if unit else 1
    return int(number * multiplier)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"

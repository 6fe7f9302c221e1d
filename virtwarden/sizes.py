"""Byte counts as people read them, for messages and tables."""
from __future__ import annotations


def human_size(n: float) -> str:
    """``512 B``, ``1.5 KiB``, ... up to TiB (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)

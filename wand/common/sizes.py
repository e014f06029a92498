"""Byte counts as people read them: ``56.1 KB``, ``3.7 MB``, ``126.0 GB`` (powers of 1000)."""

from __future__ import annotations


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError

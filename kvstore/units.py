"""Parsing of human-readable sizes and durations for flags and config files."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mi": 1024**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gi": 1024**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "ti": 1024**4, "tib": 1024**4,
}


def parse_size(text: str | int) -> int:
    """Parse '8GiB', '512MiB', '1.5G' or a plain byte count into bytes."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 8GiB, 512MiB, 1073741824)")
    number, unit = match.groups()
    factor = _SIZE_FACTORS.get((unit or "").lower())
    if factor is None:  # the pattern also admits 'i' and 'ib' with no prefix
        raise ValueError(f"not a size: {text!r} (examples: 8GiB, 512MiB, 1073741824)")
    return int(float(number) * factor)


def format_size(num_bytes: float) -> str:
    """Format bytes with a binary unit, e.g. 8.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024:
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"

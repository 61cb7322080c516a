"""Human sizes ("10G", "512MiB") and durations ("30d", "12h") for the config file and `nixcache gc`."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(value: str | int) -> int:
    """Bytes in `value`: an integer, or a number with K/M/G/T/P (binary multiples, as `du -h`)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size; use e.g. 8G, 512M or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size {value} is negative")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size; use e.g. 8G, 512M or a number of bytes")
    number, unit, _ = match.groups()
    return int(float(number) * 1024 ** _POWERS[unit.lower()])


def format_size(size: int) -> str:
    """The shortest exact rendering of `size` that `parse_size` reads back (e.g. 8G, 1536M)."""
    for unit in ("P", "T", "G", "M", "K"):
        factor = 1024 ** _POWERS[unit.lower()]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def human_size(size: float) -> str:
    """An approximate size for people (1.5 GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def parse_duration(value: str | int) -> float:
    """Seconds in `value`: an integer number of seconds or e.g. 30d, 12h, 1w2d, 90m."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    if text.isascii() and text.isdigit():
        return float(text)
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if text[pos : match.start()].strip():
            break
        total += float(match.group(1)) * _SECONDS[match.group(2).lower()]
        pos = match.end()
    if pos == 0 or text[pos:].strip():
        raise ValueError(f"{value!r} is not a duration; use e.g. 30d, 12h, 90m or a number of seconds")
    return total


def format_duration(seconds: float) -> str:
    """`seconds` the way people write it and `parse_duration` reads it back (1h, 1d12h, 0.2s);
    in days at most, as retention is usually said (30d, not 4w2d)."""
    if seconds < 1:
        return f"{seconds:g}s"
    parts, rest = [], round(seconds)
    for unit in ("d", "h", "m", "s"):
        count, rest = divmod(rest, _SECONDS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)

"""Progress lines for long work: at most one every few seconds, readable in the journal."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from nixcache.server.units import human_size as human_bytes


def human_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Throttle:
    """Calls `echo` with a line at most once per `interval` seconds."""

    def __init__(
        self, echo: Callable[[str], None], interval: float, clock: Callable[[], float] = time.monotonic
    ):
        self.echo = echo
        self.interval = interval
        self.clock = clock
        self.last = clock()

    def due(self) -> bool:
        now = self.clock()
        if now - self.last < self.interval:
            return False
        self.last = now
        return True

    def line(self, text: str) -> None:
        if self.due():
            self.echo(text)


def backup_status_line(status: dict[str, Any]) -> str:
    """restic's JSON backup status -> 'backup: 42% 1.2 GiB of 2.8 GiB, 120 of 300 files, 0:01:10 left'."""
    percent = 100 * float(status.get("percent_done", 0))
    parts = [f"backup: {percent:.0f}%"]
    total = status.get("total_bytes")
    parts.append(
        f"{human_bytes(status.get('bytes_done', 0))} of {human_bytes(total)}"
        if total
        else human_bytes(status.get("bytes_done", 0))
    )
    files = (
        f"{status.get('files_done', 0)} of {status['total_files']} files" if "total_files" in status else ""
    )
    line = " ".join(parts) + (f", {files}" if files else "")
    if status.get("seconds_remaining"):
        line += f", {human_seconds(status['seconds_remaining'])} left"
    return line

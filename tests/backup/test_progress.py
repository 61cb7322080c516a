"""Progress lines: restic's JSON status, at most one line per interval."""

from __future__ import annotations

from nixcache.backup.progress import Throttle, backup_status_line, human_bytes


def test_status_line_from_restic_json():
    status = {
        "message_type": "status",
        "seconds_elapsed": 12,
        "seconds_remaining": 70,
        "percent_done": 0.4213,
        "total_files": 300,
        "files_done": 120,
        "total_bytes": 3 * 1024**3,
        "bytes_done": 1288490189,
    }
    assert backup_status_line(status) == "backup: 42% 1.2 GiB of 3.0 GiB, 120 of 300 files, 0:01:10 left"
    assert backup_status_line({"message_type": "status", "percent_done": 0}) == "backup: 0% 0 B"


def test_throttle_prints_at_most_once_per_interval():
    now = [100.0]
    lines: list[str] = []
    throttle = Throttle(lines.append, 5, clock=lambda: now[0])
    for step in range(40):  # 20 s of status messages, two a second
        now[0] = 100.0 + step / 2
        throttle.line(f"t={now[0]}")
    assert lines == ["t=105.0", "t=110.0", "t=115.0"]


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 1024**3)] == ["0 B", "1023 B", "1.5 KiB", "5.0 GiB"]

"""The store's usage totals (narinfos, NAR files and their bytes), kept on disk in `<store>/usage`.

Every process that changes the store adjusts the totals as it publishes or deletes a file
(uploads and pull-throughs in every server worker, `nixcache gc`, `nixcache verify`'s
quarantine moves), so /metrics, answered by any worker, shows the whole store without a rescan:
one small read per scrape. The file is one JSON object padded to a fixed size, rewritten in
place under flock(2) (a few syscalls per change, no new file). An upload is counted in the same
locked step as its rename (so two workers replacing one narinfo count it once), gc after each
batch of deletions (milliseconds later): the totals stay exact whoever runs in parallel.

A full scan (`scan`, one stat per file) sets the base: in the background when a server starts
and finds no totals, and again once they are older than `RESCAN_SECONDS`, by the one process
that gets the scan lock (the others skip it). It corrects what no process counted: files
deleted or restored by hand, a process killed between a rename and its count. Changes made
while a scan runs are added to its result, which may count a file the scan also saw: the next
scan corrects that.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

RESCAN_SECONDS = 86400  # totals older than this are replaced by a full scan's
_SIZE = 256  # bytes of the file: one JSON object padded with spaces, rewritten in place


@dataclass
class StoreUsage:
    entries: int = 0
    narinfo_bytes: int = 0
    nar_files: int = 0
    nar_bytes: int = 0
    scanned_at: float = 0.0  # 0: never scanned, the totals are only the changes counted so far

    def plus(self, other: StoreUsage) -> StoreUsage:
        return StoreUsage(
            self.entries + other.entries,
            self.narinfo_bytes + other.narinfo_bytes,
            self.nar_files + other.nar_files,
            self.nar_bytes + other.nar_bytes,
            self.scanned_at,
        )

    def minus(self, other: StoreUsage) -> StoreUsage:
        return self.plus(StoreUsage(-other.entries, -other.narinfo_bytes, -other.nar_files, -other.nar_bytes))


def scan(root: Path) -> StoreUsage:
    """Count narinfos and NAR files and their bytes under `root` (one stat per file; slow on a
    large store: run it off the event loop)."""
    usage = StoreUsage(scanned_at=time.time())
    for name, is_nar in (("narinfo", False), ("nar", True)):
        try:
            entries = os.scandir(root / name)
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                try:
                    size = entry.stat().st_size
                except FileNotFoundError:
                    continue
                if is_nar:
                    usage.nar_files += 1
                    usage.nar_bytes += size
                else:
                    usage.entries += 1
                    usage.narinfo_bytes += size
    return usage


class UsageFile:
    """`<store>/usage`: read, adjusted and rebased by any process, under flock(2) on it."""

    def __init__(self, root: Path):
        self.path = root / "usage"
        self._fd = -1
        self._pid = 0

    def _open(self) -> int:
        # One descriptor per process: flock(2) belongs to the open file, which a forked worker
        # would otherwise share with its parent (and then not be excluded by it).
        if self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            self._pid = os.getpid()
        return self._fd

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[int]:
        fd = self._open()
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    @staticmethod
    def _load(fd: int) -> StoreUsage:
        try:
            data = json.loads(os.pread(fd, _SIZE, 0) or b"{}")
            return StoreUsage(**{k: data.get(k, 0) for k in StoreUsage.__dataclass_fields__})
        except (ValueError, TypeError):  # damaged or from an unknown version: a scan replaces it
            return StoreUsage()

    @staticmethod
    def _store(fd: int, usage: StoreUsage) -> None:
        text = json.dumps(asdict(usage)).encode()
        os.pwrite(fd, text.ljust(_SIZE), 0)

    def read(self) -> StoreUsage:
        with self._locked(exclusive=False) as fd:
            return self._load(fd)

    @contextlib.contextmanager
    def changing(self) -> Iterator[StoreUsage]:
        """Hold the totals while a file is published or deleted; add what changed to the yielded
        record (e.g. `change.entries += 1`), which is then counted in the same locked step."""
        change = StoreUsage()
        with self._locked(exclusive=True) as fd:
            yield change
            if change != StoreUsage():
                self._store(fd, self._load(fd).plus(change))

    def rescan_if_stale(self, root: Path, max_age: float = RESCAN_SECONDS) -> bool:
        """Replace the totals by a full scan's when they are older than `max_age` (or were never
        scanned) and no other process is scanning; True when this call scanned."""
        if time.time() - self.read().scanned_at < max_age:
            return False
        with open(f"{self.path}.scan-lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # another worker is scanning
            before = self.read()
            if time.time() - before.scanned_at < max_age:
                return False  # scanned by another process meanwhile
            counted = scan(root)
            with self._locked(exclusive=True) as fd:
                # What other processes counted while this scan ran is kept on top of it.
                self._store(fd, counted.plus(self._load(fd).minus(before)))
        return True

    def close(self) -> None:
        if self._pid == os.getpid():
            os.close(self._fd)
            self._pid = 0

"""One fetch of a pulled-through NAR per host, not per worker.

Within a worker, concurrent requests for one NAR share a `_Flight` (pullthrough.py). Across the
workers of a host (prefork.py, one per core by default) they share the flight through the store's
tmp/: the worker that fetches `nar/<name>` holds an exclusive flock(2) on `tmp/pull-<name>`
for as long as the fetch runs, and writes into it, once the first bytes are in its temp file,
the NAR's size and that temp file's path. Another worker asked for the same NAR finds the lock
held, opens the same temp file and streams it as it grows (`follow`), holding its last byte
back, as the fetching worker does, until the NAR is published: then the lock is released and
`nar/<name>` is the very file it read. A fetch that fails unlinks its temp file: a follower
sees its inode gone and cuts its connection short, as the fetcher does.

The fetcher unlinks the lock file before releasing it, so a worker that opened it just before
finds it unlinked once it gets the lock (`st_nlink == 0`) and takes a fresh one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

import gevent

from nixcache.server.tiers.errors import FetchAborted

POLL_SECONDS = 0.005  # how often a follower looks for more bytes (a stat, no data copied)


def _lock_path(tmp_dir: Path, name: str) -> Path:
    return tmp_dir / f"pull-{name}"


def _held(fd: int) -> bool:
    """Whether another process holds the exclusive lock of the open lock file `fd`."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


class FlightLock:
    """The fetching worker's hold on `tmp/pull-<name>`."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd = fd

    @classmethod
    def claim(cls, tmp_dir: Path, name: str) -> FlightLock | None:
        """The lock for fetching `nar/<name>`, or None when another worker is fetching it."""
        path = _lock_path(tmp_dir, name)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            if os.fstat(fd).st_nlink:
                os.ftruncate(fd, 0)  # what a fetcher that died (its lock released by the kernel) wrote
                return cls(path, fd)
            os.close(fd)  # the previous fetcher unlinked it as it finished: take a fresh one

    def announce(self, temp: Path, size: int) -> None:
        """The fetch has bytes in `temp`: tell the other workers where to read them."""
        os.pwrite(self._fd, f"{size} {temp}\n".encode(), 0)

    def release(self) -> None:
        """The NAR is published (or the fetch failed): unlink, then unlock."""
        if self._fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = -1


@dataclass
class Followed:
    """Another worker's fetch of a NAR: its temp file, open, and the NAR's size."""

    fd: int
    size: int
    lock: Path
    published: Path  # nar/<name>, which the temp file becomes once verified and stored


def follow(tmp_dir: Path, name: str, published: Path, deadline: float) -> Followed | None:
    """Another worker's fetch of `nar/<name>` once it has bytes (waiting at most `deadline` s
    for them), or None when no worker is fetching it (any more): the NAR is then published,
    or absent, or the caller may fetch it itself."""
    path = _lock_path(tmp_dir, name)
    end = time.monotonic() + deadline
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            if not _held(fd):
                return None
            announced = os.pread(fd, 4096, 0).decode()
        finally:
            os.close(fd)
        if announced.endswith("\n"):
            size, _, temp = announced[:-1].partition(" ")
            try:
                return Followed(os.open(temp, os.O_RDONLY), int(size), path, published)
            except FileNotFoundError:
                return None  # renamed into place (published) or dropped (failed) meanwhile
        if time.monotonic() >= end:
            return None
        gevent.sleep(POLL_SECONDS)


def readable(followed: Followed) -> int:
    """How far a follower may read: all of it once published, one byte short until then."""
    st = os.fstat(followed.fd)
    if st.st_nlink == 0:
        raise FetchAborted(f"{followed.published.name}: the other worker's fetch failed; see its log")
    try:
        fd = os.open(followed.lock, os.O_RDONLY)
    except FileNotFoundError:
        running = False
    else:
        try:
            running = _held(fd)
        finally:
            os.close(fd)
    if not running:
        try:
            done = os.stat(followed.published).st_ino == st.st_ino
        except FileNotFoundError:
            done = False
        if done:
            return followed.size
        raise FetchAborted(f"{followed.published.name}: the other worker's fetch ended unpublished")
    return min(st.st_size, followed.size - 1)

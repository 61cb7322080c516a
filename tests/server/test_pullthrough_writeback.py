"""A pulled NAR is flushed to disk while it arrives (pullthrough._Flight), so that the fsync its
clients' last byte waits for has little left to do."""

from __future__ import annotations

import os
from pathlib import Path

import gevent

from nixcache.server.tiers.flightlock import FlightLock
from nixcache.server.tiers.pullthrough import WRITEBACK_BYTES, WRITEBACKS, _Flight

NAME = "1b2m2y8asgtpgvf4jsa7z3ixbh2xbbh6k3vjc0ihfvf8pncnvj9n.nar"
CHUNK = 1024 * 1024


def _flight(tmp_path: Path, offload, size: int) -> _Flight:
    """A flight of NAME whose writebacks go through `offload` (the store's thread pool)."""
    lock = FlightLock.claim(tmp_path, NAME)
    assert lock is not None
    flight = _Flight(NAME, lock, offload)
    flight.size = size
    return flight


def _open_fds() -> set[str]:
    gevent.sleep(0)  # the hub's own descriptors (its loop) exist before the count
    return set(os.listdir("/proc/self/fd"))


def test_a_nar_is_flushed_every_writeback_bytes_one_fdatasync_at_a_time(
    tmp_path: Path,
) -> None:
    flushed: list[int] = []
    running = 0

    def offload(fn, args):  # the store's thread pool, here: record, then yield as a thread would
        nonlocal running
        assert fn is os.fdatasync
        running += 1
        assert running == 1, "one writeback at a time"
        flushed.append(os.fstat(args[0]).st_size)
        gevent.sleep(0.01)
        running -= 1
        return fn(*args)

    before = _open_fds()
    size = 3 * WRITEBACK_BYTES + CHUNK
    flight = _flight(tmp_path, offload, size)
    temp = tmp_path / "nar.1.2"
    chunk = os.urandom(CHUNK)
    with open(temp, "wb") as out:
        for written in range(CHUNK, size + 1, CHUNK):
            out.write(chunk)
            out.flush()
            flight.progress(temp, written)
        gevent.sleep(0.05)  # the last writeback ends
    flight.finish(ok=True)
    assert flushed, "a NAR past WRITEBACK_BYTES is flushed while it arrives"
    assert all(b - a >= WRITEBACK_BYTES for a, b in zip([0, *flushed], flushed, strict=False)), flushed
    assert _open_fds() == before, "every descriptor of the writebacks is closed"


def test_a_failed_writeback_is_left_to_the_final_fsync(tmp_path: Path) -> None:
    def offload(fn, args):
        raise OSError(5, "Input/output error")

    before = _open_fds()
    flight = _flight(tmp_path, offload, 2 * WRITEBACK_BYTES)
    temp = tmp_path / "nar.1.3"
    temp.write_bytes(b"x")
    flight.progress(temp, WRITEBACK_BYTES)
    gevent.sleep(0.01)
    assert not flight._flushing, "the next writeback may start"
    flight.finish(ok=False)
    assert _open_fds() == before


def test_past_the_writebacks_limit_a_pull_skips_its_turn(tmp_path: Path) -> None:
    started: list[int] = []

    def offload(fn, args):
        started.append(args[0])
        return fn(*args)

    flight = _flight(tmp_path, offload, 2 * WRITEBACK_BYTES)
    temp = tmp_path / "nar.1.4"
    temp.write_bytes(b"x")
    held = 0
    while WRITEBACKS.acquire(blocking=False):  # other pulls' writebacks take every slot
        held += 1
    try:
        flight.progress(temp, WRITEBACK_BYTES)
        gevent.sleep(0.01)
        assert not started, "no thread of the pool taken past the limit"
    finally:
        for _ in range(held):
            WRITEBACKS.release()
    flight.progress(temp, WRITEBACK_BYTES + 1)
    gevent.sleep(0.01)
    assert len(started) == 1, "the next piece takes its turn once a slot is free"
    flight.finish(ok=True)

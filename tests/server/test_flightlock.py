"""The workers of a host share one pull-through fetch of a NAR (nixcache/server/tiers/flightlock.py).

flock(2) locks belong to open file descriptions, so two opens in this one process stand for two
workers. The server-level check (20 clients on 2 workers, one origin fetch) is in test_tiers.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nixcache.server.tiers.errors import FetchAborted
from nixcache.server.tiers.flightlock import FlightLock, follow, readable

NAME = "1b2m2y8asgtpgvf4jsa7z3ixbh2xbbh6k3vjc0ihfvf8pncnvj9n.nar"


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "tmp").mkdir()
    (tmp_path / "nar").mkdir()
    return tmp_path / "tmp", tmp_path / "nar" / NAME


def test_a_second_worker_follows_the_fetch_and_gets_the_last_byte_once_published(dirs) -> None:
    tmp, published = dirs
    lock = FlightLock.claim(tmp, NAME)
    assert lock is not None
    assert FlightLock.claim(tmp, NAME) is None, "another worker must not fetch it again"
    temp = tmp / "nar.123.456"
    temp.write_bytes(b"abc")
    lock.announce(temp, 10)

    followed = follow(tmp, NAME, published, deadline=1.0)
    assert followed is not None and followed.size == 10
    assert readable(followed) == 3
    with open(temp, "ab") as grow:
        grow.write(b"defghij")
    assert readable(followed) == 9, "the last byte waits for the publication"
    os.rename(temp, published)
    assert readable(followed) == 9, "published but the lock still held (its narinfo is next)"
    lock.release()
    assert readable(followed) == 10
    assert os.pread(followed.fd, 10, 0) == b"abcdefghij"
    os.close(followed.fd)
    assert not (tmp / f"pull-{NAME}").exists()
    assert follow(tmp, NAME, published, deadline=0.1) is None, "nothing to follow once it ended"


def test_a_failed_fetch_cuts_its_followers_short(dirs) -> None:
    tmp, published = dirs
    lock = FlightLock.claim(tmp, NAME)
    assert lock is not None
    temp = tmp / "nar.123.789"
    temp.write_bytes(b"corrupt")
    lock.announce(temp, 100)
    followed = follow(tmp, NAME, published, deadline=1.0)
    assert followed is not None
    temp.unlink()  # what Store.put_nar does with a NAR that did not verify
    lock.release()
    with pytest.raises(FetchAborted, match="fetch failed"):
        readable(followed)
    os.close(followed.fd)
    assert not published.exists()


def test_a_fetcher_that_died_leaves_nothing_to_follow_and_its_lock_is_taken_fresh(dirs) -> None:
    tmp, published = dirs
    stale = tmp / f"pull-{NAME}"
    stale.write_text(f"100 {tmp / 'nar.999.1'}\n")  # written by a worker that was killed
    assert follow(tmp, NAME, published, deadline=0.1) is None
    lock = FlightLock.claim(tmp, NAME)
    assert lock is not None
    assert stale.read_text() == "", "the dead fetcher's announcement is gone"
    lock.release()


def test_a_follower_waits_for_the_first_bytes_only_up_to_its_deadline(dirs) -> None:
    tmp, published = dirs
    lock = FlightLock.claim(tmp, NAME)
    assert lock is not None
    assert follow(tmp, NAME, published, deadline=0.05) is None  # no bytes yet: the caller decides
    lock.release()

"""The thread pool's parallel steps: what a caller gets back, and what runs when one fails."""

from __future__ import annotations

import threading
import time

import gevent.threadpool
import pytest

from nixcache.server.offload import offload_to


@pytest.fixture
def offload():
    pool = gevent.threadpool.ThreadPool(4)
    yield offload_to(pool)
    pool.kill()


def test_then_runs_the_last_step_in_the_pool_once_every_call_ended(offload) -> None:
    ended: list[str] = []

    def call(name: str, seconds: float) -> str:
        time.sleep(seconds)
        ended.append(name)
        return name

    def last(results: list[str]) -> tuple[list[str], list[str], bool]:
        return results, list(ended), threading.current_thread() is not threading.main_thread()

    results, ended_before_last, in_pool = offload.then([(call, ("slow", 0.2)), (call, ("fast", 0.0))], last)
    assert results == ["slow", "fast"]  # in the order of the calls, not of their ends
    assert sorted(ended_before_last) == ["fast", "slow"]
    assert in_pool


def test_then_raises_the_failed_calls_error_after_the_others_ended_and_skips_the_last_step(offload) -> None:
    ended: list[str] = []
    published: list[object] = []

    def fail() -> None:
        raise ValueError("refused")

    def slow() -> None:
        time.sleep(0.2)
        ended.append("slow")

    with pytest.raises(ValueError, match="refused"):
        offload.then([(fail, ()), (slow, ())], published.append)
    assert ended == ["slow"]  # the caller may clean up: nothing of the step still runs
    assert published == []


def test_then_raises_what_the_last_step_raised(offload) -> None:
    def last(results: list[int]) -> None:
        raise OSError(f"rename failed after {results}")

    with pytest.raises(OSError, match=r"rename failed after \[1, 2\]"):
        offload.then([(int, ("1",)), (int, ("2",))], last)

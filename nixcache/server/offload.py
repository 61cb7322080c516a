"""Slow work (decompressing, hashing, and every write to the store's disk) off the event loop, in
gevent's thread pool.

gevent's pool reports an exception raised in one of its threads through the hub, which prints a full
traceback, even when the caller handles it (a refused NAR is an expected 400, not a crash). So
the worker returns the exception as a value and the caller raises it in its own greenlet, with
its traceback intact, where the usual handling applies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gevent


class _Raised:
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


def _capture(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    try:
        return fn(*args)
    except Exception as error:  # handed to the caller, which decides what it means
        return _Raised(error)


def _outcome(value: Any) -> Any:
    if isinstance(value, _Raised):
        raise value.error
    return value


class Offload:
    """`offload(fn, args)` for `Store`: runs `fn(*args)` in `threadpool`, raises what it raised.
    `offload.all(calls)` runs several at once (e.g. two fsyncs, which the filesystem then commits
    in one journal transaction instead of one after the other)."""

    def __init__(self, threadpool: Any):
        self.threadpool = threadpool

    def __call__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        return _outcome(self.threadpool.apply(_capture, (fn, args)))

    def all(self, calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
        """The results of `fn(*args)` for each of `calls`, run in parallel; once every one has
        ended, raises what the first that failed raised."""
        if gevent.get_hub() is not self.threadpool.hub:  # in one of the pool's threads itself:
            return [fn(*args) for fn, args in calls]  # (as threadpool.apply does) run them here
        pending = [self.threadpool.spawn(_capture, fn, args) for fn, args in calls]
        return [_outcome(result) for result in [task.get() for task in pending]]


def offload_to(threadpool: Any) -> Offload:
    """An `Offload` running in `threadpool`."""
    return Offload(threadpool)

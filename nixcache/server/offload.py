"""Slow work (decompressing, hashing, and every write to the store's disk) off the event loop, in
gevent's thread pool.

gevent's pool reports an exception raised in one of its threads through the hub, which prints a full
traceback, even when the caller handles it (a refused NAR is an expected 400, not a crash). So
the worker returns the exception as a value and the caller raises it in its own greenlet, with
its traceback intact, where the usual handling applies.
"""

from __future__ import annotations

import itertools
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
    in one journal transaction instead of one after the other); `offload.then(calls, last)`
    also runs `last(results)` once they all succeeded, in the thread that finished last, so the
    caller waits for one round of hand-offs instead of two."""

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

    def then(
        self, calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]], last: Callable[[list[Any]], Any]
    ) -> Any:
        """`last([fn(*args) for each of calls])`, the calls run in parallel and `last` in the pool
        thread that ended the last of them (not after a hand-off back to the event loop and
        another to the pool: each costs the loop a wake-up and a round of GIL hand-overs with
        the pool's threads). Raises what the first failed call raised (`last` is then not run),
        else what `last` raised."""
        if gevent.get_hub() is not self.threadpool.hub:  # in one of the pool's threads itself
            return last([fn(*args) for fn, args in calls])
        results: list[Any] = [None] * len(calls)
        errors: list[Exception | None] = [None] * len(calls)
        # next() of an itertools.count is atomic (one C call under the GIL): no lock, which the
        # server's monkey-patching would make a gevent lock, unusable in the pool's threads.
        ended = itertools.count(1)

        def run(index: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
            try:
                results[index] = fn(*args)
            except Exception as error:  # handed to the caller (see _capture)
                errors[index] = error
            if next(ended) == len(calls) and not any(errors):
                return True, _capture(last, (results,))
            return False, None

        pending = [self.threadpool.spawn(run, i, fn, args) for i, (fn, args) in enumerate(calls)]
        outcomes = [task.get() for task in pending]
        for error in errors:
            if error is not None:
                raise error
        return next(_outcome(value) for ran, value in outcomes if ran)


def offload_to(threadpool: Any) -> Offload:
    """An `Offload` running in `threadpool`."""
    return Offload(threadpool)

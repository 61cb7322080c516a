"""CPU-heavy work (decompressing, hashing an upload) off the event loop, in gevent's thread pool.

gevent's pool reports an exception raised in a worker through the hub, which prints a full
traceback, even when the caller handles it (a refused NAR is an expected 400, not a crash). So
the worker returns the exception as a value and the caller raises it in its own greenlet, with
its traceback intact, where the usual handling applies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class _Raised:
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


def _capture(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    try:
        return fn(*args)
    except Exception as error:  # handed to the caller, which decides what it means
        return _Raised(error)


def offload_to(threadpool: Any) -> Callable[[Callable[..., Any], tuple[Any, ...]], Any]:
    """An `offload(fn, args)` for `Store`: runs `fn(*args)` in `threadpool`, raises what it raised."""

    def offload(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        outcome = threadpool.apply(_capture, (fn, args))
        if isinstance(outcome, _Raised):
            raise outcome.error
        return outcome

    return offload

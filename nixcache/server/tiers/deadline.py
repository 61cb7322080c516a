"""Deadlines on tier calls: past one, the call is abandoned and counted as a timeout."""

from __future__ import annotations

from typing import Any

import gevent

from nixcache.server.tiers.errors import TierUnavailable


class within:
    """`with within(seconds, what):` TierUnavailable (reason timeout) past the deadline.

    A gevent.Timeout is a BaseException, so no library's `except Exception` swallows it."""

    def __init__(self, seconds: float, what: str):
        self.seconds = seconds
        self.what = what
        self.timer = gevent.Timeout(seconds)

    def __enter__(self) -> None:
        self.timer.start()

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        self.timer.close()
        if value is self.timer:
            raise TierUnavailable(f"{self.what}: no answer within {self.seconds:g}s", "timeout") from None

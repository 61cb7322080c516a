"""Paths recently absent from every tier, so a client walking a closure does not hammer them."""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_ENTRIES = 65536  # ~100 bytes each: a bounded few MiB whatever the clients ask


class NegativeCache:
    """Store hashes remembered as absent for `ttl` seconds; bounded to `max_entries`."""

    def __init__(
        self, ttl: float, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.monotonic
    ):
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._until: dict[str, float] = {}

    def __contains__(self, hash_part: str) -> bool:
        until = self._until.get(hash_part)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[hash_part]
            return False
        return True

    def add(self, hash_part: str) -> None:
        if self.ttl <= 0:
            return
        if len(self._until) >= self.max_entries:
            # Drop the older half (dicts keep insertion order): no per-lookup bookkeeping.
            for old in list(self._until)[: self.max_entries // 2]:
                del self._until[old]
        self._until.pop(hash_part, None)
        self._until[hash_part] = self._clock() + self.ttl

    def discard(self, hash_part: str) -> None:
        """Forget an absence: the path was just pushed here."""
        self._until.pop(hash_part, None)

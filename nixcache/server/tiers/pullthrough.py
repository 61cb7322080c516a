"""A local miss: ask the origin, then the upstreams, each within its deadline; fetch a NAR once.

Narinfos. The tiers are asked in order; the first that has the path wins. Its narinfo is kept
in memory (`_found`, bounded, with a TTL) and served at once, signed by this cache's keys: the
narinfo cannot be published locally before its NAR is here (the store's visibility rule), and
a client usually asks for the NAR next. A path no tier has is remembered in the negative cache.
A tier that fails or overruns its deadline counts an error and is skipped: a read is never a 5xx.

NARs. Concurrent requests for one NAR share one `_Flight` (and the workers of a host share it
through tiers/flightlock.py, each streaming the one temp file): one fetch, into the store's tmp/
through `Store.put_nar` (the upload verification: FileHash is the file name, FileSize, NarHash
and NarSize of the narinfo), while every waiting client reads the temp file as it grows. The
last byte is held back until the NAR verified and was published, so a corrupted NAR never
reaches a client as a complete response: its connection is cut short instead (and Nix retries).
(The last byte goes out once the NAR is durable and its narinfo published: a client that has
the whole NAR can count on the path being stored here. The fsync runs in the thread pool, so
the other connections are served meanwhile. So that it has little left to do, the flight has
each WRITEBACK_BYTES written so far flushed to disk while the rest arrives (an fdatasync in the
thread pool, one per NAR at a time, WRITEBACKS per worker): 64 MiB written at once took the
final fsync ~28 ms here, with the writeback along the way ~4 ms.)
Once the NAR is published, the narinfo that named it is published locally too (with its signed
text, by Store.put_narinfo): the next request is a local hit, one file read.

Extra files (listings, logs, debuginfo, build traces): asked of the tiers that serve any file
of the layout (the origin), within its narinfo deadline, and served without being stored here.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gevent
from gevent.event import AsyncResult, Event
from gevent.lock import BoundedSemaphore

from nixcache.server.app import NARINFO_LIMIT
from nixcache.server.metrics import Metrics
from nixcache.server.nar import NarDigest
from nixcache.server.narinfo import NarInfo
from nixcache.server.store import Store, UploadError
from nixcache.server.tiers.deadline import within
from nixcache.server.tiers.errors import FetchAborted, TierError, TierUnavailable
from nixcache.server.tiers.flightlock import POLL_SECONDS, FlightLock, Followed, follow, readable
from nixcache.server.tiers.negative import NegativeCache
from nixcache.server.wire import FileBody, StreamBody

log = logging.getLogger("nixcache.server.tiers")
FOUND_TTL = 600.0  # a narinfo found in another tier waits this long for its NAR to be asked for
EXTRA_LIMIT = 64 * 1024 * 1024  # the largest extra file kind (a build log, extras/buildlog.py)
FOUND_ENTRIES = 4096  # NarInfos of a few KiB (references): a bounded few MiB
# A NAR is received, hashed, written and sent on in pieces of this size. 1 MiB rather than
# put_nar's 256 KiB: a quarter of the wake-ups (of this loop, its readers and their clients) for
# a buffer that still fits the L2 cache that the hash reads it from (docs/benchmarks.md).
FETCH_CHUNK = 1024 * 1024
WRITEBACK_BYTES = 8 * 1024 * 1024  # flushed while a NAR arrives (4 MiB: no shorter final fsync)
# At most this many writebacks of a worker at once, whatever the number of pulls: each holds a
# thread of the pool that every write of the store shares (a pull whose turn it is not skips
# it; its final fsync does the rest).
WRITEBACKS = BoundedSemaphore(2)


class Tier(Protocol):
    name: str
    narinfo_deadline: float
    nar_deadline: float
    serves_bare_nars: bool

    def get_narinfo(self, hash_part: str) -> NarInfo | None: ...

    def open_nar(self, name: str) -> Any: ...


@dataclass
class _Found:
    tier: Tier
    info: NarInfo
    until: float


class _Flight:
    """One NAR being fetched: the temp file it grows in and how much of it is written."""

    def __init__(self, name: str, lock: FlightLock, offload: Callable[..., Any]):
        self.name = name
        self.lock = lock  # the other workers' way to this flight
        self._offload = offload  # the store's thread pool: the writeback's fdatasync
        self._flushed = 0  # bytes of the temp file an fdatasync was started for
        self._flushing = False
        self.size: int | None = None
        self.written = 0
        self.fd = -1  # a read descriptor on the temp file (the published NAR after the rename)
        self.ready = Event()  # first bytes are in the temp file, or the flight ended
        self.done = False
        self.ok = False
        self.verified = False  # every byte checked (it is made durable and published next)
        self.found = True
        self._tick = Event()

    def progress(self, path: Path, written: int) -> None:
        if self.fd < 0:
            self.fd = os.open(path, os.O_RDONLY)
            if self.size is not None:
                self.lock.announce(path, self.size)
                self.ready.set()
        self.written = written
        due = not self._flushing and written - self._flushed >= WRITEBACK_BYTES
        if due and WRITEBACKS.acquire(blocking=False):
            self._flushed, self._flushing = written, True
            gevent.spawn(self._write_back, os.dup(self.fd))
        self._tick, tick = Event(), self._tick
        tick.set()
        # A tier that sends faster than we read never blocks this greenlet: yield, so the
        # readers send each chunk now (first byte in milliseconds) rather than at the end.
        gevent.sleep(0)

    def _write_back(self, fd: int) -> None:
        """Flush what is written so far (its own descriptor: the flight may end meanwhile)."""
        try:
            self._offload(os.fdatasync, (fd,))
        except OSError as error:  # the final fsync, in put_nar, decides; this is a head start
            log.debug("writeback of nar/%s: %s", self.name, error)
        finally:
            os.close(fd)
            self._flushing = False
            WRITEBACKS.release()

    def verify(self, name: str, path: Path) -> None:
        """Store.put_nar's before_publish: the NAR verified (it is made durable next)."""
        self.verified = True

    def finish(self, ok: bool, found: bool = True) -> None:
        self.done, self.ok, self.found = True, ok, found
        self.lock.release()  # after the NAR (and its narinfo) was published, or failed
        self.ready.set()
        self._tick.set()
        if self.fd >= 0:
            os.close(self.fd)  # readers hold their own duplicates
            self.fd = -1

    def readable(self) -> int:
        """How far a client may read: all of it once stored, one byte short until then."""
        if self.done and not self.ok:
            raise FetchAborted(f"nar/{self.name}: the fetch failed or did not verify; see the server log")
        assert self.size is not None
        return self.size if self.done else min(self.written, self.size - 1)

    def wait(self, timeout: float) -> None:
        self._tick.wait(timeout)

    def reader(self, stall: float) -> Iterator[FileBody]:
        """The NAR as it grows, in segments of the temp file that the HTTP layer sends with
        sendfile(2): no copy through this process, whatever the number of readers."""
        handle = os.fdopen(os.dup(self.fd), "rb")
        try:
            position, size = 0, self.size
            assert size is not None
            while position < size:
                limit = self.readable()
                if position >= limit:
                    self.wait(stall)
                    continue
                yield FileBody(handle, position, limit - position)
                position = limit
        finally:
            handle.close()


def _follower(followed: Followed, stall: float) -> Iterator[FileBody]:
    """Another worker's fetch of a NAR, streamed from its temp file as it grows (sendfile(2))."""
    handle = os.fdopen(followed.fd, "rb")
    try:
        position, quiet_since = 0, time.monotonic()
        while position < followed.size:
            limit = readable(followed)
            if position >= limit:
                if time.monotonic() - quiet_since > stall:
                    raise FetchAborted(f"{followed.published.name}: the other worker's fetch stalled")
                gevent.sleep(POLL_SECONDS)
                continue
            yield FileBody(handle, position, limit - position)
            position, quiet_since = limit, time.monotonic()
    finally:
        handle.close()


class PullThrough:
    """The tiers after the local store, asked in order."""

    def __init__(
        self, store: Store, tiers: list[Tier], metrics: Metrics, negative: NegativeCache, max_size: int
    ):
        self.store = store
        self.tiers = tiers
        self.metrics = metrics
        self.negative = negative
        self.max_size = max_size
        self._found: dict[str, _Found] = {}
        self._by_nar: dict[str, str] = {}  # nar file -> hash part of a narinfo in _found
        self._lookups: dict[str, AsyncResult] = {}
        self._flights: dict[str, _Flight] = {}

    # -- narinfos -------------------------------------------------------------------------------

    def narinfo(self, hash_part: str) -> NarInfo | None:
        """The narinfo of a path that is not local, from the first tier that has it, or None."""
        if hash_part in self.negative:
            self.metrics.negative_hits.inc()
            return None
        found = self._found.get(hash_part)
        if found is not None and found.until > time.monotonic():
            return found.info
        pending = self._lookups.get(hash_part)
        if pending is not None:  # single flight: concurrent misses for one path ask once
            return pending.get()
        pending = self._lookups[hash_part] = AsyncResult()
        try:
            info = self._lookup(hash_part)
        except BaseException as error:
            pending.set_exception(error)
            raise
        else:
            pending.set(info)
        finally:
            del self._lookups[hash_part]
        return info

    def _lookup(self, hash_part: str) -> NarInfo | None:
        failed = False  # a tier that could not answer may have the path: not proof of absence
        for tier in self.tiers:
            start = time.perf_counter()
            try:
                with within(tier.narinfo_deadline, f"{tier.name} {hash_part}.narinfo"):
                    info = tier.get_narinfo(hash_part)
            except TierError as error:
                self._error(tier.name, "narinfo", error)
                failed = True
                continue
            finally:
                self.metrics.tier_duration.labels(tier.name, "narinfo").observe(time.perf_counter() - start)
            if info is None:
                self.metrics.tier_lookups.labels(tier.name, "narinfo", "miss").inc()
                continue
            self.metrics.tier_lookups.labels(tier.name, "narinfo", "hit").inc()
            self._remember(hash_part, tier, info)
            if self.store.keep_nar(info.nar_file):
                self._publish(hash_part, info)  # its NAR is already here (fetched on its own)
            return info
        if not failed:
            # Remembered as absent only when every tier said so: a path the origin holds must
            # be served again as soon as an outage ends, not a negative_ttl later.
            self.negative.add(hash_part)
        return None

    def _remember(self, hash_part: str, tier: Tier, info: NarInfo) -> None:
        if len(self._found) >= FOUND_ENTRIES:
            for old in list(self._found)[: FOUND_ENTRIES // 2]:
                self._forget(old)
        self._found[hash_part] = _Found(tier, info, time.monotonic() + FOUND_TTL)
        self._by_nar[info.nar_file] = hash_part

    def _forget(self, hash_part: str) -> None:
        found = self._found.pop(hash_part, None)
        if found is not None and self._by_nar.get(found.info.nar_file) == hash_part:
            del self._by_nar[found.info.nar_file]

    def _publish(self, hash_part: str, info: NarInfo) -> None:
        """Publish a pulled narinfo in the local store (its NAR is here and matches)."""
        data = info.render().encode()
        try:
            self.store.put_narinfo(hash_part, io.BytesIO(data), len(data), NARINFO_LIMIT)
        except UploadError as error:
            log.warning("pulled %s.narinfo not stored: %s", hash_part, error.reason)
            return
        self._forget(hash_part)

    # -- extra files ----------------------------------------------------------------------------

    def extra_file(self, key: str) -> bytes | None:
        """An extra file (`<hash>.ls`, `log/…`, …) from the first tier that has it, or None."""
        for tier in self.tiers:
            get_bytes = getattr(tier, "get_bytes", None)  # the origin; upstreams answer narinfos only
            if get_bytes is None:
                continue
            try:
                with within(tier.narinfo_deadline, f"{tier.name} {key}"):
                    data = get_bytes(key, EXTRA_LIMIT)
            except TierError as error:
                self._error(tier.name, "extra", error)
                continue
            self.metrics.tier_lookups.labels(tier.name, "extra", "miss" if data is None else "hit").inc()
            if data is not None:
                return data
        return None

    # -- NARs -----------------------------------------------------------------------------------

    def nar(self, name: str) -> StreamBody | None:
        """A NAR that is not local, streamed while it is fetched, or None: absent from the tiers,
        or fetched and published meanwhile (the caller then serves the local file)."""
        flight = self._flights.get(name)
        if flight is None:
            hash_part = self._by_nar.get(name)
            found = self._found.get(hash_part) if hash_part else None
            if found is not None:
                tier, info = found.tier, found.info
            else:
                tier = next((t for t in self.tiers if t.serves_bare_nars), None)
                info = None
                if tier is None:
                    return None
            lock = FlightLock.claim(self.store.tmp_dir, name)
            if lock is None:  # another worker is fetching it: stream its temp file
                followed = follow(self.store.tmp_dir, name, self.store.nar_path(name), tier.nar_deadline)
                if followed is not None:
                    return StreamBody(_follower(followed, stall=60.0), followed.size)
                if self.store.nar_path(name).exists():
                    return None  # it published the NAR meanwhile: the caller serves the file
                lock = FlightLock.claim(self.store.tmp_dir, name)  # its fetch ended unpublished
                if lock is None:
                    return None  # still no bytes past the NAR deadline: a miss for now, as for its clients
            if self.store.nar_path(name).exists():  # published by another worker just now
                lock.release()
                return None
            # From here on this worker's other requests share the flight (no yield since the
            # claim), and the other workers follow its temp file.
            flight = self._flights[name] = _Flight(name, lock, self.store.offload)
            gevent.spawn(self._fetch, flight, tier, info, hash_part)
        flight.ready.wait()
        if flight.done:
            return None
        assert flight.size is not None
        return StreamBody(flight.reader(stall=60.0), flight.size)

    def _fetch(self, flight: _Flight, tier: Tier, info: NarInfo | None, hash_part: str | None) -> None:
        name = flight.name
        source = None
        start = time.perf_counter()
        try:
            with within(tier.nar_deadline, f"{tier.name} nar/{name}"):
                source = tier.open_nar(name)
            self.metrics.tier_duration.labels(tier.name, "nar").observe(time.perf_counter() - start)
            if source is None:
                self.metrics.tier_lookups.labels(tier.name, "nar", "miss").inc()
                if info is not None:  # the tier's own narinfo names it: damage there
                    log.warning("%s: nar/%s is missing, %s.narinfo names it", tier.name, name, hash_part)
                flight.finish(ok=False, found=False)
                return
            size = info.file_size if info is not None and info.file_size is not None else source.size
            flight.size = size
            expected = NarDigest(info.nar_hash, info.nar_size) if info is not None else None
            try:
                self.store.put_nar(
                    name,
                    source,
                    size,
                    self.max_size,
                    expected,
                    progress=flight.progress,
                    before_publish=flight.verify,
                    chunk=FETCH_CHUNK,
                )
            except OSError as error:  # the tier broke off while sending
                raise TierUnavailable(f"{tier.name} nar/{name}: {error}") from None
            self.metrics.tier_lookups.labels(tier.name, "nar", "hit").inc()
            self.metrics.tier_bytes.labels(tier.name, "read").inc(flight.written)
            if info is not None and hash_part is not None:
                self._publish(hash_part, info)
            flight.finish(ok=True)
        except UploadError as error:
            # FileHash, FileSize, NarHash or NarSize did not match: never served, never stored.
            log.warning("%s: nar/%s not stored: %s", tier.name, name, error.reason)
            self._error(tier.name, "nar", TierError(error.reason, "store" if flight.verified else "corrupt"))
            if hash_part is not None:
                self._forget(hash_part)
            flight.finish(ok=False)
        except TierError as error:
            self._error(tier.name, "nar", error)
            flight.finish(ok=False)
        except BaseException:
            log.exception("pull-through of nar/%s from %s failed", name, tier.name)
            flight.finish(ok=False)
            raise
        finally:
            if source is not None:
                source.close()
            self._flights.pop(name, None)

    def _error(self, tier: str, kind: str, error: TierError) -> None:
        self.metrics.tier_lookups.labels(tier, kind, "error").inc()
        self.metrics.tier_errors.labels(tier, error.reason).inc()
        log.warning("%s", error)

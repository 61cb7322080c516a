"""`nixcache gc`: delete least recently served entries until the size and free-space limits hold.

An entry is a narinfo and the NAR it names. gc deletes entries whole: the narinfo together with
its NAR, which stays only while another kept narinfo still names it. An entry whose NAR is
younger than GRACE_SECONDS is kept whole whatever the limits say: its NAR cannot be freed yet,
and deleting the narinfo alone would free almost nothing and lose the entry. So a limit gc
cannot reach leaves every entry it did not free intact, and the summary line says what was
freed, what is left and why the limit is not met (`run` docstring).

Safe while the server runs, in another process:
- a narinfo is deleted before the NAR it names (both in one step under the exclusive lock on
  `gc.lock`), and a NAR only when no kept narinfo names it, so no narinfo ever points at a
  missing NAR; its signed text (signed/, what is served) goes just before it, in the same
  step, so neither the server nor an nginx front serves a narinfo that was collected;
- the server refreshes a NAR's mtime when a narinfo naming it is uploaded (and on HEAD, which
  pushers send first), and does so under a shared lock on `gc.lock`; gc re-checks that mtime
  under the exclusive lock just before unlinking, and spares NARs touched within GRACE_SECONDS
  (and the entries naming them). An upload racing a collection therefore never ends up with a
  narinfo whose NAR is gone.
The extra files (listings, logs, debuginfo, build traces) go with the path they describe, in the
same run (nixcache/server/extras/gc.py).
"Last served" is the narinfo's atime (set explicitly by the server, see store.py) or its
upload time, whichever is later.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import contextlib
import fcntl
import itertools
import json
import os
import resource
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nixcache.server import config as configmod
from nixcache.server.extras import gc as extras_gc
from nixcache.server.store import Store, read_quietly
from nixcache.server.units import format_duration, human_size, parse_duration, parse_size
from nixcache.server.usage import StoreUsage

GRACE_SECONDS = 3600  # a NAR this young may be waiting for a narinfo: kept, with every entry naming it
PROGRESS_SECONDS = 2.0
SCAN_CHUNK = 512  # narinfos read between two counts of the thread's waits (or per trip to a thread)
SCAN_THREADS = 4  # threads reading narinfos once they come from the disk
COLD_WAITS = 0.25  # reads of a chunk that waited for the disk (a sleep each), beyond which it is cold
COLD_BURST = 32  # chunks read by the threads after a cold one, before this thread tries again
BATCH_SECONDS = 0.002  # the exclusive gc lock is held over deletions for at most about this long


class GcError(ValueError):
    """The collection cannot run as asked; the message says what to change."""


@dataclass
class Limits:
    store: Path
    max_size: int | None = None
    older_than: float | None = None
    min_free: int | None = None
    max_free: int | None = None


@dataclass
class Result:
    deleted_entries: int = 0
    deleted_nars: int = 0
    freed_bytes: int = 0
    store_bytes: int = 0
    free_bytes: int = 0
    deleted: list[str] = field(default_factory=list)
    kept_young: int = 0  # entries a limit asked for, kept whole: their NAR is in the grace period
    kept_changed: int = 0  # entries a limit asked for that were pushed again or removed meanwhile
    shortfall: str | None = None  # the limits not met and why, as in the summary line; None: all met


def limits_from(
    config_file: Path | None,
    store: Path | None,
    max_size: str | None,
    older_than: str | None,
    min_free: str | None,
    max_free: str | None,
) -> Limits:
    """Limits from the config file (if any) overridden by flags; GcError naming a bad value."""
    try:
        config = configmod.load(config_file) if config_file else configmod.ServerConfig()
    except configmod.ConfigError as error:
        raise GcError(str(error)) from None
    try:
        limits = Limits(
            store=store or config.store,
            max_size=parse_size(max_size) if max_size is not None else config.gc_max_size,
            older_than=parse_duration(older_than) if older_than is not None else config.gc_older_than,
            min_free=parse_size(min_free) if min_free is not None else config.gc_min_free,
            max_free=parse_size(max_free) if max_free is not None else config.gc_max_free,
        )
    except ValueError as error:
        raise GcError(str(error)) from None
    if limits.max_free is not None and limits.min_free is None:
        raise GcError(
            "--max-free (gc_max_free) needs --min-free (gc_min_free): collection starts when free "
            "space drops below min-free"
        )
    if limits.min_free is not None and limits.max_free is None:
        limits.max_free = limits.min_free
    if limits.min_free is not None and limits.max_free is not None and limits.max_free < limits.min_free:
        raise GcError(
            f"--max-free/gc_max_free ({limits.max_free}) must be at least "
            f"--min-free/gc_min_free ({limits.min_free})"
        )
    if limits.max_size is None and limits.older_than is None and limits.min_free is None:
        raise GcError(
            "no limit given: pass --max-size, --older-than or --min-free/--max-free (or gc_* in the config)"
        )
    if not (limits.store / "narinfo").is_dir():
        raise GcError(f"{limits.store} is not a nixcache store (no narinfo/ in it); check --store")
    return limits


def nar_file_of(path: Path) -> str | None:
    """The NAR file a narinfo names, read without touching its atime (our last-served mark)."""
    try:
        url = _field(read_quietly(path, 65536), b"\nURL: ")
    except OSError:
        return None
    try:
        return url[len(b"nar/") :].decode() if url and url.startswith(b"nar/") else None
    except UnicodeDecodeError:
        return None


def _field(data: bytes, key: bytes) -> bytes | None:
    """The value of the first `key` line of a narinfo (`key` is b"\\n<Name>: "), or None: a
    search rather than a parse of every line (no validation, which the server did when it
    stored the file)."""
    if data.startswith(key[1:]):
        start = len(key) - 1
    else:
        start = data.find(key)
        if start < 0:
            return None
        start += len(key)
    end = data.find(b"\n", start)
    return data[start : end if end >= 0 else len(data)].strip()


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


NAR_NAME_WIDTH = 64  # bytes kept per NAR file name: nar/<52 base32 chars>.nar[.xz|.zst|…] fits


class _Scan:
    """Every narinfo of the store, from one pass of os.scandir (one stat and one read each, in
    inode order: on a cold page cache that reads the inode table and the files nearly in disk
    order rather than in hash order), held in flat arrays (about 140 bytes per entry, so a
    store of millions fits a small process): entry i is `names[32*i:32*i+32]`, its NAR file
    `nar_name(i)`, known for sharing and orphan checks by `hash()` of that name. Everything the
    deletion needs comes from here: it only re-checks, by a stat, what may have changed.

    The narinfos are read in this thread while they come from the page cache: threads would
    hand the GIL over at every syscall, which costs more than the read (16 µs a narinfo with 4
    threads, 8.5 µs in one, measured on a 1,000,000-entry store). Once more than COLD_WAITS
    of a chunk's reads waited for the disk (counted as the thread's voluntary context switches:
    unlike its time, not moved by other work on the machine), the next COLD_BURST chunks go to
    SCAN_THREADS threads, so that a cold disk gets several reads at once; then this thread
    tries again (a store is often cold in parts: what other work evicted)."""

    def __init__(self, store: Store, narinfo_fd: int, echo: Callable[[str], object] = lambda _: None):
        self.threaded = False  # whether some reads went to the threads (a cold disk)
        started = last_progress = time.monotonic()
        # Entry i is the i-th narinfo listed; the arrays are sized once, from the listing.
        self.names = bytearray()  # hash parts, 32 bytes each, in directory order
        by_inode = array("Q")  # (inode, low 32 bits) << 32 | index
        with os.scandir(narinfo_fd) as entries:
            for entry in entries:
                name = entry.name
                if len(name) == 40 and name.endswith(".narinfo"):
                    by_inode.append((entry.inode() & 0xFFFFFFFF) << 32 | len(by_inode))
                    self.names += name[:32].encode()
        by_inode = array("Q", sorted(by_inode))
        n = len(by_inode)
        self.sizes = array("q", bytes(8 * n))  # narinfo bytes
        self.nar_bytes = array("q", bytes(8 * n))  # NAR plus meta bytes, as the narinfo gives them
        self.mtimes = array("q", bytes(8 * n))  # st_mtime_ns: a push replaces the file, changing it
        self.atimes = array("q", bytes(8 * n))  # st_atime (s) after the scan read it: serving moves it
        self.nar_keys = array("q", bytes(8 * n))  # hash() of the NAR file name (0 and has_nar 0: none)
        self.has_nar = bytearray(n)
        self.nar_names = bytearray(NAR_NAME_WIDTH * n)  # NAR file names, NUL-padded
        self.long_names: dict[int, bytes] = {}  # the rare name longer than that (not ours)
        # A narinfo gone between the listing and its read keeps zeros, and is in no order below.
        nar_dir = os.fsencode(store.nar_dir)
        names = self.names

        def read_chunk(start: int) -> list[tuple]:
            """Entries by_inode[start:start+SCAN_CHUNK]: a list of what the arrays keep."""
            out = []
            for key in by_inode[start : start + SCAN_CHUNK]:
                i = key & 0xFFFFFFFF
                try:
                    st, data, atime = _read(bytes(names[32 * i : 32 * i + 32]) + b".narinfo", narinfo_fd)
                except FileNotFoundError:
                    continue
                url = _field(data, b"\nURL: ") or b""
                nar_name = url[4:] if url.startswith(b"nar/") else b""
                nar_bytes = _nar_bytes(nar_dir, nar_name, data) if nar_name else 0
                last_used = max(0, min(int(max(st.st_atime, st.st_mtime)), 0xFFFFFFFF))
                out.append((i, st.st_size, st.st_mtime_ns, atime, last_used, nar_name, nar_bytes))
            return out

        def chunks() -> Iterator[list[tuple]]:
            starts = iter(range(0, n, SCAN_CHUNK))
            with contextlib.ExitStack() as stack:
                for start in starts:
                    waits = _waits()
                    chunk = read_chunk(start)
                    cold = _waits() - waits > COLD_WAITS * SCAN_CHUNK
                    yield chunk
                    if cold:  # the next COLD_BURST chunks in the threads, then this thread again
                        if not self.threaded:
                            pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(SCAN_THREADS))
                            self.threaded = True
                        burst = iter(list(itertools.islice(starts, COLD_BURST)))
                        window = collections.deque(
                            pool.submit(read_chunk, start)
                            for start in itertools.islice(burst, 2 * SCAN_THREADS)
                        )
                        while window:
                            chunk = window.popleft().result()
                            for start in itertools.islice(burst, 1):
                                window.append(pool.submit(read_chunk, start))
                            yield chunk

        order = array("Q")  # (last used, seconds) << 32 | index: sorted, least recently served first
        sizes, mtimes, atimes, nar_keys = self.sizes, self.mtimes, self.atimes, self.nar_keys
        has_nar, nar_names, all_nar_bytes = self.has_nar, self.nar_names, self.nar_bytes
        for read, chunk in enumerate(chunks(), 1):
            if time.monotonic() - last_progress > PROGRESS_SECONDS:
                last_progress = time.monotonic()
                echo(f"gc: read {min(read * SCAN_CHUNK, n)} of {n} narinfos")
            for i, size, mtime_ns, atime, last_used, nar_name, nar_bytes in chunk:
                sizes[i], mtimes[i], atimes[i], all_nar_bytes[i] = size, mtime_ns, atime, nar_bytes
                if nar_name:
                    nar_keys[i], has_nar[i] = hash(nar_name), 1
                    if len(nar_name) > NAR_NAME_WIDTH:
                        self.long_names[i] = nar_name
                    else:
                        nar_names[NAR_NAME_WIDTH * i : NAR_NAME_WIDTH * i + len(nar_name)] = nar_name
                order.append(last_used << 32 | i)
        by_inode = array("Q")  # done with: freed before the sorting below
        if time.monotonic() - started > PROGRESS_SECONDS:
            how = (
                f"{SCAN_THREADS} threads where the disk was cold" if self.threaded else "from the page cache"
            )
            echo(f"gc: read {n} narinfos in {time.monotonic() - started:.1f} s ({how})")
        self.order = array("Q", sorted(order))
        del order
        # NARs named by more than one narinfo are rare: counted in a small dict, the rest are 1.
        refs = sorted(itertools.compress(nar_keys, has_nar))
        self.referenced = array("q", refs)
        self.shared: dict[int, int] = {}
        for previous, key in itertools.pairwise(refs):
            if previous == key:
                self.shared[key] = self.shared.get(key, 1) + 1
        del refs

    def __len__(self) -> int:
        return len(self.sizes)

    def hash_part(self, i: int) -> str:
        return self.names[32 * i : 32 * i + 32].decode()

    def nar_name(self, i: int) -> bytes:
        if i in self.long_names:
            return self.long_names[i]
        return bytes(self.nar_names[NAR_NAME_WIDTH * i : NAR_NAME_WIDTH * (i + 1)]).rstrip(b"\0")

    def refs(self, key: int) -> int:
        return self.shared.get(key, 1)

    def names_a_nar(self, key: int) -> bool:
        found = bisect.bisect_left(self.referenced, key)
        return found < len(self.referenced) and self.referenced[found] == key


def _waits() -> int:
    """Times this thread has slept so far (on a read from the disk, say; not when preempted)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


def _read(name: bytes, dir_fd: int) -> tuple[os.stat_result, bytes, int]:
    """The stat and first 64 KiB of a narinfo, without touching its atime (our last-served
    mark, see read_quietly) where the kernel allows; and its atime (seconds) after the read,
    which only serving it moves from then on."""
    quiet = True
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:  # O_NOATIME needs the file's owner (or root)
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
        quiet = False
    try:
        st = os.fstat(fd)
        data = os.read(fd, 65536)
        return st, data, int((st if quiet else os.fstat(fd)).st_atime)
    finally:
        os.close(fd)


def _nar_bytes(nar_dir: bytes, nar_name: bytes, narinfo: bytes) -> int:
    """Bytes of a narinfo's NAR and its meta, from the narinfo (the server checked FileSize
    against the file, and the meta holds "<NarHash> <NarSize>\n"); a stat only without FileSize."""
    meta = len(_field(narinfo, b"\nNarHash: ") or b"") + len(_field(narinfo, b"\nNarSize: ") or b"") + 2
    try:
        return int(_field(narinfo, b"\nFileSize: ") or b"") + meta
    except ValueError:
        try:
            return os.stat(os.path.join(nar_dir, nar_name)).st_size + meta
        except (FileNotFoundError, ValueError):
            return 0


class _Lock:
    """The exclusive gc lock, held over a batch of deletions (one flock per batch, not per
    entry) for about BATCH_SECONDS: the server waits for it on its event loop."""

    def __init__(self, store: Store):
        self.fd = os.open(store.root / "gc.lock", os.O_RDWR | os.O_CREAT, 0o644)
        self.since: float | None = None

    def hold(self) -> None:
        if self.since is None:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self.since = time.monotonic()

    def pause(self, force: bool = False) -> bool:
        """Release when held for long enough (or `force`); True when released."""
        if self.since is not None and (force or time.monotonic() - self.since > BATCH_SECONDS):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.since = None
            return True
        return False

    def close(self) -> None:
        self.pause(force=True)
        os.close(self.fd)


class _Dirs:
    """Descriptors of the store's directories: gc's stats and unlinks name a file relative to
    its directory (dir_fd), so the kernel does not walk the store's path for each."""

    def __init__(self, store: Store):
        self.narinfo = os.open(store.narinfo_dir, os.O_RDONLY | os.O_DIRECTORY)
        # The others may be missing (a store no server has started on yet): -1, nothing in them.
        self.signed, self.nar, self.meta = (
            _open_dir(path) for path in (store.signed_dir, store.nar_dir, store.meta_dir)
        )

    def close(self) -> None:
        for fd in (self.narinfo, self.signed, self.nar, self.meta):
            if fd >= 0:
                os.close(fd)


def _open_dir(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return -1


def _stat(name: bytes, dir_fd: int) -> os.stat_result | None:
    """The stat of `name` in the directory `dir_fd`, None when it (or the directory) is absent."""
    if dir_fd < 0:
        return None
    try:
        return os.stat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


# What deleting one entry did.
_YOUNG = "young"  # nothing: its NAR is in the grace period
_CHANGED = "changed"  # nothing: the narinfo was pushed again, served or removed since the scan
_NARINFO = "narinfo"  # the narinfo (its NAR stays: another kept narinfo names it, or it was gone)
_WHOLE = "whole"  # the narinfo, then its NAR and the NAR's meta


def _age(name: bytes, now: float, dir_fd: int) -> float | None:
    """Seconds since `name` in the directory `dir_fd` was modified; None when it is gone."""
    st = _stat(name, dir_fd)
    return None if st is None else now - st.st_mtime


def _unlink_all(names: list[bytes], dir_fd: int) -> None:
    if dir_fd < 0:
        return
    for name in names:
        try:  # noqa: SIM105 (contextlib.suppress costs three calls; this runs millions of times)
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass


def _nar_total(scanned: _Scan, nar_present: array, named: int) -> int:
    """Bytes of the NARs (with metas) the narinfos name and that are there, each counted once."""
    shared = scanned.shared
    if named == len(scanned.referenced) - sum(count - 1 for count in shared.values()):
        # Every NAR named is there (the usual case): a sum, less the repeats of shared NARs.
        total = sum(scanned.nar_bytes)
        if shared:
            seen: set[int] = set()
            for i in itertools.compress(range(len(scanned)), map(shared.__contains__, scanned.nar_keys)):
                key = scanned.nar_keys[i]
                if scanned.has_nar[i] and key in seen:
                    total -= scanned.nar_bytes[i]
                seen.add(key)
        return total
    # Broken entries (a NAR missing) free nothing of it: each entry is looked up.
    total = 0
    counted: set[int] = set()
    for i in range(len(scanned)):
        key = scanned.nar_keys[i]
        if scanned.has_nar[i] and (key not in shared or key not in counted):
            found = bisect.bisect_left(nar_present, key)
            if found < len(nar_present) and nar_present[found] == key:
                total += scanned.nar_bytes[i]
            if key in shared:
                counted.add(key)
    return total


def run(limits: Limits, *, dry_run: bool = False, echo: Callable[[str], object] = print) -> Result:
    """Collect; returns what was (or, with dry_run, would be) deleted, and prints one summary line.

    Entries go least recently served first while a limit asks for them, each one whole or not at
    all. When a limit is still not met at the end, the summary line ends with
    "; <limits> not met: <why>" (e.g. "12 entries have a NAR younger than the grace period of 1h")
    and gc still succeeds: what it could not free is intact. A dry run walks the same plan on
    what it scanned, so it prints what the real run does unless pushes come in between.
    """
    store = Store(limits.store)
    dirs = _Dirs(store)
    try:
        return _run(store, dirs, limits, dry_run, echo)
    finally:
        dirs.close()


def _run(store: Store, dirs: _Dirs, limits: Limits, dry_run: bool, echo: Callable[[str], object]) -> Result:
    now = time.time()
    scanned = _Scan(store, dirs.narinfo, echo)
    scanned_at = time.monotonic()
    result = Result()
    verb = "would delete" if dry_run else "deleted"
    last_progress = time.monotonic()
    lock = _Lock(store)
    pending = StoreUsage()  # freed since the usage totals were last adjusted

    def count_freed(force: bool = False) -> None:
        """Release the gc lock after a batch, and take what the batch freed off the totals."""
        nonlocal pending
        if lock.pause(force) and pending != StoreUsage():
            freed, pending = pending, StoreUsage()
            with store.usage.changing() as change:
                change.entries -= freed.entries
                change.narinfo_bytes -= freed.narinfo_bytes
                change.nar_files -= freed.nar_files
                change.nar_bytes -= freed.nar_bytes

    # NARs no narinfo names: abandoned pushes. Old ones go whatever the limits. Each is looked at
    # (one stat) only here; NARs that a narinfo names are known from the narinfo.
    present = []  # hash() of every NAR file name, for the meta files below
    orphans: list[tuple[bytes, int, float]] = []  # name, bytes (with meta), age
    named = 0  # NAR files a narinfo names: as many as the names the narinfos give, unless broken
    with os.scandir(dirs.nar) if dirs.nar >= 0 else contextlib.nullcontext(()) as nars:
        for nar in nars:
            name = os.fsencode(nar.name)
            key = hash(name)
            present.append(key)
            if scanned.names_a_nar(key):
                named += 1
                continue
            try:
                st = nar.stat()
            except FileNotFoundError:
                continue
            meta = _stat(name, dirs.meta)
            orphans.append((name, st.st_size + (meta.st_size if meta else 0), now - st.st_mtime))
    present.sort()
    nar_present = array("q", present)
    del present
    total = sum(scanned.sizes) + sum(size for _, size, _ in orphans) + _nar_total(scanned, nar_present, named)
    free_start = _free_bytes(store.root)

    def delete_orphan(name: bytes, size: int) -> int:
        """Delete a NAR no narinfo names, and its meta, unless it was touched recently (a dry
        run only counts it); bytes freed."""
        if not dry_run:
            lock.hold()
            st = _stat(name, dirs.nar)
            if st is None or time.time() - st.st_mtime <= GRACE_SECONDS:
                return 0  # a narinfo naming it was just uploaded, or a pusher HEADed it
            os.unlink(name, dir_fd=dirs.nar)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dirs.meta)
            pending.nar_files += 1
            pending.nar_bytes += st.st_size
            count_freed()
        result.deleted_nars += 1
        return size

    def in_grace(i: int) -> bool:
        """A dry run's prediction: whether entry i's NAR is too young to delete (one stat)."""
        if not scanned.has_nar[i]:
            return False
        age = _age(scanned.nar_name(i), now, dirs.nar)
        return age is not None and age <= GRACE_SECONDS

    refs_left = dict(scanned.shared)  # shared NARs: narinfos still naming them

    def delete_batch(batch: list[int]) -> list[str]:
        """Delete the entries scanned as `batch` (indexes), in one hold of the exclusive lock:
        each is checked (its narinfo is the one scanned and not served since, its NAR out of
        the grace period; a stat each), then the signed texts of those that passed go, then
        their narinfos, then the NARs no kept narinfo names and their metas, so that at no
        moment a narinfo or its signed text names a missing NAR. The outcome of each, in
        order: one of _YOUNG _CHANGED _NARINFO _WHOLE."""
        outcomes = []
        if dry_run:
            for i in batch:
                key = scanned.nar_keys[i]
                if in_grace(i):
                    outcomes.append(_YOUNG)
                    continue
                last_ref = scanned.has_nar[i] and refs_left.get(key, 1) == 1
                if key in refs_left:
                    refs_left[key] -= 1
                outcomes.append(_WHOLE if last_ref else _NARINFO)
            return outcomes
        narinfos, nars = [], []
        names, mtimes, sizes, atimes, has_nar = (
            scanned.names,
            scanned.mtimes,
            scanned.sizes,
            scanned.atimes,
            scanned.has_nar,
        )
        narinfo_dir, nar_dir, nar_keys, nar_name_of = (
            dirs.narinfo,
            dirs.nar,
            scanned.nar_keys,
            scanned.nar_name,
        )
        freed_narinfo_bytes = freed_nar_bytes = 0
        lock.hold()
        young_before = time.time() - GRACE_SECONDS  # a NAR modified since may have a new narinfo
        for i in batch:
            name = bytes(names[32 * i : 32 * i + 32]) + b".narinfo"
            try:
                st = os.stat(name, dir_fd=narinfo_dir)
            except FileNotFoundError:
                outcomes.append(_CHANGED)
                continue
            if st.st_mtime_ns != mtimes[i] or st.st_size != sizes[i] or int(st.st_atime) > atimes[i]:
                outcomes.append(_CHANGED)  # pushed again or served since the scan
                continue
            nar_name = None
            if has_nar[i]:
                nar_name = nar_name_of(i)
                nar_st = _stat(nar_name, nar_dir)
                if nar_st is None:
                    nar_name = None  # a broken entry: only its narinfo is left to delete
                elif nar_st.st_mtime >= young_before:
                    outcomes.append(_YOUNG)  # a narinfo naming it was just uploaded, or HEADed
                    continue
            narinfos.append(name)
            freed_narinfo_bytes += st.st_size
            key = nar_keys[i]
            if key in refs_left:  # a shared NAR goes with the last narinfo naming it
                refs_left[key] -= 1
                last_ref = refs_left[key] == 0
            else:
                last_ref = True
            if nar_name is None or not last_ref:
                outcomes.append(_NARINFO)
                continue
            nars.append(nar_name)
            freed_nar_bytes += nar_st.st_size  # type: ignore[union-attr]
            outcomes.append(_WHOLE)
        if dirs.signed >= 0:
            _unlink_all(narinfos, dirs.signed)  # signed texts first: never served alone
        _unlink_all(narinfos, dirs.narinfo)
        _unlink_all(nars, dirs.nar)
        _unlink_all(nars, dirs.meta)
        pending.entries += len(narinfos)
        pending.narinfo_bytes += freed_narinfo_bytes
        pending.nar_files += len(nars)
        pending.nar_bytes += freed_nar_bytes
        return outcomes

    try:
        for name, size, age in orphans:
            if age > GRACE_SECONDS:
                result.freed_bytes += delete_orphan(name, size)
        count_freed(force=True)
        # Meta files whose NAR is gone (an upload killed between the two renames).
        if not dry_run and dirs.meta >= 0:
            with os.scandir(dirs.meta) as metas:
                n_present, find = len(nar_present), bisect.bisect_left
                for meta in metas:
                    key = hash(os.fsencode(meta.name))
                    found = find(nar_present, key)
                    if found < n_present and nar_present[found] == key:
                        continue
                    age = _age(os.fsencode(meta.name), now, dirs.meta)
                    if age is not None and age > GRACE_SECONDS:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(meta.name, dir_fd=dirs.meta)
        del nar_present
        if time.monotonic() - scanned_at > PROGRESS_SECONDS:
            echo(
                f"gc: listed the NAR files and metas in {time.monotonic() - scanned_at:.1f} s "
                f"({len(orphans)} named by no narinfo); deleting"
            )

        free_triggered = limits.min_free is not None and free_start < limits.min_free

        def too_big(planned: int = 0) -> bool:
            return limits.max_size is not None and total - result.freed_bytes - planned > limits.max_size

        def too_full(planned: int = 0) -> bool:
            return (
                free_triggered
                and limits.max_free is not None
                and free_start + result.freed_bytes + planned < limits.max_free
            )

        def bytes_wanted() -> int:
            """Bytes the size and free-space limits still ask for (0: none): too_big(planned)
            and too_full(planned) are `planned < bytes_wanted()`, computed once per batch."""
            wanted = 0
            if limits.max_size is not None:
                wanted = max(wanted, total - result.freed_bytes - limits.max_size)
            if free_triggered and limits.max_free is not None:
                wanted = max(wanted, limits.max_free - free_start - result.freed_bytes)
            return wanted

        old_before = now - limits.older_than if limits.older_than is not None else -1  # last used
        kept_old = 0  # entries older than --older-than that had to stay
        batch_size = 16  # entries per hold of the lock: adapted so that a hold lasts BATCH_SECONDS
        position, order = 0, scanned.order
        while position < len(order):
            # The next entries a limit asks for, counted as if each one were freed whole (a
            # batch never frees more than that, so it never goes past a size limit).
            batch: list[int] = []
            too_old: list[bool] = []
            planned = 0
            planned_refs: dict[int, int] = {}
            wanted = bytes_wanted()
            while position < len(order) and len(batch) < batch_size:
                i = order[position] & 0xFFFFFFFF
                old = (order[position] >> 32) < old_before
                if not (old or planned < wanted):
                    break  # sorted by last use: later entries are newer, and the size limits hold
                position += 1
                batch.append(i)
                too_old.append(old)
                key = scanned.nar_keys[i]
                refs = planned_refs.get(key, refs_left.get(key, 1))
                planned_refs[key] = refs - 1
                whole = scanned.has_nar[i] and refs == 1
                planned += scanned.sizes[i] + (scanned.nar_bytes[i] if whole else 0)
            if not batch:
                break
            started = time.monotonic()
            outcomes = delete_batch(batch)
            held = time.monotonic() - started
            count_freed(force=True)
            if held < BATCH_SECONDS / 2:
                batch_size = min(batch_size * 2, 4096)
            elif held > BATCH_SECONDS:
                batch_size = max(batch_size // 2, 1)
            for i, old, outcome in zip(batch, too_old, outcomes, strict=True):
                if outcome == _YOUNG:
                    result.kept_young += 1
                    kept_old += old
                    continue  # a newer entry may still have an old NAR
                if outcome == _CHANGED:
                    result.kept_changed += 1
                    continue
                result.deleted_entries += 1
                result.deleted.append(scanned.hash_part(i))
                result.freed_bytes += scanned.sizes[i]
                if outcome == _WHOLE:
                    result.deleted_nars += 1
                    result.freed_bytes += scanned.nar_bytes[i]
            if time.monotonic() - last_progress > PROGRESS_SECONDS:
                last_progress = time.monotonic()
                echo(
                    f"gc: {verb} {result.deleted_entries} entries so far, "
                    f"{human_size(result.freed_bytes)} freed"
                )
        count_freed(force=True)
    finally:
        lock.close()

    unmet = []
    if too_big():
        unmet.append(f"max-size {human_size(limits.max_size or 0)}")
    if too_full():
        unmet.append(f"max-free {human_size(limits.max_free or 0)}")
    if kept_old:
        unmet.append(f"older-than {format_duration(limits.older_than or 0)}")
    if unmet:
        young_orphans = sum(1 for _, _, age in orphans if age <= GRACE_SECONDS)
        result.shortfall = f"{' and '.join(unmet)} not met: " + _reasons(
            result, young_orphans if (too_big() or too_full()) else 0
        )
    extras = extras_gc.collect(store, result.deleted, GRACE_SECONDS, dry_run=dry_run, now=now)
    if extras.deleted:
        echo(
            f"gc: {verb} {extras.deleted} listings, logs, debuginfo and build traces whose path is "
            f"gone ({human_size(extras.freed_bytes)})"
        )
    result.store_bytes = total - result.freed_bytes
    result.free_bytes = _free_bytes(store.root) if not dry_run else free_start + result.freed_bytes
    freed = "would free" if dry_run else "freed"
    now_word = "would be" if dry_run else "now"
    echo(
        f"gc: {verb} {result.deleted_entries} narinfos and {result.deleted_nars} NAR files, "
        f"{freed} {human_size(result.freed_bytes)} ({result.freed_bytes} bytes); "
        f"store {now_word} {human_size(result.store_bytes)}, {human_size(result.free_bytes)} free"
        + (f"; {result.shortfall}" if result.shortfall else "")
    )
    if not dry_run:
        _record(store, result)
    return result


def _reasons(result: Result, young_orphans: int) -> str:
    """Why limits are not met: what had to stay, and what nothing could free."""

    def count(n: int, one: str, many: str) -> str:
        return f"{n} {one if n == 1 else many}"

    grace = format_duration(GRACE_SECONDS)
    reasons = []
    if result.kept_young:
        reasons.append(
            f"{count(result.kept_young, 'entry has a NAR', 'entries have a NAR')} younger than the "
            f"grace period of {grace}, kept whole"
        )
    if young_orphans:
        reasons.append(
            f"{count(young_orphans, 'NAR file is', 'NAR files are')} still waiting for a narinfo "
            f"(younger than {grace})"
        )
    if result.kept_changed:
        reasons.append(f"{count(result.kept_changed, 'entry was', 'entries were')} pushed again during gc")
    return ", ".join(reasons) or "nothing else in the store can be deleted"


def _record(store: Store, result: Result) -> None:
    """Add this run to gc-stats.json (read by the server's /metrics)."""
    try:
        stats = json.loads(store.gc_stats_file.read_text())
    except (FileNotFoundError, ValueError):
        stats = {}
    stats["runs"] = stats.get("runs", 0) + 1
    stats["freed_bytes"] = stats.get("freed_bytes", 0) + result.freed_bytes
    stats["deleted_entries"] = stats.get("deleted_entries", 0) + result.deleted_entries
    stats["last_run"] = time.time()
    tmp = store.gc_stats_file.with_name(f".gc-stats.{os.getpid()}")
    tmp.write_text(json.dumps(stats))
    os.replace(tmp, store.gc_stats_file)

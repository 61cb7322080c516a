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
import contextlib
import fcntl
import itertools
import json
import os
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nixcache.server import config as configmod
from nixcache.server.extras import gc as extras_gc
from nixcache.server.store import Store, read_quietly
from nixcache.server.units import format_duration, human_size, parse_duration, parse_size
from nixcache.server.usage import StoreUsage

GRACE_SECONDS = 3600  # a NAR this young may be waiting for a narinfo: kept, with every entry naming it
PROGRESS_SECONDS = 2.0
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
        fields = _fields(read_quietly(path, 65536))
    except OSError:
        return None
    url = fields.get(b"URL")
    try:
        return url[len(b"nar/") :].decode() if url and url.startswith(b"nar/") else None
    except UnicodeDecodeError:
        return None


def _fields(data: bytes) -> dict[bytes, bytes]:
    """The `Key: value` lines of a narinfo that gc reads (a plain split: no validation, which
    the server did when it stored the file)."""
    fields = {}
    for line in data.split(b"\n"):
        key, sep, value = line.partition(b": ")
        if sep and key in _WANTED:
            fields[key] = value.strip()
    return fields


_WANTED = frozenset((b"URL", b"FileSize", b"NarHash", b"NarSize"))


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class _Scan:
    """Every narinfo of the store, from one pass of os.scandir (one stat and one read each),
    held in flat arrays (about 90 bytes per entry, so a store of millions fits a small process):
    entry i is `names[32*i:32*i+32]`, its NAR is known by `hash()` of its file name."""

    def __init__(self, store: Store):
        self.names = bytearray()  # hash parts, 32 bytes each
        self.sizes = array("q")  # narinfo bytes
        self.nar_bytes = array("q")  # NAR plus meta bytes, as the narinfo gives them
        self.mtimes = array("q")  # st_mtime_ns: a push replaces the file, changing it
        self.nar_keys = array("q")  # hash() of the NAR file name (0 and has_nar[i] == 0: none)
        self.has_nar = bytearray()
        order = array("Q")  # (last used, seconds) << 32 | index: sorted, least recently served first
        narinfo_dir = os.fsencode(store.narinfo_dir)
        with os.scandir(narinfo_dir) as entries:
            for entry in entries:
                name = entry.name
                if len(name) != 40 or not name.endswith(b".narinfo"):
                    continue
                try:
                    st = entry.stat()
                    fields = _fields(read_quietly(entry.path, 65536))  # type: ignore[arg-type]
                except FileNotFoundError:
                    continue
                url = fields.get(b"URL", b"")
                nar_name = url[4:] if url.startswith(b"nar/") else b""
                self.names += name[:32]
                self.sizes.append(st.st_size)
                self.mtimes.append(st.st_mtime_ns)
                self.nar_keys.append(hash(nar_name) if nar_name else 0)
                self.has_nar.append(1 if nar_name else 0)
                self.nar_bytes.append(_nar_bytes(store, nar_name, fields) if nar_name else 0)
                last_used = max(0, min(int(max(st.st_atime, st.st_mtime)), 0xFFFFFFFF))
                order.append(last_used << 32 | (len(self.sizes) - 1))
        self.order = array("Q", sorted(order))
        del order
        # NARs named by more than one narinfo are rare: counted in a small dict, the rest are 1.
        refs = sorted(self.nar_keys[i] for i in range(len(self.sizes)) if self.has_nar[i])
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

    def refs(self, key: int) -> int:
        return self.shared.get(key, 1)

    def names_a_nar(self, key: int) -> bool:
        found = bisect.bisect_left(self.referenced, key)
        return found < len(self.referenced) and self.referenced[found] == key


def _nar_bytes(store: Store, nar_name: bytes, fields: dict[bytes, bytes]) -> int:
    """Bytes of a narinfo's NAR and its meta, from the narinfo (the server checked FileSize
    against the file, and the meta holds "<NarHash> <NarSize>\n"); a stat only without FileSize."""
    meta = len(fields.get(b"NarHash", b"")) + len(fields.get(b"NarSize", b"")) + 2
    try:
        return int(fields[b"FileSize"]) + meta
    except (KeyError, ValueError):
        try:
            return os.stat(os.path.join(os.fsencode(store.nar_dir), nar_name)).st_size + meta
        except (FileNotFoundError, ValueError):
            return 0


class _Lock:
    """The exclusive gc lock, held over a batch of deletions (one flock per batch, not per
    entry) and never longer than BATCH_SECONDS: the server waits for it on its event loop."""

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


# What deleting one entry did.
_YOUNG = "young"  # nothing: its NAR is in the grace period
_CHANGED = "changed"  # nothing: the narinfo was pushed again or removed since the scan
_NARINFO = "narinfo"  # the narinfo (its NAR stays: another kept narinfo names it, or it was gone)
_WHOLE = "whole"  # the narinfo, then its NAR and the NAR's meta


def _age(path: Path | str | bytes, now: float) -> float | None:
    """Seconds since `path` was modified; None when it is gone."""
    try:
        return now - os.stat(path).st_mtime
    except FileNotFoundError:
        return None


def run(limits: Limits, *, dry_run: bool = False, echo: Callable[[str], object] = print) -> Result:
    """Collect; returns what was (or, with dry_run, would be) deleted, and prints one summary line.

    Entries go least recently served first while a limit asks for them, each one whole or not at
    all. When a limit is still not met at the end, the summary line ends with
    "; <limits> not met: <why>" (e.g. "12 entries have a NAR younger than the grace period of 1h")
    and gc still succeeds: what it could not free is intact. A dry run walks the same plan on
    what it scanned, so it prints what the real run does unless pushes come in between.
    """
    store = Store(limits.store)
    now = time.time()
    scanned = _Scan(store)
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
    nar_dir = os.fsencode(store.nar_dir)
    present = []  # hash() of every NAR file name, for the meta files below
    orphans: list[tuple[bytes, int, float]] = []  # name, bytes (with meta), age
    with os.scandir(nar_dir) as nars:
        for nar in nars:
            key = hash(nar.name)
            present.append(key)
            if not scanned.names_a_nar(key):
                try:
                    st = nar.stat()
                except FileNotFoundError:
                    continue
                meta = os.path.join(os.fsencode(store.meta_dir), nar.name)
                try:
                    meta_size = os.stat(meta).st_size
                except FileNotFoundError:
                    meta_size = 0
                orphans.append((nar.name, st.st_size + meta_size, now - st.st_mtime))
    present.sort()
    nar_present = array("q", present)
    del present
    total = sum(scanned.sizes) + sum(size for _, size, _ in orphans)
    counted: set[int] = set()
    for i in range(len(scanned)):
        key = scanned.nar_keys[i]
        if scanned.has_nar[i] and (key not in scanned.shared or key not in counted):
            found = bisect.bisect_left(nar_present, key)
            if found < len(nar_present) and nar_present[found] == key:  # a broken entry frees none
                total += scanned.nar_bytes[i]
            if key in scanned.shared:
                counted.add(key)
    free_start = _free_bytes(store.root)

    def delete_orphan(name: bytes, size: int) -> int:
        """Delete a NAR no narinfo names, and its meta, unless it was touched recently (a dry
        run only counts it); bytes freed."""
        if not dry_run:
            lock.hold()
            path = os.path.join(nar_dir, name)
            age = _age(path, time.time())
            if age is None or age <= GRACE_SECONDS:
                return 0  # a narinfo naming it was just uploaded, or a pusher HEADed it
            nar_size = os.stat(path).st_size
            os.unlink(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(os.fsencode(store.meta_dir), name))
            pending.nar_files += 1
            pending.nar_bytes += nar_size
            count_freed()
        result.deleted_nars += 1
        return size

    def in_grace(i: int) -> bool:
        """A dry run's prediction: whether entry i's NAR is too young to delete (one stat)."""
        if not scanned.has_nar[i]:
            return False
        name = nar_file_of(store.narinfo_path(scanned.hash_part(i)))
        age = _age(store.nar_path(name), now) if name else None
        return age is not None and age <= GRACE_SECONDS

    def delete_entry(i: int, with_nar: bool) -> str:
        """Delete the narinfo scanned as entry i and, `with_nar`, the NAR it names: one step
        under the exclusive lock, narinfo first, nothing at all when the NAR is in the grace
        period or the narinfo changed since the scan. One of _YOUNG _CHANGED _NARINFO _WHOLE."""
        if dry_run:
            if in_grace(i):
                return _YOUNG
            return _WHOLE if with_nar else _NARINFO
        hash_part = scanned.hash_part(i)
        narinfo_path = store.narinfo_path(hash_part)
        lock.hold()
        try:
            st = os.stat(narinfo_path)
            nar_name = nar_file_of(narinfo_path) if scanned.has_nar[i] else None
        except FileNotFoundError:
            return _CHANGED
        if st.st_mtime_ns != scanned.mtimes[i] or st.st_size != scanned.sizes[i]:
            return _CHANGED
        nar_path = None
        if scanned.has_nar[i]:
            if nar_name is None or hash(nar_name.encode()) != scanned.nar_keys[i]:
                return _CHANGED
            nar_path = store.nar_path(nar_name)
            age = _age(nar_path, time.time())
            if age is None:
                nar_path = None  # a broken entry: only its narinfo is left to delete
            elif age <= GRACE_SECONDS:
                return _YOUNG  # a narinfo naming it was just uploaded, or a pusher HEADed it
        store.delete_narinfo(hash_part)  # its signed text first: never served alone
        pending.entries += 1
        pending.narinfo_bytes += st.st_size
        if not (with_nar and nar_path is not None):
            return _NARINFO
        nar_size = os.stat(nar_path).st_size
        os.unlink(nar_path)
        pending.nar_files += 1
        pending.nar_bytes += nar_size
        with contextlib.suppress(FileNotFoundError):
            (store.meta_dir / nar_path.name).unlink()
        return _WHOLE

    try:
        for name, size, age in orphans:
            if age > GRACE_SECONDS:
                result.freed_bytes += delete_orphan(name, size)
        count_freed(force=True)
        # Meta files whose NAR is gone (an upload killed between the two renames).
        if not dry_run:
            meta_dir = os.fsencode(store.meta_dir)
            with os.scandir(meta_dir) as metas:
                for meta in metas:
                    found = bisect.bisect_left(nar_present, hash(meta.name))
                    if found < len(nar_present) and nar_present[found] == hash(meta.name):
                        continue
                    age = _age(meta.path, now)
                    if age is not None and age > GRACE_SECONDS:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(meta.path)
        del nar_present

        free_triggered = limits.min_free is not None and free_start < limits.min_free

        def too_big() -> bool:
            return limits.max_size is not None and total - result.freed_bytes > limits.max_size

        def too_full() -> bool:
            return (
                free_triggered
                and limits.max_free is not None
                and free_start + result.freed_bytes < limits.max_free
            )

        kept_old = 0  # entries older than --older-than that had to stay
        refs_left = dict(scanned.shared)  # shared NARs: narinfos still naming them
        for packed in scanned.order:
            i = packed & 0xFFFFFFFF
            last_used = packed >> 32
            too_old = limits.older_than is not None and last_used < now - limits.older_than
            if not (too_old or too_big() or too_full()):
                break  # sorted by last use: later entries are newer, and the size limits hold
            key = scanned.nar_keys[i]
            has_nar = scanned.has_nar[i]
            last_ref = has_nar and refs_left.get(key, 1) == 1
            outcome = delete_entry(i, with_nar=bool(last_ref))
            count_freed()
            if outcome == _YOUNG:
                result.kept_young += 1
                kept_old += too_old
                continue  # a newer entry may still have an old NAR
            if outcome == _CHANGED:
                result.kept_changed += 1
                continue
            result.deleted_entries += 1
            result.deleted.append(scanned.hash_part(i))
            result.freed_bytes += scanned.sizes[i]
            if key in refs_left:
                refs_left[key] -= 1
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

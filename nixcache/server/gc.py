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

import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nixcache.server import config as configmod
from nixcache.server.extras import gc as extras_gc
from nixcache.server.store import Store, read_quietly
from nixcache.server.units import format_duration, human_size, parse_duration, parse_size

GRACE_SECONDS = 3600  # a NAR this young may be waiting for a narinfo: kept, with every entry naming it
PROGRESS_SECONDS = 2.0


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
class _Entry:
    hash_part: str
    nar_file: str | None
    size: int
    last_used: float
    identity: tuple[int, int]  # (inode, mtime_ns): a push replaces the file, changing both


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
        for line in read_quietly(path, 65536).split(b"\n"):
            if line.startswith(b"URL: nar/"):
                return line[len(b"URL: nar/") :].decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _scan_narinfos(store: Store) -> list[_Entry]:
    entries = []
    for path in store.narinfo_dir.iterdir():
        if not path.name.endswith(".narinfo"):
            continue
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        entries.append(
            _Entry(
                path.name[:-8],
                nar_file_of(path),
                st.st_size,
                max(st.st_atime, st.st_mtime),
                (st.st_ino, st.st_mtime_ns),
            )
        )
    return entries


def _scan_nars(store: Store) -> tuple[dict[str, int], dict[str, float]]:
    """Bytes (NAR plus meta) and mtime of every NAR file."""
    sizes: dict[str, int] = {}
    mtimes: dict[str, float] = {}
    for path in store.nar_dir.iterdir():
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        sizes[path.name] = st.st_size + _size(store.meta_dir / path.name)
        mtimes[path.name] = st.st_mtime
    return sizes, mtimes


# What deleting one entry did.
_YOUNG = "young"  # nothing: its NAR is in the grace period
_CHANGED = "changed"  # nothing: the narinfo was pushed again or removed since the scan
_NARINFO = "narinfo"  # the narinfo (its NAR stays: another kept narinfo names it, or it was gone)
_WHOLE = "whole"  # the narinfo, then its NAR and the NAR's meta


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
    entries = _scan_narinfos(store)
    refs = Counter(entry.nar_file for entry in entries if entry.nar_file)
    nar_sizes, nar_mtimes = _scan_nars(store)
    total = sum(e.size for e in entries) + sum(nar_sizes.values())
    free_start = _free_bytes(store.root)
    result = Result()
    verb = "would delete" if dry_run else "deleted"
    last_progress = time.monotonic()

    def in_grace(name: str) -> bool:
        """Whether NAR `name`, as scanned, is too young to delete (a dry run's prediction)."""
        return name in nar_mtimes and now - nar_mtimes[name] <= GRACE_SECONDS

    def delete_orphan(name: str) -> int:
        """Delete a NAR no narinfo names, and its meta, unless it was touched recently (a dry
        run only counts it); bytes freed."""
        if dry_run:
            if in_grace(name):
                return 0
        else:
            with store.gc_lock(exclusive=True):
                try:
                    if time.time() - store.nar_path(name).stat().st_mtime <= GRACE_SECONDS:
                        return 0  # a narinfo naming it was just uploaded, or a pusher HEADed it
                    store.nar_path(name).unlink()
                except FileNotFoundError:
                    return 0
                with contextlib.suppress(FileNotFoundError):
                    (store.meta_dir / name).unlink()
        result.deleted_nars += 1
        return nar_sizes.get(name, 0)

    def delete_entry(entry: _Entry, with_nar: bool) -> str:
        """Delete the narinfo scanned as `entry` and, `with_nar`, the NAR it names: one step
        under the exclusive lock, narinfo first, nothing at all when the NAR is in the grace
        period or the narinfo changed since the scan. One of _YOUNG _CHANGED _NARINFO _WHOLE."""
        if dry_run:
            if entry.nar_file and in_grace(entry.nar_file):
                return _YOUNG
            return _WHOLE if with_nar else _NARINFO
        narinfo_path = store.narinfo_path(entry.hash_part)
        nar_path = store.nar_path(entry.nar_file) if entry.nar_file else None
        with store.gc_lock(exclusive=True):
            try:
                st = narinfo_path.stat()
            except FileNotFoundError:
                return _CHANGED
            if (st.st_ino, st.st_mtime_ns) != entry.identity:
                return _CHANGED
            if nar_path is not None:
                try:
                    if time.time() - nar_path.stat().st_mtime <= GRACE_SECONDS:
                        return _YOUNG  # a narinfo naming it was just uploaded, or a pusher HEADed it
                except FileNotFoundError:
                    nar_path = None  # a broken entry: only its narinfo is left to delete
            store.delete_narinfo(entry.hash_part)  # its signed text first
            if not (with_nar and nar_path is not None):
                return _NARINFO
            nar_path.unlink()
            with contextlib.suppress(FileNotFoundError):
                (store.meta_dir / nar_path.name).unlink()
        return _WHOLE

    # NARs no narinfo names: abandoned pushes. Old ones go whatever the limits.
    for name in list(nar_sizes):
        if name not in refs and now - nar_mtimes[name] > GRACE_SECONDS:
            result.freed_bytes += delete_orphan(name)
    # Meta files whose NAR is gone (an upload killed between the two renames).
    if not dry_run:
        for path in store.meta_dir.iterdir():
            if path.name not in nar_sizes and now - _mtime(path) > GRACE_SECONDS:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    free_triggered = limits.min_free is not None and free_start < limits.min_free

    def too_big() -> bool:
        return limits.max_size is not None and total - result.freed_bytes > limits.max_size

    def too_full() -> bool:
        return (
            free_triggered
            and limits.max_free is not None
            and free_start + result.freed_bytes < limits.max_free
        )

    entries.sort(key=lambda e: e.last_used)
    kept_old = 0  # entries older than --older-than that had to stay
    for entry in entries:
        too_old = limits.older_than is not None and entry.last_used < now - limits.older_than
        if not (too_old or too_big() or too_full()):
            break  # sorted by last use: later entries are newer, and the size limits hold
        nar_file = entry.nar_file or ""
        outcome = delete_entry(entry, with_nar=nar_file in nar_sizes and refs[nar_file] == 1)
        if outcome == _YOUNG:
            result.kept_young += 1
            kept_old += too_old
            continue  # a newer entry may still have an old NAR
        if outcome == _CHANGED:
            result.kept_changed += 1
            continue
        result.deleted_entries += 1
        result.deleted.append(entry.hash_part)
        result.freed_bytes += entry.size
        if entry.nar_file:
            refs[entry.nar_file] -= 1
        if outcome == _WHOLE:
            result.deleted_nars += 1
            result.freed_bytes += nar_sizes[nar_file]
        if time.monotonic() - last_progress > PROGRESS_SECONDS:
            last_progress = time.monotonic()
            echo(
                f"gc: {verb} {result.deleted_entries} entries so far, {human_size(result.freed_bytes)} freed"
            )

    unmet = []
    if too_big():
        unmet.append(f"max-size {human_size(limits.max_size or 0)}")
    if too_full():
        unmet.append(f"max-free {human_size(limits.max_free or 0)}")
    if kept_old:
        unmet.append(f"older-than {format_duration(limits.older_than or 0)}")
    if unmet:
        young_orphans = sum(1 for name in nar_sizes if name not in refs and in_grace(name))
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


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


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

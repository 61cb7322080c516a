"""`nixcache gc`: delete least recently served entries until the size and free-space limits hold.

Safe while the server runs, in another process:
- a narinfo is deleted before the NAR it names, and a NAR only when no kept narinfo names it,
  so no narinfo ever points at a missing NAR;
- the server refreshes a NAR's mtime when a narinfo naming it is uploaded (and on HEAD, which
  pushers send first), and does so under a shared lock on `gc.lock`; gc re-checks that mtime
  under the exclusive lock just before unlinking, and spares NARs touched within GRACE_SECONDS.
  An upload racing a collection therefore never ends up with a narinfo whose NAR is gone.
"Last served" is the narinfo's atime (set explicitly by the server, see store.py) or its
upload time, whichever is later.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nixcache.server import config as configmod
from nixcache.server.store import Store
from nixcache.server.units import human_size, parse_duration, parse_size

GRACE_SECONDS = 3600  # an unreferenced NAR younger than this may be waiting for its narinfo
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


def _nar_file_of(path: Path) -> str | None:
    """The NAR file a narinfo names, read without touching its atime (our last-served mark)."""
    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
        except PermissionError:  # O_NOATIME needs the file's owner (or root)
            fd = os.open(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as handle:
            for line in handle.read(65536).split(b"\n"):
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


def run(limits: Limits, *, dry_run: bool = False, echo: Callable[[str], object] = print) -> Result:
    """Collect; returns what was (or, with dry_run, would be) deleted."""
    store = Store(limits.store)
    now = time.time()
    entries: list[_Entry] = []
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
                _nar_file_of(path),
                st.st_size,
                max(st.st_atime, st.st_mtime),
                (st.st_ino, st.st_mtime_ns),
            )
        )
    refs: dict[str, int] = {}
    for entry in entries:
        if entry.nar_file:
            refs[entry.nar_file] = refs.get(entry.nar_file, 0) + 1
    nar_sizes: dict[str, int] = {}
    nar_mtimes: dict[str, float] = {}
    for path in store.nar_dir.iterdir():
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        nar_sizes[path.name] = st.st_size + _size(store.meta_dir / path.name)
        nar_mtimes[path.name] = st.st_mtime
    total = sum(e.size for e in entries) + sum(nar_sizes.values())
    free_start = _free_bytes(store.root)
    result = Result()
    verb = "would delete" if dry_run else "deleted"
    last_progress = time.monotonic()

    def delete_nar(name: str) -> int:
        """Delete an unreferenced NAR and its meta unless it was touched recently (a dry run
        only counts it); bytes freed."""
        if dry_run:
            if now - nar_mtimes.get(name, 0) <= GRACE_SECONDS:
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

    def delete_narinfo(entry: _Entry) -> bool:
        """Delete the narinfo scanned as `entry`, unless it was replaced (pushed again) since."""
        path = store.narinfo_path(entry.hash_part)
        with store.gc_lock(exclusive=True):
            try:
                st = path.stat()
                if (st.st_ino, st.st_mtime_ns) != entry.identity:
                    return False
                path.unlink()
            except FileNotFoundError:
                return False
        return True

    # NARs no narinfo names: abandoned pushes. Old ones go whatever the limits.
    for name in list(nar_sizes):
        if name not in refs and now - nar_mtimes[name] > GRACE_SECONDS:
            result.freed_bytes += delete_nar(name)
    # Meta files whose NAR is gone (an upload killed between the two renames).
    if not dry_run:
        for path in store.meta_dir.iterdir():
            if path.name not in nar_sizes and now - _mtime(path) > GRACE_SECONDS:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    entries.sort(key=lambda e: e.last_used)
    free_triggered = limits.min_free is not None and free_start < limits.min_free
    for entry in entries:
        size_now = total - result.freed_bytes
        free_now = free_start + result.freed_bytes
        too_old = limits.older_than is not None and entry.last_used < now - limits.older_than
        too_big = limits.max_size is not None and size_now > limits.max_size
        too_full = free_triggered and limits.max_free is not None and free_now < limits.max_free
        if not (too_old or too_big or too_full):
            break  # sorted by last use: later entries are newer, and the size limits hold
        if not dry_run and not delete_narinfo(entry):
            continue
        result.deleted_entries += 1
        result.deleted.append(entry.hash_part)
        result.freed_bytes += entry.size
        if entry.nar_file:
            refs[entry.nar_file] -= 1
            if refs[entry.nar_file] == 0 and entry.nar_file in nar_sizes:
                result.freed_bytes += delete_nar(entry.nar_file)
        if time.monotonic() - last_progress > PROGRESS_SECONDS:
            last_progress = time.monotonic()
            echo(
                f"gc: {verb} {result.deleted_entries} entries so far, {human_size(result.freed_bytes)} freed"
            )

    result.store_bytes = total - result.freed_bytes
    result.free_bytes = _free_bytes(store.root) if not dry_run else free_start + result.freed_bytes
    echo(
        f"gc: {verb} {result.deleted_entries} narinfos and {result.deleted_nars} NAR files, "
        f"freed {human_size(result.freed_bytes)} ({result.freed_bytes} bytes); "
        f"store now {human_size(result.store_bytes)}, {human_size(result.free_bytes)} free"
    )
    if not dry_run:
        _record(store, result)
    return result


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

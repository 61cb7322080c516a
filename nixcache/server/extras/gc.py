"""What `nixcache gc` does with the extra files: each goes with the path it describes.

    <hash>.ls                      with narinfo/<hash>.narinfo (deleted in the same run)
    log/<drv>                      while a narinfo names <drv> as its Deriver
    debuginfo/<build-id>           while a narinfo names the NAR its "archive" names
    build-trace-v2/<drv>/<o>.doi   while the narinfo of its outPath is here
    realisations/<id>.doi          while the narinfo of its outPath is here

A file whose path is not here is deleted once it is older than the grace period (gc.py's
GRACE_SECONDS): Nix uploads listings and debuginfo before the NAR and narinfo, and logs and
build traces may come before the paths they describe, so a young file may be a push in flight.
A listing whose narinfo this very run deleted goes at once. These files are small next to
their NARs and are not counted against max-size (docs/architecture.md says so).

Logs and debuginfo need each narinfo's Deriver and URL: the narinfos are read once more, only
when there are logs or debuginfo files.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nixcache.server.extras import buildtrace, debuginfo
from nixcache.server.store import Store, read_quietly


@dataclass
class ExtrasResult:
    deleted: int = 0
    freed_bytes: int = 0


def _files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [path for path in directory.rglob("*") if path.is_file()]


def _named_by(paths: Iterable[Path]) -> set[str]:
    """The Deriver and NAR file names the narinfos at `paths` name."""
    named = set()
    for path in paths:
        try:
            for line in read_quietly(path, 1 << 20).split(b"\n"):
                for field in (b"Deriver: ", b"URL: nar/"):
                    if line.startswith(field):
                        named.add(line[len(field) :].decode().strip())
        except (OSError, UnicodeDecodeError):
            continue
    return named


def collect(
    store: Store, deleted: Iterable[str], grace: float, *, dry_run: bool = False, now: float | None = None
) -> ExtrasResult:
    """Delete (or, with dry_run, count) extra files whose path is gone; `deleted`: the hash
    parts whose narinfos this run deleted (or would delete)."""
    now = time.time() if now is None else now
    result = ExtrasResult()
    root = store.root
    listings, logs, indexes = _files(root / "ls"), _files(root / "log"), _files(root / "debuginfo")
    traces = {directory: _files(root / directory) for directory in ("build-trace-v2", "realisations")}
    if not (listings or logs or indexes or any(traces.values())):
        return result  # nothing to look at: no list of the narinfos (a million names, say)
    gone = set(deleted)
    names = os.listdir(store.narinfo_dir)
    kept = {name[: -len(".narinfo")] for name in names if name.endswith(".narinfo")} - gone
    del names

    def drop(path: Path, immediately: bool = False) -> None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return
        if not immediately and now - st.st_mtime <= grace:
            return  # maybe a push in flight: its path may still come
        if not dry_run:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        result.deleted += 1
        result.freed_bytes += st.st_size

    for path in listings:
        hash_part = path.name[: -len(".ls")]
        if hash_part not in kept:
            drop(path, immediately=hash_part in gone)
    named = _named_by(store.narinfo_path(h) for h in kept) if logs or indexes else set()
    for path in indexes:
        if debuginfo.archive_of(path.read_bytes()) not in named:
            drop(path)
    for path in logs:
        if path.name not in named:
            drop(path)
    for directory in ("build-trace-v2", "realisations"):
        for path in traces[directory]:
            out_path = buildtrace.out_path_of(path.read_bytes())
            if out_path is None or out_path[:32] not in kept:
                drop(path)
        if not dry_run and (root / directory).is_dir():
            for sub in (root / directory).iterdir():
                with contextlib.suppress(OSError):  # not empty, or not a directory: kept
                    sub.rmdir()
    return result

"""`nixcache gc --origin`: retention by age and total size on the origin bucket.

Run by one designated host per environment (S3 offers no lock to share), with the guarantees of
the local gc (nixcache/server/gc.py):
- a narinfo is deleted before the NAR it names, and a NAR only when no kept narinfo names it, so
  no narinfo in the bucket points at a missing NAR;
- an unreferenced NAR younger than the grace period (origin.gc_grace, 1 h) is spared: it may be
  a push whose narinfo is on the way. Pushers upload a NAR again when the origin's copy is older
  than half the grace period (writethrough.py), so a NAR a new narinfo relies on is young when
  that narinfo lands, and pushers look at the NAR once more after their narinfo is stored;
- just before deleting, each object is looked at again: a narinfo pushed again since the scan
  (newer mtime) and a NAR uploaded again since the scan are kept.
A narinfo's listing (`<hash>.ls`) is deleted with it. Logs, debuginfo and build traces in the
bucket are not collected (they are small; Nix itself has no GC rule for build traces yet).
S3 has no access times: "age" is the time of the last upload of the narinfo.
What S3 cannot give: an atomic "delete unless changed". Between gc's last look at a NAR and its
delete a push may upload that NAR again and store a narinfo naming it; the pusher's look after
its narinfo then uploads the NAR once more. Only a push whose every request (four) falls in the
few milliseconds between gc's look and its delete could leave a narinfo without its NAR.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from nixcache.server.units import human_size

GRACE_SECONDS = 3600  # as the local gc: an unreferenced NAR younger than this may await its narinfo


class OriginGcError(ValueError):
    """The collection cannot run as asked; the message says what to change."""


@dataclass
class OriginResult:
    deleted_entries: int = 0
    deleted_nars: int = 0
    freed_bytes: int = 0
    bucket_bytes: int = 0
    deleted: list[str] = field(default_factory=list)


@dataclass
class _Entry:
    hash_part: str
    nar_file: str | None
    size: int
    modified: datetime


def _nar_file_of(data: bytes | None) -> str | None:
    for line in (data or b"").split(b"\n"):
        if line.startswith(b"URL: nar/"):
            return line[len(b"URL: nar/") :].decode(errors="replace").strip()
    return None


def _age(modified: datetime, now: float) -> float:
    if modified.tzinfo is None:
        modified = modified.replace(tzinfo=UTC)
    return now - modified.timestamp()


def run(
    origin,  # nixcache.server.tiers.origin.Origin
    *,
    max_size: int | None = None,
    older_than: float | None = None,
    dry_run: bool = False,
    echo: Callable[[str], object] = print,
    grace: float = GRACE_SECONDS,
    clock: Callable[[], float] = time.time,
) -> OriginResult:
    if max_size is None and older_than is None:
        raise OriginGcError("no limit given: pass --max-size or --older-than (or origin.gc_* in the config)")
    now = clock()
    entries = []
    for found in origin.list(""):
        if found.key.endswith(".narinfo") and "/" not in found.key:
            nar_file = _nar_file_of(origin.get_bytes(found.key))
            entries.append(_Entry(found.key[: -len(".narinfo")], nar_file, found.size, found.modified))
    nars = {found.key[len("nar/") :]: found for found in origin.list("nar/", recursive=True)}
    refs: dict[str, int] = {}
    for entry in entries:
        if entry.nar_file:
            refs[entry.nar_file] = refs.get(entry.nar_file, 0) + 1
    total = sum(e.size for e in entries) + sum(n.size for n in nars.values())
    result = OriginResult()
    verb = "would delete" if dry_run else "deleted"

    def delete_nar(name: str) -> int:
        scanned = nars[name]
        if dry_run:
            if _age(scanned.modified, now) <= grace:
                return 0
        else:
            current = origin.stat(f"nar/{name}")
            if current is None or _age(current.modified, clock()) <= grace:
                return 0  # gone already, or uploaded again by a push that relies on it
            origin.delete(f"nar/{name}")
        result.deleted_nars += 1
        return scanned.size

    def delete_narinfo(entry: _Entry) -> bool:
        if dry_run:
            return True
        current = origin.stat(f"{entry.hash_part}.narinfo")
        if current is None or current.modified != entry.modified:
            return False  # pushed again since the scan: it is new
        origin.delete(f"{entry.hash_part}.narinfo")
        origin.delete(f"{entry.hash_part}.ls")  # its listing goes with it (absent: S3 says done)
        return True

    # NARs no narinfo names (abandoned pushes): old ones go whatever the limits.
    for name, found in nars.items():
        if name not in refs and _age(found.modified, now) > grace:
            result.freed_bytes += delete_nar(name)

    entries.sort(key=lambda e: e.modified)
    for entry in entries:
        too_old = older_than is not None and _age(entry.modified, now) > older_than
        too_big = max_size is not None and total - result.freed_bytes > max_size
        if not (too_old or too_big):
            break  # sorted by age: the rest are newer, and the size limit holds
        if not delete_narinfo(entry):
            continue
        result.deleted_entries += 1
        result.deleted.append(entry.hash_part)
        result.freed_bytes += entry.size
        if entry.nar_file:
            refs[entry.nar_file] -= 1
            if refs[entry.nar_file] == 0 and entry.nar_file in nars:
                result.freed_bytes += delete_nar(entry.nar_file)

    result.bucket_bytes = total - result.freed_bytes
    echo(
        f"gc --origin: {verb} {result.deleted_entries} narinfos and {result.deleted_nars} NAR files "
        f"in {origin.where}, freed {human_size(result.freed_bytes)} ({result.freed_bytes} bytes); "
        f"bucket now {human_size(result.bucket_bytes)}"
    )
    return result

"""`nixcache verify`: re-hash the push store and move damaged entries aside (quarantine).

What is checked, for the store layout of nixcache.server.store (pulled-through entries of the
tiers are stored the same way, so they are checked alike):

- every NAR file under nar/ hashes to its name (the FileHash of every narinfo naming it: a
  narinfo's FileHash must equal the name, narinfo.parse checks that);
- its nar-meta (NarHash and NarSize computed when it was uploaded) is there and readable;
- every narinfo parses, and its FileSize, NarHash and NarSize agree with its NAR file and meta;
- every narinfo's NAR is there (a narinfo without its NAR is a 404 in the middle of a download);
- every signed/<hash>.narinfo (what the server and an nginx front serve) is its narinfo signed by
  this cache's keys (those of signed/KEYS, or of signed/KEYS.next during a re-signing), and its
  narinfo is there; one that is not is deleted (derived data, not quarantined: the server signs
  the narinfo again on its next request), under the exclusive gc lock, after the checks below;
- with `nar_hash=True`, the decompressed content of every NAR is hashed again and compared with
  its meta (NarHash/NarSize). Without it, an uncompressed NAR is still checked in full (its file
  hash is its NarHash); a compressed one is covered by FileHash: the meta was computed from these
  very bytes when they were uploaded, so if they hash to their name, their content still has the
  recorded NarHash. `--nar-hash` costs the decompression (see docs/benchmarks.md) and finds what
  only a bug at upload time could have let in.

- every listing under ls/ (nixcache.server.extras.listing) parses; one whose narinfo is here
  must describe its NAR: for an uncompressed NAR the listing is computed from the NAR's framing
  (file contents skipped, so it costs little more than the hash already read) and compared; for
  a compressed one only its file sizes are checked against NarSize. A damaged listing is moved
  to ``quarantine/<time>/ls/`` on its own (its path stays served; push it again to restore it).

A damaged entry is quarantined: under the exclusive gc lock (the one `nixcache gc` deletes
under and uploads publish under, see store.py), its narinfos, then its meta and NAR file are
renamed into ``<store>/quarantine/<UTC time>/{narinfo,nar-meta,nar}/`` with one line per entry
in ``REASONS`` there. Narinfos go before their NAR, as in gc, so no reader ever finds a narinfo
whose NAR is gone. Clients then get 404 for the path (or, with an origin, the origin's copy), and
a push uploads it again: the NAR is absent, so `HEAD nar/…` is 404 and the upload is verified as
any other. The quarantine is on the store's filesystem (rename(2), nothing copied), never read by
the server and never emptied by nixcache: `rm -r <store>/quarantine/<time>` once looked at.

Each run that is not a dry run writes verify-stats.json (the last run's counts and totals); the
server reads it at scrape time for /metrics, as it does gc-stats.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nixcache.atomicfile import write_atomically
from nixcache.backup.progress import Throttle
from nixcache.server import base32, nar, narinfo, signed
from nixcache.server.extras import ExtraError
from nixcache.server.extras import listing as listings
from nixcache.server.gc import nar_file_of
from nixcache.server.store import Store, read_quietly
from nixcache.server.units import human_size

PROGRESS_SECONDS = 10.0
STATS_FILE = "verify-stats.json"
QUARANTINE_DIR = "quarantine"


class VerifyError(Exception):
    """Verify cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class _Narinfo:
    """What a narinfo says about its NAR, as scanned (not the whole narinfo: stores are big)."""

    hash_part: str
    identity: tuple[int, int]  # (inode, mtime_ns): a push replaces the file, changing both
    nar_file: str
    file_size: int | None
    nar_hash: str
    nar_size: int


@dataclass
class Damage:
    """One damaged entry: `what` is a path under the store (nar/…, narinfo/…), `reason` why."""

    what: str
    reason: str


@dataclass
class Report:
    narinfos: int = 0  # narinfos read
    nar_files: int = 0  # NAR files hashed
    bytes: int = 0  # bytes of NAR files hashed
    damaged: list[Damage] = field(default_factory=list)
    quarantined: int = 0  # files moved aside (a NAR and its meta and narinfos are several)
    signed_deleted: int = 0  # signed/ texts deleted (derived: the server signs them again)
    changed: int = 0  # damaged when hashed, but pushed again or collected before the move
    seconds: float = 0.0
    quarantine: Path | None = None  # where this run moved files, None when it moved none


def stats_path(store: Store) -> Path:
    return store.root / STATS_FILE


def read_stats(store: Store) -> dict[str, float]:
    """verify-stats.json: numbers only; {} when verify never ran (or the file is unreadable)."""
    try:
        data = json.loads(stats_path(store).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def run(
    root: Path,
    *,
    store_dir: str = "/nix/store",
    nar_hash: bool = False,
    dry_run: bool = False,
    echo: Callable[[str], object] = print,
    progress: Callable[[str], object] | None = None,
    progress_seconds: float = PROGRESS_SECONDS,
) -> Report:
    """Verify the store at `root`; damaged entries are quarantined unless `dry_run`.

    `echo` gets one line per damaged entry and the summary line; `progress` (stderr) a line at
    most every `progress_seconds`.
    """
    store = Store(root, store_dir)
    if not store.narinfo_dir.is_dir() or not store.nar_dir.is_dir():
        raise VerifyError(f"{root} is not a nixcache store (no narinfo/ and nar/ in it); check --store")
    started = time.monotonic()
    report = Report()
    mover = _Quarantine(store, dry_run, report)

    by_nar, lone = _scan_narinfos(store, report)
    by_hash = {entry.hash_part: entry for entries in by_nar.values() for entry in entries}
    for damage, hash_part, identity in lone:
        if mover.narinfo_alone(hash_part, identity, damage):
            echo(_line(damage, dry_run))

    nars = _list_nars(store)
    total = sum(size for _, size, _ in nars)
    throttle = Throttle(progress or (lambda _line: None), progress_seconds)
    for name, size, inode in nars:
        expected = list(by_nar.pop(name, ()))
        damage = _check_nar(store, name, size, nar_hash)
        report.nar_files += 1
        report.bytes += size
        if damage is not None:
            if mover.nar(name, inode, [entry.hash_part for entry in expected], damage):
                echo(_line(damage, dry_run))
        else:
            for entry in expected:
                damage = _disagreement(store, entry, size)
                if damage is not None and mover.narinfo_alone(entry.hash_part, entry.identity, damage):
                    echo(_line(damage, dry_run))
        if throttle.due():
            throttle.echo(_progress_line(report, len(nars), total, time.monotonic() - started))

    # Narinfos whose NAR was not in nar/ when it was listed, and (after a NAR was moved aside)
    # any narinfo pushed meanwhile that names it: both would be a narinfo without its NAR.
    dangling = [entry.hash_part for entries in by_nar.values() for entry in entries]
    if report.quarantined:
        dangling = [path.name[: -len(".narinfo")] for path in store.narinfo_dir.glob("*.narinfo")]
    for hash_part in dangling:
        damage = mover.dangling(hash_part)
        if damage is not None:
            echo(_line(damage, dry_run))

    for path in sorted((store.root / "ls").glob("*.ls")):
        damage = _check_listing(store, path, by_hash.get(path.name[: -len(".ls")]))
        if damage is not None and mover.listing(path, damage):
            echo(_line(damage, dry_run))

    # Last: entries moved aside above took their signed text along.
    for damage in _check_signed(store, mover):
        echo(_line(damage, dry_run))

    report.seconds = time.monotonic() - started
    echo(_summary(report, dry_run))
    if not dry_run:
        _record(store, report)
    return report


# -- scanning ------------------------------------------------------------------------------------


def _scan_narinfos(
    store: Store, report: Report
) -> tuple[dict[str, list[_Narinfo]], list[tuple[Damage, str]]]:
    """Every narinfo, grouped by the NAR file it names; and those that are damaged on their own."""
    by_nar: dict[str, list[_Narinfo]] = {}
    lone: list[tuple[Damage, str, tuple[int, int]]] = []
    with os.scandir(store.narinfo_dir) as entries:
        for entry in entries:
            if not entry.name.endswith(".narinfo") or entry.name.startswith("."):
                continue
            hash_part = entry.name[: -len(".narinfo")]
            try:
                st = entry.stat()
                identity = (st.st_ino, st.st_mtime_ns)
                data = read_quietly(Path(entry.path))
            except FileNotFoundError:
                continue  # collected meanwhile
            except OSError as error:
                reason = f"cannot be read: {error.strerror}"
                lone.append((Damage(f"narinfo/{entry.name}", reason), hash_part, identity))
                continue
            report.narinfos += 1
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                lone.append((Damage(f"narinfo/{entry.name}", "is not UTF-8 text"), hash_part, identity))
                continue
            try:
                info = narinfo.parse(text, store.store_dir)
            except narinfo.NarInfoError as error:
                lone.append(
                    (Damage(f"narinfo/{entry.name}", f"does not parse: {error}"), hash_part, identity)
                )
                continue
            if info.hash_part != hash_part:
                reason = f"holds StorePath {info.store_path}, another path's hash"
                lone.append((Damage(f"narinfo/{entry.name}", reason), hash_part, identity))
                continue
            by_nar.setdefault(info.nar_file, []).append(
                _Narinfo(hash_part, identity, info.nar_file, info.file_size, info.nar_hash, info.nar_size)
            )
    return by_nar, lone


def _list_nars(store: Store) -> list[tuple[str, int, int]]:
    """(name, size, inode) of every NAR file, in name order (stable progress between runs)."""
    nars = []
    with os.scandir(store.nar_dir) as entries:
        for entry in entries:
            if narinfo.compression_of(entry.name) is None:
                continue  # not a name this server writes or serves
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            nars.append((entry.name, st.st_size, st.st_ino))
    return sorted(nars)


def _check_nar(store: Store, name: str, size: int, nar_hash: bool) -> Damage | None:
    """Why NAR file `name` (and its meta) is damaged, or None when it is intact."""
    what = f"nar/{name}"
    path = store.nar_path(name)
    try:
        with open(path, "rb") as handle:
            sha = hashlib.file_digest(handle, "sha256").digest()
    except FileNotFoundError:
        return None  # collected meanwhile: nothing left to check (narinfos: the dangling sweep)
    except OSError as error:  # an unreadable sector is damage too, not a reason to stop
        return Damage(what, f"cannot be read: {error.strerror}")
    if sha != base32.decode(name[:52], 32):
        return Damage(what, f"its bytes hash to {base32.encode(sha)}, not to its name (FileHash)")
    meta = store.nar_digest(name)
    if meta is None:
        return Damage(what, "has no readable nar-meta (NarHash and NarSize recorded at upload)")
    compression = narinfo.compression_of(name)
    if compression == "none":
        content = nar.NarDigest(base32.format_sha256(sha), size)
    elif nar_hash:
        try:
            content = nar.digest(path, compression or "")
        except nar.NarError as error:
            return Damage(what, str(error))
        except OSError as error:
            return Damage(what, f"cannot be read: {error.strerror}")
    else:
        return None
    if content != meta:
        return Damage(
            what,
            f"holds NarHash {content.nar_hash} NarSize {content.nar_size}, but its nar-meta records "
            f"{meta.nar_hash} {meta.nar_size}",
        )
    return None


def _check_listing(store: Store, path: Path, entry: _Narinfo | None) -> Damage | None:
    """Why the listing at `path` is damaged or describes another NAR than its narinfo's, or None."""
    what = f"ls/{path.name}"
    try:
        uploaded = listings.validate(what, read_quietly(path, listings.LIMIT))
    except FileNotFoundError:
        return None
    except ExtraError as error:
        return Damage(what, str(error).removeprefix(f"{what}: "))
    if entry is None:
        return None  # its narinfo is not here (yet, or any more): gc's business
    if narinfo.compression_of(entry.nar_file) != "none":
        if listings.total_size(uploaded) >= entry.nar_size:
            return Damage(what, f"lists more file bytes than the NarSize {entry.nar_size} of its narinfo")
        return None
    try:
        with open(store.nar_path(entry.nar_file), "rb") as handle:
            computed = listings.of_nar(handle)
    except FileNotFoundError:
        return None
    except ValueError as error:
        return Damage(what, f"cannot be compared: nar/{entry.nar_file} is not a NAR ({error})")
    if not listings.same(uploaded, computed):
        return Damage(what, f"does not describe nar/{entry.nar_file}, the NAR of its narinfo")
    return None


def _disagreement(store: Store, entry: _Narinfo, size: int) -> Damage | None:
    """Why a narinfo disagrees with its intact NAR file and meta, or None."""
    what = f"narinfo/{entry.hash_part}.narinfo"
    if entry.file_size is not None and entry.file_size != size:
        return Damage(what, f"says FileSize {entry.file_size}, but nar/{entry.nar_file} is {size} bytes")
    meta = store.nar_digest(entry.nar_file)
    if meta is not None and (entry.nar_hash, entry.nar_size) != (meta.nar_hash, meta.nar_size):
        return Damage(
            what,
            f"says NarHash {entry.nar_hash} NarSize {entry.nar_size}, but nar/{entry.nar_file} "
            f"holds {meta.nar_hash} {meta.nar_size}",
        )
    return None


def _check_signed(store: Store, mover: _Quarantine) -> list[Damage]:
    """Every signed/<hash>.narinfo (what is served) against its narinfo: one whose narinfo is
    gone, or whose text is not that narinfo signed by this cache's keys, is damage; it is
    deleted (derived data: the server signs the narinfo again on its next request)."""
    keys = signed.trusted_keys(store)
    found = []
    with os.scandir(store.signed_dir) if store.signed_dir.is_dir() else contextlib.nullcontext([]) as entries:
        for entry in entries:
            if not entry.name.endswith(".narinfo") or entry.name.startswith("."):
                continue
            hash_part = entry.name[: -len(".narinfo")]
            what = f"signed/{entry.name}"
            try:
                signed_st = entry.stat()
                text = read_quietly(Path(entry.path)).decode("utf-8", "replace")
            except FileNotFoundError:
                continue
            path = store.narinfo_path(hash_part)
            try:
                st = path.stat()
                stored = narinfo.parse(read_quietly(path).decode(), store.store_dir)
            except FileNotFoundError:
                st, reason = None, f"is served, but narinfo/{entry.name} is not in the store"
            except (OSError, ValueError):
                continue  # a damaged narinfo: the scan reported it (and moved it with this file)
            else:
                reason = signed.disagreement(stored, text, keys, store.store_dir)
            if reason is not None:
                damage = Damage(what, reason)
                if mover.signed(hash_part, signed_st.st_ino, st, damage):
                    found.append(damage)
    return found


# -- moving aside --------------------------------------------------------------------------------


class _Quarantine:
    """Moves damaged entries aside, each in one step under the exclusive gc lock."""

    def __init__(self, store: Store, dry_run: bool, report: Report):
        self.store = store
        self.dry_run = dry_run
        self.report = report
        self.dir = store.root / QUARANTINE_DIR / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())

    def nar(self, name: str, inode: int, hash_parts: list[str], damage: Damage) -> bool:
        """Quarantine NAR file `name` (as listed: `inode`), its meta and the narinfos naming it.
        False when it was pushed again or collected since it was hashed (nothing moved)."""
        if self.dry_run:
            return self._found(damage)
        store = self.store
        with store.gc_lock(exclusive=True):
            try:
                if store.nar_path(name).stat().st_ino != inode:
                    raise FileNotFoundError  # replaced by a fresh, verified upload
            except FileNotFoundError:
                self.report.changed += 1
                return False
            self._found(damage)
            for hash_part in hash_parts:  # narinfos first: no reader finds one without its NAR
                if nar_file_of(store.narinfo_path(hash_part)) == name:
                    self._move_narinfo(hash_part)
            self._move(store.meta_dir / name, "nar-meta")
            self._move(store.nar_path(name), "nar")
        return True

    def narinfo_alone(self, hash_part: str, identity: tuple[int, int], damage: Damage) -> bool:
        """Quarantine one narinfo as scanned (`identity`); False when it was pushed again or
        collected since (nothing moved: a new push replaced it with a verified one)."""
        if self.dry_run:
            return self._found(damage)
        path = self.store.narinfo_path(hash_part)
        with self.store.gc_lock(exclusive=True):
            try:
                st = path.stat()
            except FileNotFoundError:
                st = None
            if st is None or (st.st_ino, st.st_mtime_ns) != identity:
                self.report.changed += 1
                return False
            self._found(damage)
            self._move_narinfo(hash_part)
        return True

    def dangling(self, hash_part: str) -> Damage | None:
        """Quarantine narinfo `hash_part` if its NAR is absent (checked under the lock, where no
        upload is between publishing a NAR and its narinfo, and gc deletes narinfos first)."""
        path = self.store.narinfo_path(hash_part)
        with contextlib.ExitStack() as stack:
            if not self.dry_run:
                stack.enter_context(self.store.gc_lock(exclusive=True))
            name = nar_file_of(path)
            if name is None or self.store.nar_path(name).exists():
                return None  # gone meanwhile, intact, or unparseable (reported by the scan)
            damage = Damage(f"narinfo/{hash_part}.narinfo", f"names nar/{name}, which is not in the store")
            self._found(damage)
            if not self.dry_run:
                self._move_narinfo(hash_part)
        return damage

    def listing(self, path: Path, damage: Damage) -> bool:
        """Quarantine a listing on its own (nothing else depends on it)."""
        self._found(damage)
        if not self.dry_run:
            self._move(path, "ls")
        return True

    def signed(self, hash_part: str, inode: int, narinfo_st: os.stat_result | None, damage: Damage) -> bool:
        """Delete signed/<hash_part>.narinfo as checked (`inode`, against the narinfo as it was
        then, `narinfo_st`); False when either changed since (a push wrote both anew)."""
        if self.dry_run:
            return self._found(damage)
        path = self.store.signed_path(hash_part)
        with self.store.gc_lock(exclusive=True):
            try:
                now = (path.stat().st_ino, _identity(self.store.narinfo_path(hash_part)))
            except FileNotFoundError:
                now = None
            if now != (inode, None if narinfo_st is None else (narinfo_st.st_ino, narinfo_st.st_mtime_ns)):
                self.report.changed += 1
                return False
            self._found(damage)
            path.unlink()
            self.report.signed_deleted += 1
        return True

    def _move_narinfo(self, hash_part: str) -> None:
        """Move a narinfo aside, its signed text (derived: deleted, not kept) first, so neither
        the server nor an nginx front serves the path once it is quarantined."""
        with contextlib.suppress(FileNotFoundError):
            self.store.signed_path(hash_part).unlink()
        self._move(self.store.narinfo_path(hash_part), "narinfo")

    def _found(self, damage: Damage) -> bool:
        self.report.damaged.append(damage)
        return True

    def _move(self, path: Path, kind: str) -> None:
        target = self.dir / kind
        if not target.is_dir():
            for directory in (self.dir.parent, self.dir, target):
                directory.mkdir(exist_ok=True)
                _owned_like(directory, self.store.root)
        with self.store.usage.changing() as change:  # out of the store's usage totals
            try:
                size = path.stat().st_size
                os.rename(path, target / path.name)
            except FileNotFoundError:
                return
            if kind == "narinfo":
                change.entries -= 1
                change.narinfo_bytes -= size
            elif kind == "nar":
                change.nar_files -= 1
                change.nar_bytes -= size
        self.report.quarantined += 1
        self.report.quarantine = self.dir
        with open(self.dir / "REASONS", "a") as reasons:
            damage = self.report.damaged[-1]
            reasons.write(f"{kind}/{path.name}: {damage.what} {damage.reason}\n")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _owned_like(path: Path, reference: Path) -> None:
    """Give `path` the owner of `reference` when running as root (`nixcache verify` by hand), so
    that the service user's next run can still create its directories beside it."""
    if os.geteuid() == 0:
        st = reference.stat()
        os.chown(path, st.st_uid, st.st_gid)


# -- output --------------------------------------------------------------------------------------


def _line(damage: Damage, dry_run: bool) -> str:
    return f"verify: damaged: {damage.what} {damage.reason}" + (
        " (dry run: left in place)" if dry_run else ""
    )


def _rate(report: Report, seconds: float) -> str:
    return f"{report.bytes / max(seconds, 1e-6) / (1 << 20):.1f} MiB/s"


def _progress_line(report: Report, nar_total: int, bytes_total: int, seconds: float) -> str:
    percent = 100 * report.bytes / bytes_total if bytes_total else 100
    return (
        f"verify: {report.nar_files} of {nar_total} NAR files, {human_size(report.bytes)} of "
        f"{human_size(bytes_total)} ({percent:.0f}%), {_rate(report, seconds)}, "
        f"{len(report.damaged)} damaged so far"
    )


def _summary(report: Report, dry_run: bool) -> str:
    if dry_run:
        moved = f"{len(report.damaged)} damaged, nothing quarantined (dry run)"
    elif report.quarantine is not None:
        moved = (
            f"{len(report.damaged)} damaged, {report.quarantined} files quarantined in {report.quarantine}"
        )
    else:
        moved = f"{len(report.damaged)} damaged, 0 files quarantined"
    changed = f"; {report.changed} changed before they could be moved" if report.changed else ""
    if report.signed_deleted:
        changed += f"; {report.signed_deleted} signed narinfos deleted (signed again when next asked for)"
    return (
        f"verify: checked {report.narinfos} narinfos and {report.nar_files} NAR files, "
        f"{human_size(report.bytes)} in {report.seconds:.1f} s ({_rate(report, report.seconds)}); "
        f"{moved}{changed}"
    )


def _record(store: Store, report: Report) -> None:
    """The last run's counts and the totals of all runs, for the server's /metrics."""
    stats = read_stats(store)
    stats.update(
        runs=stats.get("runs", 0) + 1,
        damaged_total=stats.get("damaged_total", 0) + len(report.damaged),
        quarantined_total=stats.get("quarantined_total", 0) + report.quarantined,
        last_run=time.time(),
        last_damaged=len(report.damaged),
        last_narinfos=report.narinfos,
        last_bytes=report.bytes,
        last_seconds=report.seconds,
    )
    write_atomically(stats_path(store), json.dumps(stats).encode(), mode=0o644)
    _owned_like(stats_path(store), store.root)

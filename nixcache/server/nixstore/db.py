"""Nix's own database of valid store paths (`<state dir>/db/db.sqlite`), read, never written.

Why this is safe beside a running nix-daemon (docs/decisions/0006-read-nix-database-directly.md):

- opened with `mode=ro` and `PRAGMA query_only`: SQLite itself refuses any write;
- not `immutable=1` (but see `_execute`): that tells SQLite the file never changes, so it would
  skip locking and serve stale or torn pages while the daemon registers and collects paths;
- every lookup is one SELECT in autocommit mode, a read transaction of microseconds. Nix runs the
  database in WAL mode, where readers never block its writes; a read snapshot only holds back the
  WAL checkpoint while it lasts, and none lasts past one query (NARs are streamed after it ended);
- no busy handler in SQLite: under gevent it would sleep in C and stall every connection. A busy
  database (WAL recovery, or a non-WAL setup mid-commit) is retried here with a cooperative sleep,
  then reported as `NixDbError`.

In the service's sandbox the database is read-only, so SQLite keeps its WAL index in memory
instead of sharing `db.sqlite-shm`; reads still see every committed transaction. When no Nix
process has the database open there is no WAL to read at all, and a read-only user cannot open
one: see `_execute` for the snapshot read used until Nix opens it again.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from nixcache.server import base32

log = logging.getLogger("nixcache.server")

# Nix's schema version (the `schema` file beside db.sqlite): 10 from Nix 2.0 to today's 2.3x and Lix.
KNOWN_SCHEMAS = frozenset({10})
# Columns this module reads; a schema without them is refused at open.
_COLUMNS = {
    "ValidPaths": {"id", "path", "hash", "deriver", "narSize", "sigs", "ca"},
    "Refs": {"referrer", "reference"},
}
_INFOS = 16384  # rows whose PathInfo is kept (a few hundred bytes each)
_BUSY_RETRY_FOR = 2.0  # seconds of cooperative retries before a busy database is an error

# Paths of one hash part sort between "<dir>/<hash>-" and "<dir>/<hash>." ('-' < '.'): a range
# scan of the unique index on `path`, as Nix's own queryPathFromHashPart does.
_BY_HASH_PART = """
SELECT v.path, v.hash, v.narSize, v.deriver, v.sigs, v.ca,
       (SELECT group_concat(r.path, ' ') FROM Refs JOIN ValidPaths r ON r.id = Refs.reference
         WHERE Refs.referrer = v.id)
  FROM ValidPaths v WHERE v.path >= ? AND v.path < ? LIMIT 1
"""
# `hash` has no index: this scans the table. Only used for a NAR whose narinfo this process has
# not served since it started (see nixcache.server.nixstore.store).
# Each output of a derivation and whether it is valid (DerivationOutputs: input-addressed outputs).
_OUTPUTS = """
SELECT o.path IN (SELECT path FROM ValidPaths) FROM DerivationOutputs o
JOIN ValidPaths d ON d.id = o.drv WHERE d.path = ?
"""
_BY_NAR_HASH = "SELECT path, narSize FROM ValidPaths WHERE hash IN (?, ?) LIMIT 1"


class NixDbError(Exception):
    """Nix's database (or store) cannot be read, or has a schema this version does not know."""


@dataclass(frozen=True)
class PathInfo:
    """What a narinfo says about a valid store path, read from Nix's database."""

    path: str
    nar_hash: str  # sha256:<base32>
    nar_size: int
    references: tuple[str, ...]  # base names, sorted
    deriver: str | None  # base name
    sigs: tuple[str, ...]
    ca: str | None


class NixDatabase:
    """Read-only lookups in Nix's database of one store."""

    def __init__(self, state_dir: Path, store_dir: str = "/nix/store"):
        self.path = Path(state_dir) / "db" / "db.sqlite"
        self.store_dir = store_dir
        self._check_schema_file()
        quoted = urllib.parse.quote(str(self.path))
        self._live_uri = f"file:{quoted}?mode=ro"
        self._snapshot_uri = f"file:{quoted}?mode=ro&immutable=1"
        self._wal = Path(f"{self.path}-wal")
        self._db: sqlite3.Connection | None = None
        self._snapshot_logged = False
        self._infos: dict[tuple, PathInfo] = {}  # database row -> its PathInfo
        try:
            self._check_columns()
            self._check_store_dir()
        except sqlite3.Error as error:
            raise NixDbError(
                f"Nix database {self.path} cannot be read ({error}); the service needs read access to it"
                f" and to {self.path.parent}"
            ) from None

    def _connect(self, uri: str) -> sqlite3.Connection:
        # timeout=0: no busy handler in C (see the module docstring); retries are ours.
        db = sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA query_only = 1")
        return db

    def _execute(self, sql: str, params: tuple[str, ...] = ()) -> list[tuple]:
        """Rows of one statement, run to completion (`fetchall`: a statement left unfinished would
        keep its read transaction, and the daemon's checkpoint, waiting until garbage-collected).

        Through the live read-only connection when it can be had; when it cannot (a read-only user
        and no Nix process has the database open: SQLite deleted `-wal` and `-shm` at the last
        close and this user may not create them), through a one-query `immutable` snapshot. Without
        a WAL the database file is complete, and a writer that starts meanwhile writes its WAL, not
        the file, until a checkpoint far longer than one query away. Once Nix opens the database
        again the live connection takes over, and while it is open SQLite keeps the WAL files."""
        if self._db is None and (self._wal.exists() or os.access(self.path.parent, os.W_OK)):
            self._db = self._connect(self._live_uri)
        if self._db is not None:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.OperationalError as error:
                if "readonly" not in str(error):
                    raise
                self._db.close()  # it may not create the WAL index: fall back to a snapshot
                self._db = None
        if not self._snapshot_logged:
            self._snapshot_logged = True
            log.info(
                "Nix database %s is closed and read-only here: reading snapshots until Nix opens it",
                self.path,
            )
        snapshot = self._connect(self._snapshot_uri)
        try:
            return snapshot.execute(sql, params).fetchall()
        finally:
            snapshot.close()

    def _check_schema_file(self) -> None:
        schema_file = self.path.parent / "schema"
        try:
            text = schema_file.read_text().strip()
        except FileNotFoundError:
            raise NixDbError(
                f"no Nix database at {self.path.parent} (no schema file): install Nix, or point "
                "nix_store.state_dir at its state directory, or set serve_nix_store = false"
            ) from None
        except OSError as error:
            raise NixDbError(f"cannot read {schema_file}: {error.strerror}") from None
        if not text.isdigit() or int(text) not in KNOWN_SCHEMAS:
            known = ", ".join(str(v) for v in sorted(KNOWN_SCHEMAS))
            raise NixDbError(
                f"Nix database {self.path} has schema version {text[:20]!r}, which nixcache does not"
                f" know (it reads {known}): upgrade nixcache, or set serve_nix_store = false"
            )

    def _check_columns(self) -> None:
        for table, wanted in _COLUMNS.items():
            have = {row[1] for row in self._execute(f"PRAGMA table_info({table})")}
            missing = wanted - have
            if missing:
                raise NixDbError(
                    f"Nix database {self.path}: table {table} lacks {', '.join(sorted(missing))};"
                    " this Nix's schema is not one nixcache knows: upgrade nixcache, or set"
                    " serve_nix_store = false"
                )

    def _check_store_dir(self) -> None:
        """The paths in the database must be under `store_dir`, or nothing would ever be found."""
        rows = self._execute("SELECT path FROM ValidPaths LIMIT 1")
        if rows and rows[0][0].rpartition("/")[0] != self.store_dir:
            found = rows[0][0].rpartition("/")[0]
            raise NixDbError(
                f"Nix database {self.path} holds paths under {found}, not under store_dir ="
                f" {self.store_dir!r}: set store_dir = {found!r} (the clients' StoreDir), or point"
                " nix_store.state_dir elsewhere"
            )

    def _query(self, sql: str, params: tuple[str, ...]) -> tuple | None:
        deadline = None  # set at the first busy answer: the usual lookup pays for no clock
        delay = 0.001
        while True:
            try:
                rows = self._execute(sql, params)
                return rows[0] if rows else None
            except sqlite3.Error as error:
                busy = isinstance(error, sqlite3.OperationalError) and (
                    "locked" in str(error) or "busy" in str(error)
                )
                now = time.monotonic()
                deadline = deadline or now + _BUSY_RETRY_FOR
                if not busy or now > deadline:
                    raise NixDbError(f"Nix database {self.path}: {error}") from None
            time.sleep(delay)  # gevent's sleep once the server has monkey-patched
            delay = min(delay * 2, 0.05)

    def path_info(self, hash_part: str) -> PathInfo | None:
        """The valid path whose hash part is `hash_part`, or None."""
        prefix = f"{self.store_dir}/{hash_part}"
        row = self._query(_BY_HASH_PART, (prefix + "-", prefix + "."))
        if row is None:
            return None
        # The same row gives the same PathInfo object: converting the hash to base32 costs more
        # than the query, and callers that keep a signed narinfo per PathInfo compare by identity.
        info = self._infos.get(row)
        if info is None:
            path, nar_hash, nar_size, deriver, sigs, ca, refs = row
            if not nar_size:
                return None  # databases older than Nix 1.x lacked sizes; a narinfo needs one
            info = PathInfo(
                path=path,
                nar_hash=self._nar_hash(path, nar_hash),
                nar_size=nar_size,
                references=tuple(sorted(ref.rpartition("/")[2] for ref in (refs or "").split())),
                deriver=deriver.rpartition("/")[2] if deriver else None,
                sigs=tuple((sigs or "").split()),
                ca=ca or None,
            )
            if len(self._infos) >= _INFOS:
                for old in list(self._infos)[: _INFOS // 2]:  # drop the older half
                    del self._infos[old]
            self._infos[row] = info
        return info

    def path_for_nar_hash(self, nar_hash: str) -> tuple[str, int] | None:
        """(store path, NarSize) of a valid path whose NAR hashes to `nar_hash`, or None.

        Nix writes hashes as `sha256:<hex>`; both that and the base32 form are looked for."""
        digest = base32.parse_sha256(nar_hash)
        row = self._query(_BY_NAR_HASH, ("sha256:" + digest.hex(), base32.format_sha256(digest)))
        return (row[0], row[1]) if row else None

    def data_version(self) -> int | None:
        """SQLite's `PRAGMA data_version` on the live connection: the same number as long as no
        other connection (the daemon) committed, so an answer read under it is still current.
        None when there is no live connection (snapshot reads) or it cannot say: ask again."""
        if self._db is None:
            return None
        try:
            return self._db.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error:
            return None

    def totals(self) -> tuple[int, int]:
        """(number of valid paths, sum of their NarSize): the store's size as Nix counts it."""
        row = self._query("SELECT count(*), coalesce(sum(narSize), 0) FROM ValidPaths", ())
        return (row[0], row[1]) if row else (0, 0)

    def outputs_valid(self, drv_path: str) -> bool | None:
        """Whether every output of the derivation `drv_path` is a valid path; None when the
        derivation itself is not valid (collected) or names no outputs."""
        rows = self._execute(_OUTPUTS, (drv_path,))
        if not rows:
            return None
        return all(valid for (valid,) in rows)

    def _nar_hash(self, path: str, text: str) -> str:
        """A database hash (`sha256:<hex>` as Nix writes it, or base32) as `sha256:<base32>`."""
        try:
            return base32.normalize_sha256(text)
        except ValueError as error:
            raise NixDbError(f"Nix database {self.path}: hash of {path} is not sha256 ({error})") from None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

"""`LocalNixStore`: what the cache serves from this host's own Nix store, one method per route.

- `narinfo(hash)`  signed narinfo bytes from Nix's database (`Compression: none`, FileHash and
                   FileSize equal to NarHash and NarSize, URL `nar/<NarHash base32>.nar`, so one
                   path always has one URL), or None;
- `open_nar(name)` a `LocalNar` (size, then a body generated on the fly, Range by offset), or None;
- `listing(hash)`  the `.ls` JSON, or None;
- `log(drv)`       the build log, or None.

Methods raise `NixDbError` when the database cannot answer (the route logs it and goes on to the
push store: a read never becomes a 5xx) and the NAR body raises `PathChanged` mid-stream.

A NAR URL names only the NarHash, and Nix's database has no index on hashes: the hash part of each
narinfo served is remembered by its NarHash (clients fetch the narinfo first), and only a NAR
asked for without that (a client's cached narinfo, from before a restart) costs a table scan
(25 ms for 300,000 paths, measured here under load). The scan runs through `offload` (the
server's thread pool, so the event loop keeps serving) on a connection of its own, and a name it
did not find is remembered as absent until a narinfo names it. For the same reason the route
asks the push store first for a NAR: a name is the sha256 of the bytes, so either store serves
the same bytes for it, and a push-store NAR then costs no scan.

Signed narinfos stay in memory here, not on disk as the push store's do (docs/architecture.md,
"The store on disk"): validity and the row are in Nix's database, read per request anyway.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from nixcache.keys import SecretKey
from nixcache.server.config import NixStoreConfig
from nixcache.server.narinfo import NAR_FILE, NarInfo, is_hash_part
from nixcache.server.nixstore import dump, listing, logs
from nixcache.server.nixstore.db import NixDatabase, NixDbError, PathInfo

_REMEMBERED = 65536  # NarHash -> hash part entries, ~150 bytes each
_SIGNED = 16384  # signed narinfos kept, ~1 KiB each
_ABSENT = 16384  # NAR names a scan did not find

Offload = Callable[[Callable[..., Any], tuple[Any, ...]], Any]


def _inline(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return fn(*args)


@dataclass(frozen=True)
class LocalNar:
    """A NAR to generate from the store path at `path` (on disk); `size` is its NarSize."""

    path: str
    size: int

    def body(self, offset: int = 0, count: int | None = None) -> Iterator[bytes | dump.FileRegion]:
        """Bytes `offset`..`offset + count` as chunks and file regions (see dump.generate)."""
        return dump.generate(self.path, self.size, offset, count)


class LocalNixStore:
    """This host's Nix store, read through Nix's database and the store directory."""

    def __init__(
        self, config: NixStoreConfig, store_dir: str, keys: list[SecretKey], offload: Offload = _inline
    ):
        self.config = config
        self.store_dir = store_dir  # the clients' StoreDir, under which the database names paths
        self.keys = keys
        self.offload = offload  # runs slow work (a table scan, a log's decompression) off the loop
        if not os.path.isdir(config.store_dir):
            raise NixDbError(
                f"nix_store.store_dir {config.store_dir} is not a directory: install Nix, or point it at"
                " the store's files, or set serve_nix_store = false"
            )
        self.db = NixDatabase(config.state_dir, store_dir)
        self._hash_part_of: dict[str, str] = {}  # NarHash base32 -> store hash part
        self._signed: dict[str, tuple[PathInfo, bytes]] = {}
        # hash part -> (database data_version, narinfo or None) of the last answer
        self._current: dict[str, tuple[int, bytes | None]] = {}
        self._absent: dict[str, None] = {}  # NarHash base32 a scan did not find

    def _info(self, hash_part: str) -> PathInfo | None:
        if not is_hash_part(hash_part):
            return None
        info = self.db.path_info(hash_part)
        if info is None or info.path.rpartition("/")[0] != self.store_dir:
            return None
        return info

    def _on_disk(self, store_path: str) -> str:
        return f"{self.config.store_dir}/{store_path.rpartition('/')[2]}"

    def narinfo(self, hash_part: str) -> bytes | None:
        """The signed narinfo of the valid path `hash_part`, or None.

        An answer (hit or miss) is reused while Nix's database says nothing was committed since
        (`data_version`, one cheap PRAGMA): then the lookup's SELECT and its row are skipped. The
        version is read before the lookup, so a commit in between only makes the next call ask
        again."""
        version = self.db.data_version()
        if version is not None:
            current = self._current.get(hash_part)
            if current is not None and current[0] == version:
                return current[1]
        body = self._lookup_narinfo(hash_part)
        if version is not None:
            _remember(self._current, hash_part, (version, body), _SIGNED)
        return body

    def _lookup_narinfo(self, hash_part: str) -> bytes | None:
        info = self._info(hash_part)
        if info is None:
            return None
        cached = self._signed.get(hash_part)
        if cached is not None and cached[0] is info:  # the database's row has not changed
            return cached[1]
        body = self._render(info).signed(self.keys, self.store_dir).encode()
        _remember(self._signed, hash_part, (info, body), _SIGNED)
        nar_hash = info.nar_hash[len("sha256:") :]
        _remember(self._hash_part_of, nar_hash, hash_part, _REMEMBERED)
        self._absent.pop(nar_hash, None)
        return body

    @staticmethod
    def _render(info: PathInfo) -> NarInfo:
        return NarInfo(
            store_path=info.path,
            url=f"nar/{info.nar_hash[len('sha256:') :]}.nar",
            compression="none",
            nar_hash=info.nar_hash,
            nar_size=info.nar_size,
            file_hash=info.nar_hash,
            file_size=info.nar_size,
            references=list(info.references),
            deriver=info.deriver,
            sigs=list(info.sigs),  # e.g. cache.nixos.org's, for a substituted path: still valid
            ca=info.ca,
        )

    def open_nar(self, name: str) -> LocalNar | None:
        """The NAR `name` (`<NarHash base32>.nar`) of a valid path, or None."""
        match = NAR_FILE.match(name)
        if match is None or match.group(2) != ".nar":
            return None
        nar_hash = match.group(1)
        hash_part = self._hash_part_of.get(nar_hash)
        if hash_part is not None:
            info = self._info(hash_part)
            if info is not None and info.nar_hash == "sha256:" + nar_hash:
                return LocalNar(self._on_disk(info.path), info.nar_size)
        if nar_hash in self._absent:
            return None
        found = self.offload(self._scan, ("sha256:" + nar_hash,))
        if found is None or found[0].rpartition("/")[0] != self.store_dir:
            _remember(self._absent, nar_hash, None, _ABSENT)
            return None
        return LocalNar(self._on_disk(found[0]), found[1])

    def _scan(self, nar_hash: str) -> tuple[str, int] | None:
        """In a worker thread: a connection of its own, so the loop's lookups never wait on it."""
        db = NixDatabase(self.config.state_dir, self.store_dir)
        try:
            return db.path_for_nar_hash(nar_hash)
        finally:
            db.close()

    def listing(self, hash_part: str) -> bytes | None:
        """The `<hash>.ls` JSON of the valid path `hash_part`, or None; PathChanged if it is damaged."""
        info = self._info(hash_part)
        if info is None:
            return None
        # A walk of the whole tree (tens of ms for tens of thousands of files): off the loop.
        return self.offload(listing.listing, (self._on_disk(info.path), info.nar_size))

    def log(self, drv: str) -> logs.BuildLog | None:
        """The build log of the derivation base name `drv`, or None."""
        return self.offload(logs.open_log, (self.config.log_dir, drv))

    def close(self) -> None:
        self.db.close()


def _remember(table: dict, key: str, value: object, limit: int) -> None:
    """Insert into a bounded dict: past `limit`, drop the older half (insertion order)."""
    if len(table) >= limit and key not in table:
        for old in list(table)[: limit // 2]:
            del table[old]
    table[key] = value

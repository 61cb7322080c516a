"""The on-disk store of a cache server, and the only code that writes it during serving.

Layout under the store directory (`store` in the config, e.g. /var/lib/nixcache/store)::

    narinfo/<hash>.narinfo   one per store path, as uploaded (normalised, uploaded Sig lines kept);
                             mtime = upload time, atime = last served (set explicitly, batched:
                             the volume may be mounted noatime, and explicit utime still works)
    signed/<hash>.narinfo    exactly the body of GET /<hash>.narinfo: the narinfo above signed
                             by every configured key; its mtime is the narinfo's. Written when the
                             narinfo is (push, pull-through), present only while it is (deleted
                             first), so the server and an nginx front serve it as a plain file
    signed/KEYS              the public keys (`name:base64` lines) that signed signed/; when the
                             server starts with other keys it re-signs in the background
                             (nixcache/server/signed.py), with signed/KEYS.next as its progress
    nar/<filehash>.nar[.xz|.zst|.bz2|.br|.lz4]
                             the NAR files, named by the base32 sha256 of their bytes
    nar-meta/<nar file name> "<NarHash> <NarSize>" of each NAR, computed when it was uploaded
    tmp/                     uploads in flight; same filesystem so they can be renamed into place.
                             Emptied when the server starts; never served, never backed up.
    gc-stats.json            totals written by `nixcache gc`, exposed in /metrics
    usage                    narinfo and NAR counts and bytes, adjusted by every process that
                             publishes or deletes one (nixcache/server/usage.py); usage.scan-lock
                             lets one process at a time rescan them
    verify-stats.json        the last `nixcache verify` run and its totals, exposed in /metrics
    quarantine/<time>/       entries `nixcache verify` found damaged, moved aside (never served,
                             never deleted by nixcache; see nixcache/server/verify.py)
    gc.lock                  flock(2) that orders gc's NAR deletions with the uploads and HEADs
                             that rely on a NAR staying
    ls/<hash>.ls             NAR listings (write-nar-listing), kept while narinfo/<hash>.narinfo is
    log/<drv>                build logs (nix store copy-log), kept while a narinfo's Deriver names <drv>
    debuginfo/<build-id>     debug info indexes (index-debug-info), kept while the NAR they name is
    build-trace-v2/<drv>/<output>.doi, realisations/<id>.doi
                             build traces of CA derivations, kept while their outPath's narinfo is
                             (all five: nixcache/server/extras; verified JSON, stored decoded,
                             published by rename like the rest; gc rule in extras/gc.py)

The service user owns all of it. Back up everything but tmp/, signed/ and quarantine/ (the
backup's include_store does: signed/ is derived, and a snapshot taken file by file could pair a
signed text with another version of its narinfo, so a restored store without signed/KEYS is
re-signed when the server starts; quarantine/ holds damage a restore must not bring back).

Visibility rules: a file becomes visible only by rename(2) from tmp/ after it verified; a NAR's
meta is renamed into place before the NAR; a narinfo only after its NAR and meta exist and match.
`nixcache gc` (another process) deletes a narinfo before the NAR it names, and spares NARs
younger than a grace period, so an upload racing a collection is never left dangling. A signed
text is published under the shared gc lock and only while its narinfo is the one it was made
from (checked before and after the rename); gc and verify delete it before the narinfo, under
the exclusive lock: nothing stale is ever served.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from nixcache.keys import SecretKey
from nixcache.server import base32, nar, narinfo
from nixcache.server.narinfo import NarInfo, NarInfoError
from nixcache.server.usage import UsageFile

T = TypeVar("T")
UPLOAD_CHUNK = 256 * 1024


class UploadError(Exception):
    """An upload was refused; `status` is the HTTP status to answer with, `reason` says why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class NarFile:
    """An open NAR ready to be sent: the caller closes `handle`."""

    handle: BinaryIO
    size: int
    name: str


def read_quietly(path: Path, limit: int = 1 << 22) -> bytes:
    """Up to `limit` bytes of `path`, read without touching its atime where the kernel allows:
    a narinfo's atime is its last-served mark, which gc and verify must not refresh."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    except PermissionError:  # O_NOATIME needs the file's owner (or root)
        fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as handle:
        return handle.read(limit)


def _identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime_ns) of `path`, which a rename over it changes; None when it is absent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _is_disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


def _write_durable(path: Path, data: bytes, mtime_ns: int | None = None) -> os.stat_result:
    """Create `path` (a new temp file) holding `data` (with `mtime_ns` as its mtime, when
    given), fsync it and return its stat. Run in the thread pool: creating a file, like every
    change of the filesystem's metadata, may wait for its journal (milliseconds while other
    writes commit), and the fsync for the disk."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        if mtime_ns is not None:
            os.utime(handle.fileno(), ns=(mtime_ns, mtime_ns))
        os.fsync(handle.fileno())
        return os.fstat(handle.fileno())


def _write_durable_or_none(path: Path, data: bytes, mtime_ns: int | None = None) -> os.stat_result | None:
    """`_write_durable`, None when it fails (for derived files that may be missing)."""
    try:
        return _write_durable(path, data, mtime_ns)
    except OSError:
        return None


def _fsync_directory(*directories: Path) -> None:
    """Put the renames into each of `directories` so far on disk."""
    for directory in directories:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# Distinct narinfos remembered as served before they are flushed early (about 15 MB per process).
SERVED_LIMIT = 100_000


class Store:
    """A store directory. `offload` runs CPU-heavy work (decompressing, hashing) off the event loop."""

    def __init__(
        self,
        root: Path,
        store_dir: str = "/nix/store",
        offload: Callable[..., Any] | None = None,
        keys: Sequence[SecretKey] = (),
    ):
        self.root = Path(root)
        self.store_dir = store_dir
        self.narinfo_dir = self.root / "narinfo"
        self.nar_dir = self.root / "nar"
        self.meta_dir = self.root / "nar-meta"
        self.tmp_dir = self.root / "tmp"
        self.signed_dir = self.root / "signed"
        self.keys = list(keys)  # sign what put_narinfo stores; none: gc and verify only delete
        self.gc_stats_file = self.root / "gc-stats.json"
        self.usage = UsageFile(self.root)
        self._offload = offload or (lambda fn, args: fn(*args))
        # Several calls at once where the server can (offload.Offload.all), else one by one.
        self._offload_all = getattr(offload, "all", None) or (lambda calls: [fn(*args) for fn, args in calls])
        # Those calls, then one more step in the thread that ended last (offload.Offload.then).
        self._offload_then = getattr(offload, "then", None) or (
            lambda calls, last: last([fn(*args) for fn, args in calls])
        )
        self._served: dict[str, int | None] = {}

    def offload(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """`fn(*args)` where the server runs slow work: its thread pool (inline without one)."""
        return self._offload(fn, args)

    # -- setup ---------------------------------------------------------------------------------

    def create(self) -> None:
        """Create the directories (if missing) and drop uploads that a dead process left in tmp/.
        Only before serving starts: with several workers the parent calls it, once."""
        for directory in (self.narinfo_dir, self.nar_dir, self.meta_dir, self.tmp_dir, self.signed_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.drop_leftovers()

    def drop_leftovers(self, pid: int | None = None) -> None:
        """Remove the temp files of process `pid` (a dead worker's), or all of them when None.
        Temp files are named <what>.<pid>.<ns>, and no <what> holds a dot-delimited number."""
        leftovers = self.tmp_dir.iterdir() if pid is None else self.tmp_dir.glob(f"*.{pid}.*")
        for leftover in leftovers:
            with contextlib.suppress(OSError):
                leftover.unlink()

    def writable(self) -> bool:
        """True when a file can be created and removed in tmp/ (the /healthz check)."""
        probe = self.tmp_dir / f".healthz.{os.getpid()}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            os.unlink(probe)
        except OSError:
            return False
        return True

    @contextlib.contextmanager
    def gc_lock(self, *, exclusive: bool) -> Iterator[None]:
        """Orders gc's NAR deletions (exclusive) with uploads that rely on a NAR staying (shared).

        Held for a few syscalls only, so blocking on it briefly is fine even in the event loop.
        """
        fd = os.open(self.root / "gc.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def touch_nar(self, name: str) -> bool:
        """Refresh a NAR's mtime so gc spares it for a while; False when it is not here."""
        with self.gc_lock(exclusive=False):
            return self._touch_nar_locked(name)

    def _touch_nar_locked(self, name: str) -> bool:
        # The caller holds the shared gc lock: gc re-checks this mtime under the exclusive one.
        try:
            os.utime(self.nar_dir / name)
        except FileNotFoundError:
            return False
        return True

    # -- reads ---------------------------------------------------------------------------------

    def narinfo_path(self, hash_part: str) -> Path:
        return self.narinfo_dir / f"{hash_part}.narinfo"

    def nar_path(self, name: str) -> Path:
        return self.nar_dir / name

    def signed_path(self, hash_part: str) -> Path:
        return self.signed_dir / f"{hash_part}.narinfo"

    def open_nar(self, name: str) -> NarFile | None:
        """Open `nar/<name>` (a name already matched against narinfo.NAR_FILE), or None."""
        try:
            handle = open(self.nar_dir / name, "rb")  # noqa: SIM115 - the response closes it
        except FileNotFoundError:
            return None
        return NarFile(handle, os.fstat(handle.fileno()).st_size, name)

    def keep_nar(self, name: str) -> bool:
        """True when `nar/<name>` and a readable meta are here (else the upload replaces them, as
        _check_nar's advice says); refreshes the NAR's mtime so gc spares it while its narinfo
        is on the way (one step under the shared gc lock)."""
        with self.gc_lock(exclusive=False):
            return self._touch_nar_locked(name) and self.nar_digest(name) is not None

    def mark_served(self, hash_part: str, mtime_ns: int | None) -> None:
        """Remember that a narinfo was served; `flush_served` records it on disk in a batch.
        `mtime_ns` None (served by the nginx front, not stat'ed here): read when flushing.
        Past SERVED_LIMIT distinct hashes the batch is flushed at once (through `offload`, so
        the request that fills it waits for those syscalls): a flood of distinct hits between
        two periodic flushes would otherwise grow the batch without bound."""
        self._served[hash_part] = mtime_ns
        if len(self._served) >= SERVED_LIMIT:
            self.flush_served(self._offload)

    def flush_served(self, record: Callable[..., Any] | None = None) -> int:
        """Set atime = now on narinfos served since the last flush (mtime kept); count them.

        `record(fn, args)` runs the syscalls (the server passes its thread pool: a busy cache
        serves many thousands of distinct narinfos between two flushes)."""
        served, self._served = self._served, {}
        (record or (lambda fn, args: fn(*args)))(self._record_served, (served,))
        return len(served)

    def _record_served(self, served: dict[str, int | None]) -> None:
        now = time.time_ns()
        for hash_part, mtime_ns in served.items():
            path = self.narinfo_path(hash_part)
            with contextlib.suppress(FileNotFoundError):  # collected meanwhile
                os.utime(path, ns=(now, os.stat(path).st_mtime_ns if mtime_ns is None else mtime_ns))

    # -- uploads ---------------------------------------------------------------------------------

    def _tmp_path(self, what: str) -> Path:
        """A new name in tmp/. The pid in it keeps the names of workers apart (two may fetch or
        receive the same NAR at once)."""
        return self.tmp_dir / f"{what}.{os.getpid()}.{time.monotonic_ns()}"

    @contextlib.contextmanager
    def _disk_full_is_507(self) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            if _is_disk_full(error):
                raise UploadError(
                    507, f"no space left in store {self.root}: free space or run nixcache gc"
                ) from None
            raise

    @contextlib.contextmanager
    def _staged(self, what: str, *, eager: bool) -> Iterator[_Staged]:
        """An upload's temp file in tmp/ (see _Staged), removed unless the caller renamed it away;
        created at once when `eager`, in the thread pool (see _write_durable: the journal)."""
        staged = _Staged(self._tmp_path(what), self._offload, 0 if eager else UPLOAD_CHUNK)
        try:
            with self._disk_full_is_507():
                if eager:
                    self._offload(staged.materialize, ())
                yield staged
        finally:
            staged.close()
            if not staged.placed:  # renamed into nar/: no unlink (a failed lookup) on the loop
                _remove(staged.path)

    def _write_small(self, target: Path, data: bytes, mtime_ns: int | None = None) -> os.stat_result:
        """Publish `data` at `target` atomically, not counted in the store's usage (signed texts,
        extra files); the stat of what was published. In the thread pool, in one step: the
        create, fsync and rename (a rename keeps inode, mtime and size, so the stat identifies
        the published version)."""
        with self._disk_full_is_507():
            return self._offload(self._replace_durably, (target, data, mtime_ns))

    def _replace_durably(self, target: Path, data: bytes, mtime_ns: int | None) -> os.stat_result:
        tmp = self._tmp_path(target.name)
        try:
            published = _write_durable(tmp, data, mtime_ns)
            os.replace(tmp, target)
        finally:
            _remove(tmp)
        return published

    def _publish(self, tmp: Path, target: Path, size: int, *, nar: bool) -> None:
        """Rename `tmp` (`size` bytes) over `target` and count it in the store's usage, in one
        locked step."""
        with self.usage.changing() as change:
            try:
                replaced = os.stat(target).st_size
            except FileNotFoundError:
                replaced = None
            os.replace(tmp, target)
            if nar:
                change.nar_files += replaced is None
                change.nar_bytes += size - (replaced or 0)
            else:
                change.entries += replaced is None
                change.narinfo_bytes += size - (replaced or 0)

    def put_nar(
        self,
        name: str,
        body: BinaryIO,
        length: int | None,
        limit: int,
        expected: nar.NarDigest | None = None,
        progress: Callable[[Path, int], object] | None = None,
        before_publish: Callable[[str, Path], object] | None = None,
        chunk: int = 0,
    ) -> nar.NarDigest:
        """Receive `nar/<name>`: stream to tmp/, check the name is the sha256 of the bytes and the
        content decompresses to a NAR (with the `expected` NarHash/NarSize, when given), then
        publish meta and NAR. UploadError on any failure.

        `progress(tmp path, bytes so far)` runs after each chunk is written to the temp file,
        so a pull-through can stream the bytes to clients while they are stored;
        `before_publish(name, tmp path)` runs once it verified, before it is made durable and
        visible (the write-through to the origin; a pull-through releases its clients' last
        bytes); what it raises leaves nothing published. `chunk`: the read size (default
        UPLOAD_CHUNK)."""
        compression = narinfo.compression_of(name)
        if compression is None:
            raise UploadError(400, f"nar/{name}: expected nar/<52-char base32 sha256>{narinfo.NAR_FORM}")
        try:
            file_sha = base32.decode(name[:52], 32)
        except ValueError as error:  # e.g. a first character above '1': more than 256 bits
            raise UploadError(400, f"nar/{name}: the name is not a sha256 in Nix base32 ({error})") from None
        with self._staged(name, eager=progress is not None) as staged:
            sha = hashlib.sha256()
            out: Any = staged if progress is None else _Progress(staged, progress)
            size = _copy(body, length, limit, out, sha.update, chunk or UPLOAD_CHUNK)
            if sha.digest() != file_sha:
                raise UploadError(
                    400,
                    f"nar/{name}: the body hashes to {base32.encode(sha.digest())}, not to its name",
                )
            # The tmp file (when the NAR was small enough to be held in memory) is created in the
            # same hand-off to the thread pool as the verification: each hand-off wakes a pool
            # thread and then the loop.
            arrived = _ArrivedNar(name, compression, sha.digest(), size, expected)
            if before_publish is None and staged.held is not None:
                return self._publish_held_nar(staged, arrived)
            digest = self._offload(self._verify_nar, (staged, arrived))
            if before_publish is not None:
                before_publish(name, staged.path)
            self._publish_nar_durably(staged, name, digest, size)
        return digest

    def _publish_held_nar(self, staged: _Staged, arrived: _ArrivedNar) -> nar.NarDigest:
        """A NAR held in memory (a small push), verified, made durable and published in one
        round of the thread pool: one thread verifies the bytes and writes and fsyncs the meta
        while another writes and fsyncs the NAR's temp file, and the one that ends last renames
        both into place (the loop waits for one hand-off, not three). Nothing is renamed unless
        both succeeded."""
        meta_tmp = self._tmp_path(f"{arrived.name}.meta")
        held = bytes(staged.held or b"")  # the NAR thread empties staged.held as it writes it

        def verify_and_write_meta() -> nar.NarDigest:
            digest = arrived.digest(held)
            _write_durable(meta_tmp, digest.serialize().encode())
            return digest

        def publish(results: list[Any]) -> nar.NarDigest:
            self._publish_nar(arrived.name, staged.path, meta_tmp, arrived.size)
            staged.placed = True
            return results[0]

        try:
            return self._offload_then([(verify_and_write_meta, ()), (staged.persist, ())], publish)
        finally:
            if not staged.placed:
                _remove(meta_tmp)

    def _verify_nar(self, staged: _Staged, arrived: _ArrivedNar) -> nar.NarDigest:
        """The NAR's digest once its file is complete in tmp/; UploadError when it is no NAR or not
        the `expected` one."""
        staged.materialize()
        staged.flush()
        return arrived.digest(staged.path)

    def _publish_nar_durably(self, staged: _Staged, name: str, digest: nar.NarDigest, size: int) -> None:
        """fsync the NAR while its meta is written and fsync'ed, in two pool threads (the disk
        writes both at once: a push waits for one round of disk writes instead of two), then
        rename both into place. In the thread pool: a large NAR's fsync takes tens of ms, which
        every other connection would wait."""
        meta_tmp = self._tmp_path(f"{name}.meta")
        try:
            self._offload_all([(staged.sync, ()), (_write_durable, (meta_tmp, digest.serialize().encode()))])
            self._offload(self._publish_nar, (name, staged.path, meta_tmp, size))
        finally:
            _remove(meta_tmp)

    def _publish_nar(self, name: str, tmp: Path, meta_tmp: Path, size: int) -> None:
        # Under the shared gc lock: gc deletes a NAR and its meta as one step under the
        # exclusive lock, so it can never remove the meta we just wrote for a new copy.
        with self.gc_lock(exclusive=False):
            os.replace(meta_tmp, self.meta_dir / name)
            self._publish(tmp, self.nar_dir / name, size, nar=True)

    def nar_digest(self, name: str) -> nar.NarDigest | None:
        try:
            return nar.NarDigest.parse((self.meta_dir / name).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def put_narinfo(
        self,
        hash_part: str,
        body: BinaryIO,
        length: int | None,
        limit: int,
        before_publish: Callable[[NarInfo], object] | None = None,
    ) -> tuple[NarInfo, os.stat_result]:
        """Receive `<hash>.narinfo`: validate every field, check its NAR is here with the same
        FileSize/NarHash/NarSize, then publish it. UploadError on any failure.

        `before_publish(info)` runs once the narinfo is valid and before it is visible here (the
        write-through to the origin); what it raises leaves nothing published.
        Returns the narinfo as stored and the stat of the published file."""
        data = bytearray()
        _copy(body, length, limit, None, data.extend)
        try:
            info = narinfo.parse(data.decode("utf-8"), self.store_dir)
        except UnicodeDecodeError:
            raise UploadError(400, f"{hash_part}.narinfo is not UTF-8 text") from None
        except NarInfoError as error:
            raise UploadError(400, f"{hash_part}.narinfo: {error}") from None
        if info.hash_part != hash_part:
            raise UploadError(400, f"{hash_part}.narinfo: StorePath {info.store_path} has another hash")
        # Its NAR is checked under the gc lock as the narinfo is published (below); with a
        # write-through also first, so nothing invalid leaves this host. Every step that touches
        # the disk runs in the thread pool (see _write_durable).
        if before_publish is not None:
            self._offload(self._check_nar_locked, (hash_part, info))
            before_publish(info)
        with self._disk_full_is_507():
            published = self._store_narinfo(hash_part, info)
        return info, published

    def _store_narinfo(self, hash_part: str, info: NarInfo) -> os.stat_result:
        """Make the narinfo reachable and durable in two rounds of disk writes, in one hand-off
        to the thread pool: (1) in parallel threads, the narinfo rendered, written and fsync'ed
        in tmp/, its signed text made (signed now: its first GET, often right after a push,
        reads a file) and written and fsync'ed, while nar/ and nar-meta/ are fsync'ed (the
        NAR's PUT synced its bytes, not its renames); (2) in the thread that ended last, the
        NAR checked under the gc lock, both renamed into place and narinfo/ fsync'ed. Its 201
        survives a crash. The narinfo and its signed text share one mtime; a signed text that
        cannot be written (e.g. disk full) is left out: the GET signs then."""
        mtime_ns = time.time_ns()
        tmp = self._tmp_path(f"{hash_part}.narinfo")
        signed_tmp = self._tmp_path(f"{hash_part}.signed") if self.keys else None
        done = [False]

        def write_narinfo() -> os.stat_result:
            return _write_durable(tmp, info.render().encode(), mtime_ns)

        def write_signed(path: Path) -> os.stat_result | None:
            return _write_durable_or_none(path, info.signed(self.keys, self.store_dir).encode(), mtime_ns)

        def publish(results: list[Any]) -> os.stat_result:
            published, signed_staged = results[0], results[1] if signed_tmp is not None else None
            with_signed = signed_tmp if signed_staged is not None else None
            try:
                self._publish_narinfo(hash_part, info, tmp, published, with_signed)
            finally:  # what was not renamed (a refused NAR, a signed text left out)
                done[0] = True
                _remove(tmp)
                if signed_tmp is not None:
                    _remove(signed_tmp)
            return published

        writes: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
            (write_narinfo, ()),
            (_fsync_directory, (self.nar_dir, self.meta_dir)),
        ]
        if signed_tmp is not None:
            writes.insert(1, (write_signed, (signed_tmp,)))
        try:
            return self._offload_then(writes, publish)
        finally:
            if not done[0]:  # failed before publishing: its temp files
                _remove(tmp)
                if signed_tmp is not None:
                    _remove(signed_tmp)

    def _check_nar_locked(self, hash_part: str, info: NarInfo) -> None:
        with self.gc_lock(exclusive=False):
            self._check_nar(hash_part, info)

    def _publish_narinfo(
        self, hash_part: str, info: NarInfo, tmp: Path, published: os.stat_result, signed_tmp: Path | None
    ) -> None:
        # Under the shared gc lock, refresh the NAR's mtime, check it and publish: gc re-checks
        # that mtime under the exclusive lock before deleting a NAR, so it cannot collect this
        # one between our check and the rename.
        with self.gc_lock(exclusive=False):
            self._check_nar(hash_part, info)
            self._publish(tmp, self.narinfo_path(hash_part), published.st_size, nar=False)
            if signed_tmp is not None:
                with contextlib.suppress(OSError):  # none is left then: the GET signs it
                    self._place_signed(hash_part, published, lambda target: os.replace(signed_tmp, target))
        _fsync_directory(self.narinfo_dir)  # the rename on disk before the 201 (signed/ is derived)

    def publish_signed(self, hash_part: str, body: bytes, made_from: os.stat_result) -> bool:
        """Publish `body` as signed/<hash_part>.narinfo if narinfo/<hash_part>.narinfo is still
        the file `made_from` identifies (inode, mtime); False when it changed or went (nothing
        is left then: the next GET signs the current one)."""
        with self.gc_lock(exclusive=False):
            return self._publish_signed(hash_part, body, made_from)

    def _publish_signed(self, hash_part: str, body: bytes, made_from: os.stat_result) -> bool:
        # Under the shared gc lock, so gc and verify (exclusive) cannot delete the narinfo in
        # between. Checked again after the rename: a push of a new version by another worker
        # may have landed meanwhile, and an absent signed text is always safe, a stale one not.
        return self._place_signed(
            hash_part, made_from, lambda target: self._write_small(target, body, made_from.st_mtime_ns)
        )

    def _place_signed(
        self, hash_part: str, made_from: os.stat_result, place: Callable[[Path], object]
    ) -> bool:
        """`place(signed/<hash_part>.narinfo)` while narinfo/<hash_part>.narinfo is `made_from`."""
        identity = (made_from.st_ino, made_from.st_mtime_ns)
        if _identity(self.narinfo_path(hash_part)) != identity:
            return False
        target = self.signed_path(hash_part)
        try:
            place(target)
        except BaseException:
            _remove(target)  # the text of an older version must not outlive a failed write
            raise
        if _identity(self.narinfo_path(hash_part)) != identity:
            _remove(target)
            return False
        return True

    def delete_narinfo(self, hash_part: str) -> None:
        """Delete a narinfo and, first, its signed text; the caller holds the exclusive gc lock.
        FileNotFoundError when the narinfo is gone (its signed text is deleted all the same)."""
        _remove(self.signed_path(hash_part))
        self.narinfo_path(hash_part).unlink()

    def _check_nar(self, hash_part: str, info: NarInfo) -> None:
        """UploadError unless the narinfo's NAR is here with the same FileSize/NarHash/NarSize."""
        name = f"{hash_part}.narinfo"
        nar_path = self.nar_path(info.nar_file)
        try:
            os.utime(nar_path)
            file_size = nar_path.stat().st_size
        except FileNotFoundError:
            raise UploadError(400, f"{name}: URL {info.url} was not uploaded; PUT the NAR first") from None
        digest = self.nar_digest(info.nar_file)
        if digest is None:
            raise UploadError(400, f"{name}: URL {info.url} has no recorded NarHash; upload the NAR again")
        if info.file_size is not None and info.file_size != file_size:
            raise UploadError(400, f"{name}: FileSize {info.file_size} but {info.url} is {file_size} bytes")
        if info.nar_hash != digest.nar_hash:
            raise UploadError(400, f"{name}: NarHash {info.nar_hash} but {info.url} holds {digest.nar_hash}")
        if info.nar_size != digest.nar_size:
            raise UploadError(400, f"{name}: NarSize {info.nar_size} but {info.url} holds {digest.nar_size}")

    def drain(self, body: BinaryIO, length: int | None, limit: int) -> int:
        """Read and discard an upload this server does not keep (a client's nix-cache-info)."""
        return _copy(body, length, limit, None, None)

    def receive_small(self, body: BinaryIO, length: int | None, limit: int) -> bytes:
        """The whole body of a small upload (a listing, log, build trace), within `limit` (413)."""
        data = bytearray()
        _copy(body, length, limit, None, data.extend)
        return bytes(data)

    def put_file(self, relative: str, data: bytes) -> None:
        """Publish a verified small file at `relative` under the store (an extra file of
        nixcache.server.extras) atomically, creating its directory."""
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        self._write_small(target, data)


@dataclass(frozen=True)
class _ArrivedNar:
    """What an upload's NAR must be, known once its body is in: its name, compression, file
    sha256 and size, and the NarHash/NarSize its narinfo gives (a write-through), if any."""

    name: str
    compression: str
    file_sha: bytes
    size: int
    expected: nar.NarDigest | None

    def digest(self, source: Path | bytes) -> nar.NarDigest:
        """The digest of the NAR file at `source` (or these bytes); UploadError when it is no
        NAR or not the `expected` one."""
        try:
            if self.compression == "none":  # the file is the NAR: its sha256 is the NarHash
                digest = nar.plain_digest(source, self.file_sha, self.size)
            else:
                digest = nar.digest(source, self.compression)
        except nar.NarError as error:
            raise UploadError(400, f"nar/{self.name}: {error}") from None
        expected = self.expected
        if expected is not None and digest != expected:
            raise UploadError(
                400,
                f"nar/{self.name}: holds NarHash {digest.nar_hash} NarSize {digest.nar_size}, "
                f"not {expected.nar_hash} {expected.nar_size} as its narinfo says",
            )
        return digest


class _Staged:
    """An upload's temp file: its first `memory` bytes are held here, and the file is created
    (through `offload`: the journal) only when more arrive, or by `materialize` in the thread
    pool's step that verifies and publishes it, so a small NAR costs one hand-off to the pool
    instead of one per file operation. `memory` 0: created before the first byte (eager)."""

    def __init__(self, path: Path, offload: Callable[..., Any], memory: int):
        self.path = path
        self._offload = offload
        self._memory = memory
        self._held = bytearray()
        self._handle: BinaryIO | None = None
        self.placed = False  # renamed into place: nothing to remove

    @property
    def held(self) -> bytearray | None:
        """The bytes held so far while the file is not created, else None."""
        return self._held if self._handle is None else None

    def write(self, chunk: bytes) -> None:
        if self._handle is None:
            if len(self._held) + len(chunk) <= self._memory:
                self._held += chunk
                return
            self._offload(self.materialize, ())
        self._handle.write(chunk)  # type: ignore[union-attr]

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()

    def materialize(self) -> None:
        """Create the file (exclusively) holding what was held so far, once."""
        if self._handle is None:
            self._handle = open(self.path, "xb")  # noqa: SIM115 - closed by close()
            self._handle.write(self._held)
            self._held = bytearray()

    def sync(self) -> None:
        """Everything written so far on disk (the file must exist: materialize first)."""
        assert self._handle is not None
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def persist(self) -> None:
        """Create the file if it is not yet, put all of it on disk (`materialize`, `sync`) and
        close it (here, in the thread pool: not on the loop)."""
        self.materialize()
        self.sync()
        self._handle.close()  # type: ignore[union-attr]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


class _Progress:
    """A temp file's writer that reports each chunk once it is in the file (not in a buffer)."""

    def __init__(self, staged: _Staged, progress: Callable[[Path, int], object]):
        self.staged = staged
        self.progress = progress
        self.written = 0

    def write(self, chunk: bytes) -> None:
        self.staged.write(chunk)
        self.staged.flush()
        self.written += len(chunk)
        self.progress(self.staged.path, self.written)


def _copy(
    body: BinaryIO,
    length: int | None,
    limit: int,
    out: BinaryIO | None,
    update: Callable[[bytes], object] | None,
    chunk_size: int = UPLOAD_CHUNK,
) -> int:
    """Copy an upload body in chunks, enforcing `limit` (413) and the announced length (400)."""
    if length is not None and length > limit:
        raise UploadError(413, f"upload of {length} bytes exceeds max_upload_size ({limit} bytes)")
    total = 0
    # A body that can fill a buffer (a tier's NAR) is received into one reused buffer: no new
    # object, and no fresh memory, per chunk.
    readinto = getattr(body, "readinto", None)
    buffer = memoryview(bytearray(chunk_size)) if readinto is not None else None
    while True:
        want = chunk_size if length is None else min(chunk_size, length - total)
        if want <= 0:
            break
        try:
            chunk = buffer[: readinto(buffer[:want])] if buffer is not None else body.read(want)  # type: ignore[misc]
        except OSError as error:
            raise UploadError(400, f"upload interrupted after {total} bytes: {error}") from None
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise UploadError(413, f"upload exceeds max_upload_size ({limit} bytes)")
        if update is not None:
            update(chunk)
        if out is not None:
            out.write(chunk)  # a full disk raises in the caller's _staged: 507
    if length is not None and total != length:
        raise UploadError(400, f"upload ended after {total} of {length} bytes")
    return total

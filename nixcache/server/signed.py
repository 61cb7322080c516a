"""The signed narinfos on disk (signed/ of the store, see nixcache/server/store.py) after a change
of keys: which keys signed them, and the background re-signing when the server starts with others.

signed/KEYS lists the public keys (`name:base64`, one a line, in the configured order) whose
signatures every file in signed/ carries. A server whose keys differ (a rotation phase of
deploys/rotate_key.py, see docs/runbook.md "Key rotation"; or a store from before signed/ or
restored from a backup, which has no KEYS) keeps serving the files as they are when the two key
sets share a key (each phase of a rotation shares one with the next, and clients trust the
old key and the new one meanwhile); otherwise `Resigner.prepare` sets signed/ aside before the
first request, and each narinfo is signed on its first GET. `Resigner.run` signs every narinfo again
with the current keys, in batches in the thread pool (the event loop keeps serving), each file
replaced atomically, and writes KEYS last. What it has done is recorded after each batch in
signed/KEYS.next (the keys it signs with and the last hash done, in name order), so a restart
with the same keys resumes there; new pushes and the server's own signing on a missing file use
the current keys already. Several worker processes: one re-signs (flock on signed/.resign.lock),
the others only serve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from nixcache.atomicfile import write_atomically
from nixcache.keys import KeyFormatError, PublicKey, SecretKey
from nixcache.server import base32, narinfo
from nixcache.server.narinfo import HASH_LEN
from nixcache.server.store import Store, read_quietly

log = logging.getLogger("nixcache.server.signed")
KEYS_FILE = "KEYS"
PROGRESS_FILE = "KEYS.next"
LOCK_FILE = ".resign.lock"
STATS_FILE = ".resign-stats.json"  # this start's counts (read_stats), for every worker's /metrics
ASIDE_PREFIX = "signed.old."  # <store>/signed.old.<ns>: texts of unrelated keys, being deleted
BATCH = 500  # narinfos per trip to the thread pool: ~50 ms of signing, then the loop gets a turn
PROGRESS_SECONDS = 10.0

Offload = Callable[[Callable[..., Any], tuple[Any, ...]], Any]


def keys_text(keys: Sequence[SecretKey]) -> str:
    """What signed/KEYS holds for `keys`: their public keys, one a line."""
    return "".join(f"{key.public()}\n" for key in keys)


def recorded_keys(store: Store) -> str | None:
    """signed/KEYS as written, or None when there is none (a store from before signed/)."""
    try:
        return (store.signed_dir / KEYS_FILE).read_text()
    except FileNotFoundError:
        return None


def trusted_keys(store: Store) -> list[PublicKey]:
    """The public keys a file in signed/ may carry signatures of: those of signed/KEYS and,
    during a re-signing, those of signed/KEYS.next."""
    texts = [recorded_keys(store) or ""]
    with contextlib.suppress(OSError, ValueError, AttributeError):
        texts.append(json.loads((store.signed_dir / PROGRESS_FILE).read_text()).get("keys") or "")
    keys = []
    for line in "".join(texts).splitlines():
        with contextlib.suppress(KeyFormatError):
            keys.append(PublicKey.parse(line))
    return keys


def disagreement(
    stored: narinfo.NarInfo, signed_text: str, keys: Sequence[PublicKey], store_dir: str
) -> str | None:
    """Why `signed_text` is not what the server makes of the stored narinfo `stored` (its
    fields and uploaded signatures, then a signature by each key of this cache, each valid by
    one of `keys`), or None when it is."""
    try:
        signed = narinfo.parse(signed_text, store_dir)
    except narinfo.NarInfoError as error:
        return f"does not parse: {error}"
    if signed.render() != signed_text:
        return "is not a narinfo as this server writes it"
    if dataclasses.replace(signed, sigs=[]) != dataclasses.replace(stored, sigs=[]):
        return f"disagrees with narinfo/{stored.hash_part}.narinfo"
    if signed.sigs[: len(stored.sigs)] != stored.sigs:
        return f"lacks the signatures of narinfo/{stored.hash_part}.narinfo"
    message = stored.fingerprint(store_dir)
    ours = signed.sigs[len(stored.sigs) :]  # none when an uploaded Sig is this cache's own
    for sig in ours:
        if not any(key.verify(sig, message) for key in keys):
            return f"carries a signature by {sig.partition(':')[0]} that no key of signed/KEYS verifies"
    if not ours and not any(key.verify(sig, message) for sig in signed.sigs for key in keys):
        return "carries no signature by a key of signed/KEYS"
    return None


class Resigner:
    """Re-signs signed/ for the store's keys; `pending` and `done` feed the metrics."""

    def __init__(self, store: Store, offload: Offload | None = None, batch: int = BATCH):
        self.store = store
        self.offload: Offload = offload or (lambda fn, args: fn(*args))
        self.batch = batch
        self.wanted = keys_text(store.keys)
        self.pending = 0  # narinfos still to re-sign (nixcache_resign_pending)
        self.done = 0  # narinfos re-signed since the start (nixcache_resign_total)

    def needed(self) -> bool:
        return recorded_keys(self.store) != self.wanted

    def prepare(self) -> None:
        """Before the server serves: texts that carry no signature by a current key are set
        aside (one rename of signed/), because clients that trust only the current keys would
        refuse them. A rotation's phases share a key (A, then A and B, then B), so their texts
        stay and are served while they are re-signed; a change to unrelated keys (or a store
        whose signed/ has no KEYS) starts from an empty signed/, each narinfo signed on its
        first GET until the background run has done them all."""
        store = self.store
        with contextlib.suppress(FileNotFoundError):  # the counts of the previous start
            (store.signed_dir / STATS_FILE).unlink()
        recorded = recorded_keys(store)
        if recorded == self.wanted:
            return
        # Pending from now on, not only once the background run has counted them: a wait for
        # nixcache_resign_pending 0 (docs/runbook.md, Key rotation) must not pass before it starts.
        self.pending = store.usage.read().entries
        self._write_stats()
        if recorded is not None and set(recorded.splitlines()) & set(self.wanted.splitlines()):
            return
        with self._lock() as mine:
            if not mine or not _holds_texts(store):
                return
            aside = store.root / f"{ASIDE_PREFIX}{time.time_ns()}"
            os.rename(store.signed_dir, aside)
            store.signed_dir.mkdir(exist_ok=True)
            self._write_stats()  # into the new signed/
        log.warning(
            "signed narinfos: signed/ %s none of the keys %s: moved to %s (deleted in the"
            " background); narinfos are signed when asked for until all are re-signed",
            "has no KEYS, so it may carry" if recorded is None else "carries",
            ", ".join(key.name for key in store.keys),
            aside.name,
        )

    def run(self) -> None:
        """Re-sign everything not yet signed by the current keys, then record them in KEYS;
        and delete what `prepare` set aside (this start's or a previous one's)."""
        self._delete_set_aside()
        if not self.needed():
            return
        with self._lock() as mine:
            if not mine:
                log.info("signed narinfos: another worker re-signs them for the current keys")
                return
            if not self.needed():  # finished by the worker that held the lock before
                return
            self._resign()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[bool]:
        fd = os.open(self.store.signed_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def _delete_set_aside(self) -> None:
        for path in self.store.root.glob(f"{ASIDE_PREFIX}*"):
            self.offload(_delete_texts, (path,))

    def _resign(self) -> None:
        store = self.store
        through = self._resume_point()
        total, buckets = self.offload(_narinfo_names, (store, through))
        self.pending = total
        self._write_stats()
        previous = recorded_keys(store)
        why = "no signed/KEYS (an older or restored store)" if previous is None else "the keys changed"
        names_now = ", ".join(key.name for key in store.keys)
        resumed = f", resuming after {through}" if through else ""
        log.warning(
            "signed narinfos: %s: re-signing %d with %s in the background%s; the current texts are"
            " served meanwhile",
            why,
            total,
            names_now,
            resumed,
        )
        started = last_log = time.monotonic()
        for chunk in self._chunks(buckets):
            self.done += self.offload(_resign_batch, (store, chunk))
            self.pending -= len(chunk)
            self._record_progress(chunk[-1])
            self._write_stats()
            if time.monotonic() - last_log >= PROGRESS_SECONDS:
                last_log = time.monotonic()
                log.warning(
                    "signed narinfos: re-signed %d of %d, %d to go",
                    total - self.pending,
                    total,
                    self.pending,
                )
        self.offload(write_atomically, (store.signed_dir / KEYS_FILE, self.wanted.encode(), 0o644))
        with contextlib.suppress(FileNotFoundError):
            (store.signed_dir / PROGRESS_FILE).unlink()
        log.warning(
            "signed narinfos: all %d re-signed with %s in %.1f s; signed/KEYS updated",
            total,
            names_now,
            time.monotonic() - started,
        )

    def _chunks(self, buckets: list[bytearray]) -> Iterator[list[str]]:
        """The names of _narinfo_names in order, `batch` at a time across buckets (a small
        store's buckets hold a name or two each: one batch, one progress write per bucket would
        be a thousand of each), each bucket unpacked only when its turn comes."""
        names: list[str] = []
        for bucket in buckets:
            names += self.offload(_unpacked, (bucket,))
            bucket.clear()  # its memory back as the run goes on
            while len(names) >= self.batch:
                yield names[: self.batch]
                del names[: self.batch]
        if names:
            yield names

    def _write_stats(self) -> None:
        """The counts on disk, for the metrics of whichever worker answers a scrape (one worker
        re-signs; nixcache.server.prefork)."""
        data = json.dumps({"pending": self.pending, "done": self.done}).encode()
        # An fsync and a rename: in the thread pool, as every write of the store while serving.
        self.offload(write_atomically, (self.store.signed_dir / STATS_FILE, data, 0o644))

    def _resume_point(self) -> str:
        """The last hash a previous run with the same keys finished, or '' (start over)."""
        try:
            progress = json.loads((self.store.signed_dir / PROGRESS_FILE).read_text())
        except (OSError, ValueError):
            return ""
        if not isinstance(progress, dict) or progress.get("keys") != self.wanted:
            return ""
        through = progress.get("through")
        return through if isinstance(through, str) else ""

    def _record_progress(self, through: str) -> None:
        data = json.dumps({"keys": self.wanted, "through": through}).encode()
        self.offload(write_atomically, (self.store.signed_dir / PROGRESS_FILE, data, 0o644))


def read_stats(store: Store) -> tuple[int, int]:
    """(pending, done) of this start's re-signing; (0, 0) when none ran."""
    try:
        stats = json.loads((store.signed_dir / STATS_FILE).read_text())
        return int(stats["pending"]), int(stats["done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0


def _delete_texts(directory: Path) -> None:
    """Delete a set-aside signed/ (a flat directory of one text per narinfo) while reading it:
    shutil.rmtree lists a directory whole before it deletes anything, and for 1,000,000 texts
    that list put the worker at ~190 MiB of RSS (docs/benchmarks.md). Passes until one finds
    nothing more to delete; what cannot be deleted is left, as rmtree(ignore_errors) did."""
    while True:
        deleted = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)  # none of ours, small; an error: not counted
                    else:
                        os.unlink(entry.path)
                    deleted += 1
        if not deleted:
            break
    with contextlib.suppress(OSError):
        os.rmdir(directory)


def _holds_texts(store: Store) -> bool:
    with os.scandir(store.signed_dir) as entries:
        return any(entry.name.endswith(".narinfo") for entry in entries)


def _narinfo_names(store: Store, after: str) -> tuple[int, list[bytearray]]:
    """Hash parts of the stored narinfos past `after`, in one pass of scandir: (how many, one
    bytearray per two first characters in name order, each name packed in HASH_LEN ascii
    bytes). Packed, 1,000,000 names take 30 MB, and a bucket is a thousandth of them; a sorted
    list of str took ~110 MB more at its peak, which put a re-signing worker past its RSS
    budget (docs/benchmarks.md). Two characters, not one: a store whose names are not spread
    evenly (bench/store_scale.py's use two values of the first) still gets small buckets."""
    alphabet = sorted(base32.ALPHABET)  # sorted: name order
    buckets = {a + b: bytearray() for a in alphabet for b in alphabet}
    count = 0
    with os.scandir(store.narinfo_dir) as entries:
        for entry in entries:
            name = entry.name
            if len(name) == HASH_LEN + len(".narinfo") and name.endswith(".narinfo"):
                hash_part = name[:HASH_LEN]
                bucket = buckets.get(hash_part[:2])  # None: not a name of ours (".tmp…", upper case)
                if bucket is not None and hash_part > after:
                    bucket += hash_part.encode("ascii")
                    count += 1
    return count, [bucket for bucket in buckets.values() if bucket]


def _unpacked(bucket: bytearray) -> list[str]:
    """One bucket of _narinfo_names as sorted hash parts."""
    return sorted(bucket[i : i + HASH_LEN].decode("ascii") for i in range(0, len(bucket), HASH_LEN))


def _resign_batch(store: Store, hash_parts: list[str]) -> int:
    """In a worker thread: sign each narinfo with the store's keys and publish it; how many."""
    count = 0
    for hash_part in hash_parts:
        path = store.narinfo_path(hash_part)
        try:
            st = os.stat(path)
            info = narinfo.parse(read_quietly(path).decode(), store.store_dir)
        except FileNotFoundError:
            continue  # collected meanwhile
        except (OSError, ValueError) as error:  # damage: its GET says so, `nixcache verify` moves it
            log.warning("signed narinfos: %s.narinfo not re-signed: %s", hash_part, error)
            continue
        if store.publish_signed(hash_part, info.signed(store.keys, store.store_dir).encode(), st):
            count += 1
    return count

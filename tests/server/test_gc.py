"""`nixcache gc`: limits by size, age and free space; never a narinfo without its NAR."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import require

from nixcache.server.units import human_size
from server.conftest import Cache, StartCache
from server.helpers import Entry, make_entry, nixcache_cmd, push

DAY = 86400


def gc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nixcache_cmd("gc", *args), capture_output=True, text=True, timeout=120)


def age(cache: Cache, entry: Entry, seconds: float) -> None:
    """Make `entry` look last served (and uploaded) `seconds` ago, its NAR too."""
    t = time.time() - seconds
    os.utime(cache.store / "narinfo" / f"{entry.hash_part}.narinfo", (t, t))
    os.utime(cache.store / "nar" / entry.nar_file, (t, t))


def store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for d in ("narinfo", "nar", "nar-meta") for p in (store / d).iterdir())


def assert_consistent(store: Path) -> None:
    """Every narinfo's NAR (and its meta) is present. Safe to call while gc runs: a NAR seen
    missing counts only if its narinfo is still there afterwards (gc deletes narinfos first)."""
    for path in (store / "narinfo").iterdir():
        try:
            url = next(line for line in path.read_text().splitlines() if line.startswith("URL: "))
        except FileNotFoundError:
            continue
        name = url.removeprefix("URL: nar/")
        nar_there = (store / "nar" / name).is_file() and (store / "nar-meta" / name).is_file()
        assert nar_there or not path.exists(), f"{path.name} lost its NAR"


def present(cache: Cache, entry: Entry) -> bool:
    return (cache.store / "narinfo" / f"{entry.hash_part}.narinfo").exists()


@pytest.fixture
def aged(cache: Cache) -> list[Entry]:
    """Ten entries of ~10 KiB, entry i last served 10-i days ago (entry 0 is the oldest)."""
    entries = []
    for _ in range(10):
        entry = make_entry(os.urandom(10_000), compression="none")
        push(cache.client, entry, cache.token)
        entries.append(entry)
    for i, entry in enumerate(entries):
        age(cache, entry, (10 - i) * DAY)
    return entries


def test_max_size_deletes_least_recently_served_first(cache: Cache, aged: list[Entry]) -> None:
    before = store_bytes(cache.store)
    limit = before // 2
    out = gc("--store", str(cache.store), "--max-size", str(limit))
    assert out.returncode == 0, out.stderr
    assert store_bytes(cache.store) <= limit
    kept = [present(cache, e) for e in aged]
    assert kept == sorted(kept), "an older entry survived a newer one"
    assert kept.count(False) == 5  # ten equal entries, half the bytes
    assert "freed" in out.stdout and "deleted 5 narinfos and 5 NAR files" in out.stdout
    assert_consistent(cache.store)
    # what the server says about the deleted ones: a clean miss
    assert cache.client.get(f"/{aged[0].hash_part}.narinfo").status_code == 404
    assert cache.client.get(f"/{aged[-1].hash_part}.narinfo").status_code == 200


def test_older_than_deletes_only_old_entries(cache: Cache, aged: list[Entry]) -> None:
    out = gc("--store", str(cache.store), "--older-than", "4d12h")
    assert out.returncode == 0, out.stderr
    assert [present(cache, e) for e in aged] == [False] * 6 + [True] * 4
    assert_consistent(cache.store)


def test_dry_run_deletes_nothing(cache: Cache, aged: list[Entry]) -> None:
    before = sorted(p.name for p in (cache.store / "nar").iterdir())
    out = gc("--store", str(cache.store), "--older-than", "1s", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "would delete 10 narinfos and 10 NAR files" in out.stdout
    assert sorted(p.name for p in (cache.store / "nar").iterdir()) == before
    assert all(present(cache, e) for e in aged)


def test_dry_run_predicts_the_grace_period_of_nars(cache: Cache) -> None:
    """An old narinfo whose NAR was touched recently (a pusher HEADed it): both runs keep the
    entry whole, narinfo and NAR, and say why; the dry run says so first."""
    entry = make_entry()
    push(cache.client, entry, cache.token)
    t = time.time() - 30 * DAY
    os.utime(cache.store / "narinfo" / f"{entry.hash_part}.narinfo", (t, t))
    dry = gc("--store", str(cache.store), "--older-than", "7d", "--dry-run")
    assert "would delete 0 narinfos and 0 NAR files" in dry.stdout, dry.stdout
    real = gc("--store", str(cache.store), "--older-than", "7d")
    assert "deleted 0 narinfos and 0 NAR files" in real.stdout, real.stdout
    reason = "older-than 7d not met: 1 entry has a NAR younger than the grace period of 1h"
    assert reason in dry.stdout and reason in real.stdout
    assert present(cache, entry) and (cache.store / "nar" / entry.nar_file).exists()


def sharing(entry: Entry) -> Entry:
    """Another store path whose NAR file is byte for byte `entry`'s (one file on the server)."""
    other = make_entry(b"same bytes", compression=entry.compression)
    other.nar, other.file_bytes, other.nar_file = entry.nar, entry.file_bytes, entry.nar_file
    return other


def test_a_nar_shared_by_a_kept_narinfo_stays(cache: Cache) -> None:
    old = make_entry(b"same bytes", compression="xz")
    new = sharing(old)
    push(cache.client, old, cache.token)
    push(cache.client, new, cache.token)
    age(cache, old, 30 * DAY)
    out = gc("--store", str(cache.store), "--older-than", "7d")
    assert out.returncode == 0, out.stderr
    assert not present(cache, old) and present(cache, new)
    assert (cache.store / "nar" / old.nar_file).exists()
    assert_consistent(cache.store)
    assert cache.client.get(f"/nar/{new.nar_file}").content == new.file_bytes


def test_a_shared_nar_goes_with_the_last_narinfo_naming_it(cache: Cache) -> None:
    """max-size needs the shared NAR's bytes: both narinfos go (the older first), then the NAR."""
    first = make_entry(os.urandom(20_000), compression="none")
    second, other = sharing(first), make_entry(os.urandom(20_000), compression="none")
    for entry, days in ((first, 30), (second, 20), (other, 10)):
        push(cache.client, entry, cache.token)
        age(cache, entry, days * DAY)
    limit = store_bytes(cache.store) - 20_000
    out = gc("--store", str(cache.store), "--max-size", str(limit))
    assert out.returncode == 0, out.stderr
    assert "deleted 2 narinfos and 1 NAR files" in out.stdout and "not met" not in out.stdout, out.stdout
    assert [present(cache, e) for e in (first, second, other)] == [False, False, True]
    assert not (cache.store / "nar" / first.nar_file).exists()
    assert store_bytes(cache.store) <= limit
    assert_consistent(cache.store)


def test_a_shared_nar_in_its_grace_period_keeps_both_narinfos(cache: Cache) -> None:
    """Two long unserved narinfos share a NAR that a pusher just HEADed: neither loses it."""
    first = make_entry(os.urandom(20_000), compression="none")
    second = sharing(first)
    for entry in (first, second):
        push(cache.client, entry, cache.token)
        age(cache, entry, 30 * DAY)
    assert cache.client.head(f"/nar/{first.nar_file}").status_code == 200
    runs = [gc("--store", str(cache.store), "--max-size", "1", *dry) for dry in (["--dry-run"], [])]
    for out in runs:
        assert out.returncode == 0, out.stderr
        assert " 0 narinfos and 0 NAR files" in out.stdout, out.stdout
        assert "2 entries have a NAR younger than the grace period of 1h, kept whole" in out.stdout
    assert present(cache, first) and present(cache, second)
    assert cache.client.get(f"/nar/{second.nar_file}").content == second.file_bytes


def files(store: Path) -> dict[str, tuple[int, int]]:
    """Every file of the store's entries with its inode and mtime: what gc must not touch."""
    return {
        f"{d}/{p.name}": (p.stat().st_ino, p.stat().st_mtime_ns)
        for d in ("narinfo", "nar", "nar-meta")
        for p in (store / d).iterdir()
    }


def summary_tail(out: subprocess.CompletedProcess[str]) -> str:
    """The summary line from the store's size on: the limits not met and why (the disk's free
    space left out: other work on the machine changes it between two runs)."""
    (line,) = out.stdout.splitlines()
    return re.sub(r", [0-9.]+ [KMGT]?i?B free", "", line.split("; ", 1)[1].replace("would be", "now"))


def test_max_size_it_cannot_reach_keeps_fresh_entries_whole(cache: Cache) -> None:
    """Issue 10: 1,000 entries just pushed, max-size half the store. Every NAR is in its grace
    period, so nothing can be freed: gc deletes nothing (it used to delete all 1,000 narinfos
    and no NAR), exits 0 and says why in its one line; the dry run prints the same plan."""
    entries = [make_entry(os.urandom(2_000), compression="none") for _ in range(1000)]
    for entry in entries:
        push(cache.client, entry, cache.token)
    before = files(cache.store)
    limit = str(store_bytes(cache.store) // 2)
    dry = gc("--store", str(cache.store), "--max-size", limit, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert files(cache.store) == before
    real = gc("--store", str(cache.store), "--max-size", limit)
    assert real.returncode == 0, real.stderr
    assert files(cache.store) == before, "gc touched an entry younger than the grace period"
    assert_consistent(cache.store)
    assert "gc: would delete 0 narinfos and 0 NAR files, would free 0 B" in dry.stdout, dry.stdout
    assert "gc: deleted 0 narinfos and 0 NAR files, freed 0 B" in real.stdout, real.stdout
    reason = "not met: 1000 entries have a NAR younger than the grace period of 1h, kept whole"
    assert f"max-size {human_size(int(limit))} {reason}" in real.stdout
    assert summary_tail(dry) == summary_tail(real)
    assert cache.client.get(f"/nar/{entries[0].nar_file}").content == entries[0].file_bytes


def test_mixed_store_frees_old_entries_and_keeps_fresh_ones_whole(cache: Cache) -> None:
    """Old entries, fresh ones, and two least recently served ones whose NAR a pusher just
    HEADed: gc skips those two whole, frees the old ones and meets the limit; asked for more
    than it can free, it frees nothing else and says why."""
    headed = [make_entry(os.urandom(10_000), compression="none") for _ in range(2)]
    old = [make_entry(os.urandom(10_000), compression="none") for _ in range(6)]
    fresh = [make_entry(os.urandom(10_000), compression="none") for _ in range(4)]
    for entry in headed + old + fresh:
        push(cache.client, entry, cache.token)
    for i, entry in enumerate(headed + old):
        age(cache, entry, (20 - i) * DAY)
    for entry in headed:
        assert cache.client.head(f"/nar/{entry.nar_file}").status_code == 200
    kept = headed + fresh
    before = store_bytes(cache.store)
    limit = before * len(kept) // (len(kept) + len(old))  # what the kept entries hold
    out = gc("--store", str(cache.store), "--max-size", str(limit))
    assert out.returncode == 0, out.stderr
    assert "deleted 6 narinfos and 6 NAR files" in out.stdout and "not met" not in out.stdout, out.stdout
    assert [present(cache, e) for e in old] == [False] * 6
    assert all(present(cache, e) and (cache.store / "nar" / e.nar_file).exists() for e in kept)
    assert store_bytes(cache.store) <= limit
    assert_consistent(cache.store)
    left = files(cache.store)
    more = gc("--store", str(cache.store), "--max-size", str(limit // 2))
    assert more.returncode == 0, more.stderr
    assert "deleted 0 narinfos and 0 NAR files" in more.stdout, more.stdout
    assert "not met: 6 entries have a NAR younger than the grace period of 1h" in more.stdout
    assert files(cache.store) == left


def test_serving_an_entry_protects_it(cache: Cache, aged: list[Entry]) -> None:
    assert cache.client.get(f"/{aged[0].hash_part}.narinfo").status_code == 200
    cache.server.stop()  # flushes the last-served times it batches
    out = gc("--store", str(cache.store), "--older-than", "1d")
    assert out.returncode == 0, out.stderr
    assert [present(cache, e) for e in aged] == [True] + [False] * 9


def test_an_entry_served_while_gc_runs_is_kept(
    cache: Cache, aged: list[Entry], monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc deletes from what it scanned; an entry served after the scan (its atime moved, as the
    server's flush of served marks does) is kept, and the others go."""
    from nixcache.server import gc as gcmod

    scan = gcmod._Scan
    served = cache.store / "narinfo" / f"{aged[0].hash_part}.narinfo"

    def scan_then_serve(*args: object) -> object:
        scanned = scan(*args)  # type: ignore[arg-type]
        os.utime(served, ns=(time.time_ns(), served.stat().st_mtime_ns))
        return scanned

    monkeypatch.setattr(gcmod, "_Scan", scan_then_serve)
    result = gcmod.run(gcmod.Limits(store=cache.store, older_than=5 * DAY), echo=lambda _: None)
    assert present(cache, aged[0])
    assert [present(cache, entry) for entry in aged[1:5]] == [False] * 4
    assert result.kept_changed == 1
    assert_consistent(cache.store)


def test_orphan_nars_are_collected_after_a_grace_period(cache: Cache) -> None:
    fresh, stale = make_entry(), make_entry()
    for entry in (fresh, stale):
        r = cache.client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes, auth=cache.auth)
        assert r.status_code == 201
    t = time.time() - 2 * 3600
    os.utime(cache.store / "nar" / stale.nar_file, (t, t))
    out = gc("--store", str(cache.store), "--older-than", "30d")
    assert out.returncode == 0, out.stderr
    assert (cache.store / "nar" / fresh.nar_file).exists()  # its narinfo may be on its way
    assert not (cache.store / "nar" / stale.nar_file).exists()
    assert not (cache.store / "nar-meta" / stale.nar_file).exists()


def test_gc_runs_show_in_metrics(cache: Cache, aged: list[Entry]) -> None:
    assert gc("--store", str(cache.store), "--older-than", "5d12h").returncode == 0
    metrics = cache.client.get("/metrics").text
    assert "nixcache_gc_runs_total 1.0" in metrics
    freed = next(line for line in metrics.splitlines() if line.startswith("nixcache_gc_freed_bytes_total"))
    assert float(freed.split()[1]) > 5 * 10_000


def test_min_free_max_free_on_a_small_filesystem(start_cache: StartCache, tmp_path: Path) -> None:
    require(os.geteuid() == 0, "mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        cache = start_cache(store=mount / "store")
        entries = []
        for i in range(20):
            entry = make_entry(os.urandom(100_000), compression="none")
            push(cache.client, entry, cache.token)
            age(cache, entry, (20 - i) * DAY)
            entries.append(entry)
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        # Below min-free: collect until 1 MiB more is free; not below: nothing happens.
        untouched = gc(
            "--store", str(cache.store), "--min-free", str(free - 4096), "--max-free", str(free * 4)
        )
        assert untouched.returncode == 0 and "deleted 0 narinfos" in untouched.stdout
        target = free + 1024 * 1024
        out = gc("--store", str(cache.store), "--min-free", str(free + 1), "--max-free", str(target))
        assert out.returncode == 0, out.stderr
        after = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        assert after >= target
        kept = [present(cache, e) for e in entries]
        assert kept == sorted(kept) and 0 < kept.count(False) < 20, kept
        assert_consistent(cache.store)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no limit given"),
        (["--max-size", "lots"], "not a size"),
        (["--older-than", "yesterday"], "not a duration"),
        (["--max-free", "1G"], "--max-free (gc_max_free) needs --min-free (gc_min_free)"),
        (["--min-free", "2G", "--max-free", "1G"], "must be at least --min-free/gc_min_free (2147483648)"),
    ],
)
def test_bad_gc_arguments_say_what_to_fix(cache: Cache, args: list[str], message: str) -> None:
    out = gc("--store", str(cache.store), *args)
    assert out.returncode != 0
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_gc_refuses_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    out = gc("--store", str(tmp_path), "--max-size", "1G")
    assert out.returncode != 0 and "not a nixcache store" in out.stderr


def test_gc_racing_pushes_never_orphans_a_narinfo(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    """Collect in a loop while a pusher re-pushes the same paths as nix copy does (HEAD the NAR,
    PUT it only when missing, then PUT the narinfo): every push succeeds and no narinfo ever
    names a missing NAR. The grace period is cut to 1 s so NARs become collectable quickly (a
    narinfo PUT checks its NAR before and after its fsync: under load that took over 0.2 s, and
    gc, polling, collected the NAR in between, as it may once a push outlasts the grace period);
    only narinfos are aged (NAR mtimes are the server's protocol with gc and are left alone)."""
    import threading

    from nixcache.server import gc as gcmod

    monkeypatch.setattr(gcmod, "GRACE_SECONDS", 1.0)
    entries = [make_entry(os.urandom(2000)) for _ in range(20)]
    for entry in entries:
        push(cache.client, entry, cache.token)
    limits = gcmod.Limits(store=cache.store, older_than=DAY)
    stop = threading.Event()
    runs = []

    def collect() -> None:
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            t = time.time() - 30 * DAY
            for entry in entries:  # every narinfo looks long unserved
                with contextlib.suppress(FileNotFoundError):
                    os.utime(cache.store / "narinfo" / f"{entry.hash_part}.narinfo", (t, t))
            runs.append(gcmod.run(limits, echo=lambda _: None))
            time.sleep(0.01)

    time.sleep(1.1)  # past the grace period
    collector = threading.Thread(target=collect)
    collector.start()
    failures = []
    try:
        for _ in range(5):
            for entry in entries:
                head = cache.client.head(f"/nar/{entry.nar_file}")
                if head.status_code == 404:
                    put = cache.client.put(
                        f"/nar/{entry.nar_file}", content=entry.file_bytes, auth=cache.auth
                    )
                    if put.status_code != 201:
                        failures.append(put.text)
                put = cache.client.put(
                    f"/{entry.hash_part}.narinfo", content=entry.narinfo(), auth=cache.auth
                )
                if put.status_code != 201:
                    failures.append(put.text)
                assert_consistent(cache.store)
            time.sleep(1.05)  # let the NARs age past the grace period again
    finally:
        stop.set()
        collector.join(30)
    assert failures == []
    assert sum(r.deleted_nars for r in runs) > 0, "gc never deleted a NAR: the race was not exercised"
    assert_consistent(cache.store)


def test_a_scan_that_reads_slowly_goes_on_in_threads_with_the_same_outcome(
    cache: Cache, aged: list[Entry], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Narinfos are read in gc's own thread while they come from the page cache, and by a
    pool of threads for a while after a chunk that waited for the disk: here every chunk did."""
    from nixcache.server import gc as gcmod

    monkeypatch.setattr(gcmod, "SCAN_CHUNK", 3)
    monkeypatch.setattr(gcmod, "COLD_WAITS", -1.0)
    monkeypatch.setattr(gcmod, "COLD_BURST", 1)  # this thread, the threads, this thread, …
    result = gcmod.run(gcmod.Limits(store=cache.store, older_than=5.5 * DAY), echo=lambda _: None)
    assert sorted(result.deleted) == sorted(entry.hash_part for entry in aged[:5])
    assert [present(cache, entry) for entry in aged] == [False] * 5 + [True] * 5
    assert_consistent(cache.store)


def test_the_nar_file_of_a_narinfo_is_found_on_any_line(tmp_path: Path) -> None:
    from nixcache.server.gc import nar_file_of

    path = tmp_path / "x.narinfo"
    for text, expected in (
        ("URL: nar/a.nar\nStorePath: /nix/store/x\n", "a.nar"),
        ("StorePath: /nix/store/x\nURL: nar/b.nar.xz\r\n", "b.nar.xz"),
        ("StorePath: /nix/store/x\nNotURL: nar/c.nar\n", None),
        ("StorePath: /nix/store/x\nURL: http://elsewhere/d.nar\n", None),
    ):
        path.write_text(text)
        assert nar_file_of(path) == expected


@pytest.mark.parametrize("broken", [False, True])
def test_the_store_size_counts_a_shared_nar_once_and_a_missing_one_not(cache: Cache, broken: bool) -> None:
    from nixcache.server import gc as gcmod

    first = make_entry(os.urandom(5_000), compression="none")
    lone = make_entry(os.urandom(7_000), compression="none")
    for entry in (first, sharing(first), lone):
        push(cache.client, entry, cache.token)
    if broken:  # a narinfo whose NAR is gone (the store damaged by hand, say)
        (cache.store / "nar" / lone.nar_file).unlink()
        (cache.store / "nar-meta" / lone.nar_file).unlink()
    result = gcmod.run(
        gcmod.Limits(store=cache.store, older_than=30 * DAY), dry_run=True, echo=lambda _: None
    )
    assert result.store_bytes == store_bytes(cache.store)

"""`nixcache gc`: limits by size, age and free space; never a narinfo without its NAR."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import require

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
    """An old narinfo whose NAR was touched recently (a pusher HEADed it): both runs delete the
    narinfo and spare the NAR, and the dry run says so."""
    entry = make_entry()
    push(cache.client, entry, cache.token)
    t = time.time() - 30 * DAY
    os.utime(cache.store / "narinfo" / f"{entry.hash_part}.narinfo", (t, t))
    dry = gc("--store", str(cache.store), "--older-than", "7d", "--dry-run")
    assert "would delete 1 narinfos and 0 NAR files" in dry.stdout, dry.stdout
    real = gc("--store", str(cache.store), "--older-than", "7d")
    assert "deleted 1 narinfos and 0 NAR files" in real.stdout, real.stdout
    assert (cache.store / "nar" / entry.nar_file).exists()


def test_a_nar_shared_by_a_kept_narinfo_stays(cache: Cache) -> None:
    old = make_entry(b"same bytes", compression="xz")
    new = make_entry(b"same bytes", compression="xz")
    new.file_bytes, new.nar_file = old.file_bytes, old.nar_file  # identical NAR file
    push(cache.client, old, cache.token)
    push(cache.client, new, cache.token)
    age(cache, old, 30 * DAY)
    out = gc("--store", str(cache.store), "--older-than", "7d")
    assert out.returncode == 0, out.stderr
    assert not present(cache, old) and present(cache, new)
    assert (cache.store / "nar" / old.nar_file).exists()
    assert_consistent(cache.store)
    assert cache.client.get(f"/nar/{new.nar_file}").content == new.file_bytes


def test_serving_an_entry_protects_it(cache: Cache, aged: list[Entry]) -> None:
    assert cache.client.get(f"/{aged[0].hash_part}.narinfo").status_code == 200
    cache.server.stop()  # flushes the last-served times it batches
    out = gc("--store", str(cache.store), "--older-than", "1d")
    assert out.returncode == 0, out.stderr
    assert [present(cache, e) for e in aged] == [True] + [False] * 9


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
    names a missing NAR. The grace period is cut to 0.2 s so NARs become collectable quickly;
    only narinfos are aged (NAR mtimes are the server's protocol with gc and are left alone)."""
    import threading

    from nixcache.server import gc as gcmod

    monkeypatch.setattr(gcmod, "GRACE_SECONDS", 0.2)
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

    time.sleep(0.3)  # past the grace period
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
            time.sleep(0.25)  # let the NARs age past the grace period again
    finally:
        stop.set()
        collector.join(30)
    assert failures == []
    assert sum(r.deleted_nars for r in runs) > 0, "gc never deleted a NAR: the race was not exercised"
    assert_consistent(cache.store)

"""`nixcache verify`: damage is found, moved aside under the gc lock, counted in /metrics, and a
push repairs it."""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import require
from prometheus_client.parser import text_string_to_metric_families
from support import nixbuild

from nixcache import nixenv
from server.conftest import Cache, StartCache
from server.helpers import Entry, make_entry, nixcache_cmd, push, write_key
from server.tiers_support import binary_cache_server, publish_upstream, write_config


def verify(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        nixcache_cmd("verify", "--store", str(store), *args), capture_output=True, text=True, timeout=120
    )


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Flip one bit in the middle of `path`, keeping its size, inode and mtime (as bit rot does)."""
    st = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(st.st_size // 2 if offset is None else offset)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def metric(cache: Cache, name: str) -> float:
    text = cache.client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


def quarantined(store: Path) -> list[str]:
    """Files under quarantine/<time>/, as '<kind>/<name>'."""
    root = store / "quarantine"
    if not root.exists():
        return []
    return sorted(f"{p.parent.name}/{p.name}" for p in root.glob("*/*/*"))


@pytest.fixture
def entries(cache: Cache) -> list[Entry]:
    """Three pushed entries, one per compression that needs a decompressor, plus an uncompressed one."""
    pushed = [make_entry(os.urandom(50_000), compression=c) for c in ("xz", "zstd", "bzip2", "none")]
    for entry in pushed:
        push(cache.client, entry, cache.token)
    return pushed


def test_an_intact_store_verifies_clean(cache: Cache, entries: list[Entry]) -> None:
    out = verify(cache.store)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1].startswith("verify: checked 4 narinfos and 4 NAR files, ")
    assert "; 0 damaged, 0 files quarantined" in out.stdout
    assert quarantined(cache.store) == []
    assert metric(cache, "nixcache_verify_runs_total") == 1
    assert metric(cache, "nixcache_verify_last_damaged_entries") == 0
    assert metric(cache, "nixcache_verify_last_run_timestamp_seconds") > time.time() - 60


def test_a_flipped_byte_is_found_quarantined_counted_and_served_as_404(
    cache: Cache, entries: list[Entry]
) -> None:
    damaged, intact = entries[0], entries[1:]
    flip_byte(cache.store / "nar" / damaged.nar_file)
    # Before verify the damage is served as it is: clients fail with a decompression error.
    assert cache.client.get(f"/{damaged.hash_part}.narinfo").status_code == 200

    out = verify(cache.store)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"verify: damaged: nar/{damaged.nar_file} its bytes hash to " in out.stdout
    assert "not to its name (FileHash)" in out.stdout
    assert "; 1 damaged, 3 files quarantined in " in out.stdout.splitlines()[-1]
    assert quarantined(cache.store) == sorted(
        [f"narinfo/{damaged.hash_part}.narinfo", f"nar-meta/{damaged.nar_file}", f"nar/{damaged.nar_file}"]
    )
    reasons = next((cache.store / "quarantine").glob("*/REASONS")).read_text()
    assert f"nar/{damaged.nar_file}: nar/{damaged.nar_file} its bytes hash to" in reasons

    assert cache.client.get(f"/{damaged.hash_part}.narinfo").status_code == 404
    assert cache.client.head(f"/nar/{damaged.nar_file}").status_code == 404
    for entry in intact:
        assert cache.client.get(f"/{entry.hash_part}.narinfo").status_code == 200
        assert cache.client.get(f"/nar/{entry.nar_file}").content == entry.file_bytes
    assert metric(cache, "nixcache_verify_last_damaged_entries") == 1
    assert metric(cache, "nixcache_verify_damaged_entries_total") == 1
    assert metric(cache, "nixcache_verify_quarantined_files_total") == 3

    # A push of the same path repairs it (the NAR is absent, so it is uploaded and verified again).
    push(cache.client, damaged, cache.token)
    assert cache.client.get(f"/nar/{damaged.nar_file}").content == damaged.file_bytes
    again = verify(cache.store)
    assert again.returncode == 0, again.stdout + again.stderr
    assert metric(cache, "nixcache_verify_last_damaged_entries") == 0
    assert metric(cache, "nixcache_verify_damaged_entries_total") == 1  # the total keeps the history
    assert len(quarantined(cache.store)) == 3  # never emptied by nixcache


def test_dry_run_reports_and_moves_nothing(cache: Cache, entries: list[Entry]) -> None:
    flip_byte(cache.store / "nar" / entries[3].nar_file)  # uncompressed: the same check
    out = verify(cache.store, "--dry-run")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"nar/{entries[3].nar_file} its bytes hash to" in out.stdout
    assert "(dry run: left in place)" in out.stdout
    assert "1 damaged, nothing quarantined (dry run)" in out.stdout
    assert quarantined(cache.store) == []
    assert (cache.store / "nar" / entries[3].nar_file).exists()
    assert cache.client.get(f"/{entries[3].hash_part}.narinfo").status_code == 200
    assert metric(cache, "nixcache_verify_runs_total") == 0  # a dry run records nothing


def test_a_nar_shared_by_two_narinfos_takes_both_along(cache: Cache) -> None:
    first = make_entry(b"shared bytes", compression="xz")
    second = make_entry(b"shared bytes", compression="xz")
    second.nar, second.file_bytes, second.nar_file = first.nar, first.file_bytes, first.nar_file
    push(cache.client, first, cache.token)
    push(cache.client, second, cache.token)
    flip_byte(cache.store / "nar" / first.nar_file)
    out = verify(cache.store)
    assert out.returncode == 1, out.stdout
    assert "1 damaged, 4 files quarantined" in out.stdout
    for entry in (first, second):
        assert cache.client.get(f"/{entry.hash_part}.narinfo").status_code == 404


def test_narinfo_damage_on_its_own(cache: Cache, entries: list[Entry]) -> None:
    """A narinfo that does not parse, one that names a missing NAR, one whose NarSize disagrees
    with its NAR: each goes alone, its NAR stays when it is intact."""
    unparseable, dangling, wrong_size = entries[0], entries[1], entries[2]
    (cache.store / "narinfo" / f"{unparseable.hash_part}.narinfo").write_text("StorePath: /nix/sto\x00re\n")
    (cache.store / "nar" / dangling.nar_file).unlink()
    (cache.store / "narinfo" / f"{wrong_size.hash_part}.narinfo").write_text(
        wrong_size.narinfo(NarSize=str(len(wrong_size.nar) + 1))
    )
    out = verify(cache.store)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"narinfo/{unparseable.hash_part}.narinfo does not parse: " in out.stdout
    missing = f"narinfo/{dangling.hash_part}.narinfo names nar/{dangling.nar_file}, which is not in"
    assert missing in out.stdout
    assert f"narinfo/{wrong_size.hash_part}.narinfo says NarHash" in out.stdout
    assert "3 damaged, 3 files quarantined" in out.stdout
    assert quarantined(cache.store) == sorted(f"narinfo/{e.hash_part}.narinfo" for e in entries[:3])
    assert (cache.store / "nar" / wrong_size.nar_file).exists()
    assert cache.client.get(f"/{entries[3].hash_part}.narinfo").status_code == 200


def test_nar_hash_finds_content_that_disagrees_with_its_meta(cache: Cache, entries: list[Entry]) -> None:
    """--nar-hash decompresses: a meta that lies about a compressed NAR is found only with it."""
    entry = entries[1]  # zstd
    meta = cache.store / "nar-meta" / entry.nar_file
    nar_hash, size = meta.read_text().split()
    meta.write_text(f"{nar_hash} {int(size) + 8}\n")
    (cache.store / "narinfo" / f"{entry.hash_part}.narinfo").write_text(
        entry.narinfo(NarSize=str(int(size) + 8))
    )
    (cache.store / "signed" / f"{entry.hash_part}.narinfo").unlink()  # signed again when served
    assert verify(cache.store, "--dry-run").returncode == 0
    out = verify(cache.store, "--nar-hash")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"nar/{entry.nar_file} holds NarHash {nar_hash} NarSize {size}, but its nar-meta" in out.stdout


def test_quarantine_waits_for_the_gc_lock(cache: Cache, entries: list[Entry]) -> None:
    """While an upload holds the shared gc lock (between its check and its publish), verify
    moves nothing; it moves the entry as soon as the lock is free."""
    flip_byte(cache.store / "nar" / entries[0].nar_file)
    fd = os.open(cache.store / "gc.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        proc = subprocess.Popen(
            nixcache_cmd("verify", "--store", str(cache.store)), stdout=subprocess.PIPE, text=True
        )
        time.sleep(2)
        assert proc.poll() is None, "verify did not wait for the lock"
        assert (cache.store / "nar" / entries[0].nar_file).exists()
    finally:
        os.close(fd)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, stdout
    assert not (cache.store / "nar" / entries[0].nar_file).exists()


def test_progress_lines_go_to_stderr(cache: Cache, entries: list[Entry]) -> None:
    out = verify(cache.store, "--progress-seconds", "0.1", "--nar-hash")
    assert out.returncode == 0, out.stderr
    # At least the summary on stdout; progress only on stderr (four small NARs may all fit in 0.1 s).
    assert all(line.startswith("verify: checked") for line in out.stdout.splitlines())
    assert all(" NAR files, " in line and "damaged so far" in line for line in out.stderr.splitlines())


def test_not_a_store_is_exit_2_in_one_line(tmp_path: Path) -> None:
    out = verify(tmp_path / "nowhere")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'nowhere'} is not a nixcache store (no narinfo/ and nar/ in it); check --store"
    ]


# What the runbook's corrupted-store procedure tells CI to add: Nix's client caches positive
# narinfo lookups for 30 days, so a runner that pushed a path before skips it without asking.
BYPASS_NARINFO_CACHE = ["--option", "narinfo-cache-positive-ttl", "0"]


def test_a_runner_that_pushed_before_repairs_the_path_with_nix_copy(cache: Cache, tmp_path: Path) -> None:
    require(os.geteuid() == 0, "building into /nix/store needs root")
    top = nixbuild.build(nixbuild.closure("verify", uuid.uuid4().hex), tmp_path / "build")
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1\nlogin nix\npassword {cache.token}\n")
    netrc.chmod(0o600)
    runner_home = tmp_path / "runner"  # one HOME for every push, as on a CI runner

    def push_with_nix(*extra: str) -> subprocess.CompletedProcess[str]:
        argv = ["nix", "copy", "--to", cache.url, top, "--option", "netrc-file", str(netrc), *extra]
        return nixenv.run(argv, runner_home)

    first = push_with_nix()
    assert first.returncode == 0, first.stderr
    hash_part = Path(top).name[:32]
    info = cache.client.get(f"/{hash_part}.narinfo").text
    nar_file = next(line for line in info.splitlines() if line.startswith("URL: ")).removeprefix("URL: nar/")
    flip_byte(cache.store / "nar" / nar_file, offset=64)

    out = verify(cache.store)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"nar/{nar_file} its bytes hash to" in out.stdout
    assert metric(cache, "nixcache_verify_last_damaged_entries") == 1
    assert cache.client.get(f"/{hash_part}.narinfo").status_code == 404

    # The trap the runbook warns about: the runner's narinfo cache says the path is there.
    plain = push_with_nix()
    assert plain.returncode == 0, plain.stderr
    assert "copying 0 paths" in plain.stderr
    assert cache.client.get(f"/{hash_part}.narinfo").status_code == 404

    repaired = push_with_nix(*BYPASS_NARINFO_CACHE)
    assert repaired.returncode == 0, repaired.stderr
    assert "copying 1 paths" in repaired.stderr  # only the damaged path: the leaf is there
    assert cache.client.get(f"/{hash_part}.narinfo").status_code == 200
    fetched = nixenv.run(
        [
            "nix", "copy", "--from", cache.url, "--to", str(tmp_path / "client"), top,
            "--option", "require-sigs", "true",
            "--option", "trusted-public-keys", str(cache.key.public()),
            "--option", "netrc-file", str(netrc),
        ],
        tmp_path / "client-home",
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "client" / "nix" / "store" / Path(top).name).read_text() == Path(top).read_text()
    assert verify(cache.store).returncode == 0
    assert metric(cache, "nixcache_verify_last_damaged_entries") == 0


def test_run_by_root_leaves_what_it_creates_to_the_store_owner(cache: Cache, entries: list[Entry]) -> None:
    """An operator's `nixcache verify` as root must not leave root-owned directories that the
    service user's next run (the timer) cannot create its own quarantine in."""
    require(os.geteuid() == 0, "needs root to hand the store to another user")
    flip_byte(cache.store / "nar" / entries[0].nar_file)
    nobody = 65534
    for path in [cache.store, *cache.store.rglob("*")]:
        os.chown(path, nobody, nobody)
    assert verify(cache.store).returncode == 1
    created = [
        cache.store / "quarantine",
        *(cache.store / "quarantine").rglob("*"),
        cache.store / "verify-stats.json",
    ]
    assert {p.relative_to(cache.store).as_posix(): p.stat().st_uid for p in created if p.is_dir()} == {
        p.relative_to(cache.store).as_posix(): nobody for p in created if p.is_dir()
    }
    assert (cache.store / "verify-stats.json").stat().st_uid == nobody


def test_a_pulled_through_entry_is_verified_and_pulled_again_once_quarantined(
    start_cache: StartCache, tmp_path: Path
) -> None:
    """Entries a pull-through stored live in the same layout: verify checks them, and after the
    quarantine the next request fetches (and verifies) the upstream's copy again."""
    root = tmp_path / "upstream"
    _, upstream_key = write_key(tmp_path, "upstream-1")
    entry = make_entry(os.urandom(100_000), compression="xz")
    publish_upstream(root, entry, upstream_key)
    with binary_cache_server(root) as url:
        config = write_config(tmp_path / "up.toml", upstreams=[(url, [str(upstream_key.public())])])
        cache = start_cache("--config", str(config))
        assert cache.client.get(f"/{entry.hash_part}.narinfo").status_code == 200
        assert cache.client.get(f"/nar/{entry.nar_file}").content == entry.file_bytes
        local = cache.store / "nar" / entry.nar_file
        assert local.exists() and (cache.store / "narinfo" / f"{entry.hash_part}.narinfo").exists()

        flip_byte(local)
        out = verify(cache.store)
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"nar/{entry.nar_file} its bytes hash to" in out.stdout
        assert not local.exists()

        assert cache.client.get(f"/{entry.hash_part}.narinfo").status_code == 200  # from upstream
        assert cache.client.get(f"/nar/{entry.nar_file}").content == entry.file_bytes
        assert verify(cache.store).returncode == 0


def test_a_damaged_narinfo_pushed_again_before_the_move_stays(cache: Cache, entries: list[Entry]) -> None:
    """Verify found the narinfo damaged, but a push replaced it while verify waited for the lock:
    the fresh narinfo is not moved aside."""
    entry = entries[0]
    (cache.store / "narinfo" / f"{entry.hash_part}.narinfo").write_text("garbage\n")
    fd = os.open(cache.store / "gc.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # an upload between its check and its publish
        proc = subprocess.Popen(
            nixcache_cmd("verify", "--store", str(cache.store)), stdout=subprocess.PIPE, text=True
        )
        time.sleep(2)  # verify scanned, found the damage and waits for the exclusive lock
        assert proc.poll() is None
        push(cache.client, entry, cache.token)  # shared locks do not exclude each other
    finally:
        os.close(fd)
    stdout, _ = proc.communicate(timeout=60)
    assert "0 damaged, 0 files quarantined; 1 changed before they could be moved" in stdout
    assert cache.client.get(f"/{entry.hash_part}.narinfo").status_code == 200

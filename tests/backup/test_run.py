"""`nixcache backup run` against a real restic repository: snapshots, metrics, failures, retention."""

from __future__ import annotations

import fcntl
import json
import subprocess
import time
from pathlib import Path

from nixcache.backup.restic import Restic, classify_backup_errors


def test_first_run_initialises_backs_up_checks_and_writes_metrics(backup_env):
    before = time.time()
    result = backup_env.cli("run")
    after = time.time()
    assert result.exit_code == 0, result.output
    assert "does not exist yet; initialising it" in result.stderr
    assert result.stdout.startswith("nixcache backup ok: snapshot ")
    assert "repository initialised" in result.stdout and "check passed" in result.stdout

    snapshots = Restic(backup_env.config).snapshots()
    assert len(snapshots) == 1
    assert snapshots[0].paths == [backup_env.config.config_dir]
    assert snapshots[0].host == "cache-test-1" and "nixcache" in snapshots[0].tags
    assert snapshots[0].short_id in result.stdout

    m = backup_env.metrics()
    assert m["nixcache_backup_last_run_success"] == 1
    assert before <= m["nixcache_backup_last_success_timestamp_seconds"] <= after
    assert (
        m["nixcache_backup_last_run_timestamp_seconds"] == m["nixcache_backup_last_success_timestamp_seconds"]
    )
    assert before <= m["nixcache_backup_last_check_timestamp_seconds"] <= after
    assert m["nixcache_backup_snapshots"] == 1
    assert m["nixcache_backup_bytes_added"] > 0
    assert 0 < m["nixcache_backup_duration_seconds"] < after - before + 1
    # Written atomically: no temp file is left beside it for node exporter to trip over.
    assert [p.name for p in Path(backup_env.config.metrics_file).parent.iterdir()] == ["nixcache_backup.prom"]


def test_second_run_adds_little_and_skips_the_check_until_due(backup_env):
    assert backup_env.cli("run").exit_code == 0
    first_check = backup_env.metrics()["nixcache_backup_last_check_timestamp_seconds"]
    result = backup_env.cli("run")
    assert result.exit_code == 0, result.output
    assert "check not due" in result.stdout
    m = backup_env.metrics()
    assert m["nixcache_backup_last_check_timestamp_seconds"] == first_check
    assert m["nixcache_backup_bytes_added"] < 4096  # only a new tree and snapshot, files deduplicated

    backup_env.write_config(check_every_days=0)
    result = backup_env.cli("run")
    assert "check passed" in result.stdout
    assert backup_env.metrics()["nixcache_backup_last_check_timestamp_seconds"] > first_check


def _fails_but_keeps_success(backup_env, *, lose_state: bool) -> str:
    assert backup_env.cli("run").exit_code == 0
    good = backup_env.metrics()
    if lose_state:  # the textfile alone must still carry the last success
        Path(backup_env.config.state_file).unlink()
    Path(backup_env.config.password_file).write_text("not-the-password")
    time.sleep(0.05)
    result = backup_env.cli("run")
    assert result.exit_code == 1
    m = backup_env.metrics()
    assert m["nixcache_backup_last_run_success"] == 0
    assert (
        m["nixcache_backup_last_success_timestamp_seconds"]
        == good["nixcache_backup_last_success_timestamp_seconds"]
    )
    assert (
        m["nixcache_backup_last_check_timestamp_seconds"]
        == good["nixcache_backup_last_check_timestamp_seconds"]
    )
    assert (
        m["nixcache_backup_last_run_timestamp_seconds"] > good["nixcache_backup_last_run_timestamp_seconds"]
    )
    assert m["nixcache_backup_bytes_added"] == 0
    assert result.stdout == ""
    return result.stderr


def test_wrong_password_fails_clearly_and_keeps_the_previous_success(backup_env):
    stderr = _fails_but_keeps_success(backup_env, lose_state=False)
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("nixcache backup FAILED after ")
    assert f"backup repository {backup_env.config.repository}" in last
    assert f"the password in {backup_env.config.password_file} does not open it" in last
    assert "put the repository's password in that file" in last
    assert "not-the-password" not in stderr


def test_previous_success_survives_a_lost_state_file(backup_env):
    _fails_but_keeps_success(backup_env, lose_state=True)


def test_unreachable_repository_fails_with_the_cause(backup_env):
    blocker = backup_env.root / "not-a-dir"
    blocker.write_text("")
    backup_env.write_config(repository=str(blocker / "repo"))
    result = backup_env.cli("run")
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert f"backup repository {blocker}/repo: cannot reach it" in last
    assert "not a directory" in last
    assert "check the URL/path" in last
    m = backup_env.metrics()
    assert m["nixcache_backup_last_run_success"] == 0
    assert m["nixcache_backup_last_success_timestamp_seconds"] == 0


def test_missing_password_file_and_missing_path_are_named(backup_env):
    backup_env.write_config(password_file=str(backup_env.root / "absent.password"))
    result = backup_env.cli("run")
    assert result.exit_code == 1
    assert "absent.password does not exist; deploy the backup password" in result.stderr

    backup_env.write_config(password_file=str(backup_env.root / "backup.password"), include_store=True)
    result = backup_env.cli("run")
    assert result.exit_code == 1
    assert f"{backup_env.config.store_dir} is to be backed up but does not exist" in result.stderr


def test_store_is_backed_up_when_included_without_uploads_in_flight_or_quarantine(backup_env):
    store = Path(backup_env.config.store_dir)
    (store / "nar").mkdir(parents=True)
    (store / "tmp").mkdir()
    (store / "nar" / "x.nar").write_bytes(b"nar" * 1000)
    (store / "tmp" / "y.nar.1234.5678").write_bytes(b"half an upload")
    # Where `nixcache verify` moves a damaged entry (nixcache/server/verify.py).
    (store / "quarantine" / "20261201T030000Z" / "nar").mkdir(parents=True)
    (store / "quarantine" / "20261201T030000Z" / "nar" / "z.nar").write_bytes(b"flipped bytes")
    backup_env.write_config(include_store=True)
    assert backup_env.cli("run").exit_code == 0
    [snapshot] = Restic(backup_env.config).snapshots()
    assert snapshot.paths == [backup_env.config.config_dir, str(store)]
    target = backup_env.root / "restored"
    assert backup_env.cli("restore", "--target", str(target)).exit_code == 0
    restored = target / str(store).lstrip("/")
    assert (restored / "nar" / "x.nar").read_bytes() == b"nar" * 1000
    assert not (restored / "tmp").exists()
    assert not (restored / "quarantine").exists()


def test_store_files_deleted_during_a_backup_are_not_an_error():
    """restic 0.14's --json error lines (captured from a backup racing a deletion)."""
    stderr = "\n".join(
        [
            '{"message_type":"error","error":{"Op":"lstat","Path":"/var/lib/nixcache/nar/a.nar.zst","Err":2},'
            '"during":"archival","item":"/var/lib/nixcache/nar/a.nar.zst"}',
            '{"message_type":"error","error":{"Op":"lstat","Path":"/var/lib/nixcache/nar/b.nar.zst","Err":2},'
            '"during":"archival","item":"/var/lib/nixcache/nar/b.nar.zst"}',
        ]
    )
    vanished, unreadable = classify_backup_errors(stderr, "/var/lib/nixcache/")
    assert vanished == ["/var/lib/nixcache/nar/a.nar.zst", "/var/lib/nixcache/nar/b.nar.zst"]
    assert unreadable == []
    # The same under /etc/nixcache (not the store) or any other error is a real problem.
    other = stderr.replace("/var/lib/nixcache/nar/b", "/etc/nixcache/b").replace('"Err":2}', '"Err":13}', 1)
    vanished, unreadable = classify_backup_errors(other, "/var/lib/nixcache/")
    assert vanished == []
    assert unreadable == [
        "lstat /var/lib/nixcache/nar/a.nar.zst: Permission denied",
        "lstat /etc/nixcache/b.nar.zst: No such file or directory",
    ]
    # Without include_store no file may vanish.
    vanished, unreadable = classify_backup_errors(stderr, None)
    assert vanished == [] and len(unreadable) == 2


def test_retention_forgets_snapshots_beyond_the_counts(backup_env):
    backup_env.write_config(keep_daily=3, keep_weekly=0, keep_monthly=0)
    assert backup_env.cli("run").exit_code == 0
    restic = Restic(backup_env.config)
    # Six older daily snapshots, as if the timer had run on each of the past six days.
    now = time.time()
    for days_ago in range(1, 7):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now - days_ago * 86400))
        restic.backup([backup_env.config.config_dir], lambda _: None, time=stamp)
    # And one snapshot of another host sharing the repository: never ours to forget.
    other = Restic(backup_env.write_config(host="cache-other"))
    other.backup([backup_env.config.config_dir], lambda _: None)
    backup_env.write_config(host="cache-test-1")
    assert len(restic.snapshots(this_host=False)) == 8

    result = backup_env.cli("run")
    assert result.exit_code == 0, result.output
    assert "3 snapshots kept (5 removed)" in result.stdout
    mine = restic.snapshots()
    assert len(mine) == 3
    days = sorted({s.time[:10] for s in mine})
    assert len(days) == 3  # one per day: today, yesterday, the day before
    assert backup_env.metrics()["nixcache_backup_snapshots"] == 3
    assert [s.host for s in restic.snapshots(this_host=False)].count("cache-other") == 1

    listed = json.loads(backup_env.cli("list", "--json").stdout)
    assert sorted(s["id"] for s in listed) == sorted(s.id for s in mine)


def test_a_live_lock_is_reported_and_a_stale_one_is_cleared(backup_env):
    assert backup_env.cli("run").exit_code == 0
    restic = Restic(backup_env.config)
    # A backup reading from a pipe we keep open holds a lock, like a run still in progress.
    holder = subprocess.Popen(
        ["restic", "backup", "--stdin", "--host", "holder"],
        env=restic.environment(),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        locks = Path(backup_env.config.repository) / "locks"
        deadline = time.monotonic() + 30
        while not any(locks.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any(locks.iterdir()), "the holder never took its lock"
        result = backup_env.cli("run")
        assert result.exit_code == 1
        assert "it is locked by another restic process; wait for it to finish" in result.stderr
    finally:
        holder.kill()  # dies holding the lock: now a stale lock of a dead process
        holder.wait()
    assert any(locks.iterdir())
    result = backup_env.cli("run")
    assert result.exit_code == 0, result.output
    assert backup_env.metrics()["nixcache_backup_last_run_success"] == 1


def test_a_second_run_at_once_stops_without_touching_the_record(backup_env):
    assert backup_env.cli("run").exit_code == 0
    metrics = Path(backup_env.config.metrics_file).read_text()
    lock_file = Path(backup_env.config.state_file).with_suffix(".lock")
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in progress holds it
        result = backup_env.cli("run")
    assert result.exit_code == 75
    assert result.stderr.strip() == (
        f"nixcache backup skipped: another `nixcache backup run` holds {lock_file};"
        " wait for it to finish (its summary goes to the journal)"
    )
    assert Path(backup_env.config.metrics_file).read_text() == metrics
    assert backup_env.cli("run").exit_code == 0  # released: the next run proceeds


def test_a_readable_password_file_is_warned_about(backup_env):
    Path(backup_env.config.password_file).chmod(0o644)
    result = backup_env.cli("run")
    assert result.exit_code == 0, result.output
    assert f"password file {backup_env.config.password_file} is readable by group or others; chmod 600" in (
        result.stderr
    )


def test_an_unwritable_metrics_directory_fails_the_run_visibly(backup_env):
    blocker = backup_env.root / "textfile-is-a-file"
    blocker.write_text("")
    backup_env.write_config(metrics_file=str(blocker / "nixcache_backup.prom"))
    result = backup_env.cli("run")
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("nixcache backup FAILED after ")
    assert f"cannot record the run in {blocker}" in last
    assert "create that directory writable for root" in last

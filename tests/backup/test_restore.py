"""`nixcache backup restore | list | check` against a real restic repository."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from pathlib import Path

from click.testing import CliRunner

from nixcache.backup.progress import human_bytes
from nixcache.backup.restic import Restic
from nixcache.cli import main


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (mode, sha256 of content or symlink target) for everything under root."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            digest = "-> " + os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest = "dir"
        found[str(path.relative_to(root))] = (stat.S_IMODE(st.st_mode), digest)
    return found


def populate(etc: Path) -> None:
    (etc / "keys").mkdir()
    (etc / "keys" / "old-signing-key").write_bytes(os.urandom(3000))
    (etc / "keys" / "old-signing-key").chmod(0o600)
    (etc / "big.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    (etc / "big.bin").chmod(0o640)
    (etc / "current").symlink_to("keys/old-signing-key")


def test_restore_brings_the_files_back_identical(backup_env):
    etc = Path(backup_env.config.config_dir)
    populate(etc)
    original = tree(etc)
    assert backup_env.cli("run").exit_code == 0

    target = backup_env.root / "restored"
    result = backup_env.cli("restore", "--target", str(target))
    assert result.exit_code == 0, result.output
    assert tree(target / str(etc).lstrip("/")) == original
    assert "restore: snapshot " in result.stderr and "of cache-test-1 from " in result.stderr
    assert result.stdout.startswith("restored snapshot ") and f"into {target}" in result.stdout


def test_restore_defaults_to_the_latest_snapshot_back_in_place(backup_env):
    """A replacement host runs `restore` without --target: files land where they were."""
    etc = Path(backup_env.config.config_dir)
    populate(etc)
    restic = Restic(backup_env.config)
    # Yesterday's snapshot, so today's run does not retire it (one per day is kept).
    yesterday = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - 86400))
    assert backup_env.cli("run").exit_code == 0
    first_id = restic.backup([str(etc)], lambda _: None, time=yesterday).snapshot_id
    (etc / "signing-key").write_text("cache-2:rotated")
    latest = tree(etc)
    assert backup_env.cli("run").exit_code == 0

    shutil.rmtree(etc)  # the host is lost
    result = backup_env.cli("restore", "--verify")
    assert result.exit_code == 0, result.output
    assert "verified" in result.stdout
    assert tree(etc) == latest

    target = backup_env.root / "older"
    result = backup_env.cli("restore", "--snapshot", first_id, "--target", str(target))
    assert result.exit_code == 0, result.output
    assert (target / str(etc).lstrip("/") / "signing-key").read_text().startswith("cache-1:")


def test_restore_refuses_an_unknown_snapshot_or_host(backup_env):
    assert backup_env.cli("run").exit_code == 0
    target = backup_env.root / "restored"
    result = backup_env.cli("restore", "--snapshot", "deadbeef", "--target", str(target))
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: snapshot deadbeef is not in backup repository {backup_env.config.repository};"
        " run `nixcache backup list --all-hosts` to see the snapshots there"
    )
    assert not target.exists()

    blocker = backup_env.root / "a-file"
    blocker.write_text("")
    result = backup_env.cli("restore", "--target", str(blocker / "restored"))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: cannot create restore target {blocker}/restored: Not a directory;"
        " pass a writable --target or run as root"
    )

    result = backup_env.cli("restore", "--host", "cache-lost-9", "--target", str(target))
    assert result.exit_code == 1
    assert "holds no snapshot of host cache-lost-9; pass --host with the lost host's name" in result.stderr
    assert not target.exists()


def test_list_shows_snapshots_with_sizes_and_other_hosts_on_request(backup_env):
    result = backup_env.cli("list")
    assert result.exit_code == 1
    assert "there is no repository there yet; run `nixcache backup run`" in result.stderr

    etc = Path(backup_env.config.config_dir)
    (etc / "blob").write_bytes(b"x" * 5000)
    assert backup_env.cli("run").exit_code == 0
    other = Restic(backup_env.write_config(host="cache-other"))
    other.backup([str(etc)], lambda _: None)
    backup_env.write_config(host="cache-test-1")

    result = backup_env.cli("list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "TIME", "(UTC)", "HOST", "SIZE", "PATHS"]
    [snapshot] = Restic(backup_env.config).snapshots()
    row = lines[1].split()
    assert row[0] == snapshot.short_id and row[3] == "cache-test-1"
    # the size the run recorded: every byte of the files backed up
    assert " ".join(row[4:6]) == human_bytes(sum(p.stat().st_size for p in etc.rglob("*") if p.is_file()))
    assert row[-1] == str(etc)
    assert lines[-1] == "1 snapshots"

    result = backup_env.cli("list", "--all-hosts", "--sizes")
    assert result.exit_code == 0, result.output
    assert "cache-other" in result.stdout and "2 snapshots" in result.stdout
    assert " - " not in result.stdout  # --sizes asks restic, so every size is known

    backup_env.write_config(host="cache-none")
    result = backup_env.cli("list")
    assert result.stdout.strip() == (
        f"no snapshots of host cache-none (try --all-hosts) in {backup_env.config.repository}"
    )


def test_list_json_tells_no_snapshots_from_could_not_read(backup_env):
    """What deploys/recover.py relies on (facts/backup.py): `[]` means "answered, nothing there"."""
    result = backup_env.cli("list", "--json")
    assert result.exit_code == 1 and result.stderr == ""
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "missing"
    assert error["repository"] == backup_env.config.repository
    repository = backup_env.config.repository
    assert error["message"] == f"backup repository {repository}: {error['cause']}; {error['fix']}"

    assert backup_env.cli("run").exit_code == 0
    [mine] = json.loads(backup_env.cli("list", "--json").stdout)
    assert mine["host"] == "cache-test-1"
    result = backup_env.cli("list", "--host", "cache-lost-9", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []
    [listed] = json.loads(backup_env.cli("list", "--host", "cache-test-1", "--json").stdout)
    assert listed["id"] == mine["id"]

    Path(backup_env.config.password_file).write_text("not-the-password")
    result = backup_env.cli("list", "--json")
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "password"
    assert "does not open it" in error["cause"]

    absent = ["backup", "list", "--json", "--config", str(backup_env.root / "absent.toml")]
    result = CliRunner().invoke(main, absent)
    assert result.exit_code == 78
    assert json.loads(result.stdout)["error"]["kind"] == "config"


def test_check_records_its_time_and_catches_a_damaged_repository(backup_env):
    assert backup_env.cli("run").exit_code == 0
    before = backup_env.metrics()["nixcache_backup_last_check_timestamp_seconds"]
    result = backup_env.cli("check")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"check passed: {backup_env.config.repository} has no errors")
    after = backup_env.metrics()["nixcache_backup_last_check_timestamp_seconds"]
    assert after > before
    assert backup_env.metrics()["nixcache_backup_last_run_success"] == 1  # the run's result is kept

    packs = sorted(p for p in (Path(backup_env.config.repository) / "data").rglob("*") if p.is_file())
    with packs[0].open("ab") as pack:
        pack.write(b"bit rot")
    result = backup_env.cli("check")
    assert result.exit_code == 1
    *context, last = result.stderr.strip().splitlines()
    assert any(line.startswith("restic: pack ") and "unexpected file size" in line for line in context)
    assert last.startswith(
        f"Error: backup repository {backup_env.config.repository}: restic check found damage: pack "
    )
    assert "run `restic rebuild-index` and `nixcache backup check` again" in last
    assert backup_env.metrics()["nixcache_backup_last_check_timestamp_seconds"] == after

"""operations/hostfile.py's commands, run for real in a shell on this machine (a temp dir stands in
for the host): what a rejected file leaves behind, what the error line says, and that a secret's
staged file is private before its first byte arrives.

The commands are the ones the operation yields for the facts given (as tests/test_operations.py's
cases check them); here they are executed as pyinfra would, one `sh -c` each, stopping at the
first failure, with the upload done by writing the content onto the staged file.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest
from pyinfra.api import FileUploadCommand, HiddenValue, StringCommand
from pyinfra.context import ctx_host, ctx_state
from pyinfra_testing.util import FakeState, create_host

from operations import hostfile

HOST = "cache-test-1"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="install -o root needs root")


def facts_of(path: Path) -> dict:
    """The File / Sha256File facts pyinfra would gather for `path` on this machine."""
    if not path.exists():
        return {"files.File": {f"path={path}": None}, "files.Sha256File": {f"path={path}": None}}
    info = path.stat()
    mode = int(oct(stat.S_IMODE(info.st_mode))[2:])
    return {
        "files.File": {f"path={path}": {"user": "root", "group": "root", "mode": mode, "size": info.st_size}},
        "files.Sha256File": {f"path={path}": hashlib.sha256(path.read_bytes()).hexdigest()},
    }


def put(path: Path, content: str | HiddenValue, workdir: Path, **kwargs) -> subprocess.CompletedProcess:
    """Run hostfile.put's commands for `path` as the host would; the first failing one's result."""
    host = create_host(FakeState(), facts=facts_of(path))
    host.name = HOST
    with ctx_state.use(FakeState()), ctx_host.use(host):
        commands = list(hostfile.put._inner(str(path), content, **kwargs))
    done = subprocess.CompletedProcess([], 0, "", "")
    for command in commands:
        if isinstance(command, FileUploadCommand):
            staged = Path(command.dest)
            # Owner and mode were set before this first byte (the staged file exists, private).
            assert stat.S_IMODE(staged.stat().st_mode) == int(kwargs.get("mode", "0644"), 8)
            command.src.seek(0)
            with open(staged, "w") as handle:  # onto the existing file: owner and mode stay
                handle.write(command.src.read())
            continue
        assert isinstance(command, StringCommand)
        done = subprocess.run(
            ["sh", "-c", command.get_raw_value()], cwd=workdir, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            return done
    return done


def leftovers(path: Path) -> list[str]:
    siblings = (p.name for p in path.parent.iterdir() if p.name != path.name)
    return sorted(name for name in siblings if name.startswith(path.name))


def test_a_new_file_lands_with_owner_and_mode_and_nothing_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "etc" / "nixcache" / "signing-key"
    done = put(target, HiddenValue("k-1:secret"), tmp_path, mode="0600")
    assert done.returncode == 0, done.stderr
    assert target.read_text() == "k-1:secret"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert leftovers(target) == []
    assert not (tmp_path / "_tempfile_").exists()


def test_a_rejected_file_leaves_the_old_one_and_names_host_file_check_output_and_fix(tmp_path: Path) -> None:
    target = tmp_path / "sudoers"
    target.write_text("good\n")
    check = "grep -q '^good' {path} || { echo \"line 1: syntax error\"; echo 'near bad'; exit 1; }"
    done = put(target, "bad\n", tmp_path, check=check, fix="fix admin_users, then rerun")
    assert done.returncode == 1
    assert target.read_text() == "good\n"
    assert leftovers(target) == []
    line = done.stderr.strip()
    assert "\n" not in line
    assert line.startswith(f"{HOST}: {target}: not installed, `grep -q '^good' {target}.nixcache-new")
    assert "rejected it: line 1: syntax error near bad; the previous version is unchanged;" in line
    assert line.endswith("fix admin_users, then rerun")


def test_an_accepted_file_replaces_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "ruleset"
    target.write_text("old\n")
    done = put(target, "good new\n", tmp_path, check="grep -q good {path}")
    assert done.returncode == 0, done.stderr
    assert target.read_text() == "good new\n"
    assert leftovers(target) == []


def test_a_whole_configuration_rejected_in_place_gets_its_previous_version_back(tmp_path: Path) -> None:
    target = tmp_path / "sshd_config.d" / "60-nixcache.conf"
    target.parent.mkdir()
    target.write_text("PermitRootLogin prohibit-password\n")
    inode = target.stat().st_ino
    # Like `sshd -t`: reads the configuration where it lives, not a file it is given.
    check = f"! grep -q Bogus {target} || {{ echo 'Bad configuration option: Bogus' >&2; exit 255; }}"
    done = put(target, "Bogus yes\n", tmp_path, check=check, check_in_place=True)
    assert done.returncode == 1
    assert target.read_text() == "PermitRootLogin prohibit-password\n"
    assert target.stat().st_ino == inode  # the very file, renamed back: never a copy
    assert leftovers(target) == []
    assert "rejected it: Bad configuration option: Bogus; the previous version is unchanged" in done.stderr


def test_a_new_file_rejected_in_place_is_not_left_there(tmp_path: Path) -> None:
    target = tmp_path / "nixcache.conf"
    done = put(target, "broken\n", tmp_path, check="false", check_in_place=True)
    assert done.returncode == 1
    assert not target.exists()
    assert leftovers(target) == []


def test_an_unchanged_file_runs_nothing_and_a_mode_drift_is_only_chmod(tmp_path: Path) -> None:
    target = tmp_path / "config.toml"
    target.write_text("x = 1\n")
    target.chmod(0o666)
    host = create_host(FakeState(), facts=facts_of(target))
    with ctx_state.use(FakeState()), ctx_host.use(host):
        commands = [c.get_raw_value() for c in hostfile.put._inner(str(target), "x = 1\n", mode="0640")]
    assert commands == [f"chown root:root {target}", f"chmod 0640 {target}"]
    assert put(target, "x = 1\n", tmp_path, mode="0640").returncode == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    target.chmod(0o640)
    host = create_host(FakeState(), facts=facts_of(target))
    with ctx_state.use(FakeState()), ctx_host.use(host):
        assert list(hostfile.put._inner(str(target), "x = 1\n", mode="0640")) == []

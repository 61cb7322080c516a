"""`nixcache lab up` on a fresh machine: missing Debian packages are installed by the lab itself
when it runs as root with apt, and refused with the apt-get line to run when it cannot.

apt-get here is a stand-in script on PATH that records its calls and "installs" a tool by putting
an executable beside itself, so these run anywhere without touching the machine's packages;
.ci/run leaves debootstrap and systemd-container out, so the lab tests' first `lab up` does the
real install on a fresh CI machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nixcache.lab import PrerequisiteError, prereqs

REPO = Path(__file__).resolve().parents[2]

FAKE_APT = """#!/bin/sh
echo "$*" >> {log}
case "$1" in
  update) echo "Reading package lists... Done" ;;
  install) [ -n "{fail}" ] && {{ echo "E: Unable to locate package"; exit 100; }}
           [ -n "{provide}" ] && {{ printf '#!/bin/sh\\n' > {bin}/{provide}; /bin/chmod +x {bin}/{provide}; }}
           echo "Setting up debootstrap ..." ;;
esac
"""


def fake_apt(bin_dir: Path, log: Path, *, provide: str = "debootstrap", fail: bool = False) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "apt-get"
    script.write_text(FAKE_APT.format(log=log, bin=bin_dir, provide=provide, fail="1" if fail else ""))
    script.chmod(0o755)


@pytest.fixture
def bare_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH with nothing on it but what the test puts there (the stand-in names /bin/sh itself)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def test_root_with_apt_installs_what_is_missing(bare_path: Path, tmp_path: Path) -> None:
    log = tmp_path / "apt.log"
    fake_apt(bare_path, log)
    said: list[str] = []
    installed = prereqs.ensure(["debootstrap"], euid=0, progress=said.append)
    assert installed == ["debootstrap"]
    assert said == ["lab: installing Debian packages debootstrap (for debootstrap)"]
    assert log.read_text().splitlines() == ["update -q", "install -y -q --no-install-recommends debootstrap"]
    assert (bare_path / "debootstrap").exists()


def test_nothing_missing_installs_nothing(bare_path: Path, tmp_path: Path) -> None:
    log = tmp_path / "apt.log"
    fake_apt(bare_path, log)
    (bare_path / "debootstrap").write_text("#!/bin/sh\n")
    (bare_path / "debootstrap").chmod(0o755)
    assert prereqs.ensure(["debootstrap"], euid=0, progress=pytest.fail) == []
    assert not log.exists()


# The first lab of test_a_lab_that_waited_…: takes the lock, says so, and once the second lab
# has said it waits (the file argv[2] exists), "installs" debootstrap (argv[3]) and lets go.
FIRST_LAB = """
import os, sys, time
from pathlib import Path
from nixcache.lab.lock import locked
with locked(Path(sys.argv[1])):
    print("holding", flush=True)
    deadline = time.monotonic() + 20
    while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
        time.sleep(0.01)
    Path(sys.argv[3]).write_text("#!/bin/sh\\n")
    os.chmod(sys.argv[3], 0o755)
"""


def test_a_lab_that_waited_for_another_labs_install_installs_nothing(
    bare_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two labs starting together on a fresh machine: the second waits for the first's apt-get
    (two at once would fail on dpkg's lock) and then finds nothing left to install. The first is
    another process, as it is on a machine (a flock blocks the whole of this one)."""
    lock = tmp_path / "packages.lock"
    monkeypatch.setattr(prereqs, "INSTALL_LOCK", lock)
    log = tmp_path / "apt.log"
    fake_apt(bare_path, log)
    waiting = tmp_path / "second-lab-waits"
    said: list[str] = []

    def progress(message: str) -> None:
        said.append(message)
        waiting.touch()

    args = [sys.executable, "-c", FIRST_LAB, str(lock), str(waiting), str(bare_path / "debootstrap")]
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as first:
        assert first.stdout is not None and first.stdout.readline() == "holding\n"
        assert prereqs.ensure(["debootstrap"], euid=0, progress=progress) == []
    assert first.returncode == 0
    assert said == [f"lab: waiting for another lab's package install (lock {lock})"]
    assert not log.exists()


def test_one_package_for_two_tools(bare_path: Path, tmp_path: Path) -> None:
    log = tmp_path / "apt.log"
    fake_apt(bare_path, log, provide="ssh")
    with pytest.raises(PrerequisiteError, match=r"needs ssh-keygen, which is not installed even after"):
        prereqs.ensure(["ssh", "ssh-keygen"], euid=0, progress=lambda _: None)
    assert log.read_text().splitlines()[-1] == "install -y -q --no-install-recommends openssh-client"


def test_not_root_refuses_and_installs_nothing(bare_path: Path, tmp_path: Path) -> None:
    log = tmp_path / "apt.log"
    fake_apt(bare_path, log)
    with pytest.raises(PrerequisiteError, match=r"^nixcache lab must run as root"):
        prereqs.ensure(["debootstrap"], euid=1000)
    assert not log.exists()


def test_without_apt_the_error_names_the_packages(bare_path: Path) -> None:
    with pytest.raises(PrerequisiteError) as error:
        prereqs.ensure(["debootstrap", "systemd-nspawn"], euid=0)
    assert str(error.value) == (
        "nixcache lab needs debootstrap, systemd-nspawn, which are not installed; "
        "install them with: apt-get install debootstrap systemd-container"
    )


def test_a_failing_apt_is_one_line_naming_the_command(bare_path: Path, tmp_path: Path) -> None:
    fake_apt(bare_path, tmp_path / "apt.log", fail=True)
    with pytest.raises(PrerequisiteError) as error:
        prereqs.ensure(["debootstrap"], euid=0, progress=lambda _: None)
    message = str(error.value)
    assert "\n" not in message
    assert "`apt-get install -y -q --no-install-recommends debootstrap` exited 100" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="lab up refuses to run as a user before it installs anything")
def test_lab_up_prints_the_install_line_then_apt_output(bare_path: Path, tmp_path: Path) -> None:
    """The command a user runs: one line naming the packages, then apt's own lines, on stderr."""
    log = tmp_path / "apt.log"
    fake_apt(bare_path, log, fail=True)  # stop right after the install: nothing is booted
    done = subprocess.run(
        [sys.executable, "-c", "from nixcache.cli import main; main()", "lab", "up", "--hosts", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "NIXCACHE_LAB_DIR": str(tmp_path / "lab")},
    )
    assert done.returncode == 4, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("lab: installing Debian packages ")
    assert "debootstrap" in lines[0] and "systemd-container" in lines[0]
    assert "Reading package lists... Done" in lines
    assert lines[-1].startswith("Error: nixcache lab could not install ")
    assert done.stdout == ""

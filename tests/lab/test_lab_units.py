"""The lab's pure parts, without booting anything: state file, naming, subnets, errors."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nixcache.lab import (
    Host,
    Lab,
    LabError,
    LabNotUpError,
    LabState,
    PrerequisiteError,
    image,
    network,
    prereqs,
    rootfs,
)
from nixcache.lab import state as statefile
from nixcache.lab.lock import locked
from nixcache.packages import ALL_PACKAGES

REPO = Path(__file__).resolve().parents[2]


def nixcache_lab(*args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NIXCACHE_LAB_DIR": str(state_dir)}
    return subprocess.run(
        [sys.executable, "-c", "from nixcache.cli import main; main()", "lab", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def sample_state() -> LabState:
    return LabState(
        instance="a1b2c3",
        subnet="10.231.4.0/24",
        gateway="10.231.4.1",
        bridge="nxba1b2c3",
        hosts=[Host(name="lab1", address="10.231.4.11", ssh_key="/k", pid=None, root="/nonexistent/root")],
    )


def test_state_round_trips_and_is_written_atomically(tmp_path: Path) -> None:
    statefile.save(tmp_path, sample_state())
    assert statefile.load(tmp_path) == sample_state()
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left behind


def test_missing_state_is_none_and_garbage_is_a_one_line_error(tmp_path: Path) -> None:
    assert statefile.load(tmp_path) is None
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(LabError, match="unreadable") as error:
        statefile.load(tmp_path)
    assert "\n" not in str(error.value)


def test_status_of_recorded_but_dead_hosts_is_stopped(tmp_path: Path) -> None:
    statefile.save(tmp_path, sample_state())
    [host] = Lab(tmp_path).status()
    assert (host.name, host.state) == ("lab1", "stopped")


def test_status_without_a_lab_says_to_run_lab_up(tmp_path: Path) -> None:
    with pytest.raises(LabNotUpError, match="nixcache lab up"):
        Lab(tmp_path).status()
    result = nixcache_lab("status", state_dir=tmp_path)
    assert result.returncode == 3
    assert result.stderr.strip().splitlines() == [
        f"Error: the lab in {tmp_path} is not up; start it with `nixcache lab up`"
    ]


def test_status_json_shape(tmp_path: Path) -> None:
    statefile.save(tmp_path, sample_state())
    result = nixcache_lab("status", "--json", state_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    [record] = json.loads(result.stdout)
    assert {"name", "address", "ssh_port", "ssh_user", "ssh_key", "state"} <= set(record)
    assert record["name"] == "lab1" and record["address"] == "10.231.4.11" and record["state"] == "stopped"


def test_default_state_dir_is_dot_lab_in_the_current_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NIXCACHE_LAB_DIR", raising=False)
    assert Lab().state_dir == Path.cwd() / ".lab"
    monkeypatch.setenv("NIXCACHE_LAB_DIR", "/srv/mylab")
    assert Lab().state_dir == Path("/srv/mylab")


def test_subnet_choice_skips_every_network_in_use() -> None:
    used = [ipaddress.ip_network(n) for n in ("10.231.1.0/24", "10.231.2.128/25", "192.0.2.0/24")]
    assert network.choose_subnet(used) == "10.231.3.0/24"


def test_subnet_choice_fails_clearly_when_everything_is_taken() -> None:
    with pytest.raises(LabError, match=r"already in use.*nixcache lab down"):
        network.choose_subnet([ipaddress.ip_network("10.0.0.0/8")])


def test_names_fit_linux_limits_and_carry_the_instance() -> None:
    assert len(network.veth_name("a1b2c3", 240)) <= 15
    assert len(network.bridge_name("a1b2c3")) <= 15
    assert "a1b2c3" in network.netns_name("a1b2c3", "lab1")
    assert network.host_address("10.231.9.0/24", 1) == "10.231.9.11"
    assert network.gateway_address("10.231.9.0/24") == "10.231.9.1"
    with pytest.raises(LabError, match="at most 240"):
        network.host_address("10.231.9.0/24", 241)


def test_instance_ids_differ() -> None:
    assert len({statefile.new_instance_id() for _ in range(50)}) > 45


def test_not_root_is_a_one_line_error() -> None:
    with pytest.raises(
        PrerequisiteError, match=r"^nixcache lab must run as root .*rerun it with sudo"
    ) as error:
        prereqs.check(euid=1000)
    assert "\n" not in str(error.value)


def test_missing_tool_names_its_debian_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing is installed here
    with pytest.raises(PrerequisiteError, match=r"systemd-nspawn.*apt-get install .*systemd-container"):
        prereqs.check(euid=0)


def test_mountinfo_parsing_finds_mounts_below_a_directory() -> None:
    assert "/proc" in {point for point, _, _ in rootfs.mounts()}
    assert rootfs.mounts_under(Path("/proc")) and rootfs.mounts_under(Path("/proc"))[-1] == "/proc"


def test_inventory_without_a_lab_fails_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "NIXCACHE_LAB_DIR": str(tmp_path)}
    result = subprocess.run(
        ["pyinfra", "-y", "inventories/lab.py", "exec", "--", "true"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode != 0
    assert f"inventories/lab.py: the lab in {tmp_path} is not up; start it with `nixcache lab up`" in (
        result.stderr + result.stdout
    )


def test_image_key_follows_the_package_list() -> None:
    assert image.image_key(("a", "b")) == image.image_key(("b", "a"))
    assert image.image_key(("a", "b")) != image.image_key(("a", "b", "c"))
    assert set(ALL_PACKAGES) <= set(image.packages())
    assert {"systemd-sysv", "openssh-server", "python3"} <= set(image.packages())


def test_the_current_image_is_the_completed_build_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIXCACHE_LAB_IMAGE_CACHE", str(tmp_path))
    key_dir = tmp_path / image.image_key()
    assert image.current() is None
    (key_dir / "builds" / "half-built" / "root").mkdir(parents=True)  # a crash mid-build
    assert image.current() is None
    (key_dir / "builds" / "b1" / "root").mkdir(parents=True)
    (key_dir / "current").write_text("b1\n")
    assert image.current() == key_dir / "builds" / "b1" / "root"
    image._prune(key_dir, keep=key_dir / "builds" / "b1" / "root", progress=lambda line: None)
    assert [p.name for p in (key_dir / "builds").iterdir()] == ["b1"]


def test_image_progress_shows_phases_not_every_package() -> None:
    phases = ["I: Resolving dependencies of base packages...", "I: Unpacking the base system...", "E: boom"]
    packages = ["I: Retrieving bash 5.2.15-2+b13", "I: Extracting libc6...", "I: Configuring dash..."]
    assert [image._is_phase(line) for line in phases] == [True, True, True]
    assert [image._is_phase(line) for line in packages] == [False, False, False]


def test_a_held_lock_makes_the_next_holder_wait_and_say_so(tmp_path: Path) -> None:
    # The second holder is another process, as in real use: flock blocks the whole process, and
    # threads in the test process may be gevent greenlets (pyinfra patches the process on import).
    path = tmp_path / "sub" / "lock"
    code = (
        "import sys; from pathlib import Path; from nixcache.lab.lock import locked\n"
        "with locked(Path(sys.argv[1]), lambda: print('waiting', flush=True)):\n"
        "    print('acquired', flush=True)\n"
    )
    with locked(path):
        second = subprocess.Popen(
            [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        assert second.stdout is not None
        assert second.stdout.readline() == "waiting\n"
        assert second.poll() is None  # still blocked while the lock is held here
    out, _ = second.communicate(timeout=30)
    assert out == "acquired\n"
    assert second.returncode == 0


def _three_host_lab(tmp_path: Path) -> Path:
    state = sample_state()
    state.hosts = [
        Host(name=f"lab{n}", address=f"10.231.4.1{n}", ssh_key="/k", pid=None, root="/nonexistent/root")
        for n in (1, 2, 3)
    ]
    statefile.save(tmp_path, state)
    return tmp_path


@pytest.mark.parametrize(
    ("chosen", "endpoint", "gc_host"),
    [
        (None, "http://10.231.4.11:8333", "lab1"),
        ("lab2", "http://10.231.4.12:8333", "lab2"),
        ("", None, None),
    ],
)
def test_lab_group_data_points_every_cache_at_the_origin_host(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chosen: str | None,
    endpoint: str | None,
    gc_host: str | None,
) -> None:
    """The origin host of the lab (lab1, or $NIXCACHE_LAB_ORIGIN, or none) is the one the
    inventory puts in group `origin` and the one group data sends the caches to."""
    import runpy

    lab_dir = _three_host_lab(tmp_path)
    monkeypatch.setenv("NIXCACHE_LAB_DIR", str(lab_dir))
    if chosen is None:
        monkeypatch.delenv(statefile.ORIGIN_ENV, raising=False)
    else:
        monkeypatch.setenv(statefile.ORIGIN_ENV, chosen)
    data = runpy.run_path(str(REPO / "inventories" / "group_data" / "lab.py"))
    assert (data["origin_endpoint"], data["origin_gc_host"]) == (endpoint, gc_host)
    origin = statefile.origin_host(statefile.load(lab_dir))
    assert (origin.name if origin else None) == gc_host


def test_an_origin_host_the_lab_does_not_have_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(statefile.ORIGIN_ENV, "lab9")
    with pytest.raises(LabError) as raised:
        statefile.origin_host(statefile.load(_three_host_lab(tmp_path)))
    assert str(raised.value) == (
        "NIXCACHE_LAB_ORIGIN=lab9 is not a host of this lab (hosts: lab1, lab2, lab3); name one of them"
    )

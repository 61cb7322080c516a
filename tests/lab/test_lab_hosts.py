"""The lab end to end: real hosts booted under systemd-nspawn, driven by pyinfra over SSH.

These tests boot their own lab instance in a temporary state directory (so a developer's
`./.lab`, the session-wide `lab` fixture and other engineers' labs keep running beside it),
and check what a user sees: pyinfra's output, files on hosts, `nixcache lab` exit codes and
output, and what is left on the machine after `down`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixcache.lab import Lab, image, machine, network, rootfs
from nixcache.lab.state import load

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
HOSTS = 2
NOTHING_LEFT = {"netns": [], "links": [], "processes": [], "mounts": [], "host roots": [], "cgroups": []}


def pyinfra(lab: Lab, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`pyinfra -y inventories/lab.py …` from the repository root, as a user types it."""
    return subprocess.run(
        ["pyinfra", "-y", "inventories/lab.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=lab.environ(),
        timeout=timeout,
    )


def nixcache_lab(lab: Lab, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from nixcache.cli import main; main()", "lab", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=lab.environ(),
        timeout=timeout,
    )


def on_host(lab: Lab, name: str, command: str) -> str:
    code, output = lab.run(name, ["bash", "-c", command], timeout=30)
    assert code == 0, f"{command!r} on {name} failed ({code}): {output}"
    return output


def leftovers(lab: Lab, instance: str) -> dict[str, list[str]]:
    """Everything of one instance still on the machine (all lists empty once it is down)."""
    cgroups = [str(p) for p in machine.cgroup_paths(instance) if p.exists()]
    hosts_dir = lab.state_dir / "hosts"
    return {
        "netns": network.netns_with_prefix(network.netns_name(instance, "")),
        "links": network.links_with_prefix(f"nxv{instance}") + network.links_with_prefix(f"nxb{instance}"),
        "processes": [str(pid) for pid in machine.machines_under(hosts_dir)],
        "mounts": rootfs.mounts_under(lab.state_dir),
        "host roots": [str(p) for p in hosts_dir.glob("*")] if hosts_dir.exists() else [],
        "cgroups": cgroups,
    }


@pytest.fixture(scope="module")
def own_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("own-lab"))
    started = time.monotonic()
    try:
        lab.up(HOSTS)
        print(f"lab up ({HOSTS} hosts) took {time.monotonic() - started:.1f} s")
        yield lab
    finally:
        lab.down()


def test_every_host_answers_pyinfra_with_running(own_lab: Lab) -> None:
    result = pyinfra(own_lab, "exec", "--", "systemctl", "is-system-running")
    assert result.returncode == 0, result.stderr
    for index in range(1, HOSTS + 1):
        assert f"[lab{index}] running" in result.stdout + result.stderr


def test_a_pyinfra_operation_changes_every_host(own_lab: Lab, tmp_path: Path) -> None:
    source = tmp_path / "hello.txt"
    source.write_text("hello from the controller\n")
    result = pyinfra(own_lab, "files.put", f"src={source}", "dest=/root/hello.txt", "mode=640")
    assert result.returncode == 0, result.stderr
    for host in own_lab.status():
        assert on_host(own_lab, host.name, "cat /root/hello.txt") == "hello from the controller"
        assert on_host(own_lab, host.name, "stat -c %a /root/hello.txt") == "640"
    again = pyinfra(own_lab, "files.put", f"src={source}", "dest=/root/hello.txt", "mode=640")
    assert again.returncode == 0 and "No change" in again.stdout + again.stderr


def test_hosts_have_their_own_identity_and_reach_each_other(own_lab: Lab) -> None:
    hosts = own_lab.status()
    ids = {on_host(own_lab, host.name, "cat /etc/machine-id") for host in hosts}
    keys = {on_host(own_lab, host.name, "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub") for host in hosts}
    assert len(ids) == len(keys) == len(hosts)
    assert [on_host(own_lab, host.name, "hostname") for host in hosts] == [host.name for host in hosts]
    # Lab hosts share one network: lab1 reaches lab2's sshd by name.
    banner = on_host(own_lab, "lab1", "exec 3<>/dev/tcp/lab2/22 && head -c 7 <&3")
    assert banner == "SSH-2.0"


def test_status_json_lists_every_host(own_lab: Lab) -> None:
    result = nixcache_lab(own_lab, "status", "--json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["name"] for r in records] == [f"lab{i}" for i in range(1, HOSTS + 1)]
    for record in records:
        assert record["state"] == "running"
        assert record["ssh_port"] == 22 and record["ssh_user"] == "root"
        assert Path(record["ssh_key"]).stat().st_mode & 0o777 == 0o600
        assert record["address"].startswith("10.231.")


def test_up_again_is_harmless(own_lab: Lab) -> None:
    before = {(h.name, h.address, h.pid) for h in own_lab.status()}
    result = nixcache_lab(own_lab, "up", "--hosts", str(HOSTS))
    assert result.returncode == 0, result.stderr
    assert {(h.name, h.address, h.pid) for h in own_lab.status()} == before


def test_up_recovers_a_host_whose_machine_died(own_lab: Lab) -> None:
    on_host(own_lab, "lab2", "echo survived > /root/disk.txt && sync")
    victim = own_lab.host("lab2")
    orphans = machine.cgroup_pids(victim.cgroup)
    assert len(orphans) > 3  # nspawn, systemd, sshd, journald ...
    # nspawn dies (OOM killer, kill -9): its container lives on, orphaned, holding the address.
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while machine.is_machine(victim.pid, Path(victim.root)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert own_lab.host("lab2").state == "stopped"
    # The inventory keeps the stopped host and says so, instead of quietly leaving it out (here
    # its orphaned container still answers SSH; a host that does not fails pyinfra's run).
    kept = pyinfra(own_lab, "exec", "--", "true")
    assert "inventories/lab.py: lab2 is stopped; start it with `nixcache lab up`" in kept.stderr
    assert "[lab2]" in kept.stdout + kept.stderr
    # ... and its root filesystem is unmounted, as after a reboot of the controller.
    subprocess.run(["umount", victim.root], check=True)
    own_lab.up(HOSTS)
    assert own_lab.host("lab2").state == "running"
    assert own_lab.host("lab2").pid != victim.pid
    assert not set(orphans) & set(machine.cgroup_pids(victim.cgroup)), "the orphaned container still runs"
    assert on_host(own_lab, "lab2", "cat /root/disk.txt") == "survived"  # its disk was kept


def test_up_recovers_a_host_whose_namespace_was_deleted(own_lab: Lab) -> None:
    victim = own_lab.host("lab1")
    subprocess.run(["ip", "netns", "delete", victim.netns], check=True)
    own_lab.up(HOSTS)
    assert own_lab.host("lab1").pid != victim.pid
    assert on_host(own_lab, "lab1", "hostname") == "lab1"


def test_reset_gives_a_fresh_host_with_the_same_name_address_and_access(own_lab: Lab) -> None:
    on_host(own_lab, "lab1", "echo before-reset > /root/state.txt")
    old_key = on_host(own_lab, "lab1", "cat /etc/ssh/ssh_host_ed25519_key.pub")
    before = own_lab.host("lab1")
    result = nixcache_lab(own_lab, "reset", "lab1")
    assert result.returncode == 0, result.stderr
    after = own_lab.host("lab1")
    assert (after.name, after.address, after.ssh_key) == (before.name, before.address, before.ssh_key)
    assert on_host(own_lab, "lab1", "test -e /root/state.txt && echo present || echo gone") == "gone"
    assert on_host(own_lab, "lab1", "cat /etc/ssh/ssh_host_ed25519_key.pub") != old_key
    # pyinfra still gets in with no flag, although the host key changed.
    check = pyinfra(own_lab, "exec", "--", "systemctl", "is-system-running")
    assert check.returncode == 0 and "[lab1] running" in check.stdout + check.stderr, check.stderr


def test_unknown_host_is_a_one_line_error(own_lab: Lab) -> None:
    result = nixcache_lab(own_lab, "reset", "nosuchhost")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: no lab host named 'nosuchhost' in {own_lab.state_dir}; its hosts are: lab1, lab2"
    ]


def test_instances_coexist_on_their_own_networks(own_lab: Lab, lab: Lab) -> None:
    ours, shared = load(own_lab.state_dir), load(lab.state_dir)
    assert ours and shared
    assert ours.instance != shared.instance and ours.subnet != shared.subnet
    for instance in (own_lab, lab):
        result = pyinfra(instance, "exec", "--", "hostname")
        assert result.returncode == 0, result.stderr


def test_copied_roots_work_where_overlays_cannot(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIXCACHE_LAB_ROOTS", "copy")
    lab = Lab(tmp_path_factory.mktemp("copy-lab"))
    try:
        [host] = lab.up(1)
        assert host.storage == "copy" and not rootfs.mounts_under(lab.state_dir)
        assert on_host(lab, "lab1", "systemctl is-system-running") == "running"
    finally:
        lab.down()
    assert not (lab.state_dir / "hosts").exists()


def test_down_leaves_nothing_behind(tmp_path_factory: pytest.TempPathFactory) -> None:
    lab = Lab(tmp_path_factory.mktemp("down-lab"))
    try:
        lab.up(1)
        state = load(lab.state_dir)
        assert state is not None
        assert all(leftovers(lab, state.instance).values())  # the check below can see each kind
        started = time.monotonic()
        result = nixcache_lab(lab, "down")
        print(f"lab down (1 host) took {time.monotonic() - started:.1f} s")
        assert result.returncode == 0, result.stderr
        assert leftovers(lab, state.instance) == NOTHING_LEFT
        status = nixcache_lab(lab, "status")
        assert status.returncode == 3 and "nixcache lab up" in status.stderr
        inventory = pyinfra(lab, "exec", "--", "true")
        assert inventory.returncode != 0 and "start it with `nixcache lab up`" in inventory.stderr
    finally:
        lab.down()


def test_prune_removes_a_lab_whose_state_vanished(tmp_path_factory: pytest.TempPathFactory) -> None:
    lab = Lab(tmp_path_factory.mktemp("orphan-lab"))
    try:
        lab.up(1)
        state = load(lab.state_dir)
        assert state is not None
        (lab.state_dir / "state.json").unlink()  # its test run was killed, its temp dir cleaned up
        result = nixcache_lab(lab, "prune")
        assert result.returncode == 0, result.stderr
        assert state.instance in result.stdout
        assert leftovers(lab, state.instance) == NOTHING_LEFT
    finally:
        lab.down()


def test_a_failed_image_build_is_one_line_keeps_its_log_and_is_never_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIXCACHE_LAB_IMAGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NIXCACHE_LAB_MIRROR", "http://127.0.0.1:9/debian")  # nothing listens there
    lab = Lab(tmp_path / "state")
    result = nixcache_lab(lab, "up", "--hosts", "1")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: building the lab image failed at `debootstrap`"), result.stderr
    log = Path(error.rsplit("see ", 1)[1].split()[0])
    assert log.exists() and "127.0.0.1:9" in log.read_text()
    assert image.current() is None
    assert not [p for p in (tmp_path / "cache").rglob("root")]
    lab.down()

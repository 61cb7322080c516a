"""Lab machines: a host root copied from the base image, booted by systemd-nspawn.

The controller runs no systemd, so nspawn runs with `--register=no --keep-unit`, detached
in its own session, its console going to a log file, and is tracked by pid. Stopping a
machine kills the container's PID 1, which takes the whole PID namespace down at once, and
nspawn exits behind it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from nixcache.lab.command import run
from nixcache.lab.errors import LabError


def personalise(root: Path, name: str, authorized_key: str, hosts: dict[str, str]) -> None:
    """Give a fresh copy its own identity: hostname, machine-id, SSH host keys, the lab's key."""
    etc = root / "etc"
    (etc / "hostname").write_text(f"{name}\n")
    (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
    lines = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{name}", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{address}\t{host}" for host, address in sorted(hosts.items())]
    (etc / "hosts").write_text("\n".join(lines) + "\n")
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()
    run(["ssh-keygen", "-A", "-f", str(root)])  # -f: prefix, so the keys land in ROOT/etc/ssh
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    authorized = ssh_dir / "authorized_keys"
    authorized.write_text(authorized_key + "\n")
    os.chmod(ssh_dir, 0o700)
    os.chmod(authorized, 0o600)


CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "nixcache-lab"


def cgroup_hierarchies() -> list[Path]:
    """The cgroup trees systemd uses here: name=systemd and unified (hybrid), or the v2 root."""
    hybrid = [CGROUP_ROOT / "systemd", CGROUP_ROOT / "unified"]
    found = [tree for tree in hybrid if (tree / "cgroup.procs").exists()]
    return found or [CGROUP_ROOT]


def cgroup_paths(relative: str) -> list[Path]:
    return [tree / CGROUP_PARENT / relative for tree in cgroup_hierarchies()]


def remove_cgroups(relative: str) -> None:
    """Remove a cgroup subtree bottom-up (a cgroup can only go once its children and processes have)."""
    for top in cgroup_paths(relative):
        if not top.is_dir():
            continue
        for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def start(root: Path, name: str, netns: str, log: Path, cgroup: str) -> int:
    """Boot `root` in namespace `netns`, detached, in its own cgroup `cgroup`; return the nspawn pid.

    Its own cgroup because nspawn with --keep-unit creates `payload/` (the container's tree)
    and `supervisor/` under the cgroup it starts in: two machines started in the same cgroup
    would share one system.slice and break each other's units.
    """
    if not cgroup.strip("/"):
        raise LabError(f"lab host {name} has no cgroup of its own; run `nixcache lab down` and `up` again")
    log.parent.mkdir(parents=True, exist_ok=True)
    remove_cgroups(cgroup)
    procs = []
    for path in cgroup_paths(cgroup):
        path.mkdir(parents=True, exist_ok=True)
        procs.append(path / "cgroup.procs")

    def enter_cgroup() -> None:  # runs in the child between fork and exec
        for file in procs:
            file.write_text(str(os.getpid()))

    argv = [
        "systemd-nspawn",
        "-D",
        str(root),
        f"--machine={name}",
        "--register=no",
        "--keep-unit",
        f"--network-namespace-path=/run/netns/{netns}",
        # The deploy loads an nftables firewall; the container has its own network namespace,
        # so CAP_NET_ADMIN reaches only that namespace's rules and links.
        "--capability=CAP_NET_ADMIN",
        "--console=read-only",
        "--resolv-conf=off",
        "--timezone=off",
        "-b",
    ]
    with log.open("ab") as handle:
        handle.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} start: {' '.join(argv)}\n".encode())
        handle.flush()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=enter_cgroup,
        )
    return process.pid


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of `pid`, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def is_machine(pid: int | None, root: Path) -> bool:
    """True when `pid` is a live (not zombie) systemd-nspawn booting `root`."""
    if not pid:
        return False
    stat = _stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    argv = _cmdline(pid)
    return bool(argv) and argv[0].endswith("systemd-nspawn") and str(root) in argv


def machines_under(directory: Path) -> list[int]:
    """Pids of live systemd-nspawn processes whose root is inside `directory` (leftovers included)."""
    prefix = str(directory).rstrip("/") + "/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = _cmdline(int(entry.name))
        if argv and argv[0].endswith("systemd-nspawn") and "-D" in argv:
            target = argv[argv.index("-D") + 1] if argv.index("-D") + 1 < len(argv) else ""
            stat = _stat(int(entry.name))
            if target.startswith(prefix) and stat and stat[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat and stat[1] == pid:
                children.append(int(entry.name))
    return children


def _reap(pid: int) -> None:
    """Collect `pid` if it is our child (tests run the lab in-process), so no zombie stays."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _gone(pid: int) -> bool:
    _reap(pid)
    stat = _stat(pid)
    return stat is None or stat[0] in ("Z", "X")


def stop(pids: list[int], timeout: float = 15) -> None:
    """Stop the machines run by nspawn `pids`: kill their containers' PID 1, then nspawn itself."""
    for pid in pids:
        # The container's init is nspawn's child; SIGKILL on it ends every process of the container.
        for child in _children(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_gone(pid) for pid in pids):
        time.sleep(0.1)
    stubborn = [pid for pid in pids if not _gone(pid)]
    for pid in stubborn:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(_gone(pid) for pid in pids):
        time.sleep(0.1)
    left = [pid for pid in pids if not _gone(pid)]
    if left:
        raise LabError(
            f"lab machine processes {left} did not exit after SIGKILL; check `ps -o pid,stat,cmd -p ...`"
        )

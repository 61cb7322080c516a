"""Lab machines: a host root booted by systemd-nspawn in its own network namespace and cgroup.

The controller runs no systemd, so nspawn runs with `--register=no --keep-unit`, detached
in its own session, its console going to a log file, and is tracked by pid. Each machine
runs in its own cgroup (`nixcache-lab/<instance>/<host>`), and stopping it kills every
process of that cgroup: there is nothing to shut down cleanly, the host root is thrown away
or kept as a powered-off disk.
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
    """The cgroup `relative` below nixcache-lab in each hierarchy; never the shared parent itself."""
    if not relative.strip("/") or ".." in relative.split("/"):
        return []  # "" would mean every lab on the machine, not one
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


def _alive(pid: int) -> bool:
    """True when `pid` exists and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def is_machine(pid: int | None, root: Path) -> bool:
    """True when `pid` is a live (not zombie) systemd-nspawn booting `root`."""
    if not pid or not _alive(pid):
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
        pid = int(entry.name)
        argv = _cmdline(pid)
        if argv and argv[0].endswith("systemd-nspawn") and "-D" in argv[:-1]:
            target = argv[argv.index("-D") + 1]
            if target.startswith(prefix) and _alive(pid):
                found.append(pid)
    return found


def _reap(pid: int) -> None:
    """Collect `pid` if it is our child (tests run the lab in-process), so no zombie stays."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _gone(pid: int) -> bool:
    _reap(pid)
    return not _alive(pid)


def cgroup_pids(relative: str) -> list[int]:
    """Every process in the cgroup subtree `relative` (in any hierarchy)."""
    pids: set[int] = set()
    for top in cgroup_paths(relative):
        if top.is_dir():
            for procs in top.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(line) for line in procs.read_text().split())
    return sorted(pids)


def stop(pids: list[int], cgroup: str, timeout: float = 15) -> None:
    """Stop machines: SIGKILL every process in their cgroup subtree `cgroup`, and the nspawn `pids`.

    The cgroup is what makes this complete: it holds nspawn, the container's PID 1 and every
    process below it, including a container orphaned when nspawn itself was killed.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if not _gone(pid)] + [
            pid for pid in cgroup_pids(cgroup) if not _gone(pid)
        ]
        if not alive:
            return
        if time.monotonic() > deadline:
            raise LabError(
                f"lab machine processes {sorted(set(alive))} did not exit after SIGKILL; "
                f"check them with `ps -o pid,stat,cmd -p {','.join(map(str, sorted(set(alive))))}`"
            )
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)

"""Host hardening: kernel network tuning, file limits, sshd, sudo for admin users.

Each file is rendered by one small function here (``render_*``) and installed by the one file
primitive (``operations.hostfile.put``), which yields commands only when the host differs.
Files that can lock people out (sudoers, sshd) are approved by their checker before they
take effect, and the previous version stays when they are not.
"""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import OperationValueError, StringCommand, operation
from pyinfra.facts.files import File

from facts.hardening import SysctlState
from operations import hostfile
from operations.settings import Settings

SYSCTL_PATH = "/etc/sysctl.d/60-nixcache.conf"
LIMITS_PATH = "/etc/security/limits.d/60-nixcache.conf"
SSHD_DROPIN_PATH = "/etc/ssh/sshd_config.d/60-nixcache.conf"
SUDOERS_PATH = "/etc/sudoers.d/60-nixcache-admins"
MANAGED = "# Managed by nixcache ({source}); local changes are overwritten on the next deploy.\n"

# Kernel parameters for serving many large files to many clients: key -> (value, why).
NETWORK_SYSCTLS: dict[str, tuple[str, str]] = {
    "net.core.somaxconn": (
        "8192",
        "accept queue per listening socket: CI fleets open hundreds of connections at once",
    ),
    "net.ipv4.tcp_max_syn_backlog": ("8192", "half-open connections kept during such a burst"),
    "net.core.netdev_max_backlog": (
        "16384",
        "packets queued when the NIC delivers faster than the kernel drains (10G+ links)",
    ),
    "net.core.rmem_max": ("16777216", "let TCP autotuning grow receive buffers to 16 MiB (uploads)"),
    "net.core.wmem_max": ("16777216", "let TCP autotuning grow send buffers to 16 MiB (NAR downloads)"),
    "net.ipv4.tcp_rmem": (
        "4096 131072 16777216",
        "min/default/max receive buffer: cross-region links need a large max",
    ),
    "net.ipv4.tcp_wmem": (
        "4096 65536 16777216",
        "min/default/max send buffer: a full window to distant clients",
    ),
    "net.ipv4.tcp_fastopen": ("3", "data in the SYN for returning clients and outgoing pull-through"),
    "net.ipv4.tcp_tw_reuse": (
        "1",
        "reuse TIME-WAIT ports for new outgoing connections (nginx to the app, pull-through)",
    ),
    "net.ipv4.ip_local_port_range": (
        "10240 65535",
        "more ephemeral ports for proxy and upstream connections",
    ),
    "net.ipv4.tcp_slow_start_after_idle": (
        "0",
        "keep-alive connections keep their congestion window between NAR downloads",
    ),
    "net.ipv4.tcp_migrate_req": (
        "1",
        "connections queued on a server worker that exits move to the other workers' sockets"
        " (SO_REUSEPORT) instead of being reset (Linux >= 5.14; nixcache/server/prefork.py)",
    ),
    "fs.file-max": ("2097152", "every open NAR and every socket is a file descriptor"),
}

# Per-session limits for processes started by PAM logins (admins, cron). systemd services
# ignore limits.d: nixcache.service sets LimitNOFILE in its own unit.
NOFILE_SOFT = Settings.nofile_soft_limit
NOFILE_HARD = Settings.nofile_hard_limit


def render_sysctl(values: dict[str, tuple[str, str]], state: dict[str, dict[str, object]]) -> str:
    """The sysctl.d file: each value under its reason; keys this host cannot set commented out."""
    lines = [
        MANAGED.format(source="operations/hardening.py"),
        "# Kernel network settings for high-throughput file serving.\n",
    ]
    for key, (value, why) in values.items():
        lines.append(f"\n# {why}\n")
        info = state.get(key) or {}
        if info.get("writable"):
            lines.append(f"{key} = {value}\n")
        else:
            # Inside a container (the lab runs under systemd-nspawn) the host kernel owns
            # these: writing them fails, so they are recorded but not applied here.
            where = "absent in this network namespace" if info.get("value") is None else "read-only here"
            lines.append(f"# skipped, {where} (container or namespaced kernel):\n# {key} = {value}\n")
    return "".join(lines)


@operation()
def kernel_tuning(values: dict[str, str] | None = None, path: str = SYSCTL_PATH):
    """Write the network sysctls to ``path`` and apply them when the file or a live value differs.

    + values: extra or overriding ``key: value`` pairs from host data
    + path: the sysctl.d file

    Parameters this host cannot write (containers, namespaced kernels) are written as
    comments and skipped, so the step neither fails nor reports a change on every run.
    Applies with ``sysctl -p <file>`` rather than ``--system``: a read-only key in another
    package's file must not fail this step.
    """
    wanted: dict[str, tuple[str, str]] = dict(NETWORK_SYSCTLS)
    for key, value in (values or {}).items():
        wanted[key] = (str(value), "set by host data (sysctl_overrides)")
    state = host.get_fact(SysctlState, keys=" ".join(sorted(wanted)))
    content = render_sysctl(wanted, state)
    changed = hostfile.differs(path, content)
    drifted = [
        key
        for key, (value, _) in wanted.items()
        if (state.get(key) or {}).get("writable") and " ".join(str(state[key]["value"]).split()) != value
    ]
    yield from hostfile.put._inner(path, content)
    if changed or drifted:
        yield StringCommand(f"sysctl -q -p {shlex.quote(path)}")
    else:
        host.noop(f"{path} and the live kernel values are up to date")


def render_limits(soft: int = NOFILE_SOFT, hard: int = NOFILE_HARD) -> str:
    """The limits.d file for login sessions."""
    return (
        MANAGED.format(source="operations/hardening.py")
        + "# Open files for login sessions (admins, cron). Services set LimitNOFILE in their unit.\n"
        + f"*    soft nofile {soft}\n*    hard nofile {hard}\n"
        + f"root soft nofile {soft}\nroot hard nofile {hard}\n"
    )


@operation()
def file_limits(soft: int = NOFILE_SOFT, hard: int = NOFILE_HARD, path: str = LIMITS_PATH):
    """Raise the open-file limits of login sessions.

    + soft, hard: nofile limits
    + path: the limits.d file
    """
    if soft > hard:
        raise OperationValueError(
            f"{host.name}: nofile soft limit {soft} exceeds hard limit {hard}; "
            "lower the soft limit in host data"
        )
    yield from hostfile.put._inner(path, render_limits(soft, hard))


def render_sshd(permit_root_login: str) -> str:
    """The sshd drop-in: keys only, root login as the data allows."""
    return (
        MANAGED.format(source="operations/hardening.py")
        + "# Debian's sshd_config includes this directory first; sshd keeps the first value it\n"
        + "# reads, so these override the main file.\n"
        + "PasswordAuthentication no\n"
        + "KbdInteractiveAuthentication no\n"
        + "PermitEmptyPasswords no\n"
        + "PubkeyAuthentication yes\n"
        + f"PermitRootLogin {permit_root_login}\n"
        + "X11Forwarding no\n"
    )


@operation()
def sshd(permit_root_login: str = Settings.ssh_permit_root_login, path: str = SSHD_DROPIN_PATH):
    """Harden sshd with a drop-in, checked by ``sshd -t`` before sshd reloads.

    + permit_root_login: ``prohibit-password`` (keys only; the lab deploys as root),
      ``no`` once admin users exist, ``yes`` or ``forced-commands-only``
    + path: the drop-in file

    The value is one of sshd's (the schema's enum checked it; `sshd -t` is the judge again).
    """
    content = render_sshd(permit_root_login)
    changed = hostfile.differs(path, content)
    yield from hostfile.put._inner(
        path,
        content,
        check="sshd -t",
        check_in_place=True,
        fix="fix ssh_permit_root_login in host data (or the drop-in's template), then rerun",
    )
    if changed:
        # sshd re-reads its configuration on SIGHUP; open sessions (ours) stay up.
        yield StringCommand("systemctl reload ssh.service")


def render_sudoers(users: list[str]) -> str:
    """sudoers.d file granting the admin users sudo."""
    lines = [
        MANAGED.format(source="operations/hardening.py"),
        "# Admin users log in with SSH keys only and have no password, so sudo cannot ask one.\n",
    ]
    lines += [f"{name} ALL=(ALL:ALL) NOPASSWD: ALL\n" for name in users]
    return "".join(lines)


@operation()
def sudoers(users: list[str], path: str = SUDOERS_PATH):
    """Give ``users`` sudo through a sudoers.d file approved by ``visudo -cf``; remove it when empty.

    + users: login names
    + path: the sudoers.d file
    """
    if not users:
        if host.get_fact(File, path=path):
            yield StringCommand(f"rm -f {shlex.quote(path)}")
        else:
            host.noop(f"{path} is absent")
        return
    yield from hostfile.put._inner(
        path,
        render_sudoers(sorted(users)),
        mode="0440",
        check="visudo -cqf {path}",
        fix="fix the user names in admin_users, then rerun",
    )

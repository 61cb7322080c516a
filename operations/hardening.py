"""Host hardening: kernel network tuning, file limits, sshd, sudo for admin users.

Each file is rendered by one small function here (``render_*``) and installed by an
operation that yields commands only when the host differs. Files that can lock people out
(sudoers, sshd) go through :func:`validated_file`: the checker approves them before they
take effect, and the previous version comes back when it does not.
"""

from __future__ import annotations

import hashlib
import io
import shlex

from pyinfra import host
from pyinfra.api import FileUploadCommand, OperationValueError, StringCommand, operation
from pyinfra.facts.files import File, Sha1File

from facts.hardening import SysctlState
from operations import upload
from operations.settings import Settings
from operations.storage import fact_mode

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
    "fs.file-max": ("2097152", "every open NAR and every socket is a file descriptor"),
}

# Per-session limits for processes started by PAM logins (admins, cron). systemd services
# ignore limits.d: nixcache.service sets LimitNOFILE in its own unit.
NOFILE_SOFT = Settings.nofile_soft_limit
NOFILE_HARD = Settings.nofile_hard_limit

SSHD_ROOT_LOGIN_VALUES = ("yes", "no", "prohibit-password", "forced-commands-only")


def _sha1(content: str) -> str:
    return hashlib.sha1(content.encode()).hexdigest()  # noqa: S324 - compared with sha1sum on the host


def _needs(dest: str, content: str, mode: str, user: str, group: str) -> tuple[bool, bool]:
    """(content differs, metadata differs) for a file the host should hold."""
    info = host.get_fact(File, path=dest)
    if not info:
        return True, True
    content_differs = host.get_fact(Sha1File, path=dest) != _sha1(content)
    meta_differs = (info["user"], info["group"], info["mode"]) != (user, group, fact_mode(mode))
    return content_differs, meta_differs


def _metadata(path: str, mode: str, user: str, group: str) -> list[StringCommand]:
    target = shlex.quote(path)
    return [
        StringCommand(f"chown {user}:{group} {target}"),
        StringCommand(f"chmod {mode} {target}"),
    ]


def validated_files_changes(
    dest: str,
    content: str,
    check: str | None = None,
    *,
    check_in_place: bool = False,
    mode: str = "644",
    user: str = "root",
    group: str = "root",
):
    """Commands that install ``content`` at ``dest``; none when it is already there.

    The new version is uploaded beside ``dest``, created with its final owner and mode before
    the upload (operations/upload.py, also under ``--sudo``), so it is never exposed with other
    permissions. ``check`` is a shell command; with ``{path}`` it receives the staged file
    (``visudo -cf {path}``). With
    ``check_in_place`` the file is moved into place first and checked there (``sshd -t``,
    ``nginx -t`` read the whole configuration); a failing check restores the previous
    version, or removes the new file, and fails the step with the checker's message.
    """
    content_differs, meta_differs = _needs(dest, content, mode, user, group)
    if not content_differs:
        if meta_differs:
            yield from _metadata(dest, mode, user, group)
        return
    staged = f"{dest}.nixcache-new"
    backup = f"{dest}.nixcache-old"
    q_dest, q_staged, q_backup = (shlex.quote(p) for p in (dest, staged, backup))
    yield StringCommand(f"mkdir -p {shlex.quote(dest.rsplit('/', 1)[0] or '/')}")
    yield from upload.staged_upload(io.StringIO(content), staged, user, group, mode)
    if check is None:
        yield StringCommand(f"mv -f {q_staged} {q_dest}")
    elif not check_in_place:
        command = check.format(path=q_staged)
        yield StringCommand(
            f"if {command}; then mv -f {q_staged} {q_dest}; "
            f"else rm -f {q_staged}; echo \"{dest}: rejected by '{check.format(path='<new>')}'; "
            f'not installed, fix the data that renders it" >&2; exit 1; fi'
        )
    else:
        command = check.format(path=q_dest)
        yield StringCommand(
            f"rm -f {q_backup}; if [ -e {q_dest} ]; then cp -p {q_dest} {q_backup}; fi; "
            f"mv -f {q_staged} {q_dest}; "
            f"if {command}; then rm -f {q_backup}; "
            f"else if [ -e {q_backup} ]; then mv -f {q_backup} {q_dest}; else rm -f {q_dest}; fi; "
            f"echo \"{dest}: rejected by '{check}'; previous version kept, fix the data that "
            f'renders it" >&2; exit 1; fi'
        )


@operation()
def validated_file(
    dest: str,
    content: str,
    check: str | None = None,
    check_in_place: bool = False,
    mode: str = "644",
    user: str = "root",
    group: str = "root",
    then: str | None = None,
):
    """Install a file that a checker must approve first; run ``then`` after a change.

    + dest: path on the host
    + content: the whole file
    + check: shell command approving it (``{path}`` = the new file), see
      :func:`validated_files_changes`
    + check_in_place: check the file where it will live, restoring the old one on failure
    + mode, user, group: the file's owner and permissions
    + then: a command to run only when the content changed (e.g. a reload)
    """
    commands = list(
        validated_files_changes(
            dest, content, check, check_in_place=check_in_place, mode=mode, user=user, group=group
        )
    )
    if not commands:
        host.noop(f"{dest} is up to date")
        return
    yield from commands
    content_changed = any(isinstance(c, FileUploadCommand) for c in commands)
    if then and content_changed:
        yield StringCommand(then)


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
    commands = list(validated_files_changes(path, content))
    drifted = [
        key
        for key, (value, _) in wanted.items()
        if (state.get(key) or {}).get("writable") and " ".join(str(state[key]["value"]).split()) != value
    ]
    if not commands and not drifted:
        host.noop(f"{path} and the live kernel values are up to date")
        return
    yield from commands
    yield StringCommand(f"sysctl -q -p {shlex.quote(path)}")


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
    commands = list(validated_files_changes(path, render_limits(soft, hard)))
    if not commands:
        host.noop(f"{path} is up to date")
    yield from commands


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
    """
    if permit_root_login not in SSHD_ROOT_LOGIN_VALUES:
        raise OperationValueError(
            f"{host.name}: ssh_permit_root_login={permit_root_login!r} is not one of "
            f"{', '.join(SSHD_ROOT_LOGIN_VALUES)}; fix it in host data"
        )
    yield from validated_file._inner(
        path,
        render_sshd(permit_root_login),
        check="sshd -t",
        check_in_place=True,
        # sshd re-reads its configuration on SIGHUP; open sessions (ours) stay up.
        then="systemctl reload ssh.service",
    )


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
    yield from validated_file._inner(
        path, render_sudoers(sorted(users)), check="visudo -cqf {path}", mode="440"
    )

"""Scheduled backups of a cache host, and the sftp repository host they can go to.

`backup_timer()` is called by deploys/cache.py after the nixcache venv is installed; it does
nothing but say so when the host has no `backup_repository`. `backup_store()` prepares a host
whose data says `backup_store = True` to receive other hosts' snapshots over sftp.
"""

from __future__ import annotations

import functools
import re

from cryptography.hazmat.primitives import serialization
from pyinfra import host, logger
from pyinfra.api import HiddenValue, deploy
from pyinfra.operations import apt, files, server

from nixcache.backup.config import BackupConfig, dump
from nixcache.packages import CACHE_HOST_PACKAGES
from nixcache.secrets import ensure_ssh_key, ensure_token
from operations import backup, hostfile
from operations.settings import CONFIG_DIR, NIXCACHE_BIN, Settings, host_secret, settings

BACKUP_CONFIG_FILE = f"{CONFIG_DIR}/backup.toml"
BACKUP_PASSWORD_FILE = f"{CONFIG_DIR}/backup.password"
BACKUP_SSH_KEY_FILE = f"{CONFIG_DIR}/backup-ssh-key"
SSH_CLIENT_CONFIG = "/etc/ssh/ssh_config.d/nixcache-backup.conf"
STATE_DIR = "/var/lib/nixcache-backup"
RESTIC = tuple(p for p in CACHE_HOST_PACKAGES if p == "restic")


def sftp_host(repository: str) -> str | None:
    """The host part of an sftp: repository (`sftp:user@host:/path`, `sftp://user@host:port//path`)."""
    match = re.match(r"^sftp:(?://)?(?:[^@/]+@)?(\[[^\]]+\]|[^:/]+)", repository)
    return match.group(1).strip("[]") if match else None


def public_key(private_openssh: str) -> str:
    """`ssh-ed25519 AAAA…` of an OpenSSH private key."""
    key = serialization.load_ssh_private_key(private_openssh.encode(), password=None)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def backup_config(s: Settings, host_name: str) -> BackupConfig:
    """The host's backup.toml as data: everything from settings, the snapshot host = inventory name.

    The inventory name (not the machine's hostname) is recorded in snapshots, so a replacement
    host of the same name finds its predecessor's backups.
    """
    return BackupConfig(
        repository=s.backup_repository or "",
        password_file=BACKUP_PASSWORD_FILE,
        host=host_name,
        config_dir=CONFIG_DIR,
        include_store=s.backup_include_store,
        store_dir=s.cache_data_dir,
        # In-flight uploads: half-written, renamed into place only once verified.
        exclude=[f"{s.store_dir}/tmp"],  # noqa: S108 - the store's own upload dir, not /tmp
        keep_daily=s.backup_keep_daily,
        keep_weekly=s.backup_keep_weekly,
        keep_monthly=s.backup_keep_monthly,
        check_every_days=s.backup_check_every_days,
    )


def backup_ssh_key(s: Settings) -> HiddenValue:
    """The sftp key the cache hosts log in with and the repository host authorizes (one ref)."""
    return host_secret(
        "backup ssh key",
        "backup_ssh_key_ref",
        s.backup_ssh_key_ref,
        functools.partial(ensure_ssh_key, generate=s.backup_ssh_key_generate),
    )


def ssh_client_config(repository_host: str) -> str:
    """ssh settings restic's sftp backend uses to reach the repository host, non-interactively."""
    return f"""\
# Rendered by nixcache (deploys/parts/backup.py): how backups reach their sftp repository.
Host {repository_host}
    IdentityFile {BACKUP_SSH_KEY_FILE}
    IdentitiesOnly yes
    BatchMode yes
    # Learn the repository host's key on first use, refuse a changed one afterwards.
    StrictHostKeyChecking accept-new
    UserKnownHostsFile {STATE_DIR}/known_hosts
    ConnectTimeout 10
    # Keep notices ("Permanently added …") out of restic's output.
    LogLevel ERROR
    ServerAliveInterval 30
"""


@deploy("nixcache backup timer")
def backup_timer(schedule: bool = True) -> None:
    """restic, backup.toml, the repository password (and sftp key), and the daily timer.

    `schedule=False` (deploys/recover.py, before its restore) installs all but the timer: no run
    may back up an empty replacement host before the restore has put its store back.
    """
    s = settings()
    if not s.backup_repository:
        logger.warning(f"{host.name}: no backup_repository in host data: scheduled backups are not installed")
        return
    password = host_secret(
        "backup password",
        "backup_password_ref",
        s.backup_password_ref,
        functools.partial(ensure_token, generate=s.backup_password_generate),
    )
    config = backup_config(s, host.name)

    apt.packages(name="Install restic", packages=list(RESTIC), update=False)
    files.directory(name="Backup state directory", path=STATE_DIR, user="root", group="root", mode="0700")
    files.directory(name="Configuration directory", path=CONFIG_DIR, present=True)
    backup.password_file(
        name="Install the backup repository password", password=password, path=config.password_file
    )

    repository_host = sftp_host(s.backup_repository)
    if repository_host and s.backup_ssh_key_ref:
        ssh_key = backup_ssh_key(s)
        # OpenSSH refuses a key file without its final newline; secret stores may strip it.
        key_file = HiddenValue(ssh_key.unmask().rstrip("\n") + "\n", masked_value=str(ssh_key))
        hostfile.put(
            name="Install the backup ssh key", path=BACKUP_SSH_KEY_FILE, content=key_file, mode="0600"
        )
        hostfile.put(
            name="ssh settings for the sftp repository",
            path=SSH_CLIENT_CONFIG,
            content=ssh_client_config(repository_host),
            user="root",
            group="root",
            mode="0644",
        )

    hostfile.put(name="Render backup.toml", path=BACKUP_CONFIG_FILE, content=dump(config), mode="0600")
    metrics_dir = config.metrics_file.rsplit("/", 1)[0]
    files.directory(name="Node exporter textfile directory", path=metrics_dir, present=True)
    writable = [metrics_dir]
    if s.backup_repository.startswith("/"):
        files.directory(name="Local backup repository", path=s.backup_repository, mode="0700")
        writable.append(s.backup_repository)
    if not schedule:
        return
    backup.timer(
        name="Backup service and daily timer",
        nixcache_bin=NIXCACHE_BIN,
        config_path=BACKUP_CONFIG_FILE,
        on_calendar=s.backup_on_calendar,
        randomized_delay_sec=s.backup_randomized_delay_sec,
        writable_paths=writable,
    )


@deploy("nixcache backup repository host")
def backup_store() -> None:
    """An sftp-only account whose home receives the cache hosts' restic repositories."""
    s = settings()
    if not s.backup_store:
        return
    ssh_key = backup_ssh_key(s)
    user, home = s.backup_store_user, s.backup_store_dir
    server.user(name="Backup repository account", user=user, home=home, shell="/bin/sh", system=True)  # noqa: S604 - a login shell, not a subprocess
    files.directory(name="Backup repository home", path=home, user=user, group=user, mode="0700")
    files.directory(name="Backup account .ssh", path=f"{home}/.ssh", user=user, group=user, mode="0700")
    # restrict: no pty, forwarding or agent; the forced command allows nothing but sftp (sshd runs
    # it through the account's shell, hence /bin/sh rather than nologin).
    entry = f'restrict,command="/usr/lib/openssh/sftp-server" {public_key(ssh_key.unmask())} nixcache-backup'
    hostfile.put(
        name="Authorize the cache hosts' backup key (sftp only)",
        path=f"{home}/.ssh/authorized_keys",
        content=entry + "\n",
        user=user,
        group=user,
        mode="0600",
    )

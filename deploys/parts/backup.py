"""Scheduled backups of a cache host, and the backup repository host they go to.

`backup_timer()` is called by deploys/cache.py after the nixcache venv is installed; it does
nothing but say so when the host has no `backup_repository`. `backup_store()` makes a host whose
data says `backup_store = True` the backup repository host: an append-only restic REST server
(rclone serve restic) where each cache host, with its own credential, can only add snapshots
to its own repository, and the timer that applies every host's retention there
(docs/decisions/0008-isolated-append-only-backups.md).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from pyinfra import host, inventory, logger
from pyinfra.api import HiddenValue, deploy
from pyinfra.operations import apt, files

from deploys.parts.base import apt_packages
from deploys.parts.origin import ORIGIN_GROUP
from facts.nixcache import HostPython
from nixcache.backup.config import BackupConfig, dump
from nixcache.packages import BACKUP_STORE_PACKAGES, CACHE_HOST_PACKAGES
from nixcache.secrets import ensure_ssh_key, ensure_token
from operations import backup, firewall, hostfile, install, storage
from operations.backup import STORE_CACHE_DIR_NAME, STORE_CONFIG_DIR, STORE_HTPASSWD
from operations.settings import (
    CONFIG_DIR,
    NIXCACHE_BIN,
    Settings,
    SettingsError,
    from_data,
    host_secret,
    settings,
)

BACKUP_CONFIG_FILE = f"{CONFIG_DIR}/backup.toml"
BACKUP_PASSWORD_FILE = f"{CONFIG_DIR}/backup.password"
BACKUP_SSH_KEY_FILE = f"{CONFIG_DIR}/backup-ssh-key"
# KEY=VALUE (0600): RESTIC_REPOSITORY with the host's credential, for rest: repositories.
BACKUP_ENV_FILE = f"{CONFIG_DIR}/backup.env"
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


def per_host(value: str, host_name: str) -> str:
    """`value` with "{host}" replaced by the inventory name: one line of group data, one per host."""
    return value.replace("{host}", host_name)


def backup_config(s: Settings, host_name: str, env_file: str = "") -> BackupConfig:
    """The host's backup.toml as data: everything from settings, the snapshot host = inventory name.

    The inventory name (not the machine's hostname) is recorded in snapshots, so a replacement
    host of the same name finds its predecessor's backups. A rest: repository is the backup
    repository host's append-only server: its credential comes from `env_file`, and the
    retention runs there, not here.
    """
    repository = per_host(s.backup_repository or "", host_name)
    return BackupConfig(
        repository=repository,
        password_file=BACKUP_PASSWORD_FILE,
        env_file=env_file,
        host=host_name,
        config_dir=CONFIG_DIR,
        include_store=s.backup_include_store,
        store_dir=s.cache_data_dir,
        # In-flight uploads: half-written, renamed into place only once verified. Signed
        # narinfos: derived, re-signed by the server after a restore (nixcache/server/store.py).
        exclude=[f"{s.store_dir}/tmp", f"{s.store_dir}/signed"],  # noqa: S108 - the store's own dirs
        keep_daily=s.backup_keep_daily,
        keep_weekly=s.backup_keep_weekly,
        keep_monthly=s.backup_keep_monthly,
        apply_retention=not repository.startswith("rest:"),
        check_every_days=s.backup_check_every_days,
    )


def backup_password(s: Settings, host_name: str) -> HiddenValue:
    """The restic password of `host_name`'s repository (read by the host and the repository host)."""
    return host_secret(
        f"backup password of {host_name}",
        "backup_password_ref",
        per_host(s.backup_password_ref or "", host_name),
        functools.partial(ensure_token, generate=s.backup_password_generate),
    )


def backup_credential(s: Settings, host_name: str) -> HiddenValue:
    """`host_name`'s password on the backup repository host's REST server (its user = its name)."""
    return host_secret(
        f"backup credential of {host_name}",
        "backup_credential_ref",
        per_host(s.backup_credential_ref or "", host_name),
        functools.partial(ensure_token, generate=s.backup_credential_generate),
    )


def backup_ssh_key(s: Settings) -> HiddenValue:
    """The key for an sftp: repository the operator runs (not isolated: prefer the repository host)."""
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
    password = backup_password(s, host.name)
    env_file, credentialed = "", None
    repository = per_host(s.backup_repository, host.name)
    if repository.startswith("rest:"):
        credential = backup_credential(s, host.name)
        url = backup.rest_url_with_credential(repository, host.name, credential.unmask())
        credentialed = HiddenValue(
            "# Rendered by nixcache (deploys/parts/backup.py): the repository, with its credential.\n"
            f"RESTIC_REPOSITORY={url}\n",
            masked_value=f"<backup repository credential {s.backup_credential_ref}>",
        )
        env_file = BACKUP_ENV_FILE
    config = backup_config(s, host.name, env_file)

    apt.packages(name="Install restic", packages=list(RESTIC), update=False)
    files.directory(name="Backup state directory", path=STATE_DIR, user="root", group="root", mode="0700")
    files.directory(name="Configuration directory", path=CONFIG_DIR, present=True)
    backup.password_file(
        name="Install the backup repository password", password=password, path=config.password_file
    )

    repository_host = sftp_host(repository)
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

    if credentialed is not None:
        hostfile.put(
            name="Install the backup repository URL with this host's credential",
            path=BACKUP_ENV_FILE,
            content=credentialed,
            mode="0600",
        )
    hostfile.put(name="Render backup.toml", path=BACKUP_CONFIG_FILE, content=dump(config), mode="0600")
    metrics_dir = config.metrics_file.rsplit("/", 1)[0]
    files.directory(name="Node exporter textfile directory", path=metrics_dir, present=True)
    writable = [metrics_dir]
    if repository.startswith("/"):
        files.directory(name="Local backup repository", path=repository, mode="0700")
        writable.append(repository)
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


@dataclass(frozen=True)
class StoreClient:
    """A cache host that backs up to this repository host, as this host's deploy needs it."""

    name: str
    credential: HiddenValue  # its REST password (htpasswd entry)
    password: HiddenValue  # its restic repository password (for the retention)
    config: BackupConfig  # its repository as this host prunes it: a local directory


def store_clients(s: Settings) -> list[StoreClient]:
    """The hosts of backup_store_clients (default: every other host with a backup_credential_ref)."""
    names = list(s.backup_store_clients) or [h.name for h in inventory if h.name != host.name]
    clients = []
    for name in names:
        member = inventory.get_host(name, None)
        if member is None:
            raise SettingsError(
                f"{host.name}: backup_store_clients names {name!r}, which is not in the inventory;"
                " fix the list"
            )
        theirs = from_data(name, member.data)
        if not theirs.backup_credential_ref:
            if s.backup_store_clients:
                raise SettingsError(
                    f"{host.name}: backup client {name} has no backup_credential_ref in its host data;"
                    " give it one (the same ref its backups use)"
                )
            continue  # not a backup client: no credential, no account
        password_file = f"{STORE_CONFIG_DIR}/{name}.password"
        config = dataclasses.replace(
            backup_config(theirs, name),
            repository=f"{s.backup_store_dir}/{name}",
            password_file=password_file,
            apply_retention=True,
            cache_dir=f"/var/cache/{STORE_CACHE_DIR_NAME}",
            # Never written by `backup forget`; kept out of the cache hosts' own paths.
            state_file=f"/var/lib/{STORE_CACHE_DIR_NAME}/{name}.json",
            metrics_file=f"/var/lib/{STORE_CACHE_DIR_NAME}/{name}.prom",
        )
        clients.append(
            StoreClient(name, backup_credential(theirs, name), backup_password(theirs, name), config)
        )
    if not clients:
        raise SettingsError(
            f"{host.name}: backup_store is on but no host backs up here (no other host has a"
            " backup_credential_ref); set backup_credential_ref in the cache hosts' data"
        )
    return clients


@deploy("nixcache backup repository host")
def backup_store() -> None:
    """The append-only REST server for the cache hosts' repositories, and the retention timer.

    Each cache host has its own credential and may only add to its own repository
    (/<its name>/); deletion happens here only, by nixcache-backup-prune.timer.
    """
    s = settings()
    if not s.backup_store:
        return
    if not s.backup_store_allowed_sources:
        raise SettingsError(
            f"{host.name}: backup_store_allowed_sources is empty, so no cache host could reach the"
            " backup repository; set it to the cache hosts' addresses (CIDRs)"
        )
    clients = store_clients(s)
    user, home = s.backup_store_user, s.backup_store_dir

    apt_packages("Install rclone and restic", BACKUP_STORE_PACKAGES + RESTIC, s)
    storage.service_user(name="Backup repository account", user=user, home=home)
    files.directory(name="Backup repositories", path=home, user=user, group=user, mode="0700")
    # The shared sftp key of earlier versions opened every host's repository: it goes.
    files.file(
        name="No shared sftp key into the repositories", path=f"{home}/.ssh/authorized_keys", present=False
    )

    python = host.get_fact(HostPython)
    if python is None:
        raise SettingsError(f"{host.name}: no python3 on the backup repository host; install it and rerun")
    install.nixcache(name="nixcache venv (runs the retention)", python=python)

    files.directory(
        name="Backup repository configuration", path=STORE_CONFIG_DIR, user=user, group=user, mode="0700"
    )
    htpasswd = backup.render_htpasswd({c.name: c.credential.unmask() for c in clients})
    hostfile.put(
        name="One credential per cache host (htpasswd)",
        path=STORE_HTPASSWD,
        content=HiddenValue(htpasswd, masked_value="<backup repository htpasswd>"),
        user=user,
        group=user,
        mode="0600",
    )
    for client in clients:
        hostfile.put(
            name=f"Repository password of {client.name}",
            path=client.config.password_file,
            content=client.password,
            user=user,
            group=user,
            mode="0600",
        )
        hostfile.put(
            name=f"Retention of {client.name}",
            path=f"{STORE_CONFIG_DIR}/{client.name}.toml",
            content=dump(client.config),
            user=user,
            group=user,
            mode="0600",
        )
    firewall.ruleset(
        name="nftables firewall",
        content=firewall.render_ruleset(
            s, ssh_port=int(host.data.get("ssh_port") or 22), runs_origin=ORIGIN_GROUP in host.groups
        ),
    )
    backup.store_units(
        name="Append-only backup repository server and retention timer",
        settings=s,
        nixcache_bin=NIXCACHE_BIN,
        configs=[f"{STORE_CONFIG_DIR}/{c.name}.toml" for c in clients],
    )

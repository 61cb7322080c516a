"""Operations for scheduled backups: restic's password, backup.toml, the systemd timer, restore,
and the backup repository host's append-only REST server and retention timer.

The unit files are rendered by `render_service` and `render_timer` from their templates in
operations/templates/ and installed by the one unit primitive (`service.units`); backup.toml is
rendered by `nixcache.backup.config.dump` in the deploy part and, like the password, put by the
one file primitive (`hostfile.put`), root-only.
"""

from __future__ import annotations

import base64
import hashlib
import shlex
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote

from pyinfra import host, logger
from pyinfra.api import HiddenValue, OperationValueError, operation

from facts.backup import BackupSnapshots, DirectoryHasEntries
from nixcache.backup.restic import redact
from operations import hostfile, service
from operations.health import failed_step
from operations.render import render
from operations.settings import Settings, SettingsError, listen_address

SERVICE = "nixcache-backup.service"
TIMER = "nixcache-backup.timer"
# /var/cache/<this> and /var/lib/<this>: systemd creates them writable inside the sandbox.
CACHE_DIR_NAME = "nixcache-backup"


def render_service(
    nixcache_bin: str, config_path: str, writable_paths: Iterable[str], timeout_start_sec: int
) -> str:
    """The oneshot unit that runs one backup; sandboxed to write only the paths that backups write."""
    # "-": a path that does not exist (yet) must not stop the run.
    writable = " ".join(f"-{path}" for path in sorted(set(writable_paths)))
    return render(
        "nixcache-backup.service.j2",
        nixcache_bin=nixcache_bin,
        config_path=config_path,
        cache_dir_name=CACHE_DIR_NAME,
        timeout_start_sec=timeout_start_sec,
        writable=writable,
    )


def render_timer(on_calendar: str, randomized_delay_sec: int) -> str:
    """The timer: daily by default, spread over the fleet, and caught up after downtime."""
    return render(
        "nixcache-backup.timer.j2",
        on_calendar=on_calendar,
        randomized_delay_sec=randomized_delay_sec,
        service=SERVICE,
    )


# --- the backup repository host (docs/decisions/0008-isolated-append-only-backups.md) ----------
STORE_SERVICE = "nixcache-backup-store.service"
PRUNE_SERVICE = "nixcache-backup-prune.service"
PRUNE_TIMER = "nixcache-backup-prune.timer"
# The htpasswd and, per cache host, its repository password and retention configuration;
# owned by the repository account (rclone and the prune run as it), outside /etc/nixcache,
# whose mode on a host that is also a cache lets only the cache's group in.
STORE_CONFIG_DIR = "/etc/nixcache-backup-store"
STORE_HTPASSWD = f"{STORE_CONFIG_DIR}/htpasswd"
STORE_CACHE_DIR_NAME = "nixcache-backup-store"
# Credentials are stored as unsalted SHA-1 ({SHA}: fast, so rclone checks every request
# cheaply; bcrypt costs tens of ms per request, measured in bench/backup_store.py). That is
# only safe for long random values, which is what the deploy generates (43 characters).
MIN_CREDENTIAL_LENGTH = 32


def htpasswd_line(user: str, credential: str) -> str:
    """One htpasswd entry `user:{SHA}base64(sha1(credential))`: deterministic, so reruns change nothing."""
    if ":" in user or not user.strip():
        raise SettingsError(
            f"{user!r} cannot be a backup repository user (empty or has ':'); rename the host"
        )
    if len(credential) < MIN_CREDENTIAL_LENGTH:
        raise SettingsError(
            f"the backup credential of {user} is {len(credential)} characters; the repository host"
            f" needs a random one of at least {MIN_CREDENTIAL_LENGTH} (let the deploy generate it:"
            " backup_credential_generate = True, or `nixcache secrets` a long random value)"
        )
    digest = base64.b64encode(hashlib.sha1(credential.encode()).digest()).decode()  # noqa: S324 - see above
    return f"{user}:{{SHA}}{digest}"


def render_htpasswd(credentials: dict[str, str]) -> str:
    """The REST server's htpasswd: one line per cache host (name -> credential), sorted."""
    return "".join(f"{htpasswd_line(user, credentials[user])}\n" for user in sorted(credentials))


def rest_url_with_credential(url: str, user: str, credential: str) -> str:
    """`rest:http://host:port/path/` with `user:credential@` added (for the 0600 env file only)."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.startswith("rest:"):
        raise SettingsError(f"{url!r} is not a rest:http(s)://host:port/path/ repository URL")
    if "@" in rest.split("/", 1)[0]:
        raise SettingsError(
            f"backup_repository {redact(url)} carries a user or password; remove it: the credential"
            " comes from backup_credential_ref"
        )
    return f"{scheme}://{quote(user, safe='')}:{quote(credential, safe='')}@{rest}"


def store_bind_address(settings: Settings) -> str:
    """The one address the REST server binds: backup_store_bind_address, else the ssh address."""
    return listen_address("backup_store_bind_address", settings.backup_store_bind_address, "the cache hosts")


def render_store_units(settings: Settings, nixcache_bin: str, configs: list[str]) -> dict[str, str]:
    """The REST server unit, and the retention service and timer over `configs` (one per host)."""
    common = {"user": settings.backup_store_user, "data_dir": settings.backup_store_dir}
    return {
        STORE_SERVICE: render(
            "nixcache-backup-store.service.j2",
            bind=store_bind_address(settings),
            port=settings.backup_store_port,
            htpasswd=STORE_HTPASSWD,
            memory_max=settings.backup_store_memory_max,
            **common,
        ),
        PRUNE_SERVICE: render(
            "nixcache-backup-prune.service.j2",
            nixcache_bin=nixcache_bin,
            configs=sorted(configs),
            cache_dir_name=STORE_CACHE_DIR_NAME,
            **common,
        ),
        PRUNE_TIMER: render(
            "nixcache-backup-prune.timer.j2", on_calendar=settings.backup_store_prune_on_calendar
        ),
    }


@operation()
def store_units(settings: Settings, nixcache_bin: str, configs: list[str]) -> Iterator:
    """The append-only REST server runs, and the retention timer is enabled; restarted on change.

    + settings: the repository host's settings
    + nixcache_bin: the `nixcache` command on the host (the retention runs `nixcache backup forget`)
    + configs: one backup configuration per cache host, as written on the host
    """
    files = render_store_units(settings, nixcache_bin, configs)
    # rclone rereads the htpasswd on change: a new credential needs no restart.
    yield from service.units._inner("nixcache-backup-store", files, [STORE_SERVICE, PRUNE_TIMER])


def _unmask(value: str | HiddenValue) -> str:
    return value.unmask() if isinstance(value, HiddenValue) else value


@operation()
def password_file(password: str | HiddenValue, path: str) -> Iterator:
    """Install restic's repository password as a root-only 0600 file.

    + password: the password (pass a HiddenValue so pyinfra never prints it)
    + path: where restic reads it (`password_file` in backup.toml)
    """
    if not _unmask(password).strip():
        raise OperationValueError(
            f"{host.name}: the backup password for {path} is empty; store one at backup_password_ref"
        )
    yield from hostfile.put._inner(path, password, mode="0600")


@operation()
def timer(
    nixcache_bin: str,
    config_path: str,
    on_calendar: str = Settings.backup_on_calendar,
    randomized_delay_sec: int = Settings.backup_randomized_delay_sec,
    writable_paths: list[str] | None = None,
    timeout_start_sec: int = 6 * 3600,
) -> Iterator:
    """Install and enable the backup service and its timer; reload systemd only when a unit changed.

    + nixcache_bin: the `nixcache` command on the host
    + config_path: backup.toml
    + on_calendar: systemd OnCalendar expression
    + randomized_delay_sec: RandomizedDelaySec
    + writable_paths: what the run writes besides restic's cache (metrics dir, a local repository)
    + timeout_start_sec: the longest a run may take before systemd stops it
    """
    units = {
        SERVICE: render_service(nixcache_bin, config_path, writable_paths or [], timeout_start_sec),
        TIMER: render_timer(on_calendar, randomized_delay_sec),
    }
    yield from service.units._inner("nixcache-backup", units, [TIMER])


def _refused(host_name: str, problem: str) -> str:
    return (
        f"{host_name}: recover stopped before the restore: {problem}; nothing was restored"
        " and no backup timer was installed, so the repository is as it was"
    )


def _new_host_fix(host_name: str) -> str:
    return (
        f"or, only if {host_name} is genuinely new and never had backups, set recover_allow_empty = True"
        f" in its host data (--data recover_allow_empty=True) to start it with an empty store"
    )


def empty_start(
    host_name: str,
    repository: str,
    mine: dict[str, Any] | None,
    everyone: dict[str, Any] | None,
    allow_empty: bool,
) -> tuple[bool, str]:
    """May `host_name` start with an empty store, given what its repository answered? (yes, why).

    `mine` and `everyone` are BackupSnapshots facts (this host's snapshots, all hosts'); this
    is asked only when `mine` holds no snapshot. "Could not read" never becomes "nothing to
    restore": only a repository that answers and holds no snapshot at all may start a host
    empty on its own; no repository at that address, or only other hosts' snapshots there,
    needs `allow_empty` (a wrong address or host name looks exactly like that).
    """
    answer = everyone if mine and mine.get("readable") else mine
    if answer is None:
        answer = {
            "readable": False,
            "cause": "the host's nixcache command, which reads it, is not installed",
            "fix": "see why the install step above failed",
        }
    if not answer.get("readable") and answer.get("kind") != "missing":
        if answer.get("cause"):
            reason = f"{answer['cause']}; {answer.get('fix') or 'see restic output on the host'}"
        else:
            reason = f"{answer.get('error')}; run `nixcache backup list` on the host to see why"
        problem = f"backup repository {repository} cannot be read: {reason}"
        return False, _refused(host_name, f"{problem}, then run deploys/recover.py again")
    if not answer.get("readable"):
        found = f"there is no backup repository at {repository}"
        fix = "fix backup_repository if that address is wrong"
    elif answer.get("hosts"):
        others = ", ".join(answer["hosts"])
        found = f"backup repository {repository} holds no snapshot of {host_name}, only of {others}"
        fix = "fix backup_repository, or the inventory name if it changed (snapshots are recorded under it)"
    else:
        return True, f"backup repository {repository} holds no snapshot at all: {host_name} starts empty"
    if allow_empty:
        return True, f"{found}: starting with an empty store, as recover_allow_empty = True says"
    return False, _refused(host_name, f"{found}; {fix}, {_new_host_fix(host_name)}")


@operation()
def restore(
    nixcache_bin: str,
    config_path: str,
    store_dir: str,
    repository: str,
    snapshot_host: str,
    owner: str,
    content_dir: str | None = None,
    allow_empty: bool = Settings.recover_allow_empty,
) -> Iterator:
    """Restore /etc/nixcache and the store from `snapshot_host`'s latest snapshot, onto an empty store.

    A host that already holds store content is never overwritten (a restore onto a live cache
    would mix two histories). The repository is read through the host's own `nixcache backup
    list` (facts.backup.BackupSnapshots), with backup.toml's credentials. When it cannot be
    read, or holds no snapshot of this host, the step fails (`empty_start` says when an empty
    start is allowed), which stops the deploy before anything that would back up an empty store.

    + nixcache_bin: the `nixcache` command on the host
    + config_path: backup.toml
    + store_dir: the cache's store directory
    + repository: the restic repository, for messages (a URL's password is masked)
    + snapshot_host: the name snapshots are recorded under (the inventory name)
    + owner: the service user that must own the restored store
    + content_dir: where content shows (default store_dir); a server started on an empty store
      creates its empty subdirectories, so recover.py points this at <store>/narinfo
    + allow_empty: recover_allow_empty: a genuinely new host may start empty (see empty_start)
    """
    content_dir = content_dir or store_dir
    if host.get_fact(DirectoryHasEntries, path=content_dir):
        host.noop(f"{content_dir} already holds content: not restoring over it")
        return
    shown = redact(repository)
    facts = {"nixcache_bin": nixcache_bin, "config_path": config_path}
    mine = host.get_fact(BackupSnapshots, snapshot_host=snapshot_host, **facts)
    if mine is None and not host.state.is_executing:
        # Planning a fresh host: nixcache arrives with an earlier step; asked again when executing.
        host.noop(f"backup repository {shown} is read once nixcache is installed")
        return
    latest = (mine or {}).get("latest")
    if not latest:
        readable = bool(mine and mine.get("readable"))
        everyone = host.get_fact(BackupSnapshots, snapshot_host=None, **facts) if readable else None
        allowed, message = empty_start(snapshot_host, shown, mine, everyone, allow_empty)
        if not allowed:
            yield failed_step(message)
            return
        if host.state.is_executing:
            logger.warning(f"{host.print_prefix}{message}")
        host.noop(message)
        return
    restore = (
        f"{nixcache_bin} backup restore --config {shlex.quote(config_path)} "
        f"--snapshot {shlex.quote(latest['id'])} --target /"
    )
    # Up to three attempts in one command: a dropped sftp connection fails a restore, and a rerun
    # of this operation would see the partly restored store as content and skip it.
    yield f"{restore} || (sleep 5 && {restore}) || (sleep 5 && {restore})"
    # uids are numeric in snapshots; the replacement host's service user may have another one.
    # A snapshot without the store (backup_include_store off: the origin holds it) restores none.
    store = shlex.quote(store_dir)
    yield f"if [ -d {store} ]; then chown -R {shlex.quote(owner)}: {store}; fi"

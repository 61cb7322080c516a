"""A host that runs Nix: Debian's Nix daemon, /etc/nix/nix.conf from data, Nix's own GC, remote
builders (/etc/nix/machines), the builder side of a remote build, and build statistics.

The nix.conf values come from a named profile (nix_profile, NIX_PROFILES below: the three of the
best-practices document) with host data laid over it key by key (nix_settings). Substituters
are computed, in tier order: this host's own cache first (on loopback: the paths pushed to it),
then nix_substituters from data; each with its key, and nothing else (Debian's Nix would try
the official cache otherwise).
"""

from __future__ import annotations

import base64
import re
import shlex
from typing import Any

from pyinfra import host
from pyinfra.api import HiddenValue, OperationValueError, StringCommand, operation
from pyinfra.facts.files import File
from pyinfra.operations import server

from nixcache.server.units import parse_size
from operations import hostfile
from operations.render import render, sha256
from operations.service import units
from operations.settings import NIXCACHE_BIN, Settings, SettingsError

NIX_CONF = "/etc/nix/nix.conf"
MACHINES_FILE = "/etc/nix/machines"
# The key the daemon (root) logs in to builders with; root-only.
BUILDER_KEY_FILE = "/etc/nix/builder-ssh-key"
NIX_STORE_DIR = "/nix/store"
NIX_STATE_DIR = "/nix/var/nix"
NIX_LOG_DIR = "/nix/var/log/nix"
NIX_GC_NAME = "nix-gc"
NIX_STATS_NAME = "nixcache-nix-stats"
NIX_STATS_TEXTFILE = "nixcache_nix.prom"
NIX_DISK_ALERT_NAME = "nixcache-disk-alert-nix"
# Ends in nixcache_disk.prom, so NixcacheDiskCheckStale (file=~".*nixcache_disk.prom") watches it.
NIX_DISK_ALERT_TEXTFILE = "nix-store.nixcache_disk.prom"
# The service alone: it listens itself when its socket unit is not running (the lab image), and
# takes the socket's listener when it is (Debian enables both). Restarting the socket unit
# beside a running service fails ("Socket service nix-daemon.service already active").
DAEMON_UNITS = ["nix-daemon.service"]
# nix-setup-systemd's groups: nixbld (build users), nix-users (may open the daemon's socket).
BUILD_USERS_GROUP = "nixbld"
DAEMON_USERS_GROUP = "nix-users"

# Every profile starts from these.
NIX_COMMON: dict[str, Any] = {
    # The group nix-setup-systemd creates with build users nixbld1..10: builds run as them.
    "build-users-group": BUILD_USERS_GROUP,
    # Debian's own nix.conf says the sandbox does not work on Debian's Nix (nixpkgs PR 47794).
    "sandbox": False,
    # Collect during builds when under 10G is free, up to 25G free: the document's values.
    "min-free": "10G",
    "max-free": "25G",
    # .drv files are small and `nix log`, `nix-store -q --deriver` and the served /log/<drv>
    # need them: Nix's own default, written down.
    "keep-derivations": True,
    # bzip2'd build logs: what /log/<drv> serves, and how `nixcache nix-stats` tells a finished
    # build (a complete bzip2 stream) from a running one.
    "compress-build-log": True,
}

# The best-practices document's "Performance Profiles", its values; where it is silent:
NIX_PROFILES: dict[str, dict[str, Any]] = {
    # A single heavy user (a developer's box): 4 jobs x 2 cores. keep-outputs so a GC does not
    # throw away the build inputs of the shell they work in (as nix-direnv users set it).
    "workstation": {"max-jobs": 4, "cores": 2, "http-connections": 50, "keep-outputs": True},
    # Many light users (the document's 4 GB cache server): 2 jobs x 1 core against OOM, Nix's
    # default 25 connections, keep-outputs off to save storage.
    "office": {"max-jobs": 2, "cores": 1, "http-connections": 25, "keep-outputs": False},
    # CI: 8 jobs x 4 cores, outputs and derivations kept (rebuilds of a branch reuse them); 50
    # connections, as fetching closures is most of a CI job's time.
    "ci": {"max-jobs": 8, "cores": 4, "http-connections": 50, "keep-outputs": True},
}

# Computed from other data; nix_settings cannot set them (the value names the key that does).
COMPUTED = {
    "substituters": "nix_substituters",
    "trusted-public-keys": "nix_trusted_public_keys",
    "trusted-users": "nix_builder",
    "builders": "nix_builders",
    "compress-build-log": "nothing: build statistics need compressed logs",
}
_SIZE_KEYS = ("min-free", "max-free")
_OPTION = re.compile(r"^[a-z][a-z0-9-]*$")


def profile(settings: Settings, host_name: str) -> dict[str, Any]:
    """The nix.conf options of `settings`: common values, the profile, then nix_settings."""
    # nix_profile is one of NIX_PROFILES' names: the settings schema checked it.
    options = {**NIX_COMMON, **NIX_PROFILES[settings.nix_profile]}
    for key, value in settings.nix_settings.items():
        where = f"{host_name}: host data 'nix_settings' key {key!r}"
        if key in COMPUTED:
            raise SettingsError(f"{where} is set by the deploy; use {COMPUTED[key]} instead")
        if not isinstance(key, str) or not _OPTION.match(key):
            raise SettingsError(f"{where} is not a nix.conf option name; use e.g. 'max-jobs'")
        if not isinstance(value, bool | int | str | list | tuple) or "\n" in str(value):
            raise SettingsError(f"{where} = {value!r}: give a number, true/false, a string or a list")
        options[key] = value
    for key in _SIZE_KEYS:
        try:
            options[key] = parse_size(options[key])
        except ValueError as error:
            raise SettingsError(f"{host_name}: host data 'nix_settings' {key}: {error}") from None
    return options


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return " ".join(str(item) for item in value)
    return str(value)


def render_nix_conf(
    settings: Settings, host_name: str, own_cache: str | None = None, own_keys: list[str] = ()
) -> str:
    """/etc/nix/nix.conf for `settings`; `own_cache` (URL) and `own_keys` when it is a cache."""
    options = profile(settings, host_name)
    substituters = [own_cache] if own_cache else []
    substituters += [url for url in settings.nix_substituters if url not in substituters]
    options["substituters"] = substituters
    options["trusted-public-keys"] = [*own_keys, *settings.nix_trusted_public_keys]
    trusted = ["root"] + ([settings.nix_builder_user] if settings.nix_builder else [])
    options["trusted-users"] = trusted
    options["builders"] = f"@{MACHINES_FILE}" if settings.nix_builders else ""
    lines = [
        "# Rendered by nixcache's deploy (operations/nixhost.py) from host data; local edits are lost.",
        f"# Profile {settings.nix_profile!r} (nix_profile), overridden by nix_settings: "
        + (", ".join(sorted(settings.nix_settings)) or "nothing"),
    ]
    lines += [f"{key} = {_value(value)}".rstrip() for key, value in options.items()]
    return "\n".join(lines) + "\n"


def builders(settings: Settings, host_name: str) -> list[dict[str, Any]]:
    """nix_builders checked and completed with their defaults."""
    known = {
        "host",
        "host_key",
        "user",
        "system",
        "max_jobs",
        "speed_factor",
        "features",
        "mandatory_features",
    }
    entries = []
    for index, entry in enumerate(settings.nix_builders):
        where = f"{host_name}: host data 'nix_builders[{index}]'"
        if not isinstance(entry, dict):
            raise SettingsError(f'{where} is not a mapping; give {{"host": …, "host_key": …}}')
        if set(entry) - known:
            raise SettingsError(f"{where} has unknown keys {sorted(set(entry) - known)}; use {sorted(known)}")
        if not re.match(r"^[A-Za-z0-9.:-]+$", str(entry.get("host", ""))):
            raise SettingsError(f"{where} host {entry.get('host')!r} is not a host name or address")
        key = str(entry.get("host_key", "")).split()
        if len(key) < 2 or not key[0].startswith(("ssh-", "ecdsa-")):
            raise SettingsError(
                f"{where} host_key is missing or not a public host key; give the builder's "
                f"'ssh-ed25519 AAAA…' (ssh-keyscan {entry.get('host')}, checked out of band)"
            )
        filled = {
            "host": entry["host"],
            "host_key": " ".join(key[:2]),
            "user": entry.get("user", settings.nix_builder_user),
            "system": entry.get("system", "x86_64-linux"),
            "max_jobs": entry.get("max_jobs", 1),
            "speed_factor": entry.get("speed_factor", 1),
            "features": list(entry.get("features", [])),
            "mandatory_features": list(entry.get("mandatory_features", [])),
        }
        for number in ("max_jobs", "speed_factor"):
            if not isinstance(filled[number], int) or isinstance(filled[number], bool) or filled[number] < 1:
                raise SettingsError(f"{where} {number} is {filled[number]!r}; give a whole number >= 1")
        entries.append(filled)
    if entries and not settings.nix_builder_ssh_key_ref:
        raise SettingsError(
            f"{host_name}: host data 'nix_builders' is set but 'nix_builder_ssh_key_ref' is not; "
            "give the secret reference of the SSH key the daemon logs in to builders with"
        )
    return entries


def render_machines(entries: list[dict[str, Any]]) -> str:
    """/etc/nix/machines: one builder a line, its host key pinned in the eighth column (Nix writes
    it into a known_hosts file of its own for each connection: no trust on first use)."""
    lines = ["# Rendered by nixcache's deploy (operations/nixhost.py) from nix_builders."]
    for entry in entries:
        columns = [
            f"ssh://{entry['user']}@{entry['host']}",
            entry["system"],
            BUILDER_KEY_FILE,
            str(entry["max_jobs"]),
            str(entry["speed_factor"]),
            ",".join(entry["features"]) or "-",
            ",".join(entry["mandatory_features"]) or "-",
            base64.b64encode(entry["host_key"].encode()).decode(),
        ]
        lines.append(" ".join(columns))
    return "\n".join(lines) + "\n"


@operation()
def nix_conf(content: str):
    """/etc/nix/nix.conf holds `content` (the daemon restarts through `daemon`).

    + content: the text render_nix_conf gave
    """
    yield from hostfile.put._inner(NIX_CONF, content)


@operation()
def machines(content: str, ssh_key: HiddenValue | None):
    """/etc/nix/machines and the builders' SSH key (root-only); without builders, no key file.

    + content: the text render_machines gave
    + ssh_key: HiddenValue of the OpenSSH private key, or None when there are no builders
    """
    yield from hostfile.put._inner(MACHINES_FILE, content)
    if ssh_key is not None:
        # OpenSSH refuses a key file without its final newline; secret stores may strip it.
        key = HiddenValue(ssh_key.unmask().rstrip("\n") + "\n")
        yield from hostfile.put._inner(BUILDER_KEY_FILE, key, mode="0600")


@operation()
def daemon(depends_on: str):
    """nix-daemon.service enabled and running; restarted when `depends_on` (a
    digest of nix.conf and machines, which it reads at start) changed.

    + depends_on: digest of the files the daemon reads
    """
    yield from units._inner("nix-daemon", {}, DAEMON_UNITS, depends_on)


@operation()
def store_database():
    """Nix's database exists (`nix-store --init`): Nix creates it on first use, and the cache
    server refuses to start serving a store without one."""
    if host.get_fact(File, path=f"{NIX_STATE_DIR}/db/db.sqlite"):
        host.noop("Nix's database exists")
        return
    yield StringCommand("nix-store --init")


def render_gc_units(settings: Settings) -> dict[str, str]:
    """nix-gc.service and nix-gc.timer: Nix's own GC (the document's nix.gc)."""
    command = shlex.join(["/usr/bin/nix-collect-garbage", "--delete-older-than", settings.nix_gc_older_than])
    return {
        f"{NIX_GC_NAME}.service": render("nix-gc.service.j2", command=command),
        f"{NIX_GC_NAME}.timer": render(
            "nixcache-gc.timer.j2",
            schedule=settings.nix_gc_schedule,
            randomized_delay=settings.gc_randomized_delay,
            what="the Nix store",
        ),
    }


@operation()
def gc_timer(settings: Settings):
    """nix-gc.timer installed, enabled and waiting.

    + settings: nix_gc_older_than, nix_gc_schedule, gc_randomized_delay
    """
    yield from units._inner(NIX_GC_NAME, render_gc_units(settings), [f"{NIX_GC_NAME}.timer"])


def render_stats_units(settings: Settings) -> dict[str, str]:
    """The oneshot that writes build and store statistics for node exporter, and its timer."""
    textfile_dir = settings.node_exporter_textfile_dir
    command = shlex.join(
        [
            NIXCACHE_BIN,
            "nix-stats",
            "--textfile",
            f"{textfile_dir}/{NIX_STATS_TEXTFILE}",
            "--state-dir",
            NIX_STATE_DIR,
        ]
    )
    return {
        f"{NIX_STATS_NAME}.service": render(
            "nixcache-nix-stats.service.j2", command=command, textfile_dir=textfile_dir
        ),
        f"{NIX_STATS_NAME}.timer": render(
            "nixcache-nix-stats.timer.j2", schedule=settings.nix_stats_schedule
        ),
    }


@operation()
def stats_timer(settings: Settings, depends_on: str = ""):
    """nixcache-nix-stats.timer installed, enabled and waiting.

    + settings: node_exporter_textfile_dir, nix_stats_schedule
    + depends_on: the installed build (the timer runs `nixcache nix-stats`)
    """
    yield from units._inner(
        NIX_STATS_NAME, render_stats_units(settings), [f"{NIX_STATS_NAME}.timer"], depends_on
    )


def render_disk_alert_units(settings: Settings) -> dict[str, str]:
    """A second disk alert, on the Nix store's filesystem: the same command and template as the
    cache store's (operations/monitoring.py), its own textfile, so the `path` label tells them
    apart and the alert rules (NixcacheDiskFull, NixcacheDiskFillingUp) cover both."""
    textfile_dir = settings.node_exporter_textfile_dir
    return {
        f"{NIX_DISK_ALERT_NAME}.service": render(
            "monitoring-disk-alert.service.j2",
            nixcache_bin=NIXCACHE_BIN,
            store_dir=NIX_STORE_DIR,
            threshold_percent=settings.disk_alert_threshold_percent,
            textfile=f"{textfile_dir}/{NIX_DISK_ALERT_TEXTFILE}",
            textfile_dir=textfile_dir,
            webhook_file=None,
        ),
        f"{NIX_DISK_ALERT_NAME}.timer": render(
            "monitoring-disk-alert.timer.j2", schedule=settings.disk_alert_schedule
        ),
    }


@operation()
def disk_alert(settings: Settings, depends_on: str = ""):
    """The disk-usage alert timer for /nix/store's filesystem.

    + settings: disk_alert_threshold_percent, disk_alert_schedule, node_exporter_textfile_dir
    + depends_on: the installed build (the timer runs `nixcache disk-alert`)
    """
    yield from units._inner(
        NIX_DISK_ALERT_NAME, render_disk_alert_units(settings), [f"{NIX_DISK_ALERT_NAME}.timer"], depends_on
    )


def authorized_key(public_key: str) -> str:
    """The builder's authorized_keys line: only `nix-store --serve --write` (what Nix's ssh://
    store runs), no pty, no forwarding."""
    return f'restrict,command="nix-store --serve --write" {public_key} nixcache-remote-build'


@operation()
def builder_user(user: str, public_key: str):
    """The login remote builds arrive as: in group nix-users (the daemon's socket), its one
    authorised key restricted to `nix-store --serve --write`.

    + user: the login (nix_builder_user)
    + public_key: the OpenSSH public key of nix_builder_ssh_key_ref
    """
    if not re.match(r"^[a-z][-a-z0-9_]*$", user):
        raise OperationValueError(
            f"{host.name}: nix_builder_user {user!r} is not a valid login; use e.g. nix-remote"
        )
    yield from server.user._inner(  # noqa: S604 - sshd runs the forced command through this shell
        user=user,
        shell="/bin/sh",
        create_home=True,
        groups=[DAEMON_USERS_GROUP],
        public_keys=[authorized_key(public_key)],
        delete_keys=True,
    )


def digest(*texts: str) -> str:
    """One digest of the files a unit reads (for `daemon`'s depends_on)."""
    return sha256("\0".join(texts))

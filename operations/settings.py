"""Every tunable of the deploys, with its one default and the reason for it.

The fields of `Settings` are the host data keys: inventories and `inventories/group_data/*.py`
only override them. `settings()` reads the current host's data, converts what the pyinfra CLI
hands over as strings (`--data cache_port=5001`, `--data cache_allowed_sources=10.0.0.0/8,…`)
and fails in one line naming the host, the key and the fix when a value does not fit.

Paths that are part of the product's layout (not tunables) are module constants.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import types
import typing
from dataclasses import dataclass
from typing import Any

from pyinfra import host
from pyinfra.api.exceptions import PyinfraError

# --- fixed layout on cache hosts -----------------------------------------------------------
SERVICE_NAME = "nixcache"
INSTALL_DIR = "/opt/nixcache"
VENV_DIR = f"{INSTALL_DIR}/venv"
NIXCACHE_BIN = f"{VENV_DIR}/bin/nixcache"
# Written last by the install step: the content hash of the checkout the venv was built from.
BUILD_STAMP = f"{VENV_DIR}/nixcache-build"
WHEELHOUSE_DIR = f"{INSTALL_DIR}/wheelhouse"
CONFIG_DIR = "/etc/nixcache"
CONFIG_FILE = f"{CONFIG_DIR}/config.toml"
SIGNING_KEY_FILE = f"{CONFIG_DIR}/signing-key"
PUSH_TOKEN_FILE = f"{CONFIG_DIR}/push-token"
READ_TOKEN_FILE = f"{CONFIG_DIR}/read-token"
# What the service last started with (hash of unit, config, key, venv): restart only on change.
SERVICE_STAMP = f"{CONFIG_DIR}/.applied"
NFTABLES_FILE = "/etc/nftables.conf"


class SettingsError(PyinfraError):
    """A host data value that the deploy cannot use; the message names host, key and fix."""


@dataclass(frozen=True)
class Settings:
    """Host data keys of the deploys, each with its default and why."""

    # --- D1: cache service, storage, install, keys, firewall, gc, health --------------------
    # 5000 is nix-serve's port, the one Nix users and the docs expect for an HTTP cache.
    cache_port: int = 5000
    # Networks allowed to reach the cache port (CIDRs). Empty = nobody but loopback: the safe
    # default; every inventory names its clients (the lab: its own network).
    cache_allowed_sources: tuple[str, ...] = ()
    # Networks allowed to reach SSH. Empty = the same as cache_allowed_sources, so a host never
    # ends up reachable by clients but not by its admins.
    ssh_allowed_sources: tuple[str, ...] = ()
    # Networks allowed to scrape node exporter (9100) and the cache's /metrics. Empty = closed.
    metrics_allowed_sources: tuple[str, ...] = ()
    # Unprivileged user the service runs as; owns the store and the key file, nothing else.
    service_user: str = "nixcache"
    # Where the cache keeps its state; the store lives in <dir>/store. Debian's FHS place.
    cache_data_dir: str = "/var/lib/nixcache"
    # A dedicated block device for the store (e.g. /dev/sdb), formatted ext4 and mounted on
    # cache_data_dir. None = the store shares the root filesystem (lab, small boxes).
    cache_volume_device: str | None = None
    # noatime: a cache reads every NAR it serves; access-time writes would double the I/O.
    cache_volume_options: str = "defaults,noatime"
    # Format an empty cache_volume_device with ext4. Never reformats a device holding a filesystem.
    cache_volume_format: bool = True
    # Ceiling for the server process; gevent streams NARs, so 2G (the reference's value) is ample.
    cache_memory_max: str = "2G"
    # One process, gevent's small thread pool and a few helpers: 64 is room, a fork bomb is not.
    cache_tasks_max: int = 64
    # One fd per keep-alive connection plus one per NAR being served; Debian's 1024 is too low.
    cache_limit_nofile: int = 65536
    # nix-cache-info Priority: lower wins; 30 puts this cache ahead of cache.nixos.org (40).
    cache_priority: int = 30
    # Name in every Sig line and in clients' trusted-public-keys. None = "<host name>-1", the
    # suffix being the key's generation for later rotation.
    signing_key_name: str | None = None
    # Secret references (op://, vault://, file://); required, there is no safe default.
    signing_key_ref: str | None = None
    push_token_ref: str | None = None
    # A read token makes the cache private (clients need a netrc). None = public reads.
    read_token_ref: str | None = None
    # Create the key/tokens in their store when absent. Off by default: production keys are
    # created on purpose and backed up before use; the lab turns these on.
    signing_key_generate: bool = False
    push_token_generate: bool = False
    read_token_generate: bool = False
    # GC runs daily: small enough steps that a run never takes long.
    gc_schedule: str = "daily"
    # Spread runs of a fleet so they do not all hit shared storage at once.
    gc_randomized_delay: str = "30m"
    # Keep paths fetched or pushed in the last 30 days (a month of CI branches).
    gc_older_than: str = "30d"
    # Hard cap on the store; None = no cap, the free-space thresholds below do the work.
    gc_max_size: str | None = None
    # Start deleting when less than 10G is free; delete until 25G is free (the reference's values).
    gc_min_free: str = "10G"
    gc_max_free: str = "25G"
    # How long the last deploy step waits for /nix-cache-info; a gevent server starts in ~1 s.
    health_check_timeout: int = 20

    # --- D2: users, sshd, sysctl, limits, monitoring, nginx front ----------------------------
    # Serve through nginx (TLS, HTTP/2, X-Accel-Redirect); off = clients talk to the server.
    cache_nginx_front: bool = False
    # Internal nginx location that X-Accel-Redirect points at when the front is on.
    cache_accel_redirect_prefix: str = "/_nixcache_store/"
    # --- end of D2 section -----------------------------------------------------------------

    def key_name(self, host_name: str) -> str:
        """The signing key name for `host_name`."""
        return self.signing_key_name or f"{host_name.split('.')[0]}-1"

    @property
    def store_dir(self) -> str:
        """Where the server keeps NARs and narinfos."""
        return f"{self.cache_data_dir}/store"

    @property
    def ssh_sources(self) -> tuple[str, ...]:
        """Networks that may reach SSH."""
        return self.ssh_allowed_sources or self.cache_allowed_sources


# Keys under these prefixes are this file's business: a misspelt one is an error, not a no-op.
CHECKED_PREFIXES: tuple[str, ...] = ("cache_", "gc_", "signing_key_", "push_token_", "read_token_", "health_")
_CIDR_FIELDS = ("cache_allowed_sources", "ssh_allowed_sources", "metrics_allowed_sources")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _fail(host_name: str, key: str, problem: str, fix: str) -> SettingsError:
    return SettingsError(f"{host_name}: host data '{key}' {problem}; {fix}")


def _convert(host_name: str, key: str, value: Any, annotation: Any) -> Any:
    """`value` as `annotation` wants it, accepting the strings the CLI's --data passes."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(annotation) if m is not type(None)]
        optional, annotation = True, members[0]
    if value is None or (optional and value == ""):
        if optional:
            return None
        raise _fail(host_name, key, "is None", "remove it to use the default or give a value")
    origin = typing.get_origin(annotation)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple | set | frozenset):
            raise _fail(host_name, key, f"is {value!r}", "give a list of strings")
        return tuple(str(item).strip() for item in items if str(item).strip())
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise _fail(host_name, key, f"is {value!r}", "give True or False")
    if annotation is int:
        if isinstance(value, bool):
            raise _fail(host_name, key, f"is {value!r}", "give a whole number")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise _fail(host_name, key, f"is {value!r}", "give a whole number") from None
    if annotation is str:
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
        raise _fail(host_name, key, f"is {value!r}", "give a string")
    return value


def _data_keys(data: Any) -> set[str]:
    keys: set[str] = set()
    for layer in getattr(data, "datas", ()):
        try:
            keys.update(dict(layer).keys())
        except (TypeError, ValueError):
            continue
    return keys


def from_data(host_name: str, data: Any) -> Settings:
    """Settings from a pyinfra `HostData` (or any object with `.get` / a dict)."""
    hints = typing.get_type_hints(Settings)
    fields = {field.name for field in dataclasses.fields(Settings)}
    keys = set(data) if isinstance(data, dict) else _data_keys(data)
    for key in sorted(keys):
        if key.startswith(CHECKED_PREFIXES) and key not in fields:
            fix = "check its spelling against operations/settings.py"
            raise _fail(host_name, key, "is not a nixcache setting", fix)
    values: dict[str, Any] = {}
    missing = object()
    for field in dataclasses.fields(Settings):
        value = data.get(field.name, missing)
        if value is missing:
            continue
        values[field.name] = _convert(host_name, field.name, value, hints[field.name])
    for key in _CIDR_FIELDS:
        for source in values.get(key, ()):
            try:
                ipaddress.ip_network(source, strict=False)
            except ValueError:
                raise _fail(host_name, key, f"holds {source!r}", "give CIDRs such as 10.0.0.0/24") from None
    port = values.get("cache_port", Settings.cache_port)
    if not 0 < port < 65536:
        raise _fail(host_name, "cache_port", f"is {port}", "give a TCP port between 1 and 65535")
    return Settings(**values)


def settings() -> Settings:
    """The current pyinfra host's settings (call inside a deploy or operation)."""
    return from_data(host.name, host.data)

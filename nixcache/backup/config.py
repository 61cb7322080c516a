"""The backup configuration file, /etc/nixcache/backup.toml, declared with nixcache.schema.

`dump` is the one place that renders this file (the deploy calls it with values from group
data; tomli-w writes it); `load` reads it back on the host through the same declarations.
Every key, its default and why: docs/settings.md (generated from these declarations).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from nixcache import schema
from nixcache.schema import (
    BOOL,
    COUNT,
    PATH_TEXT,
    PATHS_TEXT,
    STR,
    STRING_LIST,
    Kind,
    SchemaError,
    integer,
    setting,
)

DEFAULT_PATH = Path("/etc/nixcache/backup.toml")
REPOSITORY_SCHEMES = ("sftp:", "s3:", "rest:")


class ConfigError(ValueError):
    """The backup configuration cannot be used; the message names the file, the key and the fix."""


def _repository(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith((*REPOSITORY_SCHEMES, "/")):
        raise ValueError
    return value


REPOSITORY = Kind(
    "restic repository",
    "give an absolute path or an sftp:user@host:/path, s3:host/bucket/path or rest:https://host/path URL",
    _repository,
)


def _path_or_empty(value: Any) -> str:
    return "" if value == "" else PATH_TEXT.parse(value)


PATH_OR_EMPTY = Kind("path or empty", 'give an absolute path, or "" for none', _path_or_empty)


@dataclass(frozen=True)
class BackupConfig:
    """What `nixcache backup` backs up, where to, and how long it keeps it."""

    repository: str = setting(
        kind=REPOSITORY,
        doc="Where snapshots go: a local path, sftp:user@host:/path, s3:host/bucket/path or rest:https://host/path.",
    )
    password_file: str = setting(
        "/etc/nixcache/backup.password",
        PATH_TEXT,
        "File (mode 0600) holding the repository password; handed to restic as a file, never on argv.",
    )
    env_file: str = setting(
        "",
        PATH_OR_EMPTY,
        "Optional KEY=VALUE file (mode 0600) with credentials for s3:/rest: repositories"
        " (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...); empty = none.",
    )
    host: str = setting(
        "",
        STR,
        "Host name recorded in snapshots and used to pick this host's snapshots; keep it stable"
        " across a host replacement so the new host finds the old one's backups. Empty = hostname.",
    )
    config_dir: str = setting(
        "/etc/nixcache",
        PATH_TEXT,
        "Configuration and signing key: always backed up, small and irreplaceable.",
    )
    include_store: bool = setting(
        False, BOOL, "Also back up the cache store: rebuildable from upstream but expensive to refill."
    )
    store_dir: str = setting(
        "/var/lib/nixcache", PATH_TEXT, "The cache store directory, backed up when include_store is true."
    )
    extra_paths: list[str] = setting([], PATHS_TEXT, "More absolute paths to back up.")
    exclude: list[str] = setting(
        [], STRING_LIST, "restic --exclude patterns, e.g. in-flight upload temp files."
    )
    keep_daily: int = setting(7, COUNT, "Retention: keep the last snapshot of each of this many days.")
    keep_weekly: int = setting(4, COUNT, "Retention: keep the last snapshot of each of this many weeks.")
    keep_monthly: int = setting(6, COUNT, "Retention: keep the last snapshot of each of this many months.")
    apply_retention: bool = setting(
        True,
        BOOL,
        "Apply keep_* (restic forget --prune) after each run. False for an append-only repository (the "
        "backup repository host's rest: server), whose host applies the retention itself.",
    )
    check_every_days: int = setting(
        7, COUNT, "Run `restic check` when the last successful check is this many days old; 0 = every run."
    )
    check_read_data_subset: str = setting(
        "", STR, "Also re-read this share of pack data on check (e.g. '5%' or '1/7'); empty = metadata only."
    )
    metrics_file: str = setting(
        "/var/lib/prometheus/node-exporter/nixcache_backup.prom",
        PATH_TEXT,
        "Node exporter textfile written after each run (backup freshness alerting reads it).",
    )
    state_file: str = setting(
        "/var/lib/nixcache-backup/state.json",
        PATH_TEXT,
        "Run history (last success, last check, snapshot sizes) kept between runs.",
    )
    cache_dir: str = setting(
        "/var/cache/nixcache-backup",
        PATH_OR_EMPTY,
        "restic's local metadata cache; speeds up every run. Empty = restic's default.",
    )
    progress_seconds: int = setting(
        10, integer(minimum=1), "Print a progress line this often during long work."
    )

    def excludes(self) -> list[str]:
        """restic --exclude patterns: the configured ones, the store's in-flight uploads and its
        signed narinfos and its quarantine."""
        from nixcache.server.verify import QUARANTINE_DIR  # the store's layout (store.py)

        patterns = list(self.exclude)
        if self.include_store:
            # Uploads land in tmp/ and are renamed into place once verified: never worth keeping.
            # signed/ is derived from narinfo/ and the key, and a snapshot read file by file may
            # pair a signed text with another version of its narinfo: the server re-signs a
            # restored store (no signed/KEYS) in the background instead.
            # quarantine/ holds what `nixcache verify` found damaged: a restore must not bring
            # damage back, and it would cost repository space for bytes nobody can serve.
            for name in ("tmp", "signed", QUARANTINE_DIR):
                pattern = str(PurePosixPath(self.store_dir) / name)
                if pattern not in patterns:
                    patterns.append(pattern)
        return patterns

    def backup_paths(self) -> list[str]:
        """The paths a run backs up, in a stable order."""
        paths = [self.config_dir]
        if self.include_store:
            paths.append(self.store_dir)
        paths.extend(p for p in self.extra_paths if p not in paths)
        return paths


def validate(config: BackupConfig, source: str = "backup config") -> BackupConfig:
    """Every key through its converter, and the one rule that spans keys; ConfigError otherwise."""
    try:
        schema.build(BackupConfig, schema.to_toml(config))
    except SchemaError as error:
        raise ConfigError(f"{source}: {error.describe()}") from None
    if not any((config.keep_daily, config.keep_weekly, config.keep_monthly)):
        raise ConfigError(
            f"{source}: keep_daily/keep_weekly/keep_monthly are all 0 (restic would keep everything);"
            f" set at least keep_daily"
        )
    return config


def parse(text: str, source: str = "backup config") -> BackupConfig:
    """Build a config from TOML text; unknown keys and wrong values are errors naming the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML ({error}); fix the syntax") from None
    try:
        config = schema.build(BackupConfig, data)
    except SchemaError as error:
        raise ConfigError(f"{source}: {error.describe()}") from None
    return validate(config, source)


def load(path: Path | str = DEFAULT_PATH) -> BackupConfig:
    """Read and validate the configuration file at `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path} does not exist; deploy the backup configuration or pass --config"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}; check its permissions") from None
    return parse(text, str(path))


def dump(config: BackupConfig) -> str:
    """Render `config` as the TOML file the host reads (tomli-w)."""
    validate(config)
    return schema.dumps(
        config,
        "nixcache backup configuration, read by `nixcache backup run|list|restore|check`.\n"
        "Rendered by the deploy (nixcache.backup.config.dump): change group data, not this file.\n"
        "Every key, its default and the reason for it: docs/settings.md.",
    )

"""The backup configuration file, /etc/nixcache/backup.toml.

`dump` is the one place that renders this file (the deploy calls it with values from group
data); `load` reads it back on the host. Every key has a default and a comment saying why,
so the rendered file documents itself.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

DEFAULT_PATH = Path("/etc/nixcache/backup.toml")
REPOSITORY_SCHEMES = ("sftp:", "s3:", "rest:")


class ConfigError(ValueError):
    """The backup configuration cannot be used; the message names the file, the key and the fix."""


def _doc(text: str, **kwargs):
    return field(metadata={"doc": text}, **kwargs)


@dataclass(frozen=True)
class BackupConfig:
    """What `nixcache backup` backs up, where to, and how long it keeps it."""

    repository: str = _doc(
        "Where snapshots go: a local path, sftp:user@host:/path, s3:host/bucket/path or rest:https://host/path."
    )
    password_file: str = _doc(
        "File (mode 0600) holding the repository password; handed to restic as a file, never on argv.",
        default="/etc/nixcache/backup.password",
    )
    env_file: str = _doc(
        "Optional KEY=VALUE file (mode 0600) with credentials for s3:/rest: repositories"
        " (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...); empty = none.",
        default="",
    )
    host: str = _doc(
        "Host name recorded in snapshots and used to pick this host's snapshots; keep it stable"
        " across a host replacement so the new host finds the old one's backups. Empty = hostname.",
        default="",
    )
    config_dir: str = _doc(
        "Configuration and signing key: always backed up, small and irreplaceable.",
        default="/etc/nixcache",
    )
    include_store: bool = _doc(
        "Also back up the cache store: rebuildable from upstream but expensive to refill.",
        default=False,
    )
    store_dir: str = _doc(
        "The cache store directory, backed up when include_store is true.", default="/var/lib/nixcache"
    )
    extra_paths: list[str] = field(default_factory=list, metadata={"doc": "More absolute paths to back up."})
    exclude: list[str] = field(
        default_factory=list,
        metadata={"doc": "restic --exclude patterns, e.g. in-flight upload temp files."},
    )
    keep_daily: int = _doc("Retention: keep the last snapshot of each of this many days.", default=7)
    keep_weekly: int = _doc("Retention: keep the last snapshot of each of this many weeks.", default=4)
    keep_monthly: int = _doc("Retention: keep the last snapshot of each of this many months.", default=6)
    apply_retention: bool = _doc(
        "Apply keep_* (restic forget --prune) after each run. False for an append-only repository"
        " (the backup repository host's rest: server), whose host applies the retention itself.",
        default=True,
    )
    check_every_days: int = _doc(
        "Run `restic check` when the last successful check is this many days old; 0 = every run.",
        default=7,
    )
    check_read_data_subset: str = _doc(
        "Also re-read this share of pack data on check (e.g. '5%' or '1/7'); empty = metadata only.",
        default="",
    )
    metrics_file: str = _doc(
        "Node exporter textfile written after each run (backup freshness alerting reads it).",
        default="/var/lib/prometheus/node-exporter/nixcache_backup.prom",
    )
    state_file: str = _doc(
        "Run history (last success, last check, snapshot sizes) kept between runs.",
        default="/var/lib/nixcache-backup/state.json",
    )
    cache_dir: str = _doc(
        "restic's local metadata cache; speeds up every run. Empty = restic's default.",
        default="/var/cache/nixcache-backup",
    )
    progress_seconds: int = _doc("Print a progress line this often during long work.", default=10)

    def excludes(self) -> list[str]:
        """restic --exclude patterns: the configured ones and the store's in-flight uploads."""
        patterns = list(self.exclude)
        if self.include_store:
            # Uploads land in tmp/ and are renamed into place once verified: never worth keeping.
            uploads = str(PurePosixPath(self.store_dir) / "tmp")
            if uploads not in patterns:
                patterns.append(uploads)
        return patterns

    def backup_paths(self) -> list[str]:
        """The paths a run backs up, in a stable order."""
        paths = [self.config_dir]
        if self.include_store:
            paths.append(self.store_dir)
        paths.extend(p for p in self.extra_paths if p not in paths)
        return paths


def _fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(BackupConfig))


def _check_value(source: str, name: str, value: object, kind: object) -> None:
    expected = {"str": str, "bool": bool, "int": int, "list[str]": list}[str(kind)]
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if ok and expected is list:
        ok = all(isinstance(item, str) for item in value)  # type: ignore[union-attr]
    if not ok:
        raise ConfigError(f"{source}: '{name}' must be a {kind}, got {value!r}; fix the value")


def validate(config: BackupConfig, source: str = "backup config") -> BackupConfig:
    """Refuse settings that would fail later in a less obvious way."""
    if not config.repository:
        raise ConfigError(f"{source}: 'repository' is empty; set it to a path, sftp:, s3: or rest: URL")
    if not config.repository.startswith(REPOSITORY_SCHEMES) and not config.repository.startswith("/"):
        raise ConfigError(
            f"{source}: repository {config.repository!r} is neither an absolute path nor an"
            f" sftp:/s3:/rest: URL; fix 'repository'"
        )
    for name in ("password_file", "config_dir", "store_dir", "metrics_file", "state_file"):
        if not getattr(config, name).startswith("/"):
            raise ConfigError(f"{source}: '{name}' must be an absolute path; fix it")
    for name in ("env_file", "cache_dir"):
        value = getattr(config, name)
        if value and not value.startswith("/"):
            raise ConfigError(f"{source}: '{name}' must be an absolute path or empty; fix it")
    for path in config.extra_paths:
        if not path.startswith("/"):
            raise ConfigError(f"{source}: extra path {path!r} must be absolute; fix 'extra_paths'")
    retention = (config.keep_daily, config.keep_weekly, config.keep_monthly)
    if any(n < 0 for n in retention) or not any(retention):
        raise ConfigError(
            f"{source}: keep_daily/keep_weekly/keep_monthly must be >= 0 and not all 0"
            f" (restic would keep everything); set at least keep_daily"
        )
    if config.check_every_days < 0 or config.progress_seconds < 1:
        raise ConfigError(f"{source}: check_every_days must be >= 0 and progress_seconds >= 1; fix them")
    return config


def parse(text: str, source: str = "backup config") -> BackupConfig:
    """Build a config from TOML text; unknown keys and wrong types are errors naming the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML ({error}); fix the syntax") from None
    known = {f.name: f for f in _fields()}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; remove them or fix the spelling")
    if "repository" not in data:
        raise ConfigError(f"{source}: 'repository' is missing; set it to where snapshots go")
    for name, value in data.items():
        _check_value(source, name, value, known[name].type)
    return validate(BackupConfig(**data), source)


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


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # JSON string escapes are a subset of TOML basic string escapes.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def dump(config: BackupConfig) -> str:
    """Render `config` as the TOML file the host reads, one comment per key."""
    validate(config)
    lines = [
        "# nixcache backup configuration, read by `nixcache backup run|list|restore|check`.",
        "# Rendered by the deploy (nixcache.backup.config.dump): change group data, not this file.",
    ]
    for f in _fields():
        lines.append("")
        lines.append(f"# {f.metadata['doc']}")
        lines.append(f"{f.name} = {_toml_value(getattr(config, f.name))}")
    return "\n".join(lines) + "\n"

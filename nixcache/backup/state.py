"""What the backup remembers between runs, and the node exporter textfile rendered from it.

The state file is the source of truth; the metrics file is a rendering of it, rewritten
atomically after every run. If the state file is lost, the success and check times are
read back from the previous metrics file, so a failed run never hides the last success.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

from nixcache.atomicfile import write_atomically

PREFIX = "nixcache_backup_"

# metric name (without prefix) -> (state attribute, help text)
METRICS: dict[str, tuple[str, str]] = {
    "last_success_timestamp_seconds": (
        "last_success",
        "Unix time the last fully successful backup run ended.",
    ),
    "last_run_timestamp_seconds": ("last_run", "Unix time the last backup run ended, successful or not."),
    "last_run_success": ("last_run_success", "1 if the last backup run succeeded, 0 if it failed."),
    "duration_seconds": ("duration", "Wall-clock duration of the last backup run."),
    "bytes_added": ("bytes_added", "Bytes the last backup added to the repository (after dedup)."),
    "snapshots": ("snapshots", "Snapshots of this host in the repository after the last run."),
    "last_check_timestamp_seconds": ("last_check", "Unix time of the last successful `restic check`."),
}


@dataclass
class BackupState:
    """Outcome of the last runs; zero means never."""

    last_run: float = 0.0
    last_run_success: int = 0
    last_success: float = 0.0
    duration: float = 0.0
    bytes_added: int = 0
    snapshots: int = 0
    last_check: float = 0.0
    # short snapshot id -> bytes backed up (restic 0.14 does not keep sizes in snapshots)
    sizes: dict[str, int] = field(default_factory=dict)


def _from_metrics(path: Path) -> BackupState:
    state = BackupState()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return state
    by_name = {f"{PREFIX}{name}": attr for name, (attr, _) in METRICS.items()}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                attr = by_name.get(sample.name)
                if attr:
                    kind = type(getattr(state, attr))
                    setattr(state, attr, kind(sample.value))
    except ValueError:
        return BackupState()  # a damaged file gives no history rather than a crash
    return state


def load_state(state_file: Path, metrics_file: Path) -> BackupState:
    """The remembered state; falls back to the previous metrics file, then to an empty state."""
    try:
        data = json.loads(state_file.read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(BackupState)}
        return BackupState(**{k: v for k, v in data.items() if k in known})
    except (OSError, ValueError, TypeError):
        return _from_metrics(metrics_file)


def save_state(state: BackupState, state_file: Path) -> None:
    """Write the state file atomically (temp + rename)."""
    data = json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"
    state_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(state_file, data.encode())


def write_metrics(state: BackupState, metrics_file: Path) -> None:
    """Render `state` as a node exporter textfile, atomically (prometheus_client writes temp + rename)."""
    registry = CollectorRegistry()
    for name, (attr, help_text) in METRICS.items():
        Gauge(f"{PREFIX}{name}", help_text, registry=registry).set(getattr(state, attr))
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(metrics_file), registry)
    os.chmod(metrics_file, 0o644)  # node exporter runs as its own user

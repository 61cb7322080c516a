"""Facts about a host's backups: the timer, the last run's metrics, the repository, store content."""

from __future__ import annotations

import json
import shlex
from datetime import UTC, datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from pyinfra.api import FactBase

BACKUP_TIMER = "nixcache-backup.timer"

# The `systemctl show` properties the timer fact reads; systemd prints them in this order.
_TIMER_PROPERTIES = ("LoadState", "ActiveState", "UnitFileState", "LastTriggerUSec", "NextElapseUSecRealtime")


class BackupTimer(FactBase[dict[str, str]]):
    """The backup timer's state, from `systemctl show`.

    `{"LoadState": "loaded", "ActiveState": "active", "UnitFileState": "enabled",
    "LastTriggerUSec": "…", "NextElapseUSecRealtime": "…"}`; LoadState is "not-found" when the
    timer was never installed.
    """

    default = dict

    def requires_command(self, timer: str = BACKUP_TIMER) -> str:
        return "systemctl"

    def command(self, timer: str = BACKUP_TIMER) -> str:
        return f"systemctl show {shlex.quote(timer)} --property={','.join(_TIMER_PROPERTIES)}"

    def process(self, output: list[str]) -> dict[str, str]:
        state: dict[str, str] = {}
        for line in output:
            key, sep, value = line.partition("=")
            if sep and key in _TIMER_PROPERTIES:
                state[key] = value.strip()
        return state


class BackupMetrics(FactBase[dict[str, float]]):
    """The samples of the node exporter textfile the backup run writes, `{name: value}`.

    Labels are folded into the key as Prometheus prints them (`name{label="v"}`), so a run's
    result reads as `{"nixcache_backup_last_success_timestamp_seconds": 1.7e9, …}`; an absent
    file gives `{}`.
    """

    default = dict

    def command(self, path: str) -> str:
        # An absent file is a fact ("never ran"), not an error.
        return f"cat {shlex.quote(path)} 2>/dev/null || true"

    def process(self, output: list[str]) -> dict[str, float]:
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families("\n".join(output) + "\n"):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples


class DirectoryHasEntries(FactBase[bool]):
    """True when a directory exists and holds at least one entry (an absent directory is empty)."""

    def command(self, path: str) -> str:
        # -print -quit stops at the first entry: constant time even on a store of millions of files.
        return f"find {shlex.quote(path)} -mindepth 1 -maxdepth 1 -print -quit 2>/dev/null || true"

    def process(self, output: list[str]) -> bool:
        return any(line.strip() for line in output)


class BackupSnapshots(FactBase[dict[str, Any] | None]):
    """A host's snapshots in its backup repository, as the host's own `nixcache backup list` sees them.

    The host's `nixcache` is the one restic client: it reads backup.toml, so the repository's
    password file, env file (s3:/rest: credentials) and ssh settings are those of the backups
    themselves. `snapshot_host` filters (restic `--host`); None lists every host's snapshots.

    Answered: `{"readable": true, "latest": {"id", "short_id", "time", "host", "paths"} | None,
    "hosts": [host names seen]}`; `latest` is None when there is no snapshot (of that host).
    Not read: `{"readable": false, "kind": "unreachable", "error": "<one line: repository, cause,
    fix>", "cause": …, "fix": …}`; `kind` is "missing" when no repository exists at that
    location (nixcache.backup.restic.ResticError has the list); cause and fix are None when
    nixcache itself failed. None while `nixcache` is not installed yet.
    """

    def requires_command(self, nixcache_bin: str, config_path: str, snapshot_host: str | None = None) -> str:
        return nixcache_bin

    def command(self, nixcache_bin: str, config_path: str, snapshot_host: str | None = None) -> str:
        which = f"--host {shlex.quote(snapshot_host)}" if snapshot_host else "--all-hosts"
        # A failure is a JSON error object on stdout: `|| true` keeps the fact from failing the
        # deploy before the operation can say what it means; 2>&1 keeps a crash's last line.
        nixcache = f"{shlex.quote(nixcache_bin)} backup list --config {shlex.quote(config_path)}"
        return f"{nixcache} {which} --json 2>&1 || true"

    def process(self, output: list[str]) -> dict[str, Any]:
        # The JSON document starts a line; anything before it (a warning on stderr) is skipped.
        starts = [i for i, line in enumerate(output) if line.startswith(("[", "{"))]
        try:
            text = "\n".join(output[starts[0] :]) if starts else ""
            answer, _ = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError:
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            error = answer["error"]
            return {
                "readable": False,
                "kind": str(error.get("kind") or "failed"),
                "error": str(error.get("message") or "nixcache backup list failed without a reason"),
                "cause": error.get("cause"),
                "fix": error.get("fix"),
            }
        if not isinstance(answer, list):
            lines = [line.strip() for line in output if line.strip()]
            said = lines[-1] if lines else "no output"
            return {"readable": False, "kind": "failed", "error": f"nixcache backup list failed: {said}"}
        snapshots = [row for row in answer if isinstance(row, dict) and row.get("id") and row.get("time")]
        hosts = sorted({str(row.get("host", "")) for row in snapshots})
        if not snapshots:
            return {"readable": True, "latest": None, "hosts": hosts}
        latest = max(snapshots, key=lambda row: _moment(row["time"]))
        return {
            "readable": True,
            "latest": {
                "id": latest["id"],
                "short_id": latest.get("short_id") or latest["id"][:8],
                "time": latest["time"],
                "host": latest.get("host", ""),
                "paths": latest.get("paths") or [],
            },
            "hosts": hosts,
        }


def _moment(rfc3339: str) -> datetime:
    """restic's snapshot time (RFC 3339, nanoseconds, any offset) as a comparable datetime."""
    try:
        return datetime.fromisoformat(rfc3339)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


class NewestNarinfo(FactBase[str | None]):
    """The hash part of the most recently written narinfo under a cache store, or None."""

    def command(self, store: str) -> str:
        return (
            f"find {shlex.quote(store)} -name '*.narinfo' -type f -printf '%T@ %f\\n' 2>/dev/null"
            " | sort -n | tail -n 1"
        )

    def process(self, output: list[str]) -> str | None:
        for line in output:
            name = line.strip().rpartition(" ")[2]
            if name.endswith(".narinfo"):
                return name[: -len(".narinfo")]
        return None

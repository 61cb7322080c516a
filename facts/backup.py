"""Facts about a host's backups: the timer, the last run's metrics, the repository, store content."""

from __future__ import annotations

import json
import shlex
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


class ResticSnapshots(FactBase[dict[str, Any]]):
    """The latest snapshot of a restic repository, read with the host's password file.

    `{"reachable": true, "latest": {"id": …, "time": …, "paths": […]}}`, `latest` is None for an
    empty repository; `{"reachable": false, "error": "<restic's last line>"}` when restic cannot
    open it (absent, unreachable, wrong password). The password never leaves the host: restic
    reads it from the 0600 file.
    """

    def requires_command(self, repository: str, password_file: str) -> str:
        return "restic"

    def command(self, repository: str, password_file: str) -> str:
        restic = (
            f"restic --no-cache --no-lock --repo {shlex.quote(repository)} "
            f"--password-file {shlex.quote(password_file)} snapshots --json --latest 1"
        )
        # One line of JSON on success, "ERROR <message>" otherwise: the fact never fails the deploy.
        return f'out=$({restic} 2>&1) && echo "$out" || echo "ERROR $(echo "$out" | tail -n 1)"'

    def process(self, output: list[str]) -> dict[str, Any]:
        text = "\n".join(output).strip()
        if text.startswith("ERROR"):
            return {"reachable": False, "error": text[len("ERROR") :].strip()}
        # ssh and restic may print notices (a host key learnt on first contact) before the JSON line.
        json_lines = [line for line in text.splitlines() if line.startswith("[")]
        try:
            snapshots = json.loads(json_lines[-1] if json_lines else text or "[]")
        except json.JSONDecodeError:
            return {"reachable": False, "error": text.splitlines()[-1] if text else "no output"}
        if not snapshots:
            return {"reachable": True, "latest": None}
        latest = max(snapshots, key=lambda snapshot: snapshot.get("time", ""))
        return {
            "reachable": True,
            "latest": {
                "id": latest.get("short_id") or latest.get("id", "")[:8],
                "time": latest.get("time"),
                "paths": latest.get("paths", []),
            },
        }


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

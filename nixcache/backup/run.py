"""One scheduled backup run: init if needed, back up, apply retention (unless the repository
host does: append-only repositories), check when due, record.

Whatever happens, the run ends by writing the state file and the node exporter textfile:
a failed run sets last_run_success to 0 and leaves last_success where the last good run
put it, so freshness alerts keep counting from the real last backup.
"""

from __future__ import annotations

import fcntl
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from nixcache.backup.config import BackupConfig
from nixcache.backup.progress import Throttle, backup_status_line, human_bytes
from nixcache.backup.restic import Restic, ResticError
from nixcache.backup.state import BackupState, load_state, save_state, write_metrics

DAY = 86400.0


@dataclass
class RunResult:
    """What a run did; `error` is the one-line reason when it failed."""

    ok: bool = False
    snapshot_id: str = ""
    bytes_added: int = 0
    snapshots: int = 0
    removed: list[str] = field(default_factory=list)
    initialised: bool = False
    checked: bool = False
    duration: float = 0.0
    error: str = ""
    busy: bool = False  # another run holds the lock; nothing was done or recorded
    retention_elsewhere: bool = False  # apply_retention off: the repository host prunes

    def summary(self, config: BackupConfig, repository: str) -> str:
        """The one line the journal keeps for this run."""
        if self.busy:
            return f"nixcache backup skipped: {self.error}"
        if not self.ok:
            return f"nixcache backup FAILED after {self.duration:.1f} s: {self.error}"
        parts = [
            f"nixcache backup ok: snapshot {self.snapshot_id} of {', '.join(config.backup_paths())}"
            f" to {repository}",
            f"{human_bytes(self.bytes_added)} added",
            f"{self.snapshots} snapshots"
            + (
                " (retention by the repository host)"
                if self.retention_elsewhere
                else f" kept ({len(self.removed)} removed)"
            ),
        ]
        if self.initialised:
            parts.append("repository initialised")
        parts.append("check passed" if self.checked else "check not due")
        parts.append(f"{self.duration:.1f} s")
        return ", ".join(parts)


def check_due(state: BackupState, config: BackupConfig, now: float) -> bool:
    """A check runs when none succeeded yet or the last one is check_every_days old."""
    return not state.last_check or now - state.last_check >= config.check_every_days * DAY


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _warn_if_exposed(path: Path, echo: Callable[[str], None]) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # restic's own step reports a missing file, with the fix
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        echo(f"backup: warning: password file {path} is readable by group or others; chmod 600 {path}")


def _steps(restic: Restic, config: BackupConfig, state: BackupState, result: RunResult, echo, now) -> None:
    repository = restic.display_repository()
    _warn_if_exposed(Path(config.password_file), echo)
    for path in config.backup_paths():
        if not Path(path).exists():
            raise ResticError(
                repository,
                f"{path} is to be backed up but does not exist",
                "create it, or fix config_dir/store_dir/extra_paths in the config",
            )
    if not restic.exists():
        echo(f"backup: repository {repository} does not exist yet; initialising it")
        restic.init()
        result.initialised = True

    echo(f"backup: {', '.join(config.backup_paths())} -> {repository} as host {restic.host}")
    throttle = Throttle(echo, config.progress_seconds)

    def on_status(message: dict) -> None:
        if message.get("message_type") == "status":
            throttle.line(backup_status_line(message))

    summary = restic.backup(config.backup_paths(), on_status)
    if summary.vanished:
        echo(
            f"backup: {len(summary.vanished)} store file(s) were deleted while the backup ran"
            f" (garbage collection), e.g. {summary.vanished[0]}; the snapshot does not need them"
        )
    result.snapshot_id = summary.snapshot_id
    result.bytes_added = summary.bytes_added
    if result.snapshot_id:
        state.sizes[result.snapshot_id[:8]] = summary.bytes_processed

    if config.apply_retention:
        echo("backup: applying retention and pruning unused data")
        result.removed = restic.forget()
    else:
        # Append-only: this host cannot delete; the repository host's timer applies retention.
        result.retention_elsewhere = True
    snapshots = restic.snapshots()
    result.snapshots = len(snapshots)
    state.snapshots = result.snapshots
    kept = {s.short_id for s in snapshots}
    state.sizes = {k: v for k, v in state.sizes.items() if k in kept}

    if check_due(state, config, now()):
        last = _iso(state.last_check) if state.last_check else "never"
        echo(f"backup: checking repository integrity (last check: {last})")
        restic.check()
        state.last_check = now()
        result.checked = True


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[bool]:
    """Hold an flock on `lock_file` for the block; yields False when another run holds it."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_backup(
    config: BackupConfig,
    echo: Callable[[str], None],
    *,
    now: Callable[[], float] = time.time,
) -> RunResult:
    """Run every step, then record the outcome; never raises for a restic failure.

    Two runs at once (the timer and an operator) would fight over restic's locks and the
    metrics file, so a second run stops at once with `busy` set and records nothing.
    """
    lock_file = Path(config.state_file).with_suffix(".lock")
    try:
        with _exclusive(lock_file) as acquired:
            if not acquired:
                return RunResult(
                    busy=True,
                    error=f"another `nixcache backup run` holds {lock_file}; wait for it to finish"
                    f" (its summary goes to the journal)",
                )
            return _run_locked(config, echo, now)
    except OSError as error:
        return RunResult(
            error=f"cannot take the run lock {lock_file}: {error.strerror};"
            f" make {lock_file.parent} writable for root (state_file's directory)"
        )


def _run_locked(config: BackupConfig, echo: Callable[[str], None], now: Callable[[], float]) -> RunResult:
    restic = Restic(config)
    state_file, metrics_file = Path(config.state_file), Path(config.metrics_file)
    state = load_state(state_file, metrics_file)
    result = RunResult()
    started = time.monotonic()
    try:
        _steps(restic, config, state, result, echo, now)
        result.ok = True
    except ResticError as error:
        for line in error.detail:
            echo(f"restic: {line}")
        result.error = str(error)
    result.duration = time.monotonic() - started

    finished = now()
    state.last_run = finished
    state.last_run_success = int(result.ok)
    state.duration = result.duration
    state.bytes_added = result.bytes_added
    if result.ok:
        state.last_success = finished
    try:
        save_state(state, state_file)
        write_metrics(state, metrics_file)
    except OSError as error:
        result.ok = False
        where = error.filename or metrics_file
        result.error = (
            f"cannot record the run in {where}: {error.strerror};"
            f" create that directory writable for root (backup alerts read it)"
        )
    return result

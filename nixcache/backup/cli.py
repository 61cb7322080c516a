"""`nixcache backup`: scheduled restic backups of the cache host, listing, restore and checks.

Exit codes: 0 success, 1 the backup/restore/check failed (the last line says why and how to
fix it), 75 (EX_TEMPFAIL) another `backup run` is in progress, 78 (EX_CONFIG) the
configuration file is missing or invalid. `list --json` reports a failure as one JSON object
on stdout, `{"error": {"kind", "repository", "cause", "fix", "message", "detail"}}`, with the
same exit code, so a program can tell "no snapshots" (`[]`) from "could not read" (deploys
ask this way: facts/backup.py).
A systemd oneshot unit runs `nixcache backup run --config /etc/nixcache/backup.toml`; on the
backup repository host, nixcache-backup-prune.service runs `nixcache backup forget` over every
cache host's repository (the only place where snapshots are deleted).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC
from pathlib import Path

import click

from nixcache.backup.config import DEFAULT_PATH, BackupConfig, ConfigError, load
from nixcache.backup.progress import human_bytes
from nixcache.backup.restic import Restic, ResticError, Snapshot
from nixcache.backup.run import run_backup
from nixcache.backup.state import load_state, save_state, write_metrics

EX_TEMPFAIL = 75
EX_CONFIG = 78


class ConfigProblem(click.ClickException):
    exit_code = EX_CONFIG


def _failed(error: ResticError) -> click.ClickException:
    """restic's own last lines for context, then the one-line error (as click prints it)."""
    for line in error.detail:
        click.echo(f"restic: {line}", err=True)
    return click.ClickException(str(error))


def _config(path: Path) -> BackupConfig:
    try:
        return load(path)
    except ConfigError as error:
        raise ConfigProblem(str(error)) from None


def _progress(line: str) -> None:
    click.echo(line, err=True)


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_PATH,
    show_default=True,
    help="Backup configuration (TOML, rendered by the deploy).",
)


@click.group()
def backup() -> None:
    """Back up /etc/nixcache (and optionally the store) with restic; list, restore, check."""


@backup.command()
@config_option
def run(config_path: Path) -> None:
    """Init the repository if needed, back up, apply retention, check when due, write metrics."""
    config = _config(config_path)
    result = run_backup(config, _progress)
    line = result.summary(config, Restic(config).display_repository())
    if result.ok:
        click.echo(line)
        return
    click.echo(line, err=True)
    sys.exit(EX_TEMPFAIL if result.busy else 1)


def _when(snapshot: Snapshot) -> str:
    return snapshot.moment().astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _json_failure(kind: str, message: str, exit_code: int, error: ResticError | None = None) -> None:
    """`list --json`'s failure: one JSON object on stdout (nothing on stderr), then exit."""
    fields = {"kind": kind, "message": message}
    if error is not None:
        fields |= {
            "repository": error.repository,
            "cause": error.cause,
            "fix": error.fix,
            "detail": error.detail,
        }
    click.echo(json.dumps({"error": fields}, indent=2))
    sys.exit(exit_code)


@backup.command(name="list")
@config_option
@click.option("--all-hosts", is_flag=True, help="Show every host's snapshots, not only this host's.")
@click.option("--host", "host_name", help="Show this host's snapshots instead (e.g. a lost host's name).")
@click.option(
    "--sizes", is_flag=True, help="Ask restic for each snapshot's size (slower on big repositories)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table (errors too).")
def list_snapshots(
    config_path: Path, all_hosts: bool, host_name: str | None, sizes: bool, as_json: bool
) -> None:
    """List the snapshots in the repository (this host's by default)."""
    if all_hosts and host_name:
        raise click.UsageError("--all-hosts and --host exclude each other; give one of them")
    try:
        config = _config(config_path)
    except ConfigProblem as problem:
        if as_json:
            _json_failure("config", problem.message, EX_CONFIG)
        raise
    restic = Restic(config)
    if host_name:
        restic.host = host_name
    state = load_state(Path(config.state_file), Path(config.metrics_file))
    try:
        snapshots = restic.snapshots(this_host=not all_hosts)
        known = {
            s.short_id: (restic.restore_size(s.id) if sizes else state.sizes.get(s.short_id))
            for s in snapshots
        }
    except ResticError as error:
        if as_json:
            _json_failure(error.kind, str(error), 1, error)
        raise _failed(error) from None
    if as_json:
        rows = [
            {
                "id": s.id,
                "short_id": s.short_id,
                "time": s.time,
                "host": s.host,
                "paths": s.paths,
                "tags": s.tags,
                "size": known[s.short_id],
            }
            for s in snapshots
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    if not snapshots:
        where = "" if all_hosts else f" of host {restic.host} (try --all-hosts)"
        click.echo(f"no snapshots{where} in {restic.display_repository()}")
        return
    header = ("ID", "TIME (UTC)", "HOST", "SIZE", "PATHS")
    rows = [
        (
            s.short_id,
            _when(s),
            s.host,
            human_bytes(known[s.short_id]) if known[s.short_id] is not None else "-",
            ", ".join(s.paths),
        )
        for s in sorted(snapshots, key=Snapshot.moment)
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
        )
    click.echo(f"{len(rows)} snapshots")


def _pick(restic: Restic, snapshot_id: str | None, host: str) -> Snapshot:
    """The snapshot to restore: an id (prefix) from any host, or the latest of `host`."""
    repository = restic.display_repository()
    if snapshot_id == "latest":  # restic's own word for it
        snapshot_id = None
    if snapshot_id:
        matches = [s for s in restic.snapshots(this_host=False) if s.id.startswith(snapshot_id.lower())]
        if not matches:
            raise click.ClickException(
                f"snapshot {snapshot_id} is not in backup repository {repository};"
                f" run `nixcache backup list --all-hosts` to see the snapshots there"
            )
        if len(matches) > 1:
            raise click.ClickException(
                f"snapshot id {snapshot_id} matches {len(matches)} snapshots in {repository};"
                f" give more characters of the id"
            )
        return matches[0]
    restic.host = host
    mine = restic.snapshots()
    if not mine:
        raise click.ClickException(
            f"backup repository {repository} holds no snapshot of host {host};"
            f" pass --host with the lost host's name (see `nixcache backup list --all-hosts`)"
        )
    return max(mine, key=Snapshot.moment)


def _bytes_under(roots: list[Path]) -> int:
    total = 0
    for root in roots:
        for directory, _, files in os.walk(root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(directory, name)).st_size
                except OSError:
                    continue  # restic may be replacing it right now
    return total


def _watch_restore(
    roots: list[Path], total: int, interval: float, echo: Callable[[str], None]
) -> Callable[[], None]:
    """Print bytes on disk under the restored paths every `interval` s; returns a stop function.

    restic 0.14's restore reports no progress of its own, so progress is measured on disk.
    """
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval):
            done = _bytes_under(roots)
            share = f" ({100 * done / total:.0f}%)" if total else ""
            echo(f"restore: {human_bytes(done)} of {human_bytes(total)} on disk{share}")

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    def finish() -> None:
        stop.set()
        thread.join()

    return finish


@backup.command()
@config_option
@click.option(
    "--snapshot", "snapshot_id", help="Snapshot id (or prefix) to restore; default: this host's latest."
)
@click.option(
    "--target",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/"),
    show_default=True,
    help="Directory to restore into; '/' puts /etc/nixcache and the store back in place.",
)
@click.option("--host", help="Take the latest snapshot of this host instead (the lost host's name).")
@click.option(
    "--include", "includes", multiple=True, help="Restore only paths matching this pattern (repeatable)."
)
@click.option("--verify", is_flag=True, help="Re-read the restored files and compare them with the snapshot.")
def restore(
    config_path: Path,
    snapshot_id: str | None,
    target: Path,
    host: str | None,
    includes: tuple[str, ...],
    verify: bool,
) -> None:
    """Restore a snapshot (this host's latest by default) into --target."""
    config = _config(config_path)
    restic = Restic(config)
    started = time.monotonic()
    try:
        snapshot = _pick(restic, snapshot_id, host or restic.host)
        total = restic.restore_size(snapshot.id)
        _progress(
            f"restore: snapshot {snapshot.short_id} of {snapshot.host} from {_when(snapshot)} UTC"
            f" ({', '.join(snapshot.paths)}, {human_bytes(total)}) into {target}"
        )
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise click.ClickException(
                f"cannot create restore target {target}: {error.strerror};"
                " pass a writable --target or run as root"
            ) from None
        roots = [target / p.lstrip("/") for p in snapshot.paths]
        finish = _watch_restore(roots, total, config.progress_seconds, _progress)
        try:
            restic.restore(snapshot.id, str(target), list(includes), verify=verify)
        finally:
            finish()
    except ResticError as error:
        raise _failed(error) from None
    checked = ", verified" if verify else ""
    click.echo(
        f"restored snapshot {snapshot.short_id} into {target}: {human_bytes(total)}{checked}"
        f" in {time.monotonic() - started:.1f} s"
    )


@backup.command()
@click.option(
    "--config",
    "config_paths",
    type=click.Path(dir_okay=False, path_type=Path),
    multiple=True,
    required=True,
    help="A repository's configuration (repeatable: one per cache host on the repository host).",
)
def forget(config_paths: tuple[Path, ...]) -> None:
    """Apply each configuration's retention (restic forget --prune): where deletion is allowed.

    Cache hosts back up append-only; the backup repository host runs this from its
    nixcache-backup-prune.timer, with direct access to the repository directories. Every
    repository is tried; the exit code is 1 when any of them failed.
    """
    failed = 0
    for path in config_paths:
        config = _config(path)
        restic = Restic(config)
        repository = restic.display_repository()
        try:
            if not restic.exists():
                click.echo(
                    f"{repository}: no repository yet (host {restic.host} never backed up); nothing to do"
                )
                continue
            removed = restic.forget()
            kept = len(restic.snapshots())
        except ResticError as error:
            failed += 1
            for line in error.detail:
                click.echo(f"restic: {line}", err=True)
            click.echo(f"nixcache backup forget FAILED: {error}", err=True)
            continue
        click.echo(f"{repository}: host {restic.host}: {len(removed)} snapshots removed, {kept} kept")
    if failed:
        sys.exit(1)


@backup.command()
@config_option
def check(config_path: Path) -> None:
    """Run `restic check` now and record its time (the metric the next run also reports)."""
    config = _config(config_path)
    restic = Restic(config)
    started = time.monotonic()
    state_file, metrics_file = Path(config.state_file), Path(config.metrics_file)
    try:
        restic.check()
    except ResticError as error:
        raise _failed(error) from None
    state = load_state(state_file, metrics_file)
    state.last_check = time.time()
    try:
        save_state(state, state_file)
        write_metrics(state, metrics_file)
    except OSError as error:
        raise click.ClickException(
            f"check passed but cannot record it in {error.filename or metrics_file}: {error.strerror};"
            f" make that directory writable"
        ) from None
    click.echo(
        f"check passed: {restic.display_repository()} has no errors ({time.monotonic() - started:.1f} s)"
    )

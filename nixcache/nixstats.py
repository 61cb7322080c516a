"""`nixcache nix-stats`: a Nix host's build results and store size, for node exporter.

Run by a systemd timer (nixcache-nix-stats.timer) on hosts that run Nix. Why not the daemon's
journal: Debian's nix-daemon (2.8) logs only "accepted connection from pid …" there; build
output and errors go to the client that asked. What every build leaves on the host is its log,
`<log dir>/drvs/<2>/<rest>.drv.bz2`, and, when it succeeded, its outputs in Nix's database.
So a build is counted once, when its log is a complete bzip2 stream (Nix closes the stream when
the build ends, however it ends): a success when every output of the derivation is then valid,
a failure when not. Remote builds count too (their log is written here). A log that does not
end yet is a build still running: looked at again next time.

The counts are cumulative (counters) and kept in a small state file with the logs already
counted; logs older than an hour before the last run that were all counted are not read again.
Also written: the store's path count and size (the sum of NarSize in Nix's database, what
`nix path-info --all -S` adds up), so growth is `deriv(nixcache_nix_store_bytes[6h])`.

Exit codes: 0 written, 3 the statistics could not be gathered or written.
"""

from __future__ import annotations

import bz2
import json
import os
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

EXIT_FAILED = 3
STATE_FILE = "nix-stats.json"
# Logs settle: a finished build's log is never written again. Everything finished an hour
# before the last run is behind the watermark and not read again.
SETTLE_SECONDS = 3600
_CHUNK = 1 << 16


@dataclass
class State:
    """What earlier runs counted."""

    success: int = 0
    failure: int = 0
    since: float = 0.0  # logs last modified before this were all counted
    seen: dict[str, float] = field(default_factory=dict)  # counted log name -> its mtime

    @classmethod
    def load(cls, path: Path) -> State:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        return cls(data["success"], data["failure"], data["since"], dict(data["seen"]))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__))
        os.replace(tmp, path)


def finished(log: Path) -> bool:
    """True when `log` holds a complete bzip2 stream: the build that writes it has ended."""
    decompressor = bz2.BZ2Decompressor()
    with log.open("rb") as handle:
        while not decompressor.eof:
            # At most _CHUNK bytes out per step: a large log is read, never held.
            chunk = handle.read(_CHUNK) if decompressor.needs_input else b""
            if decompressor.needs_input and not chunk:
                return False
            try:
                decompressor.decompress(chunk, max_length=_CHUNK)
            except (OSError, EOFError):
                return True  # damaged: nothing will write it any more
    return True


def count_builds(log_dir: Path, store_dir: str, state: State, outputs_valid, now: float) -> State:
    """`state` advanced by the logs under `log_dir`/drvs finished since; `outputs_valid(drv)` is
    True, False or None (derivation collected: not counted)."""
    unfinished: list[float] = []
    for log in sorted((log_dir / "drvs").glob("*/*.drv.bz2")):
        try:
            mtime = log.stat().st_mtime
        except FileNotFoundError:
            continue
        name = log.parent.name + log.name[: -len(".bz2")]
        if mtime < state.since or name in state.seen:
            continue
        if not finished(log):
            unfinished.append(mtime)
            continue
        valid = outputs_valid(f"{store_dir}/{name}")
        if valid is True:
            state.success += 1
        elif valid is False:
            state.failure += 1
        state.seen[name] = mtime
    state.since = min([now - SETTLE_SECONDS, *unfinished])
    state.seen = {name: mtime for name, mtime in state.seen.items() if mtime >= state.since}
    return state


def write_metrics(textfile: str, state: State, paths: int, size: int) -> None:
    """The counters and gauges, atomically (prometheus_client writes a temp file and renames)."""
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Gauge,
        disable_created_metrics,
        write_to_textfile,
    )

    disable_created_metrics()  # a counter's _created series: noise in a textfile
    registry = CollectorRegistry()
    builds = Counter(
        "nixcache_nix_builds",
        "Builds this host's Nix finished, by result (a log that ended; success = all outputs valid)",
        ["result"],
        registry=registry,
    )
    builds.labels(result="success").inc(state.success)
    builds.labels(result="failure").inc(state.failure)
    Gauge("nixcache_nix_store_paths", "Valid paths in this host's Nix store", registry=registry).set(paths)
    Gauge(
        "nixcache_nix_store_bytes",
        "Sum of the NAR sizes of the valid paths in this host's Nix store",
        registry=registry,
    ).set(size)
    Gauge(
        "nixcache_nix_stats_timestamp_seconds",
        "When nixcache nix-stats last wrote these statistics",
        registry=registry,
    ).set(time.time())
    write_to_textfile(textfile, registry)
    os.chmod(textfile, 0o644)  # node exporter runs as its own user


def fail(message: str) -> None:
    click.echo(f"nix-stats: {message}", err=True)
    sys.exit(EXIT_FAILED)


@click.command("nix-stats")
@click.option(
    "--textfile", required=True, help="The .prom file to write, in node exporter's textfile directory."
)
@click.option(
    "--state-dir",
    "nix_state_dir",
    default="/nix/var/nix",
    show_default=True,
    help="Nix's state directory (its database is db/db.sqlite there).",
)
@click.option("--log-dir", default="/nix/var/log/nix", show_default=True, help="Nix's log directory.")
@click.option("--store-dir", default="/nix/store", show_default=True, help="Nix's store directory.")
@click.option(
    "--state",
    "state_file",
    default=None,
    help="Where the counts are kept between runs [default: $STATE_DIRECTORY/nix-stats.json].",
)
def nix_stats(
    textfile: str, nix_state_dir: str, log_dir: str, store_dir: str, state_file: str | None
) -> None:
    """Count finished builds (success, failure) and measure the Nix store; write them for node exporter."""
    from nixcache.server.nixstore.db import NixDatabase, NixDbError

    state_path = Path(state_file or Path(os.environ.get("STATE_DIRECTORY", ".")) / STATE_FILE)
    try:
        state = State.load(state_path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        fail(f"cannot read the state file {state_path} ({error}); remove it to count from scratch")
    try:
        db = NixDatabase(Path(nix_state_dir), store_dir)
        state = count_builds(Path(log_dir), store_dir, state, db.outputs_valid, time.time())
        paths, size = db.totals()
    except (NixDbError, sqlite3.Error) as error:
        fail(f"Nix database in {nix_state_dir}: {error}; check --state-dir names Nix's state directory")
    except OSError as error:
        fail(f"cannot read the build logs in {log_dir}: {error.strerror}; check --log-dir")
    try:
        state.save(state_path)
        write_metrics(textfile, state, paths, size)
    except OSError as error:
        fail(f"cannot write {error.filename}: {error.strerror}; check the directory exists and is writable")
    click.echo(
        f"nix-stats: {state.success} builds succeeded, {state.failure} failed; {paths} paths, {size} bytes"
    )

"""`nixcache lab`: boot, inspect, reset and remove local test hosts."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any

import click

from nixcache.lab.errors import LabError
from nixcache.lab.lab import Lab
from nixcache.lab.lab import prune as prune_orphans


def _one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a LabError into `Error: <message>` on stderr and the error's exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except LabError as error:
            click.echo(f"Error: {error}", err=True)
            raise SystemExit(error.exit_code) from None

    return wrapper


def _progress(line: str) -> None:
    click.echo(line, err=True)


@click.group()
def lab() -> None:
    """Local test hosts: Debian bookworm under systemd-nspawn, reachable over SSH.

    State (hosts, SSH key, logs) lives in $NIXCACHE_LAB_DIR, default ./.lab; the base image is
    cached in /var/cache/nixcache/lab ($NIXCACHE_LAB_IMAGE_CACHE). Needs root.

    Each lab has its own network 10.231.X.0/24 (controller .1, labN at .10+N). Once up:
    `pyinfra -y inventories/lab.py exec -- systemctl is-system-running`.
    """


@lab.command()
@click.option(
    "--hosts", "count", type=click.IntRange(1, 240), default=3, show_default=True, help="Number of hosts."
)
@click.option("--rebuild", is_flag=True, help="Build the base image again even if it is cached.")
@click.option("--timeout", type=float, default=120, show_default=True, help="Seconds to wait for the hosts.")
@_one_line_errors
def up(count: int, rebuild: bool, timeout: float) -> None:
    """Boot hosts lab1..labN (again, if they died) and wait until they answer SSH."""
    started = time.monotonic()
    hosts = Lab(progress=_progress).up(count, rebuild=rebuild, timeout=timeout)
    for host in hosts:
        click.echo(f"{host.name}\t{host.address}\t{host.state}")
    click.echo(
        f"lab up in {time.monotonic() - started:.1f} s; try: pyinfra -y inventories/lab.py exec -- hostname",
        err=True,
    )


@lab.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of host objects.")
@_one_line_errors
def status(as_json: bool) -> None:
    """Name, address, SSH port, key and state of each host."""
    state = Lab(progress=_progress).state()
    hosts = state.hosts
    if as_json:
        click.echo(json.dumps([host.public() for host in hosts], indent=2))
        return
    rows = [("NAME", "ADDRESS", "SSH PORT", "STATE", "SSH KEY")]
    rows += [(h.name, h.address, str(h.ssh_port), h.state, h.ssh_key) for h in hosts]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    click.echo(f"network {state.subnet}, controller {state.gateway}")


@lab.command()
@click.argument("name")
@click.option("--timeout", type=float, default=120, show_default=True, help="Seconds to wait for the host.")
@_one_line_errors
def reset(name: str, timeout: float) -> None:
    """Replace host NAME with a fresh copy of the base image (same name, address and SSH key)."""
    started = time.monotonic()
    host = Lab(progress=_progress).reset(name, timeout=timeout)
    click.echo(f"{host.name}\t{host.address}\t{host.state}")
    click.echo(f"reset in {time.monotonic() - started:.1f} s", err=True)


@lab.command()
@_one_line_errors
def down() -> None:
    """Stop every host and remove its namespace, links, processes and root."""
    started = time.monotonic()
    Lab(progress=_progress).down()
    click.echo(f"lab down in {time.monotonic() - started:.1f} s", err=True)


@lab.command()
@_one_line_errors
def prune() -> None:
    """Remove labs whose state directory is gone (e.g. a test run killed before its teardown)."""
    removed = prune_orphans(progress=_progress)
    click.echo(f"removed {len(removed)} orphaned lab(s){': ' + ', '.join(removed) if removed else ''}")

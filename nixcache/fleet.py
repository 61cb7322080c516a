"""`nixcache fleet status INVENTORY`: how every cache of an inventory is doing, at a glance.

Run on the controller, from the repository's checkout (the inventory and its group_data are
loaded with pyinfra's own loader, and each host's settings with operations/settings.py, so
ports and paths are those the deploy used). For every cache host (data `monitoring_scrape` on),
in parallel: the cache's `/metrics` and `/pubkey` and node exporter's `/metrics`, over HTTP,
twice `--sample` seconds apart for the request rate. The controller must be in the hosts'
`metrics_allowed_sources` (or `cache_allowed_sources`), as the lab's is.

Columns: reachable, nixcache version (what the deploy installed), signing key name(s), narinfo
hit rate since the server started, requests/s over the sample, store size, free space on the
store's filesystem, age of the last successful backup, age of the last completed GC.

Exit codes: 0 every host answered, 1 some host did not (its line says why), 2 bad inventory.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import httpx
from prometheus_client.parser import text_string_to_metric_families

from nixcache.httpcompat import make_httpx_importable

EXIT_UNREACHABLE = 1
TIMEOUT = 5.0


@dataclass(frozen=True)
class Endpoint:
    """Where one cache host answers, from its inventory data."""

    name: str
    address: str
    cache_port: int
    node_exporter_port: int

    def url(self, port: int, path: str) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{port}{path}"


@dataclass
class Status:
    """One row of the table (and one object of --json). None: unknown."""

    host: str
    reachable: bool
    error: str | None = None
    version: str | None = None
    signing_keys: list[str] = field(default_factory=list)
    hit_rate: float | None = None
    requests_per_second: float | None = None
    store_bytes: float | None = None
    free_bytes: float | None = None
    filesystem_used_ratio: float | None = None
    backup_age_seconds: float | None = None  # None: no backups configured; inf: never succeeded
    gc_age_seconds: float | None = None  # inf: never ran
    node_exporter_error: str | None = None


Samples = list[tuple[str, dict[str, str], float]]


def parse(text: str) -> Samples:
    """(name, labels, value) of every sample of a Prometheus text exposition."""
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def total(samples: Samples, name: str, **labels: str) -> float | None:
    """Sum of the samples called `name` whose labels include `labels`; None when there are none."""
    values = [v for n, ls, v in samples if n == name and all(ls.get(k) == x for k, x in labels.items())]
    return sum(values) if values else None


def endpoints(inventory_path: Path) -> list[Endpoint]:
    """The cache hosts of an inventory file, with the ports and store their settings give."""
    # Controller-side only: pyinfra and the checkout's operations/ are not on cache hosts.
    try:
        from nixcache.secrets.inventory import load_inventory
        from operations.firewall import node_exporter_port
        from operations.settings import SettingsError, from_data
    except ImportError as error:
        raise click.UsageError(
            f"cannot load inventories here ({error.name} is missing); run `nixcache fleet` on the "
            "controller, from the repository's checkout with the deploy extras installed"
        ) from None
    if not inventory_path.is_file():
        raise click.UsageError(f"{inventory_path}: no such inventory file; give e.g. inventories/prod.py")
    try:
        inventory = load_inventory(inventory_path)
    except SystemExit as error:  # inventories/lab.py exits with a message when no lab runs
        raise click.UsageError(str(error.code)) from None
    # pyinfra's loader patched the process with gevent: keep httpx importable (httpcompat.py).
    make_httpx_importable()
    found = []
    for host in inventory:
        data = host.data.dict()
        try:
            s = from_data(host.name, data)
        except SettingsError as error:
            raise click.UsageError(str(error)) from None
        if not s.monitoring_scrape:
            continue
        found.append(
            Endpoint(
                name=host.name,
                address=str(data.get("ssh_hostname") or host.name),
                cache_port=s.cache_port,
                node_exporter_port=node_exporter_port(s.node_exporter_listen),
            )
        )
    if not found:
        raise click.UsageError(f"{inventory_path}: the inventory has no cache hosts")
    return found


def _reason(error: httpx.HTTPError, url: str) -> str:
    if isinstance(error, httpx.TimeoutException):
        return f"no answer from {url} within {TIMEOUT:g} s"
    if isinstance(error, httpx.ConnectError):
        return f"cannot connect to {url} (service stopped, host down, or a firewall drops the controller)"
    if isinstance(error, httpx.HTTPStatusError):
        return f"{url} answered HTTP {error.response.status_code}"
    return f"{url}: {type(error).__name__}"


def _get(client: httpx.Client, url: str) -> str:
    response = client.get(url)
    response.raise_for_status()
    return response.text


def _age(now: float, timestamp: float | None) -> float | None:
    if timestamp is None:
        return None
    return float("inf") if timestamp <= 0 else max(0.0, now - timestamp)


def probe(endpoint: Endpoint, sample_seconds: float) -> Status:
    """Ask one host; never raises for network trouble (the row says what failed)."""
    metrics_url = endpoint.url(endpoint.cache_port, "/metrics")
    node_url = endpoint.url(endpoint.node_exporter_port, "/metrics")
    with httpx.Client(timeout=TIMEOUT) as client:
        try:
            started = time.monotonic()
            first = parse(_get(client, metrics_url))
            pubkeys = _get(client, endpoint.url(endpoint.cache_port, "/pubkey")).split()
        except httpx.HTTPError as error:
            return Status(endpoint.name, reachable=False, error=_reason(error, str(error.request.url)))
        except ValueError:
            return Status(endpoint.name, reachable=False, error=f"{metrics_url} is not Prometheus metrics")
        node: Samples = []
        node_error = None
        try:
            node = parse(_get(client, node_url))
        except httpx.HTTPError as error:
            node_error = _reason(error, str(error.request.url))
        except ValueError:
            node_error = f"{node_url} is not Prometheus metrics"
        time.sleep(max(0.0, sample_seconds - (time.monotonic() - started)))
        try:
            second = parse(_get(client, metrics_url))
            elapsed = time.monotonic() - started
        except (httpx.HTTPError, ValueError):
            second, elapsed = [], 0.0
    now = time.time()
    status = Status(endpoint.name, reachable=True, node_exporter_error=node_error)
    status.signing_keys = [key.split(":", 1)[0] for key in pubkeys]
    hits = total(second or first, "nixcache_narinfo_lookups_total", result="hit")
    lookups = total(second or first, "nixcache_narinfo_lookups_total")
    status.hit_rate = hits / lookups if hits is not None and lookups else None
    before, after = (
        total(first, "nixcache_http_requests_total"),
        total(second, "nixcache_http_requests_total"),
    )
    if before is not None and after is not None and elapsed > 0:
        # The first scrape and /pubkey are counted once answered, so the second scrape sees
        # them: leave those two out.
        status.requests_per_second = max(0.0, after - before - 2) / elapsed
    status.store_bytes = total(first, "nixcache_store_bytes")
    status.gc_age_seconds = _age(now, total(first, "nixcache_gc_last_run_timestamp_seconds"))
    versions = sorted({ls["version"] for n, ls, _ in node if n == "nixcache_build_info" and "version" in ls})
    status.version = ", ".join(versions) or None
    # The disk check's view of the store's filesystem (as df sees it, every 15 minutes).
    status.free_bytes = total(node, "nixcache_disk_available_bytes")
    status.filesystem_used_ratio = total(node, "nixcache_disk_usage_ratio")
    status.backup_age_seconds = _age(now, total(node, "nixcache_backup_last_success_timestamp_seconds"))
    return status


def gather(hosts: list[Endpoint], sample_seconds: float) -> list[Status]:
    """Every host's status, asked in parallel, in inventory order."""
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return list(pool.map(lambda e: probe(e, sample_seconds), hosts))


# --- rendering -----------------------------------------------------------------------------

COLUMNS = ("HOST", "REACHABLE", "VERSION", "KEY", "HIT RATE", "REQ/S", "STORE", "FREE", "BACKUP", "LAST GC")


def _size(value: float | None) -> str:
    from nixcache.server.units import human_size

    return "-" if value is None else human_size(value)


def _ago(seconds: float | None, absent: str) -> str:
    if seconds is None:
        return absent
    if seconds == float("inf"):
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"


def row(status: Status) -> tuple[str, ...]:
    if not status.reachable:
        return (status.host, "no", *["-"] * (len(COLUMNS) - 2))
    free = _size(status.free_bytes)
    if status.filesystem_used_ratio is not None:
        free += f" ({status.filesystem_used_ratio:.0%} used)"
    return (
        status.host,
        "yes",
        status.version or "?",
        ", ".join(status.signing_keys) or "?",
        "-" if status.hit_rate is None else f"{status.hit_rate:.1%}",
        "-" if status.requests_per_second is None else f"{status.requests_per_second:.1f}",
        _size(status.store_bytes),
        free,
        _ago(status.backup_age_seconds, "not set up"),
        _ago(status.gc_age_seconds, "?"),
    )


def table(statuses: list[Status], colour: bool) -> str:
    rows = [COLUMNS, *map(row, statuses)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for index, cells in enumerate(rows):
        line = "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
        if colour and index:
            line = click.style(line, fg="green" if statuses[index - 1].reachable else "red")
        lines.append(line)
    for status in statuses:
        if not status.reachable:
            line = f"{status.host}: does not answer: {status.error}"
            lines.append(click.style(line, fg="red") if colour else line)
        elif status.node_exporter_error:
            lines.append(f"{status.host}: node exporter: {status.node_exporter_error}")
    return "\n".join(lines)


def as_json(statuses: list[Status]) -> str:
    def clean(value: Any) -> Any:
        return None if value == float("inf") else value  # JSON has no infinity: never = null + flag

    out = []
    for status in statuses:
        record = {k: clean(v) for k, v in asdict(status).items()}
        record["backup_never_succeeded"] = status.backup_age_seconds == float("inf")
        record["gc_never_ran"] = status.gc_age_seconds == float("inf")
        out.append(record)
    return json.dumps(out, indent=2)


@click.group("fleet")
def fleet() -> None:
    """Look at every cache of an inventory from the controller."""


@fleet.command("status")
@click.argument("inventory", type=click.Path(path_type=Path))
@click.option("--json", "json_output", is_flag=True, help="Print JSON (one object per host) for scripts.")
@click.option(
    "--sample",
    type=click.FloatRange(0.2, 60),
    default=2.0,
    show_default=True,
    help="Seconds between the two scrapes that give requests/s.",
)
def status(inventory: Path, json_output: bool, sample: float) -> None:
    """One line per cache host of INVENTORY: reachable, version, key, hit rate, requests/s, store,
    free space, backup age, last GC."""
    hosts = endpoints(inventory)
    terminal = sys.stdout.isatty() and not json_output
    if terminal:
        click.echo(f"asking {len(hosts)} hosts ({sample:g} s sample)…", err=True)
    statuses = gather(hosts, sample)
    click.echo(as_json(statuses) if json_output else table(statuses, colour=terminal))
    if not all(s.reachable for s in statuses):
        sys.exit(EXIT_UNREACHABLE)

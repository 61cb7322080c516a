"""`nixcache disk-alert`: warn before the cache's filesystem fills up.

Run by a systemd timer on every cache host. It measures the filesystem holding the store the
way `df` does, writes `nixcache_disk_usage_ratio`, `nixcache_disk_available_bytes` and
`nixcache_disk_alert` for node
exporter's textfile collector (atomically: the collector never reads half a file), logs a
warning to the journal when usage is at or above the threshold and, when a webhook URL file
is given, POSTs a JSON message to it. The URL is a secret (it usually embeds a token), so it
is read from a file and never printed, not even in errors.

Exit codes: 0 under the threshold, 1 at or above it (the unit shows as failed, so
`systemctl --failed` lists it too), 3 the check itself failed, 4 the webhook was not accepted.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import click

EXIT_OVER = 1
EXIT_CHECK_FAILED = 3
EXIT_WEBHOOK_FAILED = 4


@dataclass(frozen=True)
class Usage:
    """Space on one filesystem, in bytes, as `df` reports it."""

    used: int
    available: int

    @property
    def ratio(self) -> float:
        """Used fraction of what the service may use (root's reserved blocks excluded, as df does)."""
        total = self.used + self.available
        return self.used / total if total else 0.0


def measure(path: str) -> Usage:
    """Usage of the filesystem holding ``path``."""
    stat = os.statvfs(path)
    return Usage(
        used=(stat.f_blocks - stat.f_bfree) * stat.f_frsize,
        available=stat.f_bavail * stat.f_frsize,
    )


def write_metrics(textfile: str, path: str, usage: Usage, threshold_percent: int) -> None:
    """Write the gauges to ``textfile`` atomically (prometheus_client writes a temp file and renames)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()
    labels = {"path": path}
    Gauge(
        "nixcache_disk_usage_ratio",
        "Used fraction of the filesystem holding the cache store, as df computes it",
        ["path"],
        registry=registry,
    ).labels(**labels).set(round(usage.ratio, 6))
    Gauge(
        "nixcache_disk_alert",
        "1 while the store filesystem is at or above the alert threshold",
        ["path"],
        registry=registry,
    ).labels(**labels).set(1 if usage.ratio * 100 >= threshold_percent else 0)
    Gauge(
        "nixcache_disk_available_bytes",
        "Bytes the service may still write on the store's filesystem, as df computes it",
        ["path"],
        registry=registry,
    ).labels(**labels).set(usage.available)
    Gauge(
        "nixcache_disk_alert_threshold_ratio",
        "The alert threshold the last check used",
        ["path"],
        registry=registry,
    ).labels(**labels).set(threshold_percent / 100)
    write_to_textfile(textfile, registry)
    os.chmod(textfile, 0o644)  # node exporter runs as its own user


def log(priority: int, message: str) -> None:
    """Print to stderr; under systemd the `<N>` prefix sets the journal priority (4 = warning)."""
    prefix = f"<{priority}>" if os.environ.get("JOURNAL_STREAM") else ""
    click.echo(f"{prefix}{message}", err=True)


def fail(message: str, code: int = EXIT_CHECK_FAILED) -> NoReturn:
    """Log `message` as an error (what failed and the fix) and exit with `code`."""
    log(3, f"disk-alert: {message}")
    sys.exit(code)


def post_webhook(url: str, payload: dict[str, object], timeout: float) -> str | None:
    """POST ``payload``; None when accepted, else a reason that never contains the URL."""
    import httpx

    try:
        response = httpx.post(url, json=payload, timeout=timeout)
    except httpx.HTTPError as error:
        # httpx messages can carry the URL; name only the kind of failure.
        return f"{type(error).__name__} after at most {timeout:g} s"
    if response.status_code >= 300:
        return f"the receiver answered HTTP {response.status_code}"
    return None


@click.command("disk-alert")
@click.option(
    "--path",
    "store_path",
    required=True,
    help="A directory on the filesystem to check: the cache store.",
)
@click.option(
    "--threshold-percent",
    type=click.IntRange(1, 100),
    default=85,
    show_default=True,
    help="Alert at or above this usage.",
)
@click.option(
    "--textfile",
    default=None,
    help="Where to write the metrics: a .prom file in node exporter's textfile directory.",
)
@click.option(
    "--webhook-url-file",
    default=None,
    help="File holding a webhook URL to POST a JSON alert to (mode 0600; never pass the URL itself).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 60),
    default=10.0,
    show_default=True,
    help="Seconds the webhook may take.",
)
def disk_alert(
    store_path: str,
    threshold_percent: int,
    textfile: str | None,
    webhook_url_file: str | None,
    timeout: float,
) -> None:
    """Check the store filesystem against a usage threshold; alert when over."""
    try:
        usage = measure(store_path)
    except OSError as error:
        fail(f"cannot measure {store_path}: {error.strerror}; check --path names the store")
    percent = usage.ratio * 100
    over = percent >= threshold_percent
    if textfile:
        try:
            write_metrics(textfile, store_path, usage, threshold_percent)
        except OSError as error:
            fail(
                f"cannot write {textfile}: {error.strerror}; "
                "check that node exporter's textfile directory exists and is writable"
            )
    if not over:
        click.echo(f"disk-alert: {store_path} at {percent:.1f}% (threshold {threshold_percent}%)")
        return
    hostname = socket.gethostname()
    message = (
        f"{hostname}: cache store filesystem {store_path} is {percent:.1f}% full "
        f"(threshold {threshold_percent}%, {usage.available // 2**20} MiB free); "
        "run `nixcache gc` or grow the volume"
    )
    log(4, f"disk-alert: {message}")
    if webhook_url_file:
        try:
            url = Path(webhook_url_file).read_text().strip()
        except OSError as error:
            fail(
                f"cannot read the webhook URL file {webhook_url_file}: {error.strerror}; "
                "redeploy to restore it or unset alert_webhook_ref"
            )
        payload = {
            "text": message,
            "host": hostname,
            "path": store_path,
            "usage_percent": round(percent, 1),
            "threshold_percent": threshold_percent,
        }
        failure = post_webhook(url, payload, timeout)
        if failure:
            fail(
                f"webhook from {webhook_url_file} not delivered: {failure}; "
                "check the receiver and the URL stored under alert_webhook_ref",
                EXIT_WEBHOOK_FAILED,
            )
    sys.exit(EXIT_OVER)

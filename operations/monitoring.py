"""Observability of a cache host: node exporter, persistent journald, the disk-usage alert.

The values come from host data, already checked by the schema (operations/settings.py: the
listen address, the journald time span and size, the threshold's range): not checked again here.
"""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import HiddenValue, StringCommand, operation
from pyinfra.facts.files import Directory, File

from operations import hostfile
from operations import service as units_op
from operations.render import render, sha256
from operations.settings import Settings

NODE_EXPORTER_DEFAULTS = "/etc/default/prometheus-node-exporter"
NODE_EXPORTER_UNIT = "prometheus-node-exporter.service"
# A drop-in for Debian's unit (a file name under /etc/systemd/system, for service.units).
NODE_EXPORTER_DROPIN = f"{NODE_EXPORTER_UNIT}.d/60-nixcache-sandbox.conf"
JOURNALD_DROPIN = "/etc/systemd/journald.conf.d/60-nixcache.conf"
DISK_ALERT_NAME = "nixcache-disk-alert"
DISK_ALERT_TEXTFILE = "nixcache_disk.prom"
# Root-only: the URL usually embeds the receiver's token.
DISK_ALERT_WEBHOOK_FILE = "/etc/nixcache/alert-webhook"
# What the deploy put on the host, for node exporter's textfile collector.
DEPLOY_INFO_TEXTFILE = "nixcache_deploy.prom"


def render_node_exporter_defaults(listen: str, textfile_dir: str) -> str:
    """/etc/default/prometheus-node-exporter: listen address and textfile directory."""
    return render("monitoring-node-exporter.default.j2", listen=listen, textfile_dir=textfile_dir)


@operation()
def node_exporter(
    listen: str = Settings.node_exporter_listen, textfile_dir: str = Settings.node_exporter_textfile_dir
):
    """prometheus-node-exporter listening on ``listen`` with the textfile collector on ``textfile_dir``.

    + listen: ``[address]:port``
    + textfile_dir: directory of *.prom files (Debian's default: /var/lib/prometheus/node-exporter)

    Restarts the exporter when its arguments or its sandbox (a unit drop-in) changed; starts
    and enables it when it is not.
    """
    if not host.get_fact(Directory, path=textfile_dir):
        yield StringCommand(f"install -d -m 0755 {shlex.quote(textfile_dir)}")
    defaults = render_node_exporter_defaults(listen, textfile_dir)
    yield from hostfile.put._inner(NODE_EXPORTER_DEFAULTS, defaults)
    # Debian's unit reads the defaults file at start: a new one restarts it, as a new sandbox does.
    yield from units_op.units._inner(
        "prometheus-node-exporter",
        {NODE_EXPORTER_DROPIN: render("monitoring-node-exporter.hardening.conf.j2")},
        [NODE_EXPORTER_UNIT],
        sha256(defaults),
    )


def render_journald(max_retention: str, system_max_use: str) -> str:
    """journald drop-in: persistent storage with retention and a size cap."""
    return render("monitoring-journald.conf.j2", max_retention=max_retention, system_max_use=system_max_use)


@operation()
def journald(
    max_retention: str = Settings.journald_max_retention,
    system_max_use: str = Settings.journald_system_max_use,
):
    """Persistent journal kept ``max_retention`` and capped at ``system_max_use``; restart journald on change.

    + max_retention: systemd time span (``2week``, ``30d``)
    + system_max_use: size (``1G``, ``500M``)
    """
    content = render_journald(max_retention, system_max_use)
    changed = hostfile.differs(JOURNALD_DROPIN, content)
    yield from hostfile.put._inner(JOURNALD_DROPIN, content)
    if changed:
        # journald reads its configuration only at start; restarting it keeps the logs.
        yield StringCommand("systemctl restart systemd-journald.service")


def render_disk_alert_units(
    nixcache_bin: str,
    store_dir: str,
    threshold_percent: int,
    textfile_dir: str,
    schedule: str,
    webhook_file: str | None,
) -> dict[str, str]:
    """The oneshot service and its timer, by unit file name."""
    service = render(
        "monitoring-disk-alert.service.j2",
        nixcache_bin=nixcache_bin,
        store_dir=store_dir,
        threshold_percent=threshold_percent,
        textfile=f"{textfile_dir}/{DISK_ALERT_TEXTFILE}",
        textfile_dir=textfile_dir,
        webhook_file=webhook_file,
    )
    timer = render("monitoring-disk-alert.timer.j2", schedule=schedule)
    return {f"{DISK_ALERT_NAME}.service": service, f"{DISK_ALERT_NAME}.timer": timer}


@operation()
def disk_alert(
    nixcache_bin: str,
    store_dir: str,
    threshold_percent: int = Settings.disk_alert_threshold_percent,
    textfile_dir: str = Settings.node_exporter_textfile_dir,
    schedule: str = Settings.disk_alert_schedule,
    webhook_url: HiddenValue | None = None,
):
    """The disk-usage alert timer; the webhook URL (a secret) in a root-only file when given.

    + nixcache_bin: the installed ``nixcache`` command
    + store_dir: directory whose filesystem is checked
    + threshold_percent: alert at or above this usage
    + textfile_dir: node exporter's textfile directory
    + schedule: systemd OnCalendar expression
    + webhook_url: HiddenValue of the URL, or None to remove a previously installed one
    """
    if webhook_url is not None:
        yield from hostfile.put._inner(DISK_ALERT_WEBHOOK_FILE, webhook_url, mode="0600")
    elif host.get_fact(File, path=DISK_ALERT_WEBHOOK_FILE):
        yield StringCommand(f"rm -f {DISK_ALERT_WEBHOOK_FILE}")
    files = render_disk_alert_units(
        nixcache_bin,
        store_dir,
        int(threshold_percent),
        textfile_dir,
        schedule,
        DISK_ALERT_WEBHOOK_FILE if webhook_url is not None else None,
    )
    yield from units_op.units._inner(DISK_ALERT_NAME, files, active=[f"{DISK_ALERT_NAME}.timer"])


def render_deploy_info(public_keys: list[str], version: str, build: str) -> str:
    """The textfile of what the deploy installed: one `nixcache_signing_key_info` series per key
    the server signs with (alert NixcacheSigningKeyMismatch compares hosts) and the build.

    The server itself does not export its keys or version; the deploy is what sets both, and it
    rewrites this file whenever it changes either.
    """
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    keys = Gauge(
        "nixcache_signing_key_info",
        "A public key the cache signs with, as installed by the deploy (value 1)",
        ["key_name", "public_key"],
        registry=registry,
    )
    for public_key in public_keys:
        keys.labels(key_name=public_key.split(":", 1)[0], public_key=public_key).set(1)
    Gauge(
        "nixcache_build_info",
        "The nixcache version and build (source digest, Python) the deploy installed (value 1)",
        ["version", "build"],
        registry=registry,
    ).labels(version=version, build=build).set(1)
    return generate_latest(registry).decode()


@operation()
def deploy_info(
    public_keys: list[str],
    version: str,
    build: str,
    textfile_dir: str = Settings.node_exporter_textfile_dir,
):
    """`<textfile_dir>/nixcache_deploy.prom` names the signing keys and the build installed."""
    path = f"{textfile_dir}/{DEPLOY_INFO_TEXTFILE}"
    content = render_deploy_info(public_keys, version, build)
    yield from hostfile.put._inner(path, content)

"""Monitoring of a cache host: node exporter, persistent journald, the disk-usage alert timer,
and the textfile naming the signing keys and build the deploy installed."""

from __future__ import annotations

from pyinfra.api import deploy

from nixcache import __version__
from operations import monitoring as monitoring_ops
from operations.settings import NIXCACHE_BIN, Settings, host_secret, settings


@deploy("nixcache monitoring: node exporter, journald, disk alert")
def monitoring(
    config: Settings | None = None, public_keys: tuple[str, ...] | list[str] = (), build: str = ""
) -> None:
    """Node exporter with the textfile collector, journald retention, the disk alert timer, and
    the textfile of the deploy (``public_keys`` the server signs with, the installed ``build``).

    Runs after the nixcache package is installed: the alert timer runs ``nixcache disk-alert``.
    """
    s = config or settings()
    webhook_url = (
        host_secret("alert webhook URL", "alert_webhook_ref", s.alert_webhook_ref)
        if s.alert_webhook_ref
        else None
    )
    monitoring_ops.node_exporter(
        name="Node exporter with the textfile collector",
        listen=s.node_exporter_listen,
        textfile_dir=s.node_exporter_textfile_dir,
    )
    monitoring_ops.journald(
        name="Persistent journal with retention",
        max_retention=s.journald_max_retention,
        system_max_use=s.journald_system_max_use,
    )
    monitoring_ops.disk_alert(
        name="Disk-usage alert timer",
        nixcache_bin=NIXCACHE_BIN,
        store_dir=s.store_dir,
        threshold_percent=s.disk_alert_threshold_percent,
        textfile_dir=s.node_exporter_textfile_dir,
        schedule=s.disk_alert_schedule,
        webhook_url=webhook_url,
    )
    monitoring_ops.deploy_info(
        name="Signing keys and build for node exporter",
        public_keys=list(public_keys),
        version=__version__,
        build=build,
        textfile_dir=s.node_exporter_textfile_dir,
    )

"""The fleet's Prometheus and Alertmanager on the hosts of inventory group `monitoring`.

Called by deploys/cache.py for a cache host that is also in group `monitoring` (the lab's first
host), and by deploys/monitoring.py for a host of its own.
"""

from __future__ import annotations

from pyinfra import host, inventory
from pyinfra.api import HiddenValue, deploy

from deploys.parts.base import apt_packages
from nixcache.packages import MONITORING_PACKAGES
from operations import prometheus
from operations.settings import Settings, host_secret, settings

MONITORING_GROUP = "monitoring"


@deploy("nixcache monitoring server: Prometheus, Alertmanager, blackbox exporter")
def monitoring_server(config: Settings | None = None) -> None:
    """Prometheus scraping every cache of the inventory, the repository's alert rules, Alertmanager
    sending to the webhook at `alert_webhook_ref`, and the blackbox exporter for TLS fronts."""
    s = config or settings()
    fleet = prometheus.targets(inventory)
    prometheus.check_admitted(host.name, str(host.data.get("ssh_hostname") or host.name), fleet)
    webhook = (
        host_secret("alert webhook URL", "alert_webhook_ref", s.alert_webhook_ref).unmask()
        if s.alert_webhook_ref
        else None
    )
    alertmanager_config = HiddenValue(
        prometheus.render_alertmanager_config(webhook, s),
        masked_value=f"<alertmanager.yml with the webhook {s.alert_webhook_ref}>",
    )
    apt_packages("Install Prometheus, Alertmanager and the blackbox exporter", MONITORING_PACKAGES, s)
    prometheus.server(
        name=f"Prometheus and Alertmanager for {len(fleet)} caches",
        prometheus_config=prometheus.render_prometheus_config(fleet, s),
        rules=prometheus.render_rules(dict(s.monitoring_alert_for)),
        alertmanager_config=alertmanager_config,
        blackbox_config=prometheus.render_blackbox_config(),
        defaults=prometheus.render_defaults(s),
    )

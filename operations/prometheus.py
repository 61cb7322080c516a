"""The fleet's Prometheus, Alertmanager and blackbox exporter on a monitoring host (Debian's packages).

Scrape targets are rendered from the inventory: every host whose data leaves `monitoring_scrape`
on is a cache, scraped on its cache port (`/metrics`) and on node exporter, labelled with its
inventory name (`instance`) and its `monitoring_environment` (`environment`); hosts with the
nginx front are also probed over HTTPS by the blackbox exporter for their certificate's expiry.
The alert rules are the repository's `monitoring/rules/nixcache.yml`, installed as they are
unless host data overrides a rule's `for:` (`monitoring_alert_for`). Alertmanager sends to the
webhook at `alert_webhook_ref`: its configuration holds that URL, so it is a secret file
(root:prometheus 0640, uploaded from memory, never on a command line).

Every file goes through the one file primitive (operations/hostfile.py: staged, checked by
promtool / amtool, then renamed); each service is (re)started through the one unit primitive
(operations/service.py) when what it reads changed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pyinfra import host
from pyinfra.api import HiddenValue, OperationValueError, operation
from pyinfra.operations import files as pyinfra_files

from operations import hostfile
from operations import service as units_op
from operations.firewall import node_exporter_port
from operations.render import sha256
from operations.settings import Settings, SettingsError, from_data

RULES_SOURCE = Path(__file__).resolve().parents[1] / "monitoring" / "rules" / "nixcache.yml"
PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"
RULES_DIR = "/etc/prometheus/rules"
RULES_FILE = f"{RULES_DIR}/nixcache.yml"
ALERTMANAGER_CONFIG = "/etc/prometheus/alertmanager.yml"
BLACKBOX_CONFIG = "/etc/prometheus/blackbox.yml"
# Debian's units read their arguments from these (EnvironmentFile, $ARGS).
PROMETHEUS_DEFAULTS = "/etc/default/prometheus"
ALERTMANAGER_DEFAULTS = "/etc/default/prometheus-alertmanager"
BLACKBOX_DEFAULTS = "/etc/default/prometheus-blackbox-exporter"
# Debian's packages run all three as this user.
PROMETHEUS_USER = "prometheus"
TLS_MODULE = "nixcache_tls"
# amtool prints a summary of what it found (never the receivers' URLs); only its errors matter.
AMTOOL_CHECK = "amtool check-config {path} >/dev/null"
HEADER = "# Rendered by nixcache's deploy (operations/prometheus.py); local edits are overwritten.\n"

# Prometheus' duration syntax (1d, 5m, 30s, 1h30m).
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


@dataclass(frozen=True)
class Target:
    """One cache host as Prometheus sees it."""

    name: str  # inventory name: the `instance` label
    address: str  # how the monitoring host reaches it
    environment: str
    cache_port: int
    node_exporter_port: int
    tls_port: int | None  # the nginx front's HTTPS port, when it has one
    metrics_allowed_sources: tuple[str, ...]

    @property
    def hostport(self) -> str:
        return f"[{self.address}]" if ":" in self.address else self.address


def targets(inventory: Iterable[Any]) -> list[Target]:
    """The caches of `inventory` (pyinfra hosts), in inventory order."""
    found = []
    for member in inventory:
        s = from_data(member.name, member.data)
        if not s.monitoring_scrape:
            continue
        found.append(
            Target(
                name=member.name,
                address=str(member.data.get("ssh_hostname") or member.name),
                environment=s.monitoring_environment,
                cache_port=s.cache_port,
                node_exporter_port=node_exporter_port(s.node_exporter_listen),
                tls_port=s.nginx_https_port if s.cache_nginx_front else None,
                metrics_allowed_sources=s.metrics_allowed_sources,
            )
        )
    return found


def check_admitted(monitor: str, address: str, fleet: list[Target]) -> None:
    """Refuse a target whose firewall would drop the monitoring host's scrapes.

    Only checked when the monitoring host's address is an IP address (a name would need a DNS
    lookup on the controller); its own host is reached over loopback, which is always open.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return
    for target in fleet:
        if target.name == monitor:
            continue
        if not any(ip in ipaddress.ip_network(n, strict=False) for n in target.metrics_allowed_sources):
            raise SettingsError(
                f"{target.name}: host data 'metrics_allowed_sources' "
                f"{list(target.metrics_allowed_sources)} does not admit the monitoring host {monitor} "
                f"({address}), so its firewall drops Prometheus' scrapes; add '{address}/32' (or its "
                f"network) to {target.name}'s metrics_allowed_sources and deploy it"
            )


def _labels(target: Target) -> dict[str, str]:
    return {"instance": target.name, "environment": target.environment}


def render_prometheus_config(fleet: list[Target], s: Settings) -> str:
    """/etc/prometheus/prometheus.yml: global intervals, the rules, Alertmanager, three jobs."""
    tls = [t for t in fleet if t.tls_port is not None]
    scrape_configs: list[dict[str, Any]] = [
        {
            "job_name": "nixcache",
            "metrics_path": "/metrics",
            "static_configs": [
                {"targets": [f"{t.hostport}:{t.cache_port}"], "labels": _labels(t)} for t in fleet
            ],
        },
        {
            "job_name": "node",
            "static_configs": [
                {"targets": [f"{t.hostport}:{t.node_exporter_port}"], "labels": _labels(t)} for t in fleet
            ],
        },
    ]
    if tls:
        scrape_configs.append(
            {
                "job_name": "nixcache_tls",
                "metrics_path": "/probe",
                "params": {"module": [TLS_MODULE]},
                "static_configs": [
                    {"targets": [f"https://{t.hostport}:{t.tls_port}/nix-cache-info"], "labels": _labels(t)}
                    for t in tls
                ],
                # The blackbox exporter probes the URL it is given as ?target=.
                "relabel_configs": [
                    {"source_labels": ["__address__"], "target_label": "__param_target"},
                    {"target_label": "__address__", "replacement": s.monitoring_blackbox_listen},
                ],
            }
        )
    document = {
        "global": {
            "scrape_interval": s.monitoring_scrape_interval,
            "evaluation_interval": s.monitoring_evaluation_interval,
        },
        "rule_files": [RULES_FILE],
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [s.monitoring_alertmanager_listen]}]}]
        },
        "scrape_configs": scrape_configs,
    }
    return HEADER + "# Targets: every host of the inventory with monitoring_scrape on.\n" + _dump(document)


def render_rules(for_overrides: dict[str, str], source: Path = RULES_SOURCE) -> str:
    """The repository's rule file, with `for:` of the alerts named in `for_overrides` replaced.

    Text is substituted rather than the YAML re-dumped, so the reasons in its comments stay.
    """
    text = source.read_text()
    known = re.findall(r"^\s*- alert: (\S+)$", text, re.M)
    for name, duration in sorted(for_overrides.items()):
        if name not in known:
            raise OperationValueError(
                f"{host.name}: monitoring_alert_for names {name!r}, which is no alert in "
                f"{source.name}; use one of {', '.join(known)}"
            )
        if not _DURATION.match(str(duration)):
            raise OperationValueError(
                f"{host.name}: monitoring_alert_for[{name!r}] = {duration!r} is not a Prometheus "
                "duration; give e.g. '30s', '5m' or '1h'"
            )
        rule = re.compile(rf"(^\s*- alert: {re.escape(name)}\n(?:(?!\s*- alert: ).*\n)*?\s*for: )\S+", re.M)
        text = rule.sub(rf"\g<1>{duration}", text, count=1)
    return text


def render_alertmanager_config(webhook_url: str | None, s: Settings) -> str:
    """/etc/prometheus/alertmanager.yml: every alert to the webhook (none: shown in the UI only)."""
    receiver: dict[str, Any] = {"name": "webhook"}
    if webhook_url:
        receiver["webhook_configs"] = [{"url": webhook_url, "send_resolved": True}]
    document = {
        "route": {
            "receiver": "webhook",
            "group_by": ["alertname", "environment", "instance"],
            "group_wait": s.monitoring_alert_group_wait,
            "group_interval": s.monitoring_alert_group_interval,
            # An alert still firing is sent again every 4 hours: seen on each shift, not spammed.
            "repeat_interval": "4h",
        },
        "receivers": [receiver],
    }
    return (
        HEADER + "# Holds the webhook URL (alert_webhook_ref): root and prometheus only.\n" + _dump(document)
    )


def render_blackbox_config() -> str:
    """/etc/prometheus/blackbox.yml: the module that reads the front's certificate."""
    document = {
        "modules": {
            TLS_MODULE: {
                "prober": "http",
                "timeout": "10s",
                # The point is the expiry date; the lab's fronts are self-signed, and a chain
                # problem shows up as failed client fetches (NixcacheDown does not, this does not).
                "http": {"method": "GET", "tls_config": {"insecure_skip_verify": True}},
            }
        }
    }
    return HEADER + _dump(document)


def render_defaults(s: Settings) -> dict[str, str]:
    """The /etc/default files of the three services (their command-line arguments)."""
    prometheus_args = [
        f"--config.file={PROMETHEUS_CONFIG}",
        "--storage.tsdb.path=/var/lib/prometheus/metrics2/",
        f"--storage.tsdb.retention.time={s.monitoring_retention}",
        f"--web.listen-address={s.monitoring_prometheus_listen}",
    ]
    alertmanager_args = [
        f"--config.file={ALERTMANAGER_CONFIG}",
        "--storage.path=/var/lib/prometheus/alertmanager/",
        f"--web.listen-address={s.monitoring_alertmanager_listen}",
        # One Alertmanager: no gossip port open on every interface.
        "--cluster.listen-address=",
    ]
    blackbox_args = [
        f"--config.file={BLACKBOX_CONFIG}",
        f"--web.listen-address={s.monitoring_blackbox_listen}",
    ]

    def text(args: list[str]) -> str:
        return HEADER + f'ARGS="{" ".join(args)}"\n'

    return {
        PROMETHEUS_DEFAULTS: text(prometheus_args),
        ALERTMANAGER_DEFAULTS: text(alertmanager_args),
        BLACKBOX_DEFAULTS: text(blackbox_args),
    }


def _dump(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


@operation()
def server(
    prometheus_config: str,
    rules: str,
    alertmanager_config: HiddenValue,
    blackbox_config: str,
    defaults: dict[str, str],
):
    """Prometheus, Alertmanager and the blackbox exporter configured, checked and running.

    A new rule file or configuration is installed only once its checker accepted it (promtool,
    amtool); a refused one stops the deploy with the checker's message and the previous file
    stays. Each service restarts only when one of its own files changed.
    """
    yield from pyinfra_files.directory._inner(path=RULES_DIR, user="root", group="root", mode="0755")
    secret = alertmanager_config.unmask()
    # unit -> [(path, content, check, check in place, group, mode)], in install order.
    files: dict[str, list[tuple[str, str, str | None, bool, str, str]]] = {
        "prometheus": [
            (RULES_FILE, rules, "promtool check rules {path}", False, "root", "0644"),
            # The whole configuration, rules included, at its final place.
            (PROMETHEUS_CONFIG, prometheus_config, "promtool check config {path}", True, "root", "0644"),
            (PROMETHEUS_DEFAULTS, defaults[PROMETHEUS_DEFAULTS], None, False, "root", "0644"),
        ],
        "prometheus-alertmanager": [
            (
                ALERTMANAGER_CONFIG,
                secret,
                "amtool check-config {path} >/dev/null",
                False,
                PROMETHEUS_USER,
                "0640",
            ),
            (ALERTMANAGER_DEFAULTS, defaults[ALERTMANAGER_DEFAULTS], None, False, "root", "0644"),
        ],
        "prometheus-blackbox-exporter": [
            (BLACKBOX_CONFIG, blackbox_config, None, False, "root", "0644"),
            (BLACKBOX_DEFAULTS, defaults[BLACKBOX_DEFAULTS], None, False, "root", "0644"),
        ],
    }
    for unit, entries in files.items():
        for path, content, check, in_place, group, mode in entries:
            yield from hostfile.put._inner(
                path,
                content,
                user="root",
                group=group,
                mode=mode,
                check=check,
                check_in_place=in_place,
                fix="fix the monitoring_* host data (or monitoring/rules/nixcache.yml), then rerun",
            )
        digest = sha256("\0".join(content for _, content, *_ in entries))
        yield from units_op.units._inner(unit, {}, [f"{unit}.service"], digest)

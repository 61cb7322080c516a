"""The Grafana dashboard and the alert rules ask only for metrics that really exist.

Every PromQL expression of monitoring/dashboards/nixcache.json and monitoring/rules/nixcache.yml
is parsed by promtool (as a recording rule), and every metric name in it must be one that a
running `nixcache serve` exposes on /metrics, one that the textfile writers of this repository
write (disk check, backups, deploy info, nix-stats), or one of node exporter's and the blackbox exporter's
names listed below (checked against a lab host's node exporter in test_monitoring_lab.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import require
from prometheus_client.parser import text_string_to_metric_families
from server.helpers import start_server, write_key

from nixcache import alerts, nixstats
from nixcache.backup import state as backup_state
from operations.monitoring import render_deploy_info

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "monitoring" / "dashboards" / "nixcache.json"
RULES = REPO / "monitoring" / "rules" / "nixcache.yml"

# Node exporter 1.5 (Debian bookworm) names used by the dashboard and the rules.
NODE_EXPORTER_NAMES = frozenset(
    {
        "node_cpu_seconds_total",
        "node_memory_MemAvailable_bytes",
        "node_memory_MemTotal_bytes",
        "node_network_transmit_bytes_total",
        "node_systemd_unit_state",
        "node_textfile_mtime_seconds",
    }
)
# Prometheus' own series per target, and the blackbox exporter's certificate expiry.
OTHER_NAMES = frozenset({"up", "probe_ssl_earliest_cert_expiry"})

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_KEYWORDS |= {"group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or labels."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, Grafana variables)
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group(0) in _KEYWORDS:
            continue
        names.add(match.group(0))
    return names


def dashboard_exprs() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        f"{panel['title']} / {target['refId']}": target["expr"]
        for panel in dashboard["panels"]
        for target in panel["targets"]
    }


def rule_exprs() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Sample names of a running server's /metrics plus the repository's textfile writers."""
    tmp = tmp_path_factory.mktemp("exported")
    key_file, _ = write_key(tmp)
    server = start_server(
        ["--listen", "127.0.0.1:0", "--store", str(tmp / "store"), "--signing-key", str(key_file)],
        home=tmp,
        log=tmp / "log",
    )
    try:
        with httpx.Client(base_url=server.url) as client:
            client.get("/nix-cache-info")  # so that the labelled request families have samples
            client.get("/" + "0" * 32 + ".narinfo")
            texts = [client.get("/metrics").text]
    finally:
        server.stop()
    alerts.write_metrics(str(tmp / "disk.prom"), str(tmp), alerts.Usage(used=1, available=1), 85)
    backup_state.write_metrics(backup_state.BackupState(), tmp / "backup.prom")
    nixstats.write_metrics(str(tmp / "nix.prom"), nixstats.State(), paths=1, size=1)
    texts += [(tmp / "disk.prom").read_text(), (tmp / "backup.prom").read_text()]
    texts.append((tmp / "nix.prom").read_text())
    texts.append(render_deploy_info(["k-1:AAAA"], "0.1.0", "build"))
    names = set()
    for text in texts:
        for family in text_string_to_metric_families(text):
            names |= {sample.name for sample in family.samples}
            # A family without samples yet (uploads before the first push, tier metrics on a
            # cache without tiers) is still declared, with its type: its sample names follow.
            names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
    return names


_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
}


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_metric_name_is_really_exported(source: str, exported: set[str]) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else rule_exprs()
    known = exported | NODE_EXPORTER_NAMES | OTHER_NAMES
    unknown = {where: sorted(metric_names(expr) - known) for where, expr in exprs.items()}
    assert {where: names for where, names in unknown.items() if names} == {}


def test_the_server_scrape_covers_what_the_dashboard_uses_of_it(exported: set[str]) -> None:
    used = set().union(*map(metric_names, dashboard_exprs().values()))
    assert {n for n in used if n.startswith("nixcache_http")} <= exported
    assert "nixcache_http_request_duration_seconds_bucket" in used


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (instance) (rate(nixcache_x_total{result="hit", i=~"$instance"}[5m])) '
        "/ on (instance) group_left up offset 5m > 1e3 and time() - foo:bar"
    )
    assert metric_names(expr) == {"nixcache_x_total", "up", "foo:bar"}


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool is not installed (apt-get install prometheus)")
    rules = [
        {
            "record": f"dashboard:query_{index}",
            "expr": expr.replace("$environment", ".*").replace("$instance", ".*"),
        }
        for index, expr in enumerate(dashboard_exprs().values())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout

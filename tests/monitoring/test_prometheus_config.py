"""What deploys/monitoring.py renders from an inventory: a configuration promtool accepts,
the repository's rules with data overrides of `for:`, and one-line refusals of bad data."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import require
from pyinfra.api import OperationValueError

from operations import prometheus
from operations.settings import SettingsError, from_data


def member(name: str, **data):
    return SimpleNamespace(name=name, data=data)


INVENTORY = [
    member(
        "eu",
        ssh_hostname="10.0.1.5",
        metrics_allowed_sources=["10.9.0.0/24"],
        monitoring_environment="production",
    ),
    member(
        "us",
        ssh_hostname="10.0.2.5",
        metrics_allowed_sources=["10.9.0.0/24"],
        monitoring_environment="production",
        cache_nginx_front=True,
        cache_port=5001,
    ),
    member("prometheus", ssh_hostname="10.9.0.2", monitoring_scrape=False),
]


def test_targets_come_from_the_inventory() -> None:
    fleet = prometheus.targets(INVENTORY)
    assert [(t.name, t.address, t.cache_port, t.node_exporter_port, t.tls_port) for t in fleet] == [
        ("eu", "10.0.1.5", 5000, 9100, None),
        ("us", "10.0.2.5", 5001, 9100, 443),
    ]
    config = yaml.safe_load(prometheus.render_prometheus_config(fleet, from_data("prometheus", {})))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert [c["targets"] for c in jobs["nixcache"]["static_configs"]] == [
        ["10.0.1.5:5000"],
        ["10.0.2.5:5001"],
    ]
    assert [c["targets"] for c in jobs["node"]["static_configs"]] == [["10.0.1.5:9100"], ["10.0.2.5:9100"]]
    assert jobs["node"]["static_configs"][0]["labels"] == {"instance": "eu", "environment": "production"}
    # Only the host with the nginx front is probed for its certificate.
    assert [c["targets"] for c in jobs["nixcache_tls"]["static_configs"]] == [
        ["https://10.0.2.5:443/nix-cache-info"]
    ]


def test_promtool_accepts_the_rendered_configuration(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool is not installed (apt-get install prometheus)")
    text = prometheus.render_prometheus_config(prometheus.targets(INVENTORY), from_data("prometheus", {}))
    rules = tmp_path / "nixcache.yml"
    rules.write_text(prometheus.render_rules({"NixcacheDown": "10s"}))
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace(prometheus.RULES_FILE, str(rules)))
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert of the repository's rule file reached the rendered configuration.
    alerts = [r for g in yaml.safe_load(prometheus.RULES_SOURCE.read_text())["groups"] for r in g["rules"]]
    assert len(alerts) >= 15
    assert f"SUCCESS: {len(alerts)} rules found" in result.stdout


def test_for_overrides_change_only_the_named_alert() -> None:
    source = prometheus.RULES_SOURCE.read_text()
    text = prometheus.render_rules({"NixcacheDown": "10s"})
    rules = {r["alert"]: r for g in yaml.safe_load(text)["groups"] for r in g["rules"]}
    original = {r["alert"]: r for g in yaml.safe_load(source)["groups"] for r in g["rules"]}
    assert rules["NixcacheDown"]["for"] == "10s"
    assert {k: v for k, v in rules.items() if k != "NixcacheDown"} == {
        k: v for k, v in original.items() if k != "NixcacheDown"
    }
    assert "# Reason:" in text  # comments survive
    assert prometheus.render_rules({}) == source


def test_bad_overrides_are_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prometheus, "host", SimpleNamespace(name="mon"))
    with pytest.raises(
        OperationValueError, match=r"^mon: monitoring_alert_for names 'CacheDown', which is no alert"
    ):
        prometheus.render_rules({"CacheDown": "10s"})
    with pytest.raises(OperationValueError, match=r"is not a Prometheus duration; give e.g. '30s'"):
        prometheus.render_rules({"NixcacheDown": "ten seconds"})


def test_a_target_whose_firewall_drops_the_monitoring_host_is_refused() -> None:
    fleet = prometheus.targets(INVENTORY)
    prometheus.check_admitted("prometheus", "10.9.0.2", fleet)  # inside 10.9.0.0/24
    with pytest.raises(SettingsError) as error:
        prometheus.check_admitted("prometheus", "10.8.0.2", fleet)
    assert str(error.value) == (
        "eu: host data 'metrics_allowed_sources' ['10.9.0.0/24'] does not admit the monitoring host "
        "prometheus (10.8.0.2), so its firewall drops Prometheus' scrapes; add '10.8.0.2/32' (or its "
        "network) to eu's metrics_allowed_sources and deploy it"
    )
    prometheus.check_admitted("prometheus", "prometheus.example", fleet)  # a name: not checked


def test_the_webhook_url_is_only_in_alertmanagers_file() -> None:
    s = from_data("prometheus", {})
    url = "https://hooks.example/T0KEN"
    config = yaml.safe_load(prometheus.render_alertmanager_config(url, s))
    assert config["receivers"] == [
        {"name": "webhook", "webhook_configs": [{"url": url, "send_resolved": True}]}
    ]
    assert "webhook_configs" not in prometheus.render_alertmanager_config(None, s)
    assert all(url not in text for text in prometheus.render_defaults(s).values())


def test_monitoring_keys_are_checked_like_every_setting() -> None:
    with pytest.raises(
        SettingsError,
        match=r"^mon: host data 'monitoring_retension' is not a nixcache setting; did you mean 'monitoring_r",
    ):
        from_data("mon", {"monitoring_retension": "90d"})
    with pytest.raises(
        SettingsError, match=r"^mon: host data 'monitoring_alert_for' is 'NixcacheDown=10s'; give a mapping"
    ):
        from_data("mon", {"monitoring_alert_for": "NixcacheDown=10s"})
    assert from_data("mon", {"monitoring_alert_for": {"NixcacheDown": "10s"}}).monitoring_alert_for == {
        "NixcacheDown": "10s"
    }


def test_bad_monitoring_durations_and_addresses_are_refused() -> None:
    with pytest.raises(
        SettingsError,
        match=r"^mon: host data 'monitoring_retention' is '30 days'; give a Prometheus duration such as",
    ):
        from_data("mon", {"monitoring_retention": "30 days"})
    with pytest.raises(
        SettingsError,
        match=r"^mon: host data 'monitoring_prometheus_listen' is '9090'; give \[address\]:port, e\.g\.",
    ):
        from_data("mon", {"monitoring_prometheus_listen": "9090"})
    from_data("mon", {})  # the defaults pass

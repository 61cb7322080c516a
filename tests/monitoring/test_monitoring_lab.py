"""The main job brings up the fleet's Prometheus on the lab's first host (group `monitoring`):
every cache and node exporter is `up`, and a stopped cache's alert reaches a webhook and resolves.

Runs on the shared session lab after tests/deploy's converge. The alert test redeploys the
monitoring host with short intervals and a webhook (data keys, never the defaults) and
converges it back to the lab's defaults before it finishes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from deploy.conftest import Run, deploy, hosts, on_host, pyinfra
from prometheus_client.parser import text_string_to_metric_families
from support.webhook import Receiver

from monitoring.test_dashboard import NODE_EXPORTER_NAMES
from nixcache.lab import Lab
from nixcache.lab.state import load
from operations.prometheus import RULES_SOURCE

pytestmark = pytest.mark.lab

FAST = {
    "monitoring_scrape_interval": "5s",
    "monitoring_evaluation_interval": "5s",
    "monitoring_alert_for": json.dumps({"NixcacheDown": "10s"}),
    "monitoring_alert_group_wait": "1s",
    "monitoring_alert_group_interval": "5s",
}


def query(lab_dir: Path, monitor: str, promql: str) -> list[dict]:
    """The result of an instant query, asked on the monitoring host (Prometheus listens on loopback)."""
    command = f"curl -fsS -G --data-urlencode query={shlex.quote(promql)} http://127.0.0.1:9090/api/v1/query"
    answer = json.loads(on_host(lab_dir, monitor, command))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for(what: str, condition: Callable[[], object], timeout: float = 120, step: float = 2) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout:.0f} s")
        time.sleep(step)


def converged(run: Run) -> None:
    assert run.returncode == 0, run.output[-5000:]
    assert run.totals()["error"] == 0


def test_prometheus_sees_every_cache_and_node_exporter_up(deployed: Run, lab_dir: Path) -> None:
    caches = hosts(lab_dir)
    monitor = caches[0].name
    expected = {(h.name, job): "1" for h in caches for job in ("nixcache", "node")}

    seen: dict = {}

    def all_up() -> bool:
        seen.clear()
        seen.update(
            {
                (r["metric"]["instance"], r["metric"]["job"]): r["value"][1]
                for r in query(lab_dir, monitor, 'up{job=~"nixcache|node"}')
            }
        )
        return seen == expected

    # The first scrape of each target happens within one scrape interval (30 s) of the start.
    # Only these two jobs: the TLS probe job comes and goes with the nginx front (another test
    # turns it on and off on lab1), and its last `up` outlives a Prometheus restart by 5 minutes.
    try:
        wait_for("every lab cache and node exporter up", all_up, timeout=90)
    except AssertionError as error:
        raise AssertionError(f"{error}: Prometheus last saw {seen}, expected {expected}") from None
    # Every host's deploy names its signing key: one key for the whole lab, so no mismatch.
    keys = query(lab_dir, monitor, "nixcache_signing_key_info")
    assert {r["metric"]["instance"] for r in keys} == {h.name for h in caches}
    assert {r["metric"]["key_name"] for r in keys} == {"nixcache-lab-1"}
    # The rules are the repository's file, loaded: Prometheus lists every alert of it.
    rules = json.loads(on_host(lab_dir, monitor, "curl -fsS http://127.0.0.1:9090/api/v1/rules"))
    loaded = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
    assert loaded == set(re.findall(r"- alert: (\S+)", RULES_SOURCE.read_text()))
    installed = on_host(lab_dir, monitor, "sha256sum /etc/prometheus/rules/nixcache.yml").split()[0]
    assert installed == hashlib.sha256(RULES_SOURCE.read_bytes()).hexdigest()
    # No UI or API open beyond loopback; the other hosts run no Prometheus.
    # (9094, Alertmanager's cluster port, is not opened at all.)
    listening = on_host(lab_dir, monitor, "ss -Hltn '( sport = :9090 or sport = :9093 or sport = :9094 )'")
    assert sorted(line.split()[3] for line in listening.splitlines()) == ["127.0.0.1:9090", "127.0.0.1:9093"]
    for other in caches[1:]:
        code, _ = Lab(lab_dir).run(other.name, ["systemctl", "is-active", "prometheus"])
        assert code != 0, f"{other.name} runs Prometheus but is not in group monitoring"


def test_node_exporter_exports_the_names_dashboard_and_rules_use(deployed: Run, lab_dir: Path) -> None:
    host = hosts(lab_dir)[-1]
    text = httpx.get(f"http://{host.address}:9100/metrics", timeout=10).text
    names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    assert names >= NODE_EXPORTER_NAMES, sorted(NODE_EXPORTER_NAMES - names)
    # The textfile collector serves what the deploy and the disk check wrote.
    assert {"nixcache_signing_key_info", "nixcache_build_info"} <= names


def notifications(receiver: Receiver, status: str, instance: str) -> list[dict]:
    """Alertmanager webhook bodies announcing NixcacheDown for `instance` with `status`."""
    return [
        body
        for body in receiver.bodies
        if body.get("status") == status
        and any(
            a["labels"].get("alertname") == "NixcacheDown" and a["labels"].get("instance") == instance
            for a in body.get("alerts", [])
        )
    ]


def test_stopped_cache_alerts_the_webhook_and_resolves(deployed: Run, lab_dir: Path, tmp_path: Path) -> None:
    caches = hosts(lab_dir)
    monitor, victim = caches[0].name, caches[-1].name
    gateway = load(lab_dir).gateway
    receiver = Receiver(gateway)
    secret = uuid.uuid4().hex
    url_file = tmp_path / "webhook-url"
    url_file.write_text(f"http://{gateway}:{receiver.port}/alerts/{secret}\n")
    data = [arg for key, value in FAST.items() for arg in ("--data", f"{key}={value}")]
    try:
        run = pyinfra(
            lab_dir, "-y", "-vvv", "--limit", monitor, *data,
            "--data", f"alert_webhook_ref=file://{url_file}",
            "inventories/lab.py", "deploys/cache.py",
        )  # fmt: skip
        converged(run)
        assert secret not in run.output  # the webhook URL never shows, even at -vvv
        mode = on_host(lab_dir, monitor, "stat -c '%a %U %G' /etc/prometheus/alertmanager.yml").strip()
        assert mode == "640 root prometheus"
        wait_for(
            f"{victim} up after the restart",
            lambda: query(lab_dir, monitor, f'up{{instance="{victim}"}} == 1'),
        )

        on_host(lab_dir, victim, "systemctl stop nixcache")
        stopped = time.monotonic()
        firing = wait_for(
            f"NixcacheDown firing for {victim}", lambda: notifications(receiver, "firing", victim)
        )
        alert = next(a for a in firing[0]["alerts"] if a["labels"]["alertname"] == "NixcacheDown")
        assert alert["labels"]["environment"] == "lab" and alert["labels"]["severity"] == "critical"
        assert alert["annotations"]["runbook"] == "docs/alerts.md#nixcachedown"
        assert f"--limit {victim}" in alert["annotations"]["description"]
        assert not notifications(receiver, "resolved", victim)

        fired = time.monotonic()
        on_host(lab_dir, victim, "systemctl start nixcache")
        wait_for(f"NixcacheDown resolved for {victim}", lambda: notifications(receiver, "resolved", victim))
        # With 5 s scrapes and evaluations, for: 10s and a 5 s group interval (the FAST data).
        print(
            f"\nNixcacheDown: webhook {fired - stopped:.0f} s after the stop, "
            f"resolved {time.monotonic() - fired:.0f} s after the start",
            file=sys.stderr,
        )
    finally:
        Lab(lab_dir).run(victim, ["systemctl", "start", "nixcache"])
        receiver.close()
        converged(deploy(lab_dir, "--limit", monitor))
    # Back to the defaults: no webhook, the repository's rules as they are.
    alertmanager = on_host(lab_dir, monitor, "cat /etc/prometheus/alertmanager.yml")
    assert "webhook_configs" not in alertmanager

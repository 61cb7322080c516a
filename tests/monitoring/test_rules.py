"""The alert rules in monitoring/rules/ load in Debian's Prometheus and do what their tests say.

`promtool` comes with Debian's `prometheus` package (.ci/run installs it). Without it these
tests skip, or fail under LAB_REQUIRED=1 as in CI, so CI can never pass without running them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml
from conftest import require

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "monitoring" / "rules"
RULES = RULES_DIR / "nixcache.yml"
RULE_TESTS = RULES_DIR / "nixcache.test.yml"
ALERTS_DOC = REPO / "docs" / "alerts.md"


def promtool() -> str:
    path = shutil.which("promtool")
    require(path is not None, "promtool is not installed (apt-get install prometheus)")
    return path


def alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_promtool_rule_tests_pass() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rule_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The tests can fail: with the cache-down rule inverted, promtool reports it."""
    broken = RULES.read_text().replace('up{job="nixcache"} == 0', 'up{job="nixcache"} == 1')
    assert broken != RULES.read_text()
    (tmp_path / "nixcache.yml").write_text(broken)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "alertname: NixcacheDown" in result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case["exp_alerts"]))
    for name in alert_names():
        assert cases.get(name) == {True, False}, f"{name}: needs a case that fires and one that does not"


def test_every_alert_says_why_and_what_to_do() -> None:
    text = RULES.read_text()
    groups = yaml.safe_load(text)["groups"]
    documented = set(re.findall(r'<a id="([a-z0-9]+)"></a>', ALERTS_DOC.read_text()))
    for group in groups:
        for rule in group["rules"]:
            name = rule["alert"]
            # The comment block right above `- alert: <name>` carries the reason.
            above = text[: text.index(f"- alert: {name}\n")].rstrip().rsplit("\n\n", 1)[-1]
            assert "# Reason:" in above, f"{name}: no '# Reason:' comment above the rule"
            annotations = rule["annotations"]
            assert {"summary", "description", "runbook"} <= set(annotations), name
            assert annotations["runbook"] == f"docs/alerts.md#{name.lower()}"
            assert name.lower() in documented, f"{name}: no section in docs/alerts.md"

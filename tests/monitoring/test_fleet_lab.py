"""`nixcache fleet status inventories/lab.py` on the converged lab, with one cache stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from deploy.conftest import REPO, Run

from nixcache import __version__
from nixcache.lab import Lab
from nixcache.lab.state import load

pytestmark = pytest.mark.lab


def fleet_status(lab_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """The command as an operator runs it from the checkout (its own process: pyinfra's loader
    patches the process with gevent)."""
    return subprocess.run(
        [sys.executable, "-c", "from nixcache.cli import main; main()", "fleet", "status", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NIXCACHE_LAB_DIR": str(lab_dir)},
    )


def test_fleet_status_of_the_lab_with_a_stopped_cache(deployed: Run, lab_dir: Path) -> None:
    hosts = [h for h in load(lab_dir).hosts if h.state == "running"]
    for host in hosts:
        # Free space comes from the disk check, whose first run is 2 minutes after boot: run it now.
        code, output = Lab(lab_dir).run(host.name, ["systemctl", "start", "nixcache-disk-alert.service"])
        assert code == 0, output
    for _ in range(3):  # lookups of an absent path: the hit rate is known (not "-"), and under 100 %
        assert httpx.get(f"http://{hosts[0].address}:5000/{'0' * 32}.narinfo").status_code == 404

    result = fleet_status(lab_dir, "inventories/lab.py", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["host"]: row for row in json.loads(result.stdout)}
    assert list(rows) == [h.name for h in hosts]
    for row in rows.values():
        assert row["reachable"] and row["error"] is None, row
        assert row["version"] == __version__
        assert row["signing_keys"] == ["nixcache-lab-1"]
        assert row["free_bytes"] > 0 and 0 < row["filesystem_used_ratio"] < 1
        assert row["store_bytes"] >= 0 and row["requests_per_second"] >= 0
        assert row["node_exporter_error"] is None
    assert 0.0 <= rows[hosts[0].name]["hit_rate"] < 1.0

    stopped = hosts[-1]
    code, output = Lab(lab_dir).run(stopped.name, ["systemctl", "stop", "nixcache"])
    assert code == 0, output
    try:
        result = fleet_status(lab_dir, "inventories/lab.py")
        assert result.returncode == 1, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].split()[:4] == ["HOST", "REACHABLE", "VERSION", "KEY"]
        table = {line.split()[0]: line.split() for line in lines[1 : 1 + len(hosts)]}
        assert table[stopped.name][:3] == [stopped.name, "no", "-"]
        for other in hosts[:-1]:
            assert table[other.name][:4] == [other.name, "yes", __version__, "nixcache-lab-1"]
        assert lines[1 + len(hosts)] == (
            f"{stopped.name}: does not answer: cannot connect to http://{stopped.address}:5000/metrics "
            "(service stopped, host down, or a firewall drops the controller)"
        )
        assert "\x1b[" not in result.stdout  # not a terminal: plain text
    finally:
        Lab(lab_dir).run(stopped.name, ["systemctl", "start", "nixcache"])

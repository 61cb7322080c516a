"""`nixcache drill` refuses what would destroy a lab that is not its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nixcache.lab import Host, LabState
from nixcache.lab import state as statefile

REPO = Path(__file__).resolve().parents[2]


def test_drill_refuses_a_lab_dir_that_holds_a_lab(tmp_path: Path) -> None:
    lab = LabState(
        instance="d1d2d3",
        subnet="10.231.7.0/24",
        gateway="10.231.7.1",
        bridge="nxbd1d2d3",
        hosts=[Host(name="lab1", address="10.231.7.11", ssh_key="/k", pid=None, root="/nonexistent/root")],
    )
    statefile.save(tmp_path, lab)
    before = (tmp_path / "state.json").read_text()
    done = subprocess.run(
        [sys.executable, "-c", "from nixcache.cli import main; main()", "drill", "--lab-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"Invalid value for --lab-dir: {tmp_path} holds a lab (lab1)" in done.stderr
    assert f"NIXCACHE_LAB_DIR={tmp_path} nixcache lab down" in done.stderr
    assert "drill lab:" not in done.stdout  # refused before any phase
    assert (tmp_path / "state.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]

"""Plumbing for end-to-end deploy tests: run the real `pyinfra` CLI against lab hosts.

`deployed` converges every running lab host once per module with deploys/cache.py and records
how long it took; tests then look at the hosts from outside (HTTP, SSH, nix).
"""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from nixcache.lab import Lab
from nixcache.lab.state import load

REPO = Path(__file__).resolve().parents[2]
# A converge of three fresh hosts builds a wheelhouse and installs a venv on each.
DEPLOY_TIMEOUT = 600


@dataclass
class Run:
    """One pyinfra run: exit code, output and wall time."""

    returncode: int
    output: str
    seconds: float

    def totals(self) -> dict[str, int]:
        """The summary's Grand total row: hosts, success (changed), error, no change."""
        match = re.search(r"Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", self.output)
        assert match, f"no pyinfra summary in output:\n{self.output[-3000:]}"
        values = [0 if v == "-" else int(v) for v in match.groups()]
        return dict(zip(("hosts", "changed", "error", "no_change"), values, strict=True))

    def changed_operations(self) -> list[str]:
        """Names of operations the summary reports as changed on some host."""
        rows = []
        for line in self.output.splitlines():
            cells = re.split(r"\s{2,}", line.strip())
            if len(cells) == 5 and cells[2] not in ("-", "Success") and cells[0] != "Grand total":
                rows.append(cells[0])
        return rows

    def detected_changes(self) -> list[str]:
        """`--dry`: operations listed with a change (or a conditional change) for some host."""
        rows = []
        for line in self.output.splitlines():
            cells = re.split(r"\s{2,}", line.strip())
            if len(cells) == 3 and cells[0] != "Operation" and (cells[1] != "-" or cells[2] != "-"):
                rows.append(cells[0])
        return rows


def lab_group_data(lab_dir: Path, leave_out: tuple[str, ...] = ()) -> str:
    """inventories/group_data/lab.py's exported settings for the lab in `lab_dir`, as literal
    assignments: the group data of a test's own inventory (a computed `__all__` is an error)."""
    previous = os.environ.get("NIXCACHE_LAB_DIR")
    os.environ["NIXCACHE_LAB_DIR"] = str(lab_dir)
    try:
        values = runpy.run_path(str(REPO / "inventories" / "group_data" / "lab.py"))
    finally:
        if previous is None:
            os.environ.pop("NIXCACHE_LAB_DIR")
        else:
            os.environ["NIXCACHE_LAB_DIR"] = previous
    names = [name for name in values["__all__"] if not name.startswith(leave_out)]
    return "".join(f"{name} = {values[name]!r}\n" for name in names)


def hosts(lab_dir: Path):
    """The running hosts of the lab in `lab_dir`."""
    state = load(lab_dir)
    assert state is not None and state.hosts, f"no lab in {lab_dir}"
    return [h for h in state.hosts if h.state == "running"]


def on_host(lab_dir: Path, name: str, command: str, ok: bool = True) -> str:
    """Run `command` on lab host `name` over SSH; its output (asserts success unless not `ok`)."""
    code, output = Lab(lab_dir).run(name, ["sh", "-c", command])
    if ok:
        assert code == 0, f"{name}: {command!r} exited {code}: {output}"
    return output


def pyinfra(lab_dir: Path, *args: str, timeout: float = DEPLOY_TIMEOUT) -> Run:
    """`pyinfra <args>` from the repository root, as a user runs it, against the lab at `lab_dir`."""
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pyinfra", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "NIXCACHE_LAB_DIR": str(lab_dir)},
    )
    return Run(result.returncode, result.stdout + result.stderr, time.monotonic() - start)


def deploy(lab_dir: Path, *extra: str) -> Run:
    """`pyinfra -y inventories/lab.py deploys/cache.py [extra…]`."""
    return pyinfra(lab_dir, "-y", *extra, "inventories/lab.py", "deploys/cache.py")


@pytest.fixture(scope="session")
def lab_dir(lab) -> Path:
    """The state directory of the shared session lab (tests/conftest.py's `lab` fixture)."""
    return Path(lab.state_dir)


@pytest.fixture(scope="session")
def deployed(lab_dir: Path) -> Run:
    """Every lab host converged by deploys/cache.py (the first run, timed)."""
    run = deploy(lab_dir)
    assert run.returncode == 0, run.output[-5000:]
    print(f"\nfirst converge: {run.seconds:.1f} s", file=sys.stderr)
    return run

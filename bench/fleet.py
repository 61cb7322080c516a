"""Lab, deploy and recovery timings against their targets, on a lab of this machine's own.

    python bench/fleet.py                   # lab up/down, first converge, rerun, --dry, the drill
    python bench/fleet.py --rebuild-image   # also time a fresh debootstrap of the base image
    python bench/fleet.py --cold            # empty controller caches: the wheelhouse is built anew
    python bench/fleet.py --no-drill        # skip the drill (about 2 minutes)

Runs every step as a user would (`nixcache lab …`, `pyinfra -y inventories/lab.py …`,
`nixcache drill`) in a temporary lab directory, times each, and prints one table with the
targets. Needs root and the lab's Debian tools (see README). The lab is torn down at the end,
also when a step fails.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP_TIMEOUT = 1800


@dataclass
class Result:
    what: str
    seconds: float
    target: float | None = None

    def row(self) -> str:
        target = f"< {self.target:.0f} s" if self.target else ""
        verdict = ("met" if self.seconds < self.target else "MISSED") if self.target else ""
        return f"{self.what:<40} {self.seconds:>8.1f} s   {target:<9} {verdict}"


def run(args: list[str], env: dict[str, str], what: str) -> tuple[float, str]:
    """Run a step, echoing its output only when it fails; (seconds, combined output)."""
    print(f"… {what}", file=sys.stderr, flush=True)
    start = time.monotonic()
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    seconds = time.monotonic() - start
    output = done.stdout + done.stderr
    if done.returncode != 0:
        sys.exit(f"{what} failed (exit {done.returncode}):\n{output[-4000:]}")
    return seconds, output


def pyinfra(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyinfra", *args, "inventories/lab.py", "deploys/cache.py"]


def changed_hosts(output: str) -> int:
    """Hosts with a change in a pyinfra run's summary (`Grand total  hosts  changed  …`, `-` for 0)."""
    totals = re.search(r"Grand total\s+(\S+)\s+(\S+)", output)
    if totals is None:
        return -1
    return 0 if totals.group(2) == "-" else int(totals.group(2))


def lab_and_deploy(hosts: int, rebuild: bool, cold: bool, env: dict[str, str]) -> list[Result]:
    results = []
    if rebuild:
        seconds, _ = run(["nixcache", "lab", "up", "--hosts", "1", "--rebuild"], env, "image build (+1 host)")
        results.append(Result("base image build, uncached (+ 1 host up)", seconds))
        run(["nixcache", "lab", "down"], env, "lab down")
    seconds, _ = run(["nixcache", "lab", "up", "--hosts", str(hosts)], env, f"lab up, {hosts} hosts")
    results.append(Result(f"lab up, {hosts} hosts, image cached", seconds, target=30))
    seconds, _ = run(pyinfra("-y"), env, "first converge")
    label = " (cold caches)" if cold else ""
    results.append(Result(f"first converge, {hosts} hosts{label}", seconds, target=120))
    seconds, output = run(pyinfra("-y"), env, "no-change rerun")
    if changed_hosts(output) != 0:
        sys.exit(f"the rerun changed something:\n{output[-4000:]}")
    results.append(Result(f"no-change rerun, {hosts} hosts", seconds, target=15))
    seconds, _ = run(pyinfra("--dry"), env, "dry run")
    results.append(Result(f"--dry on converged hosts, {hosts} hosts", seconds))
    seconds, _ = run(["nixcache", "lab", "reset", "lab1"], env, "lab reset")
    results.append(Result("lab reset of one host", seconds))
    return results


def drill(env: dict[str, str], lab_dir: Path) -> list[Result]:
    _, output = run(["nixcache", "drill", "--lab-dir", str(lab_dir)], env, "drill")
    results = [
        Result(f"drill phase {name}", float(seconds))
        for name, seconds in re.findall(r"^phase (\w+): ([\d.]+) s$", output, re.MULTILINE)
    ]
    recovery = re.search(r"^recovery time: ([\d.]+) s$", output, re.MULTILINE)
    if recovery is None:
        sys.exit(f"the drill printed no recovery time:\n{output[-4000:]}")
    results.append(Result("drill recovery time (reset -> verified)", float(recovery.group(1)), target=300))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--rebuild-image", action="store_true", help="time a fresh debootstrap too")
    parser.add_argument(
        "--cold", action="store_true", help="empty wheelhouse and pip caches (XDG_CACHE_HOME in the temp dir)"
    )
    parser.add_argument("--no-drill", action="store_true")
    options = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/fleet.py needs root (the lab boots systemd-nspawn hosts)")

    with tempfile.TemporaryDirectory(prefix="nixcache-bench-") as tmp:
        lab_dir = Path(tmp) / "lab"
        env = {**os.environ, "NIXCACHE_LAB_DIR": str(lab_dir)}
        if options.cold:
            env["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        results: list[Result] = []
        try:
            results += lab_and_deploy(options.hosts, options.rebuild_image, options.cold, env)
        finally:
            if lab_dir.exists():
                seconds, _ = run(["nixcache", "lab", "down"], env, "lab down")
                results.append(Result(f"lab down, {options.hosts} hosts", seconds))
        if not options.no_drill:
            results += drill(env, Path(tmp) / "drill-lab")

    print(f"{'measurement':<40} {'time':>10}   {'target':<9} verdict")
    for result in results:
        print(result.row())


if __name__ == "__main__":
    main()

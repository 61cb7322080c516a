"""The README's main job, exactly as its first command runs it, on a lab of its own.

`nixcache lab up && pyinfra -y inventories/lab.py deploys/cache.py` (read from README.md, so
the test follows the README) boots lab1..lab3 and makes them caches of one environment with
lab1's SeaweedFS as their origin. Then, from outside: a path pushed to lab2 is substituted from
lab3 with require-sigs and only the fleet's key trusted, lab3 stored it (a second pull is a
local hit in its /metrics), and a second run of the job changes nothing.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import nixbuild

from deploy.conftest import REPO, Run, hosts, on_host, pyinfra
from deploy.test_cache_deploy import PORT, nix
from nixcache.keys import SecretKey
from nixcache.lab import Lab

pytestmark = pytest.mark.lab

LAB_UP_TIMEOUT = 900


def readme_main_job() -> list[list[str]]:
    """The commands of the README's first command line after the install step."""
    text = (REPO / "README.md").read_text()
    line = next(
        line.strip() for line in text.split("```sh", 1)[1].splitlines() if line.strip() and "pyinfra" in line
    )
    install, *commands = (shlex.split(part) for part in line.split("&&"))
    assert install[:2] == ["pip", "install"], f"README's first command lost its install step: {line}"
    return commands


@pytest.fixture(scope="module")
def main_job(tmp_path_factory: pytest.TempPathFactory):
    """A lab of the README's size, converged by the README's main job: (lab dir, the deploy run)."""
    lab_dir = tmp_path_factory.mktemp("main-job-lab")
    commands = readme_main_job()
    up, job = commands
    assert up[:3] == ["nixcache", "lab", "up"], commands
    assert job[:3] == ["pyinfra", "-y", "inventories/lab.py"], commands
    env = {**os.environ, "NIXCACHE_LAB_DIR": str(lab_dir)}
    env.pop("NIXCACHE_LAB_ORIGIN", None)
    try:
        # The checkout's own `nixcache`, as the README's editable install would run it.
        subprocess.run(
            [sys.executable, "-c", "from nixcache.cli import main; main()", *up[1:]],
            cwd=REPO,
            env=env,
            check=True,
            timeout=LAB_UP_TIMEOUT,
        )
        run = pyinfra(lab_dir, *job[1:])
        assert run.returncode == 0, run.output[-5000:]
        print(f"\nmain job, first converge of 3 hosts: {run.seconds:.1f} s", file=sys.stderr)
        yield lab_dir, job, run
    finally:
        Lab(lab_dir).down()


def lookups(url: str, tier: str, kind: str, result: str) -> float:
    # Lab hosts run a worker per core; whichever answers the scrape, it counts every worker's
    # requests answered until then (nixcache.server.metrics).
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "nixcache_tier_lookups_total"
        and sample.labels == {"tier": tier, "kind": kind, "result": result}
    )


def test_lab1_runs_the_origin_beside_its_cache_and_every_cache_uses_it(main_job) -> None:
    lab_dir, _, _ = main_job
    lab1, *others = hosts(lab_dir)
    assert [h.name for h in others] == ["lab2", "lab3"]
    assert on_host(lab_dir, lab1.name, "systemctl is-active seaweedfs.service nixcache.service").split() == [
        "active",
        "active",
    ]
    for host in (lab1, *others):
        config = on_host(lab_dir, host.name, "cat /etc/nixcache/config.toml")
        assert f'endpoint = "http://{lab1.address}:8333"' in config, (host.name, config)
        code, _ = Lab(lab_dir).run(host.name, ["systemctl", "cat", "seaweedfs.service"])
        assert (code == 0) == (host is lab1), f"{host.name}: seaweedfs.service only on the origin host"


def test_a_path_pushed_to_lab2_is_substituted_from_lab3_and_stored_there(main_job, tmp_path: Path) -> None:
    lab_dir, _, _ = main_job
    _, lab2, lab3 = hosts(lab_dir)
    top = nixbuild.build(nixbuild.closure("deploy", uuid.uuid4().hex), tmp_path / "build")

    token = (lab_dir / "secrets" / "push-token").read_text().strip()
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {lab2.address}\nlogin nix\npassword {token}\n")
    netrc.chmod(0o600)
    pushed = nix(["copy", "--to", f"http://{lab2.address}:{PORT}", top], tmp_path / "home-push", netrc)
    assert pushed.returncode == 0, pushed.stderr

    reader = f"http://{lab3.address}:{PORT}"
    fleet_key = str(SecretKey.parse((lab_dir / "secrets" / "signing-key").read_text()).public())

    def pull(into: str) -> subprocess.CompletedProcess[str]:
        return nix(
            [
                "copy", "--from", reader, "--to", str(tmp_path / into), top,
                "--option", "require-sigs", "true",
                "--option", "trusted-public-keys", fleet_key,
                "--option", "substituters", "",
            ],
            tmp_path / f"home-{into}",
        )  # fmt: skip

    origin_before = lookups(reader, "origin", "nar", "hit")
    first = pull("fresh")
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "fresh" / "nix" / "store" / Path(top).name).read_bytes() == Path(top).read_bytes()
    pulled = lookups(reader, "origin", "nar", "hit") - origin_before
    assert pulled == 2, "lab3 fetched the closure's NARs (deploy-top, deploy-leaf) from the origin"

    # lab3 stored the path: its narinfo is in its own store, and a second pull into another
    # fresh store is served locally (local hits grow, the origin is not asked again).
    hash_part = Path(top).name[:32]
    on_host(lab_dir, lab3.name, f"test -s /var/lib/nixcache/store/narinfo/{hash_part}.narinfo")
    local_before = lookups(reader, "local", "narinfo", "hit")
    origin_narinfo_before = lookups(reader, "origin", "narinfo", "hit")
    origin_nar_before = lookups(reader, "origin", "nar", "hit")
    second = pull("again")
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "again" / "nix" / "store" / Path(top).name).read_bytes() == Path(top).read_bytes()
    assert lookups(reader, "local", "narinfo", "hit") >= local_before + pulled
    assert lookups(reader, "origin", "narinfo", "hit") == origin_narinfo_before
    assert lookups(reader, "origin", "nar", "hit") == origin_nar_before


def test_a_second_run_of_the_main_job_changes_nothing(main_job) -> None:
    lab_dir, job, _ = main_job
    again: Run = pyinfra(lab_dir, *job[1:])
    assert again.returncode == 0, again.output[-3000:]
    assert again.totals()["changed"] == 0, again.changed_operations()
    print(f"\nmain job, second run: {again.seconds:.1f} s", file=sys.stderr)

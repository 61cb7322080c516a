"""nixcache-verify on a deployed lab host: the timer waits, the service finds and quarantines a
flipped byte, /metrics counts it, clients never get the damaged copy (404, or the origin's copy
pulled through again), and a push or the pull-through repairs it."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server.helpers import make_entry, push

from deploy.conftest import Run, hosts, on_host

pytestmark = pytest.mark.lab

PORT = 5000
STORE = "/var/lib/nixcache/store"


def damaged_entries(client: httpx.Client) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "nixcache_verify_last_damaged_entries":
                return sample.value
    raise AssertionError("nixcache_verify_last_damaged_entries not in /metrics")


def start_verify(lab_dir: Path, host: str) -> tuple[int, str]:
    """`systemctl start nixcache-verify.service` (waits for the oneshot); exit code and journal."""
    code = on_host(lab_dir, host, "systemctl start nixcache-verify.service; echo rc=$?", ok=False)
    journal = on_host(lab_dir, host, "journalctl -u nixcache-verify.service -n 20 --no-pager -o cat")
    return int(code.strip().rsplit("rc=", 1)[1]), journal


def test_the_verify_timer_runs_the_check_that_quarantines_damage(deployed: Run, lab_dir: Path) -> None:
    host = hosts(lab_dir)[0]
    assert on_host(lab_dir, host.name, "systemctl is-enabled nixcache-verify.timer").strip() == "enabled"
    assert on_host(lab_dir, host.name, "systemctl is-active nixcache-verify.timer").strip() == "active"
    show = "systemctl show -p Nice,IOSchedulingClass,User nixcache-verify.service"
    unit = on_host(lab_dir, host.name, show)
    assert sorted(unit.split()) == ["IOSchedulingClass=3", "Nice=19", "User=nixcache"]  # 3 = idle

    token = (lab_dir / "secrets" / "push-token").read_text().strip()
    entry = make_entry(os.urandom(200_000), compression="xz")
    with httpx.Client(base_url=f"http://{host.address}:{PORT}", timeout=10) as client:
        push(client, entry, token)
        code, journal = start_verify(lab_dir, host.name)
        assert code == 0, journal
        assert "; 0 damaged, 0 files quarantined" in journal
        assert damaged_entries(client) == 0

        nar = f"{STORE}/nar/{entry.nar_file}"
        # Flip one bit in the middle, as bit rot does (size and mtime unchanged).
        on_host(
            lab_dir,
            host.name,
            f"python3 -c \"import os; f=open('{nar}','r+b'); f.seek(100000); b=f.read(1); "
            f'f.seek(100000); f.write(bytes([b[0]^1])); f.close()"',
        )
        code, journal = start_verify(lab_dir, host.name)
        assert code != 0, journal  # the unit fails: `systemctl --failed` shows it
        assert f"verify: damaged: nar/{entry.nar_file} its bytes hash to" in journal
        assert "1 damaged, 3 files quarantined in /var/lib/nixcache/store/quarantine/" in journal
        assert damaged_entries(client) == 1
        # The damaged copy is never served again. A host without an origin answers 404 until a
        # push repairs it; one behind an origin (the lab's caches are, lab1 runs it) pulls the
        # entry through again, verified against its narinfo, so clients get the pushed bytes.
        behind_origin = "[origin]" in on_host(lab_dir, host.name, "cat /etc/nixcache/config.toml")
        narinfo = client.get(f"/{entry.hash_part}.narinfo")
        assert narinfo.status_code == (200 if behind_origin else 404)
        if behind_origin:
            assert client.get(f"/nar/{entry.nar_file}").content == entry.file_bytes
        moved = on_host(lab_dir, host.name, f"stat -c %U {STORE}/quarantine/*/nar/{entry.nar_file}")
        assert moved.split("\n")[0] == "nixcache"
        # The runbook's "Corrupted store" step 2: the store paths to push again.
        paths = on_host(lab_dir, host.name, f"grep -h '^StorePath: ' {STORE}/quarantine/*/narinfo/*.narinfo")
        assert paths.split("\n")[0] == f"StorePath: {entry.store_path}"

        if not behind_origin:
            push(client, entry, token)
        assert client.get(f"/nar/{entry.nar_file}").content == entry.file_bytes
        code, journal = start_verify(lab_dir, host.name)
        assert code == 0, journal
        assert damaged_entries(client) == 0

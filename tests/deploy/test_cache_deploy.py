"""deploys/cache.py end to end: real pyinfra runs against lab hosts, checked from outside."""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import httpx
import pytest
from support import nixbuild

from deploy.conftest import Run, deploy, hosts, on_host, pyinfra
from nixcache import nixenv
from nixcache.keys import SecretKey
from nixcache.lab.state import load

pytestmark = pytest.mark.lab

PORT = 5000


def cache_info(address: str, local_address: str | None = None, timeout: float = 3.0) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=local_address) if local_address else None
    with httpx.Client(transport=transport, timeout=timeout) as client:
        return client.get(f"http://{address}:{PORT}/nix-cache-info")


def test_converges_and_serves_every_host(deployed: Run, lab_dir: Path) -> None:
    assert deployed.totals()["error"] == 0
    for host in hosts(lab_dir):
        response = cache_info(host.address)
        assert response.status_code == 200
        assert "StoreDir: /nix/store" in response.text


def test_nixcache_is_on_the_path_of_a_login_shell(deployed: Run, lab_dir: Path) -> None:
    """The runbook's on-host commands call `nixcache` by name, as root in a login shell."""
    host = hosts(lab_dir)[0]
    assert on_host(lab_dir, host.name, "bash -lc 'command -v nixcache && nixcache --version'").split("\n")[
        :2
    ] == [
        "/usr/local/bin/nixcache",
        "nixcache, version 0.1.0",
    ]


def test_second_run_reports_no_changes(deployed: Run, lab_dir: Path) -> None:
    rerun = deploy(lab_dir)
    assert rerun.returncode == 0, rerun.output[-5000:]
    totals = rerun.totals()
    print(
        f"\n{len(hosts(lab_dir))} hosts: first converge {deployed.seconds:.1f} s, "
        f"no-change rerun {rerun.seconds:.1f} s",
        file=sys.stderr,
    )
    assert totals["changed"] == 0, f"changed on rerun: {rerun.changed_operations()}"
    assert totals["error"] == 0
    assert totals["no_change"] == totals["hosts"] > 0
    # Times are printed for the record; bench/fleet.py measures them against their targets.


def test_dry_run_on_converged_hosts_shows_no_change(deployed: Run, lab_dir: Path) -> None:
    dry = pyinfra(lab_dir, "--dry", "inventories/lab.py", "deploys/cache.py")
    assert dry.returncode == 0, dry.output[-5000:]
    assert "Detected changes" in dry.output
    assert dry.detected_changes() == []


def test_dry_run_creates_no_missing_secret(deployed: Run, lab_dir: Path, tmp_path: Path) -> None:
    # References to secrets that do not exist yet, with generation allowed (the lab's data):
    # a real run would create them; a dry run must show the change and create nothing.
    key_ref, token_ref = f"file://{tmp_path}/signing-key", f"file://{tmp_path}/push-token"
    host = hosts(lab_dir)[0]
    dry = pyinfra(
        lab_dir, "--dry", "--limit", host.name,
        "--data", f"signing_key_ref={key_ref}", "--data", f"push_token_ref={token_ref}",
        "inventories/lab.py", "deploys/cache.py",
    )  # fmt: skip
    assert dry.returncode == 0, dry.output[-5000:]
    assert f"dry run: {key_ref} does not exist yet" in dry.output
    assert {"Signing key", "Push token"} <= set(dry.detected_changes())
    assert list(tmp_path.iterdir()) == []
    installed = on_host(lab_dir, host.name, "sha256sum /etc/nixcache/signing-key | cut -c1-64")
    stored = hashlib.sha256((lab_dir / "secrets" / "signing-key").read_bytes()).hexdigest()
    assert installed == stored


def test_key_file_is_0600_and_owned_by_nixcache(deployed: Run, lab_dir: Path) -> None:
    host = hosts(lab_dir)[0]
    files = "/etc/nixcache/signing-key /etc/nixcache/push-token"
    stat = on_host(lab_dir, host.name, f"stat -c '%a %U %G' {files}")
    assert stat.split("\n")[:2] == ["600 nixcache nixcache", "600 nixcache nixcache"]


def test_security_score_is_2_or_lower(deployed: Run, lab_dir: Path) -> None:
    host = hosts(lab_dir)[0]
    for unit in ("nixcache.service", "nixcache-gc.service", "nixcache-verify.service"):
        output = on_host(lab_dir, host.name, f"systemd-analyze security --no-pager {unit} | tail -n 1")
        match = re.search(r"exposure level for \S+: ([0-9.]+)", output)
        assert match, output
        assert float(match.group(1)) <= 2.0, f"{unit}: {output}"


def test_gc_unit_runs_with_the_limits_of_config_toml(deployed: Run, lab_dir: Path) -> None:
    """One source of truth: the GC unit names the config file, whose gc_* keys are the lab's data."""
    host = hosts(lab_dir)[0]
    exec_start = on_host(lab_dir, host.name, "systemctl show -p ExecStart --value nixcache-gc.service")
    assert "argv[]=/opt/nixcache/venv/bin/nixcache gc --config /etc/nixcache/config.toml ;" in exec_start
    config = tomllib.loads(on_host(lab_dir, host.name, "cat /etc/nixcache/config.toml"))
    # inventories/group_data/lab.py's values, the default age limit, the lab's store
    assert (config["gc_min_free"], config["gc_max_free"], config["gc_older_than"]) == ("1G", "2G", "30d")
    assert config["store"] == "/var/lib/nixcache/store"
    on_host(lab_dir, host.name, "systemctl start nixcache-gc.service")  # a oneshot: waits, fails on error
    journal = on_host(lab_dir, host.name, "journalctl -u nixcache-gc.service -n 20 --no-pager -o cat")
    assert re.search(r"gc: deleted \d+ narinfos and \d+ NAR files", journal), journal


def test_a_bad_memory_limit_stops_the_deploy_in_one_line(deployed: Run, lab_dir: Path) -> None:
    """systemd would run the service with no limit at all ('Invalid memory limit, ignoring')."""
    run = deploy(lab_dir, "--data", "cache_memory_max=lots")
    assert run.returncode != 0 and "Traceback" not in run.output, run.output[-3000:]
    errors = [line for line in run.output.splitlines() if "pyinfra error" in line]
    assert len(errors) == 1, run.output[-3000:]
    assert re.search(
        r": lab\d+: host data 'cache_memory_max' is 'lots'; give a systemd memory limit: bytes with K, M, "
        r"G or T \(512M, 2G\), a percentage \(50%\) or infinity$",
        errors[0],
    ), errors[0]
    host = hosts(lab_dir)[0]
    assert on_host(lab_dir, host.name, "systemctl show -p MemoryMax --value nixcache.service").strip() == str(
        512 * 1024**2
    )


def test_service_restarts_after_kill_9(deployed: Run, lab_dir: Path) -> None:
    host = hosts(lab_dir)[0]
    main_pid = "systemctl show -p MainPID --value nixcache.service"
    before = on_host(lab_dir, host.name, main_pid).strip()
    assert before != "0"
    on_host(lab_dir, host.name, f"kill -9 {before}")
    after = before
    for _ in range(30):  # Restart=on-failure with RestartSec=2s: back within a few seconds
        time.sleep(0.5)
        after = on_host(lab_dir, host.name, main_pid).strip()
        if after not in ("0", before):
            break
    assert after not in ("0", before), "nixcache.service did not come back after kill -9"
    for _ in range(20):
        with contextlib.suppress(httpx.HTTPError):
            if cache_info(host.address).status_code == 200:
                break
        time.sleep(0.5)
    assert cache_info(host.address).status_code == 200


def test_one_worker_per_core_and_a_killed_worker_is_replaced(deployed: Run, lab_dir: Path) -> None:
    """The sandboxed unit runs the pre-forking parent (cache_workers 0: one worker per core)."""
    host = hosts(lab_dir)[0]
    main = on_host(lab_dir, host.name, "systemctl show -p MainPID --value nixcache.service").strip()
    cores = int(on_host(lab_dir, host.name, "nproc").strip())

    def workers() -> list[str]:
        return on_host(lab_dir, host.name, f"cat /proc/{main}/task/{main}/children").split()

    first = workers()
    assert len(first) == cores
    on_host(lab_dir, host.name, f"kill -9 {first[0]}")
    now = first
    for _ in range(40):
        time.sleep(0.25)
        assert cache_info(host.address).status_code == 200  # the other workers answer meanwhile
        now = workers()
        if len(now) == cores and first[0] not in now:
            break
    assert len(now) == cores and first[0] not in now, f"worker {first[0]} was not replaced: {now}"
    assert on_host(lab_dir, host.name, "systemctl show -p MainPID --value nixcache.service").strip() == main
    metrics = httpx.get(f"http://{host.address}:{PORT}/metrics", timeout=5).text
    assert re.search(r"^nixcache_worker_restarts_total [1-9]", metrics, re.M), metrics[-600:]
    assert re.search(rf"^nixcache_workers {cores}\.0$", metrics, re.M)


def nix(args: list[str], home: Path, netrc: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--option", "netrc-file", str(netrc)] if netrc else []
    return nixenv.run(["nix", *args, *extra], home)


def test_nix_copy_push_then_fetch_with_required_signatures(
    deployed: Run, lab_dir: Path, tmp_path: Path
) -> None:
    host = hosts(lab_dir)[0]
    url = f"http://{host.address}:{PORT}"
    top = nixbuild.build(nixbuild.closure("deploy", uuid.uuid4().hex), tmp_path / "build")

    token = (lab_dir / "secrets" / "push-token").read_text().strip()
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {host.address}\nlogin nix\npassword {token}\n")
    netrc.chmod(0o600)
    pushed = nix(["copy", "--to", url, top], tmp_path / "home-push", netrc)
    assert pushed.returncode == 0, pushed.stderr

    # The key clients should trust: what the cache publishes, and what the secret store holds.
    published = httpx.get(f"{url}/pubkey", timeout=5).text.strip()
    stored = str(SecretKey.parse((lab_dir / "secrets" / "signing-key").read_text()).public())
    assert published == stored

    fetched = nix(
        [
            "copy", "--from", url, "--to", str(tmp_path / "fresh"), top,
            "--option", "require-sigs", "true",
            "--option", "trusted-public-keys", stored,
            "--option", "substituters", "",
        ],
        tmp_path / "home-fetch",
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    copied = tmp_path / "fresh" / "nix" / "store" / Path(top).name
    assert copied.read_text() == Path(top).read_text()

    wrong = str(SecretKey.generate("someone-else-1").public())
    refused = nix(
        [
            "copy", "--from", url, "--to", str(tmp_path / "untrusted"), top,
            "--option", "require-sigs", "true",
            "--option", "trusted-public-keys", wrong,
            "--option", "substituters", "",
        ],
        tmp_path / "home-untrusted",
    )  # fmt: skip
    assert refused.returncode != 0
    assert not (tmp_path / "untrusted" / "nix" / "store" / Path(top).name).exists()


def test_firewall_refuses_the_cache_port_outside_allowed_sources(deployed: Run, lab_dir: Path) -> None:
    state = load(lab_dir)
    host = hosts(lab_dir)[0]
    gateway = state.gateway
    # A second controller address on the lab bridge: routable from the host (same subnet), so
    # only the firewall can refuse it.
    outsider = re.sub(r"\.\d+$", ".250", gateway)
    subprocess.run(["ip", "addr", "add", f"{outsider}/32", "dev", state.bridge], check=True)
    try:
        assert cache_info(host.address, local_address=outsider).status_code == 200  # allowed: lab network

        # The cache narrowed to the controller's own address; SSH stays open to the lab network.
        # The cache port also admits metrics_allowed_sources (Prometheus reads /metrics there):
        # narrowed too, to the controller and the lab's monitoring host (the first host).
        narrowed = deploy(
            lab_dir,
            "--limit", host.name,
            "--data", f"cache_allowed_sources={gateway}/32",
            "--data", f"metrics_allowed_sources={gateway}/32,{hosts(lab_dir)[0].address}/32",
            "--data", f"ssh_allowed_sources={state.subnet}",
        )  # fmt: skip
        assert narrowed.returncode == 0, narrowed.output[-5000:]
        with pytest.raises(httpx.ConnectTimeout):
            cache_info(host.address, local_address=outsider, timeout=2.0)
        assert cache_info(host.address, local_address=gateway).status_code == 200
        # Control: the outsider still reaches the host (SSH is open to it), only the cache port is shut.
        with socket.create_connection((host.address, 22), timeout=3, source_address=(outsider, 0)):
            pass
    finally:
        restored = deploy(lab_dir, "--limit", host.name)
        subprocess.run(["ip", "addr", "del", f"{outsider}/32", "dev", state.bridge], check=False)
    assert restored.returncode == 0, restored.output[-5000:]


def test_secrets_are_reinstalled_without_ever_showing_in_pyinfra_output(deployed: Run, lab_dir: Path) -> None:
    host = hosts(lab_dir)[0]
    on_host(lab_dir, host.name, "rm /etc/nixcache/push-token /etc/nixcache/signing-key")
    run = pyinfra(lab_dir, "-y", "-vvv", "--limit", host.name, "inventories/lab.py", "deploys/cache.py")
    assert run.returncode == 0, run.output[-5000:]
    token = (lab_dir / "secrets" / "push-token").read_text().strip()
    key = (lab_dir / "secrets" / "signing-key").read_text().strip()
    assert token not in run.output
    assert key.partition(":")[2][:16] not in run.output
    assert "file uploaded: /etc/nixcache/push-token.nixcache-new" in run.output
    stat = on_host(lab_dir, host.name, "stat -c '%a %U' /etc/nixcache/push-token /etc/nixcache/signing-key")
    assert stat.split("\n")[:2] == ["600 nixcache", "600 nixcache"]

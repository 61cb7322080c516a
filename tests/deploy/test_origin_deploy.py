"""The lab's origin end to end: SeaweedFS as seaweedfs.service on lab1 (group `origin`, set up by
the main job), the caches behind it, its outage and its GC, checked from outside. The README's
push-to-lab2, pull-from-lab3 check on three hosts is tests/deploy/test_main_job.py."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import pytest

from deploy.conftest import Run, hosts, on_host, pyinfra
from nixcache.lab import Lab

pytestmark = pytest.mark.lab

S3_PORT = 8333


@pytest.fixture(scope="module")
def origin_deployed(deployed: Run, lab_dir: Path):
    """The main job (deploys/cache.py) ran SeaweedFS on lab1, the host of group `origin`."""
    return hosts(lab_dir)[0], deployed


@pytest.fixture(scope="module")
def caches_behind_origin(origin_deployed, lab_dir: Path):
    """Every lab host a cache whose origin is lab1's SeaweedFS: (origin host, other hosts).
    The group data points them there: no --data flag."""
    origin_host, *others = hosts(lab_dir)
    return origin_host, others


def _client(lab_dir: Path, address: str):
    import minio
    import urllib3

    secrets = lab_dir / "secrets"
    return minio.Minio(
        f"{address}:{S3_PORT}",
        access_key=(secrets / "origin-access-key").read_text().strip(),
        secret_key=(secrets / "origin-secret-key").read_text().strip(),
        secure=False,
        http_client=urllib3.PoolManager(timeout=10, retries=False),
    )


def test_origin_answers_s3_from_the_controller_with_its_bucket(origin_deployed, lab_dir: Path) -> None:
    host, run = origin_deployed
    client = _client(lab_dir, host.address)
    assert client.bucket_exists("nixcache")
    key = f"probe/{uuid.uuid4().hex}"
    client.put_object("nixcache", key, io.BytesIO(b"hello"), 5)
    assert client.get_object("nixcache", key).read() == b"hello"
    client.remove_object("nixcache", key)
    for name in ("origin-access-key", "origin-secret-key"):
        assert (lab_dir / "secrets" / name).read_text().strip() not in run.output


def test_only_the_origin_host_opens_the_s3_port(origin_deployed, lab_dir: Path) -> None:
    """The lab's group data gives every host origin_allowed_sources; SeaweedFS runs on lab1 only."""
    origin_host, *others = hosts(lab_dir)
    assert f"tcp dport {S3_PORT} accept" in on_host(lab_dir, origin_host.name, "nft list ruleset")
    for other in others:
        assert f"dport {S3_PORT}" not in on_host(lab_dir, other.name, "nft list ruleset"), other.name


def test_origin_deploy_alone_changes_nothing_after_the_main_job(origin_deployed, lab_dir: Path) -> None:
    """deploys/origin.py and the main job's origin part agree (same units, same firewall)."""
    host, _ = origin_deployed
    again = pyinfra(lab_dir, "-y", "--limit", host.name, "inventories/lab.py", "deploys/origin.py")
    assert again.returncode == 0, again.output[-3000:]
    assert again.totals()["changed"] == 0, again.changed_operations()


def test_binds_the_lab_address_only_telemetry_off_sandboxed(origin_deployed, lab_dir: Path) -> None:
    host, _ = origin_deployed
    listening = on_host(lab_dir, host.name, "ss -ltnpH | grep weed")
    addresses = {line.split()[3].rsplit(":", 1)[0] for line in listening.splitlines()}
    # SeaweedFS adds a loopback listener beside every HTTP port bound to a specific address
    # (util.NewIpAndLocalListeners); nothing else, and never a wildcard.
    assert addresses <= {host.address, "127.0.0.1"} and host.address in addresses, listening
    unit = on_host(lab_dir, host.name, "systemctl cat seaweedfs.service")
    assert "-master.telemetry=false" in unit
    identities = on_host(lab_dir, host.name, "stat -c '%a %U' /etc/seaweedfs/s3.json")
    assert identities.split() == ["600", "seaweedfs"]
    score = on_host(lab_dir, host.name, "systemd-analyze security seaweedfs.service | tail -1")
    assert float(score.split("exposure level for seaweedfs.service:")[1].split()[0]) <= 2.0, score


def test_origin_outage_local_hits_served_misses_404_pushes_503(caches_behind_origin, lab_dir: Path) -> None:
    """Stop seaweedfs.service: lab1 still serves what it holds, a path it lacks is 404 within
    3 s, a push to lab2 is 503 and leaves nothing visible; started again, the push succeeds."""
    import time

    import httpx
    from server.helpers import make_entry, push

    from deploy.test_cache_deploy import PORT

    origin_host, others = caches_behind_origin
    pusher_host = others[0] if others else origin_host
    token = (lab_dir / "secrets" / "push-token").read_text().strip()
    auth = ("nix", token)
    reader = httpx.Client(base_url=f"http://{origin_host.address}:{PORT}", timeout=30)
    pusher = httpx.Client(base_url=f"http://{pusher_host.address}:{PORT}", timeout=30)
    held, late = make_entry(), make_entry()
    push(pusher, held, token)
    assert reader.get(f"/{held.hash_part}.narinfo").status_code == 200
    assert reader.get(f"/nar/{held.nar_file}").content == held.file_bytes

    on_host(lab_dir, origin_host.name, "systemctl stop seaweedfs.service")
    try:
        assert reader.get(f"/{held.hash_part}.narinfo").status_code == 200
        assert reader.get(f"/nar/{held.nar_file}").content == held.file_bytes
        start = time.monotonic()
        assert reader.get(f"/{make_entry().hash_part}.narinfo").status_code == 404
        assert time.monotonic() - start < 3
        nar = pusher.put(f"/nar/{late.nar_file}", content=late.file_bytes, auth=auth)
        assert nar.status_code == 503 and "Retry-After" in nar.headers, nar.text
        assert pusher.head(f"/nar/{late.nar_file}").status_code == 404
        info = pusher.put(f"/{late.hash_part}.narinfo", content=late.narinfo(), auth=auth)
        assert info.status_code == 400, info.text  # its NAR was never stored
        assert pusher.head(f"/{late.hash_part}.narinfo").status_code == 404
    finally:
        on_host(lab_dir, origin_host.name, "systemctl start seaweedfs.service")
    deadline = time.monotonic() + 60
    while pusher.put(f"/nar/{late.nar_file}", content=late.file_bytes, auth=auth).status_code != 201:
        assert time.monotonic() < deadline, "the origin took writes again only after 60 s"
        time.sleep(1)  # the gateway takes writes a few seconds after its start
    push(pusher, late, token)
    assert reader.get(f"/{late.hash_part}.narinfo").status_code == 200


def test_the_origin_gc_runs_on_the_designated_host_only(caches_behind_origin, lab_dir: Path) -> None:
    origin_host, others = caches_behind_origin
    on_host(lab_dir, origin_host.name, "systemctl start nixcache-gc-origin.service")
    journal = on_host(lab_dir, origin_host.name, "journalctl -u nixcache-gc-origin.service --no-pager")
    assert "gc --origin: deleted" in journal and "bucket now" in journal, journal[-2000:]
    assert (
        on_host(lab_dir, origin_host.name, "systemctl is-enabled nixcache-gc-origin.timer").strip()
        == "enabled"
    )
    for other in others:
        code, _ = Lab(lab_dir).run(other.name, ["test", "-e", "/etc/systemd/system/nixcache-gc-origin.timer"])
        assert code != 0, f"{other.name} must not collect the origin"

"""`nixcache fleet status` against a real `nixcache serve` on loopback (no lab): what a row says."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import httpx
from server.helpers import nixcache_cmd, start_server, write_key

from nixcache import fleet


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_running_cache_without_node_exporter(tmp_path: Path) -> None:
    key_file, key = write_key(tmp_path)
    server = start_server(
        ["--listen", "127.0.0.1:0", "--store", str(tmp_path / "store"), "--signing-key", str(key_file)],
        home=tmp_path,
        log=tmp_path / "log",
    )
    try:
        with httpx.Client(base_url=server.url) as client:
            for _ in range(4):  # four misses: a hit rate of 0, not "unknown"
                assert client.get("/" + "0" * 32 + ".narinfo").status_code == 404
        port = int(server.url.rsplit(":", 1)[1])
        node_port = closed_port()
        status = fleet.probe(fleet.Endpoint("c1", "127.0.0.1", port, node_port), sample_seconds=0.3)
    finally:
        server.stop()
    assert status.reachable and status.error is None
    assert status.signing_keys == [key.name]
    assert status.hit_rate == 0.0
    assert status.requests_per_second == 0.0  # nothing but the probe itself between the samples
    assert status.store_bytes == 0
    assert status.gc_age_seconds == float("inf")  # gc never ran
    assert status.version is None and status.backup_age_seconds is None
    assert status.node_exporter_error == (
        f"cannot connect to http://127.0.0.1:{node_port}/metrics "
        "(service stopped, host down, or a firewall drops the controller)"
    )
    text = fleet.table([status], colour=False)
    header, line, note = text.splitlines()
    assert header.split()[:3] == ["HOST", "REACHABLE", "VERSION"]
    assert line.split()[:5] == ["c1", "yes", "?", key.name, "0.0%"]
    assert "never" in line and "not set up" in line
    assert note == f"c1: node exporter: {status.node_exporter_error}"


def test_a_host_that_does_not_answer() -> None:
    port = closed_port()
    status = fleet.probe(fleet.Endpoint("gone", "127.0.0.1", port, closed_port()), sample_seconds=0.2)
    assert not status.reachable
    assert status.error == (
        f"cannot connect to http://127.0.0.1:{port}/metrics "
        "(service stopped, host down, or a firewall drops the controller)"
    )
    lines = fleet.table([status], colour=False).splitlines()
    assert lines[1].split()[:3] == ["gone", "no", "-"]
    assert lines[2] == f"gone: does not answer: {status.error}"
    record = json.loads(fleet.as_json([status]))[0]
    assert record["host"] == "gone" and record["reachable"] is False and record["error"] == status.error


def test_a_missing_inventory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.py"
    result = subprocess.run(
        nixcache_cmd("fleet", "status", str(missing)), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert f"{missing}: no such inventory file; give e.g. inventories/prod.py" in result.stderr

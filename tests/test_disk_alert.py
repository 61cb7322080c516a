"""`nixcache disk-alert` as its systemd unit runs it: metrics file, journal line, webhook."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from nixcache.alerts import disk_alert, measure


@pytest.fixture
def receiver():
    """A loopback webhook receiver recording what it is sent; answers with `status`."""
    received: list[dict] = []
    state = {"status": 204}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"type": self.headers["Content-Type"], "body": json.loads(body)})
            self.send_response(state["status"])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook/secret-token-123"
    yield url, received, state
    server.shutdown()
    server.server_close()


def metrics(path):
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(path.read_text())
        for sample in family.samples
    }


def run(*args):
    return CliRunner().invoke(disk_alert, list(args))


def test_under_threshold_writes_metrics_and_exits_0(tmp_path):
    prom = tmp_path / "nixcache_disk.prom"
    result = run("--path", str(tmp_path), "--threshold-percent", "100", "--textfile", str(prom))
    assert result.exit_code == 0, result.output
    values = metrics(prom)
    assert values["nixcache_disk_alert"] == 0
    assert values["nixcache_disk_usage_ratio"] == pytest.approx(measure(str(tmp_path)).ratio, abs=0.01)
    assert values["nixcache_disk_alert_threshold_ratio"] == 1.0
    assert oct(prom.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == ["nixcache_disk.prom"]  # no temp file left


def test_over_threshold_warns_posts_json_and_exits_1(tmp_path, receiver):
    url, received, _ = receiver
    url_file = tmp_path / "webhook"
    url_file.write_text(url + "\n")
    prom = tmp_path / "m.prom"
    result = run(
        "--path",
        str(tmp_path),
        "--threshold-percent",
        "1",
        "--textfile",
        str(prom),
        "--webhook-url-file",
        str(url_file),
    )
    assert result.exit_code == 1, result.output
    assert "is " in result.output and "% full (threshold 1%" in result.output
    assert metrics(prom)["nixcache_disk_alert"] == 1
    assert len(received) == 1
    assert received[0]["type"] == "application/json"
    body = received[0]["body"]
    assert body["path"] == str(tmp_path) and body["threshold_percent"] == 1
    assert "run `nixcache gc`" in body["text"]
    assert "secret-token-123" not in result.output


def test_journal_priority_prefix_only_under_systemd(tmp_path, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    result = run("--path", str(tmp_path), "--threshold-percent", "1")
    assert result.exit_code == 1
    assert result.output.startswith("<4>disk-alert: ")


@pytest.mark.parametrize("status", [500, None])
def test_webhook_failure_exits_4_without_printing_the_url(tmp_path, receiver, status):
    url, _, state = receiver
    if status is None:
        url = "http://127.0.0.1:1/hook/secret-token-123"  # nothing listens on port 1
    else:
        state["status"] = status
    url_file = tmp_path / "webhook"
    url_file.write_text(url)
    result = run(
        "--path",
        str(tmp_path),
        "--threshold-percent",
        "1",
        "--webhook-url-file",
        str(url_file),
        "--timeout",
        "2",
    )
    assert result.exit_code == 4, result.output
    assert "not delivered" in result.output
    assert "secret-token-123" not in result.output and "127.0.0.1" not in result.output


def test_missing_path_and_unwritable_textfile_exit_3(tmp_path):
    result = run("--path", str(tmp_path / "absent"))
    assert result.exit_code == 3
    assert "cannot measure" in result.output and "absent" in result.output
    result = run("--path", str(tmp_path), "--textfile", str(tmp_path / "no-dir" / "m.prom"))
    assert result.exit_code == 3
    assert "cannot write" in result.output


def test_wired_into_the_nixcache_command():
    from nixcache.cli import main

    result = CliRunner().invoke(main, ["disk-alert", "--help"])
    assert result.exit_code == 0
    assert "--webhook-url-file" in result.output

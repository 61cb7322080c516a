"""The health check's probe against loopback servers: what it accepts and how it reports a failure."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest

from operations import health


def serve(status: int, body: bytes, token: str | None = None) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if token and self.headers.get("Authorization") != f"Bearer {token}":
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/nix-cache-info"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def healthy() -> Iterator[str]:
    yield from serve(200, b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n")


@pytest.fixture
def broken() -> Iterator[str]:
    yield from serve(500, b"oops")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_cache_answering_nix_cache_info_is_healthy(healthy: str) -> None:
    assert health.probe(healthy, timeout=5) is None


def test_a_private_cache_is_asked_with_its_read_token() -> None:
    for url in serve(200, b"StoreDir: /nix/store\n", token="r34d"):
        assert health.probe(url, timeout=5, read_token="r34d") is None
        assert health.probe(url, timeout=1) == "answers HTTP 401"


class FakeClock:
    """Stands in for the probe's `time`: pauses advance it instead of taking wall-clock time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(health, "time", fake)
    return fake


def test_a_server_error_is_retried_within_the_timeout_and_reported_with_its_status(
    broken: str, clock: FakeClock
) -> None:
    assert health.probe(broken, timeout=2) == "answers HTTP 500"
    assert clock.pauses, "a failing answer is asked again"
    assert clock.now <= 2  # the retries end within the timeout


def test_nothing_listening_is_reported_within_the_timeout(clock: FakeClock) -> None:
    problem = health.probe(f"http://127.0.0.1:{free_port()}/nix-cache-info", timeout=2)
    assert problem is not None and problem.startswith("does not answer (ConnectError")
    assert clock.pauses and clock.now <= 2


def run_operation(url: str, timeout: int) -> tuple[list, object]:
    """Run health.cache_info's generator as pyinfra does while executing; (commands, host)."""
    from pyinfra.context import ctx_host, ctx_state
    from pyinfra_testing.util import FakeState, create_host

    state = FakeState()
    state.is_executing = True
    host = create_host(state, facts={})
    host.name = "cache-eu-central"
    with ctx_state.use(state), ctx_host.use(host):
        return list(health.cache_info._inner(url, timeout=timeout)), host


def test_the_failed_step_names_the_host_the_url_and_where_to_look() -> None:
    url = f"http://127.0.0.1:{free_port()}/nix-cache-info"
    commands, _ = run_operation(url, timeout=1)
    assert len(commands) == 1
    (message,) = commands[0].args
    assert message.startswith("cache-eu-central: nixcache does not answer (ConnectError")
    assert f"at {url} after 1 s; look at `journalctl -u nixcache`" in message
    assert "\n" not in message
    assert commands[0].function(None, type("H", (), {"print_prefix": ""})(), message) is False


def test_a_healthy_cache_is_no_change(healthy: str) -> None:
    commands, host = run_operation(healthy, timeout=5)
    assert commands == []
    assert host.noop_description == f"{healthy} answers"

"""`workers`: several processes answer on one port, a dead one is replaced, SIGTERM drains them,
/metrics counts every worker's requests, a bad value is a one-line error."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.conftest import Cache, StartCache
from server.helpers import make_entry
from server.test_cli import serve_fails


def answering_pid(cache: Cache) -> int:
    """The pid of the worker that answered /healthz on a fresh connection."""
    response = httpx.get(cache.url + "/healthz", headers={"Connection": "close"}, timeout=10)
    assert response.status_code == 200
    return int(response.headers["x-nixcache-pid"])


def pids_answering(cache: Cache, want: int, within: float = 60) -> set[int]:
    """The workers seen answering, until `want` of them were (the server announces itself when
    the first is ready; on a loaded machine the others may take some seconds more)."""
    seen: set[int] = set()
    deadline = time.monotonic() + within
    while len(seen) < want and time.monotonic() < deadline:
        seen.add(answering_pid(cache))
    return seen


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))


def metric(text: str, sample: str) -> float:
    """The value of one sample line of a /metrics answer, e.g. 'nixcache_workers'."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in /metrics")


def test_workers_answer_on_one_port(start_cache: StartCache) -> None:
    cache = start_cache("--workers", "3")
    pids = pids_answering(cache, 3)
    assert len(pids) == 3, f"only {pids} answered"
    server = cache.server.proc.pid
    assert server not in pids
    assert {parent_of(pid) for pid in pids} == {server}
    assert cache.client.get("/nix-cache-info").status_code == 200


def test_a_killed_worker_is_replaced_and_the_port_keeps_answering(start_cache: StartCache) -> None:
    cache = start_cache("--workers", "2")
    first = pids_answering(cache, 2)
    assert len(first) == 2
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    seen: set[int] = set()
    while time.monotonic() < deadline:
        seen.add(answering_pid(cache))  # never refused meanwhile: the other worker answers
        if seen - first:
            break
    new = seen - first
    assert new, f"no replacement for {victim} answered (saw {seen})"
    assert victim not in seen
    assert parent_of(new.pop()) == cache.server.proc.pid
    text = cache.client.get("/metrics").text
    assert metric(text, "nixcache_worker_restarts_total") == 1
    assert metric(text, "nixcache_workers") == 2
    assert any(f"(pid {victim}) was killed by SIGKILL" in line for line in cache.server.log_lines())


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_lets_a_slow_download_finish_then_exits_0(start_cache: StartCache, workers: str) -> None:
    cache = start_cache("--workers", workers)
    entry = make_entry(os.urandom(16 << 20), compression="none")  # incompressible: 16 MiB on the wire
    for path, body in ((f"/nar/{entry.nar_file}", entry.file_bytes), (f"/{entry.hash_part}.narinfo", None)):
        assert cache.client.put(path, content=body or entry.narinfo(), auth=cache.auth).status_code == 201
    idle = httpx.Client(base_url=cache.url)
    assert idle.get("/nix-cache-info").status_code == 200  # a kept-alive connection, idle from here on
    digest = hashlib.sha256()
    received = 0
    with httpx.stream("GET", f"{cache.url}/nar/{entry.nar_file}", timeout=30) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes(128 * 1024):
            if received == 0:
                cache.server.proc.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                with pytest.raises(httpx.ConnectError):  # no longer accepting
                    httpx.get(cache.url + "/nix-cache-info", timeout=5)
            digest.update(chunk)
            received += len(chunk)
            time.sleep(0.01)  # a slow client: about 2 s for the whole NAR
    assert received == len(entry.file_bytes)
    assert digest.digest() == hashlib.sha256(entry.file_bytes).digest()
    assert cache.server.proc.wait(30) == 0
    with pytest.raises(httpx.TransportError):  # the idle connection was closed, not kept open
        idle.get("/nix-cache-info")
    idle.close()


def scrape(cache: Cache, timeout: float = 10) -> str:
    """A /metrics answer on a fresh connection (so either worker may answer it)."""
    response = httpx.get(cache.url + "/metrics", headers={"Connection": "close"}, timeout=timeout)
    assert response.status_code == 200
    return response.text


def test_a_scrape_right_after_requests_counts_every_workers_requests(start_cache: StartCache) -> None:
    # No wait between the last request and the scrape: each round ends with requests answered
    # by both workers, so whichever answers the scrape, the other's newest requests must be in
    # it (when the other workers copied their counts only once a second, every round failed).
    cache = start_cache("--workers", "2")
    entry = make_entry()
    served = misses = 0
    deadline = time.monotonic() + 60  # the second worker may take some seconds to start
    for _ in range(6):
        pids: set[int] = set()
        while len(pids) < 2 or len(pids) + served % 7 < 5:  # a varying count of requests a round
            assert time.monotonic() < deadline, f"only {pids} answered"
            pids.add(answering_pid(cache))
            served += 1
        for _ in range(3):  # narinfo misses, counted on the hot path
            url = f"{cache.url}/{entry.hash_part}.narinfo"
            assert httpx.get(url, headers={"Connection": "close"}).status_code == 404
            misses += 1
        text = scrape(cache)
        assert (
            metric(text, 'nixcache_http_requests_total{method="GET",route="healthz",status="200"}') == served
        )
        assert metric(text, 'nixcache_http_request_duration_seconds_count{route="healthz"}') == served
        assert metric(text, 'nixcache_narinfo_lookups_total{result="miss"}') == misses
        local_misses = 'nixcache_tier_lookups_total{kind="narinfo",result="miss",tier="local"}'
        assert metric(text, local_misses) == misses
        assert metric(text, "nixcache_workers") == 2
        assert metric(text, "nixcache_scrape_flush_timeouts_total") == 0


def test_a_stopped_worker_delays_a_scrape_only_briefly(start_cache: StartCache) -> None:
    cache = start_cache("--workers", "2")
    pids = pids_answering(cache, 2)
    assert len(pids) == 2
    stopped = min(pids)
    os.kill(stopped, signal.SIGSTOP)  # as busy as a worker can be: it handles nothing
    try:
        # A connection the kernel gives the stopped worker is never answered: try from other
        # ports (the kernel picks the worker by the client's port) until the running one answers.
        for _ in range(20):
            try:
                text = scrape(cache, timeout=3)
                break
            except httpx.TimeoutException:
                continue
        else:
            raise AssertionError("no scrape was answered within 3 s")
        assert metric(text, "nixcache_scrape_flush_timeouts_total") == 1
        assert metric(text, "nixcache_workers") == 2
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert metric(scrape(cache), "nixcache_scrape_flush_timeouts_total") == 1  # the other copies again


def test_scrapes_do_not_disturb_uploads_and_downloads_in_flight(start_cache: StartCache) -> None:
    # Every scrape signals every worker; the signal may land in any thread, a thread pool's
    # included (an upload's decompression and hashing run there), mid system call.
    cache = start_cache("--workers", "2")
    assert len(pids_answering(cache, 2)) == 2
    big = make_entry(os.urandom(8 << 20), compression="none")
    response = cache.client.put(f"/nar/{big.nar_file}", content=big.file_bytes, auth=cache.auth)
    assert response.status_code == 201
    scrapes = 0
    stop = threading.Event()

    def scrape_until_stopped() -> None:
        nonlocal scrapes
        while not stop.is_set():
            scrape(cache)
            scrapes += 1

    scraper = concurrent.futures.ThreadPoolExecutor(2)
    running = [scraper.submit(scrape_until_stopped) for _ in range(2)]
    try:
        for _ in range(3):
            uploaded = make_entry(os.urandom(4 << 20), compression="xz")  # decompressed while received
            response = httpx.put(
                f"{cache.url}/nar/{uploaded.nar_file}",
                content=slowly(uploaded.file_bytes),
                auth=cache.auth,
                timeout=30,
            )
            assert response.status_code == 201, response.text
            digest = hashlib.sha256()
            with httpx.stream("GET", f"{cache.url}/nar/{big.nar_file}", timeout=30) as response:
                assert response.status_code == 200
                for chunk in response.iter_bytes(256 * 1024):
                    digest.update(chunk)
                    time.sleep(0.005)  # a slow client: the sendfile of the NAR waits on the socket
            assert digest.digest() == hashlib.sha256(big.file_bytes).digest()
            fetched = cache.client.get(f"/nar/{uploaded.nar_file}")
            assert fetched.content == uploaded.file_bytes
    finally:
        stop.set()
        for future in running:
            future.result()
        scraper.shutdown()
    assert scrapes >= 20, f"only {scrapes} scrapes ran beside the transfers"
    text = scrape(cache)
    assert metric(text, 'nixcache_uploads_total{kind="nar",result="accepted"}') == 4


def slowly(data: bytes, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """A request body sent in pieces with pauses, so the upload is in flight for a while."""
    for start in range(0, len(data), chunk):
        yield data[start : start + chunk]
        time.sleep(0.002)


@pytest.mark.parametrize(
    ("value", "shown"), [("-1", "-1"), ('"many"', "'many'"), ("1000", "1000"), ("2.5", "2.5")]
)
def test_a_bad_workers_value_is_a_one_line_error(tmp_path: Path, value: str, shown: str) -> None:
    (tmp_path / "config.toml").write_text(f'listen = "127.0.0.1:0"\nworkers = {value}\n')
    out = serve_fails(["--config", str(tmp_path / "config.toml")], tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"Error: config {tmp_path / 'config.toml'}: 'workers' is {shown}; give a whole number from 0 to 256"
    ]


def test_a_worker_that_cannot_start_stops_the_server_with_its_error(tmp_path: Path) -> None:
    """A bad key is found by the workers (they load it): the one-line error, once, exit 1."""
    (tmp_path / "bad.secret").write_text("not a key")
    out = serve_fails(
        ["--listen", "127.0.0.1:0", "--store", str(tmp_path / "s"),
         "--signing-key", str(tmp_path / "bad.secret"), "--workers", "2"],
        tmp_path,
    )  # fmt: skip
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "signing key" in errors[0] and "malformed" in errors[0], out.stderr

#!/usr/bin/env python3
"""What the metrics cost per request, one process vs several workers (shared metric files).

    python bench/metrics_cost.py [--requests 1000000] [--scrapes 300 [--baseline CHECKOUT]]

Times what the server does per narinfo hit (nixcache.server.http.Server._record and
App.narinfo): one requests counter, one duration histogram, one served-bytes counter and one
narinfo-lookup counter, with the children looked up once as the server does. With workers the
hot path is the same and each worker copies its values into its mmap'ed file of the shared
directory once a second and whenever another worker answers a scrape (`Metrics.flush`): timed
here too, with 200 series. For comparison, the
design not taken: writing each value into the file as it changes (what prometheus_client's
multiprocess mode does, plus a lock), and prometheus_client's own multiprocess Counter.inc.

--scrapes N then starts `nixcache serve --workers 2` (and, with --baseline, the same server of
another checkout beside it) and, N times per server, interleaved: a few requests on fresh
connections (so both workers answer some), then at once one scrape on a fresh connection. It
prints the scrape's latency (median, 95th percentile: a scrape waits for the other worker's
copy) and how many scrapes counted fewer requests than had been answered (stale).
Prints microseconds; asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from nixcache.server.metrics import Metrics
from nixcache.server.store import Store


def per_request(metrics: Metrics, requests: int, file: MmapedDict | None = None) -> float:
    """Seconds per request of the hot path's metric updates (`file`: each value also written)."""
    counted = metrics.requests.labels("narinfo", "GET", "200")
    duration = metrics.duration.labels("narinfo")
    served = metrics.served_bytes.labels("narinfo")
    hit = metrics.narinfo.labels("hit")
    if file is None:
        start = time.perf_counter()
        for _ in range(requests):
            hit.inc()
            counted.inc()
            duration.observe(0.0002)
            served.inc(612)
        return (time.perf_counter() - start) / requests
    write = file.write_value
    start = time.perf_counter()
    for _ in range(requests):
        hit.inc()
        write("a", hit.value, 0.0)
        counted.inc()
        write("b", counted.value, 0.0)
        duration.observe(0.0002)
        write("c", duration.counts[0], 0.0)
        write("d", duration.sum, 0.0)
        served.inc(612)
        write("e", served.value, 0.0)
    return (time.perf_counter() - start) / requests


def flush_cost(metrics: Metrics, rounds: int) -> float:
    """Seconds per Metrics.flush() with about 200 series (routes x methods x statuses)."""
    for route in ("narinfo", "nar", "nix-cache-info", "healthz", "metrics", "other"):
        for status in ("200", "404", "401", "400", "500"):
            for method in ("GET", "HEAD", "PUT"):
                metrics.requests.labels(route, method, status).inc()
        metrics.duration.labels(route).observe(0.001)
        metrics.served_bytes.labels(route).inc(1)
    start = time.perf_counter()
    for _ in range(rounds):
        metrics.flush()
    return (time.perf_counter() - start) / rounds


PROMETHEUS_MULTIPROCESS = """
import sys, time
from prometheus_client import Counter
c = Counter("x", "x", ["route"]).labels("narinfo")
n = int(sys.argv[1])
start = time.perf_counter()
for _ in range(n):
    c.inc()
print((time.perf_counter() - start) / n)
"""


def start_server(checkout: Path, work: Path) -> tuple[subprocess.Popen, str]:
    """`nixcache serve --workers 2` of `checkout` on an empty store; its base URL."""
    from serve import free_port, wait_port

    from nixcache.keys import SecretKey

    work.mkdir()
    (work / "key").write_text(SecretKey.generate("bench-1").serialize())
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from nixcache.cli import main; main()", "serve",
         "--listen", f"127.0.0.1:{port}", "--store", str(work / "store"),
         "--signing-key", str(work / "key"), "--workers", "2"],
        cwd=checkout,
        env={**os.environ, "PYTHONPATH": str(checkout)},
        stdout=subprocess.DEVNULL,
        stderr=open(work / "server.log", "wb"),  # noqa: SIM115
    )  # fmt: skip
    wait_port(port)
    return proc, f"http://127.0.0.1:{port}"


HEALTHZ = ("nixcache_http_requests_total", {"route": "healthz", "method": "GET", "status": "200"})
TIMEOUTS = ("nixcache_scrape_flush_timeouts_total", {})


def get(base: str, path: str) -> bytes:
    """GET on a fresh connection (http.client: no client set-up to time along)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise SystemExit(f"{path}: {response.status}")
        return body
    finally:
        conn.close()


def scrape_round(base: str, answered: int) -> tuple[int, float, bool]:
    """A few /healthz requests, then one scrape at once: (answered now, its seconds, stale)."""
    for _ in range(4):
        get(base, "/healthz")
        answered += 1
    start = time.perf_counter()
    text = get(base, "/metrics")
    seconds = time.perf_counter() - start
    return answered, seconds, (counted(text, HEALTHZ) or 0) < answered


def counted(text: bytes | str, wanted: tuple[str, dict[str, str]]) -> float | None:
    """The value of one sample of a /metrics answer; None when it has none."""
    name, labels = wanted
    text = text.decode() if isinstance(text, bytes) else text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def scrapes(count: int, baseline: Path | None) -> None:
    checkouts = {"this checkout": Path(__file__).resolve().parents[1]}
    if baseline is not None:
        checkouts["baseline"] = baseline.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        try:
            for i, (name, checkout) in enumerate(checkouts.items()):
                servers[name] = start_server(checkout, Path(tmp) / f"server{i}")
            answered = dict.fromkeys(servers, 0)
            for name, (_, base) in servers.items():  # warm-up: both workers answering
                for _ in range(50):
                    answered[name], _, _ = scrape_round(base, answered[name])
            times: dict[str, list[float]] = {name: [] for name in servers}
            stale = dict.fromkeys(servers, 0)
            for _ in range(count):  # interleaved, so other load on the machine hits both alike
                for name, (_, base) in servers.items():
                    answered[name], seconds, late = scrape_round(base, answered[name])
                    times[name].append(seconds)
                    stale[name] += late
            timeouts = {name: counted(get(base, "/metrics"), TIMEOUTS) for name, (_, base) in servers.items()}
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _ in servers.values():
                proc.wait(70)
    print(f"a scrape right after requests, 2 workers, {count} scrapes per server, interleaved:")
    for name in servers:
        ms = sorted(t * 1000 for t in times[name])
        p95 = ms[int(len(ms) * 0.95)]
        print(
            f"  {name:14} median {statistics.median(ms):.2f} ms, p95 {p95:.2f} ms; "
            f"stale (fewer requests counted than answered): {stale[name]} of {count}; "
            f"nixcache_scrape_flush_timeouts_total {timeouts[name]}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scrapes", type=int, default=0, help="then time this many scrapes per server")
    parser.add_argument("--baseline", type=Path, help="a checkout whose server is timed beside this one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        shared = Path(tmp) / "metrics"
        shared.mkdir()
        alone, workers = Metrics(store), Metrics(store, shared)
        file = MmapedDict(str(shared / "bench.db"))
        one, through = [], []
        for _ in range(args.rounds):  # alternating, so other load on the machine hits both alike
            one.append(per_request(alone, args.requests))
            through.append(per_request(alone, args.requests, file))
        flush = flush_cost(workers, 200)
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared)}
        theirs = min(
            float(
                subprocess.run(
                    [sys.executable, "-c", PROMETHEUS_MULTIPROCESS, str(args.requests)],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            for _ in range(args.rounds)
        )
    print(f"metric updates per narinfo hit (4 series, 5 values), best of {args.rounds} x {args.requests}:")
    print(f"  in memory (one process, and each worker):     {min(one) * 1e6:.3f} us")
    print(f"  each value also written to the mmap file:     {min(through) * 1e6:.3f} us (not taken)")
    print(f"  prometheus_client multiprocess Counter.inc:   {theirs * 1e6:.3f} us per call (not taken)")
    print(
        f"a worker's copy into the shared file (flush), 200 series: {flush * 1e6:.0f} us, "
        "once a second and once per scrape"
    )
    if args.scrapes:
        scrapes(args.scrapes, args.baseline)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (a shared machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

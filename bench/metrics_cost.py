#!/usr/bin/env python3
"""What the metrics cost per request, one process vs several workers (shared metric files).

    python bench/metrics_cost.py [--requests 1000000]

Times what the server does per narinfo hit (nixcache.server.http.Server._record and
App.narinfo): one requests counter, one duration histogram, one served-bytes counter and one
narinfo-lookup counter, with the children looked up once as the server does. With workers the
hot path is the same and each worker copies its values into its mmap'ed file of the shared
directory once a second (`Metrics.flush`): timed here too, with 200 series. For comparison, the
design not taken: writing each value into the file as it changes (what prometheus_client's
multiprocess mode does, plus a lock), and prometheus_client's own multiprocess Counter.inc.
Prints microseconds; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
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
    print(f"a worker's copy into the shared file (flush), 200 series: {flush * 1e6:.0f} us, once a second")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (a shared machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

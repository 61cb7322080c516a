"""`bench/serve.py --front`: the deploy's nginx front against nginx alone on the same files.

Both are Debian's nginx with 2 workers, TLS (the same self-signed P-256 certificate), sendfile and
an access log on: nginx alone its default one (combined format, one write per request), the front
its hits log (buffered, as the deploy renders it). "nginx alone" serves `signed/<hash>.narinfo`
and `nar/` with two aliases and decides nothing; "front" is the site the deploy renders
(operations/nginx.py: the map of readers, files opened from `signed/` and `nar/` with
`open_file_cache`, its hits log) and its main-context file (`worker_rlimit_nofile`, room for
that cache) before a `nixcache serve` that reads that log. `signed/` holds what the server
answers for each narinfo. Measured, alternating the two round by round:
- narinfo hits, one keep-alive connection (curl, as Nix uses libcurl): median time per round;
- narinfo hits, requests/s with wrk on 16 and 64 connections, rotating over every narinfo;
- absent narinfos (404): nginx alone answers them, the front hands them to the server (and the
  server's own answer, direct, for reference);
- NAR throughput with wrk on 1 and 16 connections.
Prints the load average with each round (the machine may be shared).
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # operations/ renders the site; tests/support runs it
import reference_nginx  # noqa: E402
from support.front import hits_log_for, self_signed, start_front  # noqa: E402

# wrk: each request the next narinfo of the list, round robin (per connection thread).
ROTATE = """
local paths = {{ {paths} }}
local i = 0
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
"""


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 1)[0]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by `pids` (and their waited-for children)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def workers(master: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]


def wrk_rps(url: str, connections: int, seconds: int, script: Path, nice: list[str]) -> tuple[float, int]:
    out = subprocess.run(
        [*nice, "wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"wrk got {errors.group(1)} error answers from {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    if not requests:
        raise SystemExit(f"wrk made no request to {url}:\n{out}")
    return rps, requests


def run(args, serve) -> int:  # type: ignore[no-untyped-def]
    """`serve`: bench/serve.py as a module (its store builder, curl and wrk helpers)."""
    import tempfile

    from nixcache.keys import SecretKey
    from nixcache.server import base32

    work = Path(tempfile.mkdtemp(prefix="nixcache-bench-front-"))
    procs: list[subprocess.Popen] = []
    front = None
    try:
        store = work / "store"
        hashes, big = serve.build_store(store, args.paths, args.nar_mib)
        key = SecretKey.generate("bench-1")
        (work / "key").write_text(key.serialize())
        hits = hits_log_for(work)
        (work / "config.toml").write_text(f'front_hits_log = "{hits}"\n')
        port = serve.free_port()
        ours = subprocess.Popen(
            [*serve.NICE, sys.executable, "-c", "from nixcache.cli import main; main()", "serve",
             "--config", str(work / "config.toml"), "--listen", f"127.0.0.1:{port}", "--store", str(store),
             "--signing-key", str(work / "key"), "--log-level", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=open(work / "server.log", "wb"),  # noqa: SIM115
        )  # fmt: skip
        procs.append(ours)
        serve.wait_port(port)
        direct = f"http://127.0.0.1:{port}"
        (store / "signed").mkdir(exist_ok=True)  # the server makes it for its own signed narinfos
        with httpx.Client(base_url=direct) as client:
            for h in hashes:  # the store was written directly: its signed texts are what the server answers
                body = client.get(f"/{h}.narinfo").raise_for_status().content
                (store / "signed" / f"{h}.narinfo").write_bytes(body)

        front = start_front(work / "front", port, store, hits, workers=2, nice=serve.NICE)
        alone_dir = work / "alone"
        alone_dir.mkdir()
        cert, key_file = self_signed(alone_dir)
        alone_port = serve.free_port()
        locations = [
            reference_nginx.NARINFO.format(dir=store / "signed"),
            reference_nginx.NARS.format(store=store),
        ]
        conf = reference_nginx.conf(alone_dir, alone_port, locations, tls=(cert, key_file))
        procs.append(reference_nginx.start(alone_dir, conf, serve.NICE))
        serve.wait_port(alone_port)
        bases = {"nginx alone": f"https://127.0.0.1:{alone_port}", "front": front.url}
        # curl checks each server's certificate against its own file.
        cas = {"nginx alone": str(cert), "front": str(front.cert)}
        script = work / "rotate.lua"
        script.write_text(ROTATE.format(paths=", ".join(f'"/{h}.narinfo"' for h in hashes)))

        results: dict[str, dict[str, list[float]]] = {name: {} for name in bases}

        def add(name: str, what: str, value: float) -> None:
            results[name].setdefault(what, []).append(value)

        absent = [base32.encode(os.urandom(20)) for _ in hashes]
        for round_ in range(args.rounds):
            for name, base in bases.items():
                os.environ["CURL_CA_BUNDLE"] = cas[name]
                add(name, "narinfo 1 conn (ms)", serve.curl_round(base, hashes, work) * 1000)
                add(name, "404s 1 conn (ms)", serve.curl_round(base, absent, work, absent=True) * 1000)
            print(f"round {round_ + 1}/{args.rounds}: load average {loadavg()}", file=sys.stderr)
        os.environ["CURL_CA_BUNDLE"] = str(front.cert)
        direct_misses = statistics.median(
            serve.curl_round(direct, absent, work, absent=True) * 1000 for _ in range(3)
        )
        # CPU per hit: what serving costs, less disturbed by other load than requests/s. The
        # front's includes the server's (its parent and every worker: the first reads nginx's
        # hits log meanwhile).
        cpu_of = {
            "nginx alone": lambda: workers(procs[1].pid),
            "front": lambda: [*workers(front.proc.pid), ours.pid, *workers(ours.pid)],
        }
        for connections in (16, 64):
            for _ in range(3):
                for name, base in bases.items():
                    pids = cpu_of[name]()
                    before = cpu_seconds(pids)
                    rps, requests = wrk_rps(base, connections, args.seconds, script, serve.NICE)
                    time.sleep(1.5)  # the server reads the last second of nginx's log
                    add(name, f"narinfo {connections} conns (req/s)", rps)
                    add(
                        name,
                        f"CPU per hit {connections} conns (us)",
                        (cpu_seconds(pids) - before) / requests * 1e6,
                    )
                print(f"wrk {connections} conns: load average {loadavg()}", file=sys.stderr)
        if not args.narinfo_only:
            for connections in (1, 16):
                for name, base in bases.items():
                    add(
                        name,
                        f"NAR {connections} conn (MiB/s)",
                        serve.wrk(f"{base}/nar/{big}", connections, args.seconds),
                    )
        time.sleep(2.5)  # nginx flushes its hits log and the server reads it, every second
        metrics = httpx.get(f"{direct}/metrics").text
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("nixcache_front_requests_total{")
        )
        rss = serve.peak_rss_mib(ours.pid)
    finally:
        if front is not None:
            front.stop()
        serve.stop(procs)
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"{len(hashes)} signed narinfos, NAR of {args.nar_mib} MiB; TLS everywhere; "
        f"load average now {loadavg()}"
    )
    print(f"{'':30}{'nginx alone':>14}{'front':>14}{'front/alone':>13}")
    for what in results["front"]:
        a, b = statistics.median(results["nginx alone"][what]), statistics.median(results["front"][what])
        # Times and CPU: alone/front, so above 1 means the front is cheaper; rates: front/alone.
        ratio = a / b if "(ms)" in what or "(us)" in what else b / a
        print(f"{what:30}{a:>14.1f}{b:>14.1f}{ratio:>12.2f}x")
    print(f"404s through the server directly (plain HTTP, 1 conn): {direct_misses:.1f} ms per round")
    print(f"hits the server counted from nginx's log (nixcache_front_requests_total): {counted:.0f}")
    print(f"server peak RSS: {rss:.1f} MiB")
    print("ratio: front relative to nginx alone, higher is better for the front (target >= 0.95x for hits)")
    return 0

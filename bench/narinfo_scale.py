#!/usr/bin/env python3
"""Narinfo hits over a large store: `nixcache serve` against nginx serving the same signed files.

    python bench/narinfo_scale.py [--entries 100000] [--connections 16] [--seconds 10] [--rounds 3]
                                  [--in-process-only]

Writes `--entries` narinfos in the store's own layout (narinfo/<hash>.narinfo, and the signed
text the server answers with in signed/<hash>.narinfo with signed/KEYS, see
nixcache/server/store.py), then:
- in process: CPU microseconds per hit of `App.narinfo` (the route's whole work, no HTTP), one pass
  rotating over every entry, twice (the first pass is the first read of each entry after a
  start, the second what a long-running server pays);
- over HTTP: requests/s of wrk at `--connections` connections, each request the next entry
  (a Lua script rotates over all of them), against nixcache and nginx (2 workers, access log on,
  sendfile, serving signed/ with try_files-like aliasing), rounds alternating between the two;
  plus the server's CPU time per hit (from /proc) and the load average of each round.
nginx serves the signed files as they are. NARs are not needed for narinfo hits and are not
written. Prints a table; writes nothing outside the temp dir.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import reference_nginx
from serve import free_port, stop, wait_port
from serve_front import cpu_seconds, wrk_rps
from serve_front import workers as children

from nixcache.keys import SecretKey
from nixcache.server import base32, narinfo

WRK_SCRIPT = """
local paths = {}
for line in io.lines("%s") do paths[#paths + 1] = "/" .. line .. ".narinfo" end
local i = 0
function init(args) i = math.random(#paths) end
request = function()
  i = i %% #paths + 1
  return wrk.format("GET", paths[i])
end
"""

NICE = ["nice", "-n", "-10"] if os.geteuid() == 0 else []


def build_store(root: Path, entries: int, key: SecretKey) -> list[str]:
    """`entries` narinfos (each referring to up to five before it) and their signed texts."""
    for d in ("narinfo", "nar", "nar-meta", "tmp", "signed"):
        (root / d).mkdir(parents=True)
    hashes, refs = [], []
    for i in range(entries):
        h = base32.encode(os.urandom(20))
        base = f"{h}-bench-path-{i}"
        file_hash = base32.encode(os.urandom(32))
        text = (
            f"StorePath: /nix/store/{base}\nURL: nar/{file_hash}.nar.xz\nCompression: xz\n"
            f"FileHash: sha256:{file_hash}\nFileSize: {1000 + i}\n"
            f"NarHash: sha256:{base32.encode(os.urandom(32))}\nNarSize: {4000 + i}\n"
            f"References: {' '.join(refs[-5:])}\n"
            f"Deriver: {base32.encode(os.urandom(20))}-bench-path-{i}.drv\n"
        )
        info = narinfo.parse(text)
        (root / "narinfo" / f"{h}.narinfo").write_text(info.render())
        (root / "signed" / f"{h}.narinfo").write_text(info.signed([key], "/nix/store"))
        refs.append(base)
        hashes.append(h)
    (root / "signed" / "KEYS").write_text(f"{key.public()}\n")
    return hashes


def in_process(store_root: Path, key: SecretKey, hashes: list[str]) -> list[float]:
    """CPU microseconds per hit of App.narinfo, per pass over every entry (a fresh App: a
    start). CPU time, not wall time: on a shared machine the wall clock counts other work."""
    from nixcache.server.app import App
    from nixcache.server.auth import Tokens
    from nixcache.server.config import ServerConfig
    from nixcache.server.metrics import Metrics
    from nixcache.server.store import Store

    try:
        store = Store(store_root, keys=[key])  # type: ignore[call-arg]
    except TypeError:  # before signed narinfos on disk
        store = Store(store_root)
    app = App(ServerConfig(), store, [key], Tokens.load(None, None), Metrics(store))
    passes = []
    for _ in range(2):
        start = time.process_time()
        for h in hashes:
            response = app.narinfo(h, None)
            assert response.status == 200, response
        passes.append((time.process_time() - start) / len(hashes) * 1e6)
    return passes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-process-only", action="store_true", help="skip the HTTP rounds")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nixcache-scale-"))
    procs: list[subprocess.Popen] = []
    try:
        store = work / "store"
        key = SecretKey.generate("bench-1")
        (work / "key").write_text(key.serialize())
        started = time.perf_counter()
        hashes = build_store(store, args.entries, key)
        print(f"{args.entries} entries written in {time.perf_counter() - started:.1f} s")
        passes = in_process(store, key, hashes)
        print(
            f"in process, App.narinfo CPU per hit: first pass {passes[0]:.1f} us, second {passes[1]:.1f} us"
        )
        if args.in_process_only:
            return 0
        (work / "hashes").write_text("".join(f"{h}\n" for h in hashes))
        script = work / "rotate.lua"
        script.write_text(WRK_SCRIPT % (work / "hashes"))

        ours_port, nginx_port = free_port(), free_port()
        ours = subprocess.Popen(
            [*NICE, sys.executable, "-c", "from nixcache.cli import main; main()", "serve",
             "--listen", f"127.0.0.1:{ours_port}", "--store", str(store),
             "--signing-key", str(work / "key"), "--log-level", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=open(work / "server.log", "wb"),  # noqa: SIM115
        )  # fmt: skip
        procs.append(ours)
        conf = reference_nginx.conf(
            work / "nginx",
            nginx_port,
            [reference_nginx.NARINFO.format(dir=store / "signed")],
            extra="open_file_cache off;",  # each hit opens its file, as the server does
        )
        nginx = reference_nginx.start(work / "nginx", conf, NICE)
        procs.append(nginx)
        wait_port(ours_port, timeout=30)  # a large store: the server starts slower than nginx
        wait_port(nginx_port, timeout=30)
        pids = {"nginx": [nginx.pid, *children(nginx.pid)], "nixcache": [ours.pid, *children(ours.pid)]}
        bases = {"nginx": f"http://127.0.0.1:{nginx_port}", "nixcache": f"http://127.0.0.1:{ours_port}"}
        rates: dict[str, list[float]] = {name: [] for name in bases}
        cpu: dict[str, list[float]] = {name: [] for name in bases}
        for number in range(1, args.rounds + 1):
            for name, base in bases.items():
                before = cpu_seconds(pids[name])
                rate, count = wrk_rps(base, args.connections, args.seconds, script, NICE)
                cpu[name].append((cpu_seconds(pids[name]) - before) / count * 1e6)
                rates[name].append(rate)
                load = " ".join(f"{x:.2f}" for x in os.getloadavg())
                per_hit = cpu[name][-1]
                print(f"round {number} {name:>8}: {rate:9.0f} req/s, {per_hit:5.0f} us CPU/hit, load {load}")
    finally:
        stop(procs)
        shutil.rmtree(work, ignore_errors=True)
    ng, us = statistics.median(rates["nginx"]), statistics.median(rates["nixcache"])
    print(f"\n{args.entries} entries, hits rotating over all of them, {args.connections} connections (wrk)")
    print(f"{'':28}{'nginx':>12}{'nixcache':>12}{'ratio':>8}")
    print(f"{'requests/s (median)':28}{ng:12.0f}{us:12.0f}{us / ng:7.2f}x")
    ng_cpu, us_cpu = statistics.median(cpu["nginx"]), statistics.median(cpu["nixcache"])
    print(f"{'CPU us per hit (median)':28}{ng_cpu:12.0f}{us_cpu:12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark `nixcache serve` against nginx serving the same store from disk.

    python bench/serve.py [--paths 300] [--nar-mib 64] [--seconds 5] [--rounds 15] [--narinfo-only]
                          [--local-store] [--front]

Builds a synthetic store (narinfos + NARs) in a temp dir, starts this server and nginx
(Debian's nginx-light, temp config, loopback only) on it, then measures:
- narinfo: time to fetch every narinfo over ONE keep-alive connection with curl (libcurl, as
  Nix uses), median of several rounds after a warm-up, plus the first (cold) round, plus as many
  absent narinfos (404 each: Nix clients ask for many);
- NAR throughput with wrk on 1 and 16 connections;
- peak RSS (VmHWM) of the server process.
nginx serves the stored narinfo files as they are; this server signs each one on the fly (and
caches the signed text). Prints a table; writes nothing outside the temp dir.

--rps measures instead narinfo requests per second with wrk (a Lua script rotating over the
hashes): hits at 1, 16 and 64 connections, misses (404) at 16, nixcache with `--workers`
(default: one per core) against nginx with 2 workers and its access log on, the same signed
files (nginx serves the narinfos as nixcache signs them), alternating server by server each
round, the load average printed per round (issue 15).

`--baseline CHECKOUT` (e.g. `git worktree add /tmp/base main`) adds a third server, `before`:
that checkout's `nixcache serve` on a copy of the same store (--local-store: the same Nix store,
its own push store) with the same key, in the same rounds. With --rps the server CPU per request
is printed too (user + system time
of all its processes over the requests wrk made, wrk included in the machine but not in the
number): on a shared machine that, not requests/s, shows what a change saved.

--local-store measures serving this host's own Nix store instead (`[nix_store]`, issue 14): the
paths are built into /nix/store with nix-build (needs root; the same paths on every run with the
same --paths and --nar-mib, so reruns build nothing), this server reads Nix's database and
generates each NAR, and nginx serves the narinfos this server gave once and NARs dumped once
with `nix-store --dump`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import reference_nginx
from serve_front import cpu_seconds
from serve_front import workers as child_pids

from nixcache import nixenv
from nixcache.keys import SecretKey
from nixcache.server import base32

# Every process measured (both servers, curl, wrk) runs at this nice level when root, so other
# work on a shared machine disturbs the measurement less; both servers get the same treatment.
NICE = ["nice", "-n", "-10"] if os.geteuid() == 0 else []
ROOT = Path(__file__).resolve().parent.parent  # the checkout whose server is measured


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(procs: list[subprocess.Popen], grace: float = 10) -> None:
    """SIGTERM to every one of `procs` at once, then SIGKILL to those still there after `grace` s."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


def nar_of(size: int) -> bytes:
    """A valid uncompressed NAR of one file, `size` bytes long give or take 7 (padding)."""
    body = os.urandom(max(0, size - 112))  # the framing around the contents is 112 bytes

    def s(b: bytes) -> bytes:
        return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)

    parts = (b"nix-archive-1", b"(", b"type", b"regular", b"contents", body, b")")
    return b"".join(s(p) for p in parts)


def build_store(root: Path, paths: int, nar_mib: int) -> tuple[list[str], str]:
    """narinfos for `paths` store paths (small NARs) and one big NAR; returns hashes and its name."""
    for d in ("narinfo", "nar", "nar-meta", "tmp"):
        (root / d).mkdir(parents=True)
    hashes = []
    refs: list[str] = []
    for i in range(paths):
        nar = nar_of(2048 + i)
        file_hash = base32.encode(hashlib.sha256(nar).digest())
        name = f"{file_hash}.nar"
        (root / "nar" / name).write_bytes(nar)
        nar_hash = "sha256:" + file_hash
        (root / "nar-meta" / name).write_text(f"{nar_hash} {len(nar)}\n")
        h = base32.encode(os.urandom(20))
        base = f"{h}-bench-path-{i}"
        (root / "narinfo" / f"{h}.narinfo").write_text(
            f"StorePath: /nix/store/{base}\nURL: nar/{name}\nCompression: none\n"
            f"FileHash: {nar_hash}\nFileSize: {len(nar)}\nNarHash: {nar_hash}\nNarSize: {len(nar)}\n"
            f"References: {' '.join(refs[-5:])}\n"
            f"Deriver: {base32.encode(os.urandom(20))}-bench-path-{i}.drv\n"
        )
        refs.append(base)
        hashes.append(h)
    big = nar_of(nar_mib * 1024 * 1024)
    big_name = base32.encode(hashlib.sha256(big).digest()) + ".nar"
    (root / "nar" / big_name).write_bytes(big)
    return hashes, big_name


# `paths` small paths, each referring to up to five before it, and one of `nar_mib` MiB.
LOCAL_CLOSURE = """
let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
  last5 = acc: let n = builtins.length acc; k = if n < 5 then n else 5;
    in builtins.genList (j: builtins.elemAt acc (n - 1 - j)) k;
  step = acc: i:
    acc ++ [ (mk "bench-local-${toString i}" "echo ${toString i} ${toString (last5 acc)} > $out") ];
  small = builtins.foldl' step [] (builtins.genList (i: i) @PATHS@);
in small ++ [ (mk "bench-local-big-@MIB@" "/usr/bin/head -c @BYTES@ /dev/urandom > $out") ]
"""


def build_local_store(root: Path, work: Path, paths: int, nar_mib: int) -> tuple[list[str], str]:
    """Build the paths into /nix/store; nginx's copy under `root` is filled later (fill_for_nginx).
    Returns the hash parts of the small paths and the big path."""
    expr = work / "local.nix"
    expr.write_text(
        LOCAL_CLOSURE.replace("@PATHS@", str(paths))
        .replace("@MIB@", str(nar_mib))
        .replace("@BYTES@", str(nar_mib * 1024 * 1024))
    )
    built = nixenv.run(["nix-build", "--no-out-link", str(expr)], home=work / "home-build", timeout=1800)
    if built.returncode != 0:
        raise SystemExit(f"nix-build failed: {built.stderr.strip().splitlines()[-3:]}")
    outputs = built.stdout.split()
    for d in ("narinfo", "nar"):
        (root / d).mkdir(parents=True)
    return [Path(p).name[:32] for p in outputs[:-1]], outputs[-1]


def fill_for_nginx(root: Path, base: str, hashes: list[str], big_path: str, work: Path) -> str:
    """nginx's files: each narinfo as this server answers it, each NAR dumped by nix-store once.
    Returns the big NAR's file name."""
    import httpx

    big_name = ""
    with httpx.Client(base_url=base) as client:
        for h in [*hashes, Path(big_path).name[:32]]:
            text = client.get(f"/{h}.narinfo").raise_for_status().text
            (root / "narinfo" / f"{h}.narinfo").write_text(text)
            url = re.search(r"^URL: nar/(\S+)$", text, re.MULTILINE).group(1)  # type: ignore[union-attr]
            store_path = re.search(r"^StorePath: (\S+)$", text, re.MULTILINE).group(1)  # type: ignore[union-attr]
            with open(root / "nar" / url, "wb") as out:
                dumped = subprocess.run(
                    ["nix-store", "--dump", store_path],
                    stdout=out,
                    env=nixenv.environ(work / "home-dump"),
                    check=False,
                )
            if dumped.returncode != 0:
                raise SystemExit(f"nix-store --dump {store_path} failed")
            big_name = url
    return big_name


def wait_port(port: int, timeout: float = 15) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def start_servers(
    work: Path,
    serve_args: list[str],
    nginx_root: Path,
    nginx_workers: int,
    procs: list[subprocess.Popen],
    baseline: tuple[Path, list[str]] | None = None,
) -> tuple[dict[str, str], dict[str, subprocess.Popen]]:
    """`nixcache serve SERVE_ARGS` of this checkout and nginx (`nginx_workers`) on `nginx_root`'s
    narinfo/ and nar/, and with `baseline` (CHECKOUT, ITS_SERVE_ARGS) that checkout's server as
    "before"; each on a free loopback port at NICE, all added to `procs` (the caller stops them)
    and all answering on return. Returns their base URLs and their processes by name."""
    ports = {"nginx": free_port(), "nixcache": free_port()}
    servers = {"nixcache": start_nixcache(ROOT, ports["nixcache"], work / "server.log", serve_args)}
    procs.append(servers["nixcache"])
    if baseline is not None:
        ports["before"] = free_port()
        checkout, before_args = baseline
        log = work / "before.log"
        servers["before"] = start_nixcache(checkout.resolve(), ports["before"], log, before_args)
        procs.append(servers["before"])
    locations = [
        reference_nginx.NARINFO.format(dir=nginx_root / "narinfo"),
        reference_nginx.NARS.format(store=nginx_root),
    ]
    conf = reference_nginx.conf(work / "nginx", ports["nginx"], locations, workers=nginx_workers)
    servers["nginx"] = reference_nginx.start(work / "nginx", conf, NICE)
    procs.append(servers["nginx"])
    for port in ports.values():
        wait_port(port)
    return {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}, servers


def curl_round(base: str, hashes: list[str], work: Path, *, absent: bool = False) -> float:
    """Seconds curl takes to GET every narinfo, all on one keep-alive connection (`absent`:
    hashes that are not in the store, each answered 404, as Nix clients ask for many)."""
    config = work / "curl.cfg"
    config.write_text("".join(f'url = "{base}/{h}.narinfo"\noutput = "/dev/null"\n' for h in hashes))
    start = time.perf_counter()
    out = subprocess.run(
        [
            *NICE,
            "curl",
            "-sS",
            *([] if absent else ["--fail"]),
            "--config",
            str(config),
            "-w",
            "%{num_connects}\n",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    elapsed = time.perf_counter() - start
    connects = sum(int(x) for x in out.stdout.split())
    if connects != 1:
        raise SystemExit(f"curl opened {connects} connections to {base}; expected one keep-alive connection")
    return elapsed


def wrk(url: str, connections: int, seconds: int) -> float:
    """MiB/s that wrk reports."""
    threads = min(connections, 2)
    out = subprocess.run(
        [*NICE, "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
    if not match:
        raise SystemExit(f"cannot read wrk output:\n{out}")
    factor = {"B": 1 / 1024**2, "KB": 1 / 1024, "MB": 1, "GB": 1024}[match.group(2)]
    return float(match.group(1)) * factor


def peak_rss_mib(pid: int) -> float:
    """The largest VmHWM of the server's processes: the process and, with workers, each worker."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    peaks = []
    for each in [pid, *map(int, children)]:
        status = Path(f"/proc/{each}/status").read_text()
        peaks.append(int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024)  # type: ignore[union-attr]
    return max(peaks)


def measure(
    bases: dict[str, str], hashes: list[str], big: str, work: Path, rounds: int, seconds: int
) -> dict:
    """Every measurement alternates between the servers, so load from elsewhere on the machine
    hits both alike; narinfo times are medians of `rounds`."""
    results: dict[str, dict] = {name: {"warm": []} for name in bases}
    for name, base in bases.items():
        results[name]["cold"] = curl_round(base, hashes, work)
    for _ in range(rounds):
        for name, base in bases.items():
            results[name]["warm"].append(curl_round(base, hashes, work))
    absent = [base32.encode(os.urandom(20)) for _ in hashes]
    for name in bases:
        results[name]["misses"] = []
    for _ in range(max(3, rounds // 3)):
        for name, base in bases.items():
            results[name]["misses"].append(curl_round(base, absent, work, absent=True))
    for name in bases:
        results[name]["best"] = min(results[name]["warm"])
        results[name]["warm"] = statistics.median(results[name]["warm"])
        results[name]["misses"] = statistics.median(results[name]["misses"])
    for connections, key in ((1, "one"), (16, "sixteen")) if seconds else ():
        for name, base in bases.items():
            results[name][key] = wrk(f"{base}/nar/{big}", connections, seconds)
    return results


NGINX_WORKERS = 2

WRK_ROTATE = """
local paths = {}
for line in io.lines("@FILE@") do paths[#paths + 1] = line end
local i = math.random(#paths)
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
"""


def wrk_rps(url: str, paths: list[str], connections: int, seconds: int, work: Path) -> tuple[float, int]:
    """(requests/s, requests) that wrk reports, GETs rotating over `paths` (non-2xx counted too)."""
    listing = work / "wrk-paths.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    script = work / "rotate.lua"
    script.write_text(WRK_ROTATE.replace("@FILE@", str(listing)))
    threads = min(connections, 2)
    out = subprocess.run(
        [*NICE, "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    count = re.search(r"(\d+) requests in", out)
    if not rate or not count:
        raise SystemExit(f"cannot read wrk output:\n{out}")
    return float(rate.group(1)), int(count.group(1))


def start_nixcache(checkout: Path, port: int, log: Path, serve_args: list[str]):  # type: ignore[no-untyped-def]
    """`nixcache serve SERVE_ARGS` of `checkout` (its code, not the installed one: `-c` imports
    from the working directory) on 127.0.0.1:`port`."""
    return subprocess.Popen(
        [*NICE, sys.executable, "-c", "from nixcache.cli import main; main()", "serve",
         "--listen", f"127.0.0.1:{port}", *serve_args],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
        cwd=checkout,
    )  # fmt: skip


def rps(args: argparse.Namespace) -> int:
    """The --rps run: narinfo requests/s of nixcache (workers) and nginx (2 workers, access log),
    and of `before` (the --baseline checkout) when given; CPU per request of each."""
    work = Path(tempfile.mkdtemp(prefix="nixcache-bench-"))
    procs: list[subprocess.Popen] = []
    workers = args.workers or len(os.sched_getaffinity(0))
    cases = [("hits", 1), ("hits", 16), ("hits", 64), ("misses", 16)]
    results: dict[tuple[str, str, int], list[float]] = {}
    cpu: dict[tuple[str, str, int], list[float]] = {}  # µs of server CPU per request
    try:
        store = work / "store"
        hashes, _ = build_store(store, args.paths, 1)
        (work / "key").write_text(SecretKey.generate("bench-1").serialize())
        signed = work / "signed"  # nginx serves the very bytes nixcache answers
        serve_args = [
            "--workers",
            str(workers),
            "--signing-key",
            str(work / "key"),
            *args.server_args.split(),
        ]
        baseline = None
        if args.baseline is not None:
            shutil.copytree(store, work / "store-before")  # its own store: the servers share nothing
            baseline = (args.baseline, ["--store", str(work / "store-before"), *serve_args])
        ours_args = ["--store", str(store), *serve_args]
        bases, servers = start_servers(work, ours_args, signed, NGINX_WORKERS, procs, baseline)
        import httpx

        (signed / "narinfo").mkdir(parents=True)
        (signed / "nar").mkdir()
        with httpx.Client(base_url=bases["nixcache"]) as client:
            for h in hashes:
                text = client.get(f"/{h}.narinfo").raise_for_status().text
                (signed / "narinfo" / f"{h}.narinfo").write_text(text)
        paths = {
            "hits": [f"/{h}.narinfo" for h in hashes],
            "misses": [f"/{base32.encode(os.urandom(20))}.narinfo" for _ in hashes],
        }
        for base in bases.values():  # warm-up: caches, signed-narinfo memory, pages
            wrk_rps(base, paths["hits"], 16, 1, work)
        print(f"nixcache: {workers} workers; nginx: {NGINX_WORKERS} workers, access log on; "
              f"{len(hashes)} narinfos, wrk {args.seconds}s per run, {args.rounds} rounds"
              + (f"; before: {args.baseline}" if args.baseline else ""))  # fmt: skip
        for round_ in range(args.rounds):
            line = []
            for kind, connections in cases:
                for name, base in bases.items():
                    pids = [servers[name].pid, *child_pids(servers[name].pid)]
                    used = cpu_seconds(pids)
                    value, requests = wrk_rps(base, paths[kind], connections, args.seconds, work)
                    used = cpu_seconds(pids) - used
                    results.setdefault((name, kind, connections), []).append(value)
                    cpu.setdefault((name, kind, connections), []).append(used / requests * 1e6)
                    line.append(f"{kind[0]}{connections} {name} {value:.0f}")
            load = " ".join(f"{x:.2f}" for x in os.getloadavg())
            print(f"round {round_ + 1}: load {load}; " + ", ".join(line), flush=True)
    finally:
        stop(procs, 70)
        shutil.rmtree(work, ignore_errors=True)
    names = list(bases)
    ours_vs = [name for name in names if name != "nginx"]
    print(f"{'narinfo requests/s (medians)':30}" + "".join(f"{n:>10}" for n in names)
          + "".join(f"{n + '/nginx':>16}" for n in ours_vs) + "   target")  # fmt: skip
    targets = {("hits", 16): ">= 0.8x", ("hits", 64): ">= 0.8x", ("misses", 16): ">= 0.7x"}
    for kind, connections in cases:
        got = {n: statistics.median(results[(n, kind, connections)]) for n in names}
        label = f"{kind}, {connections} connection{'s' if connections > 1 else ''}"
        print(f"{label:30}" + "".join(f"{got[n]:>10.0f}" for n in names)
              + "".join(f"{got[n] / got['nginx']:>15.2f}x" for n in ours_vs)
              + f"   {targets.get((kind, connections), '')}")  # fmt: skip
    print(f"{'server CPU per request, us':30}" + "".join(f"{n:>10}" for n in names))
    for kind, connections in cases:
        label = f"{kind}, {connections} connection{'s' if connections > 1 else ''}"
        print(
            f"{label:30}" + "".join(f"{statistics.median(cpu[(n, kind, connections)]):>10.1f}" for n in names)
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", type=int, default=300)
    parser.add_argument("--nar-mib", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--server-args", default="", help="extra flags for nixcache serve, e.g. '--log-level warning'"
    )
    parser.add_argument("--narinfo-only", action="store_true", help="skip the NAR throughput runs")
    parser.add_argument(
        "--local-store", action="store_true", help="serve paths built into /nix/store ([nix_store], root)"
    )
    parser.add_argument("--rps", action="store_true", help="narinfo requests/s at 1-64 connections (wrk)")
    parser.add_argument("--workers", type=int, default=0, help="--rps: nixcache workers [one per core]")
    parser.add_argument(
        "--baseline", type=Path, help="a checkout whose server is measured beside, as `before`"
    )
    parser.add_argument(
        "--front", action="store_true", help="the deploy's nginx front vs nginx alone (bench/serve_front.py)"
    )
    args = parser.parse_args()
    if args.rps:
        return rps(args)
    if args.front:
        import serve_front

        return serve_front.run(args, sys.modules[__name__])
    if args.local_store and os.geteuid() != 0:
        raise SystemExit("--local-store builds into /nix/store: run it as root")
    for tool in ("nginx", "wrk", "curl"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} not found: apt-get install nginx-light wrk curl")

    work = Path(tempfile.mkdtemp(prefix="nixcache-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        store = work / "store"
        if args.local_store:
            hashes, big_path = build_local_store(store, work, args.paths, args.nar_mib)
            (work / "config.toml").write_text("[nix_store]\nserve_nix_store = true\n")
            config = ["--config", str(work / "config.toml"), "--store", str(work / "push-store")]
        else:
            hashes, big = build_store(store, args.paths, args.nar_mib)
            config = ["--store", str(store)]
        key = SecretKey.generate("bench-1")
        (work / "key").write_text(key.serialize())

        # One nginx worker, as in the runs recorded for this mode (one keep-alive connection: one works).
        serve_args = ["--signing-key", str(work / "key"), *args.server_args.split()]
        baseline = None
        if args.baseline is not None:  # the same paths, its own push store
            if args.local_store:
                before_store = work / "push-store-before"
            else:
                before_store = work / "store-before"
                shutil.copytree(store, before_store)
            baseline = (
                args.baseline,
                [*config[:-2], "--store", str(before_store), *serve_args],
            )  # `config` without its "--store DIR"
        bases, servers = start_servers(work, [*config, *serve_args], store, 1, procs, baseline)
        if args.local_store:
            big = fill_for_nginx(store, bases["nixcache"], hashes, big_path, work)
        results = measure(bases, hashes, big, work, args.rounds, 0 if args.narinfo_only else args.seconds)
        rss = peak_rss_mib(servers["nixcache"].pid)
    finally:
        stop(procs)
        shutil.rmtree(work, ignore_errors=True)

    ng, us = results["nginx"], results["nixcache"]
    n = len(hashes)
    nar_target = ">= 0.5x" if args.local_store else ">= 0.7x"  # issue 14 vs the push store's
    if args.local_store:
        print("local Nix store: narinfo from Nix's database, NARs generated (nginx: files dumped once)")
    print(f"{n} narinfos over one keep-alive connection (curl)")
    print(f"NAR of {args.nar_mib} MiB, wrk for {args.seconds}s per run")
    print(f"{'':34}{'nginx':>12}{'nixcache':>12}{'ratio':>10}   target")
    rows = [
        ("narinfo, warm (median of rounds)", ng["warm"] * 1000, us["warm"] * 1000, "ms", "<= 1.5x time"),
        ("narinfo, warm (best round)", ng["best"] * 1000, us["best"] * 1000, "ms", ""),
        ("narinfo, first round", ng["cold"] * 1000, us["cold"] * 1000, "ms", ""),
        ("absent narinfos (404), median", ng["misses"] * 1000, us["misses"] * 1000, "ms", ""),
    ]
    if not args.narinfo_only:
        rows += [
            ("NAR throughput, 1 connection", ng["one"], us["one"], "MiB/s", nar_target),
            ("NAR throughput, 16 connections", ng["sixteen"], us["sixteen"], "MiB/s", nar_target),
        ]
    for label, a, b, unit, target in rows:
        print(f"{label:34}{a:>9.1f} {unit:<3}{b:>9.1f} {unit:<3}{b / a:>8.2f}x   {target}")
    print(f"per narinfo: nginx {ng['warm'] / n * 1e6:.0f} us, nixcache {us['warm'] / n * 1e6:.0f} us")
    if "before" in results:
        was = results["before"]
        print(f"before ({args.baseline}): narinfo warm {was['warm'] * 1000:.1f} ms"
              f" ({was['warm'] / ng['warm']:.2f}x nginx), best {was['best'] * 1000:.1f} ms,"
              f" 404s {was['misses'] * 1000:.1f} ms ({was['misses'] / ng['misses']:.2f}x)")  # fmt: skip
    print(f"nixcache peak RSS: {rss:.1f} MiB (per process, the largest; target < 100 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

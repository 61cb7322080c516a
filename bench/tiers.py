#!/usr/bin/env python3
"""Benchmark the tiers: local hits, pull-through from the origin, direct S3, write-through pushes.

    python bench/tiers.py [--paths 200] [--nar-mib 64] [--pushes 500] [--rounds 5] [--nar-rounds 3]
                          [--baseline CHECKOUT] [--recycle-pages] [--nar-only]

Starts SeaweedFS (`weed mini`, loopback, as the tests do) and three `nixcache serve`: `eu` and
`us` share the origin bucket, `plain` has no origin. Then, side by side in one run:
- narinfo latency over ONE keep-alive connection (curl, as Nix uses libcurl): a local hit on `eu`
  vs pulled through from the origin by `us` (cold: each path asked once) vs a direct SigV4 GET
  of the same objects from SeaweedFS;
- NAR throughput of a cold pull-through on 1 connection and on 16 concurrent connections for one
  uncached NAR (one origin fetch, streamed to all 16) vs direct GETs from SeaweedFS, and a hot
  (local) NAR for reference;
- push time of `--pushes` small paths (NAR + narinfo PUT, as nix copy does) to `plain` vs to
  `eu` (write-through).
NAR throughputs are medians of `--nar-rounds` rounds, each on NARs nobody fetched yet, the
contenders one after the other within a round (the machine's load moves between rounds).
`--baseline CHECKOUT` (e.g. `git worktree add /tmp/base <commit>`) adds a fourth server, `before`,
running that checkout's code with `us`'s config: its cold pull-through is measured in the same
rounds, so a change to the pull-through path is shown before/after beside direct S3.
A last reference line: writing a NAR-sized new file here (the ceiling of any cache that stores
what it streams). On a VM whose never-touched memory costs a host fault per page (this one:
Firecracker with free page reporting), new page-cache pages are that slow while the pages a
deleted file just freed are not: `--recycle-pages` writes and deletes a file of three NARs'
size before each cold NAR (direct S3 included), as a long-running cache host's full page cache
recycles its pages; without it every NAR lands on fresh memory.
`--nar-only` measures the NAR rows alone (no narinfo latency, no pushes).
Prints a table; writes nothing outside its temp dir. The S3 credentials are throwaway ones and go
to curl in a config file, not on its command line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import httpx  # noqa: E402
from serve import peak_rss_mib  # noqa: E402
from server.helpers import make_entry, push, start_server, write_key  # noqa: E402
from server.tiers_support import write_config  # noqa: E402
from support.seaweed import Seaweed, start_seaweed  # noqa: E402

NICE = ["nice", "-n", "-10"] if os.geteuid() == 0 else []


def curl(config: Path) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(
        [*NICE, "curl", "-sS", "--fail", "--config", str(config)], capture_output=True, text=True, check=True
    )
    return time.perf_counter() - start, out.stdout


def curl_config(path: Path, urls: list[str], s3: Seaweed | None = None, write_out: str = "") -> Path:
    lines = []
    if s3 is not None:
        lines += [f'aws-sigv4 = "aws:amz:{s3.region}:s3"', f'user = "{s3.access_key}:{s3.secret_key}"']
    for url in urls:
        lines += [f'url = "{url}"', 'output = "/dev/null"']
        if write_out:
            lines.append(f'write-out = "{write_out}"')
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def narinfo_round(work: Path, urls: list[str], s3: Seaweed | None = None) -> float:
    """Seconds to GET every URL over one keep-alive connection (checked)."""
    elapsed, out = curl(curl_config(work / "narinfo.cfg", urls, s3, r"%{num_connects}\n"))
    connects = sum(int(x) for x in out.split())
    if connects != 1:
        raise SystemExit(f"curl opened {connects} connections; expected one keep-alive connection")
    return elapsed


def nar_mib_s(work: Path, url: str, size: int, connections: int, s3: Seaweed | None = None) -> float:
    """Aggregate MiB/s of `connections` concurrent GETs of one NAR (each checked complete)."""
    config = curl_config(work / f"nar-{secrets.token_hex(4)}.cfg", [url], s3, r"%{size_download}\n")

    def one(_: int) -> int:
        return int(curl(config)[1].strip())

    start = time.perf_counter()
    with ThreadPoolExecutor(connections) as pool:
        sizes = list(pool.map(one, range(connections)))
    elapsed = time.perf_counter() - start
    if any(s != size for s in sizes):
        raise SystemExit(f"incomplete NAR downloads from {url}: {sizes}")
    return size * connections / elapsed / 1024**2


def start_cache(
    work: Path, name: str, config: Path | None, checkout: Path | None = None
) -> tuple[object, str]:
    base = work / name
    base.mkdir()
    key_file, _ = write_key(base, f"bench-{name}-1")
    token = secrets.token_urlsafe(16)
    (base / "token").write_text(token)
    args = ["--listen", "127.0.0.1:0", "--store", str(base / "store"), "--signing-key", str(key_file),
            "--push-token-file", str(base / "token"), "--log-level", "warning"]  # fmt: skip
    if config is not None:
        args += ["--config", str(config)]
    return start_server(args, home=base, log=base / "server.log", checkout=checkout), token


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", type=int, default=200)
    parser.add_argument("--nar-mib", type=int, default=64)
    parser.add_argument("--pushes", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nar-rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="a checkout whose server is measured as `before`")
    parser.add_argument(
        "--recycle-pages",
        action="store_true",
        help="before each cold NAR, write and delete a file of 3 NARs' size (see below)",
    )
    parser.add_argument("--nar-only", action="store_true", help="only the NAR throughput and CPU rows")
    args = parser.parse_args()
    if args.nar_only:
        args.paths, args.pushes = 0, 0
    if not shutil.which("curl"):
        raise SystemExit("curl not found: apt-get install curl")

    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="nixcache-bench-tiers-"))
    weed = start_seaweed(work / "seaweed")
    servers = []
    try:
        bucket = weed.make_bucket("bench")
        config = write_config(work / "tiers.toml", seaweed=weed, bucket=bucket)
        eu, eu_token = start_cache(work, "eu", config)
        us, _ = start_cache(work, "us", config)
        plain, plain_token = start_cache(work, "plain", None)
        servers += [eu, us, plain]
        before = None
        if args.baseline is not None:
            before, _ = start_cache(work, "before", config, args.baseline.resolve())
            servers.append(before)
        pullers = {"after (us)": us, **({"before": before} if before else {})}
        s3 = f"{weed.endpoint}/{bucket}"

        small = [make_entry() for _ in range(args.paths)]
        size = args.nar_mib * 1024 * 1024
        # Per round and connection count: one NAR per puller and one for direct S3.
        per_round = 2 * (len(pullers) + 1)
        count = per_round * args.nar_rounds
        big = [make_entry(os.urandom(size - 112), compression="none") for _ in range(count)]
        with httpx.Client(base_url=eu.url, timeout=300) as client:
            for entry in small + big:
                push(client, entry, eu_token)

        # narinfo latency: local (eu), cold pull-through (us, each path once), direct S3.
        local = [f"{eu.url}/{e.hash_part}.narinfo" for e in small]
        direct = [f"{s3}/{e.hash_part}.narinfo" for e in small]
        if small:
            narinfo_round(work, local)  # warm the signed-narinfo cache, as a busy cache has it
            narinfo_round(work, direct, weed)
            cold = narinfo_round(work, [f"{us.url}/{e.hash_part}.narinfo" for e in small])
            local_t = statistics.median(narinfo_round(work, local) for _ in range(args.rounds))
            direct_t = statistics.median(narinfo_round(work, direct, weed) for _ in range(args.rounds))

        # NAR throughput: cold pull-throughs (never fetched by anyone) vs direct S3, interleaved.
        size = len(big[0].file_bytes)
        unused = iter(big)
        rates: dict[tuple[str, int], list[float]] = {}
        # CPU seconds per NAR of each process involved (the client: every curl of the GETs).
        cpu: dict[tuple[str, int], dict[str, list[float]]] = {}
        weed_pid = weed.process.pid
        hot: dict[int, tuple[object, str]] = {}
        for _ in range(args.nar_rounds):
            for connections in (1, 16):
                for label, server in pullers.items():
                    entry = next(unused)
                    if args.recycle_pages:
                        _new_file_mib_s(work / "recycle", 3 * size)
                    # The narinfo first, as a client does; the NAR stays cold.
                    httpx.get(f"{server.url}/{entry.hash_part}.narinfo", timeout=30).raise_for_status()
                    url = f"{server.url}/nar/{entry.nar_file}"
                    with _cpu(cpu, (label, connections), {"server": server.proc.pid, "SeaweedFS": weed_pid}):
                        mib_s = nar_mib_s(work, url, size, connections)
                    rates.setdefault((label, connections), []).append(mib_s)
                    hot.setdefault(connections, (server, entry.nar_file))
                url = f"{s3}/nar/{next(unused).nar_file}"
                if args.recycle_pages:
                    _new_file_mib_s(work / "recycle", 3 * size)
                with _cpu(cpu, ("direct", connections), {"SeaweedFS": weed_pid}):
                    mib_s = nar_mib_s(work, url, size, connections, weed)
                rates.setdefault(("direct", connections), []).append(mib_s)
        rate = {key: statistics.median(values) for key, values in rates.items()}
        hot_rate = {c: nar_mib_s(work, f"{s.url}/nar/{name}", size, c) for c, (s, name) in hot.items()}
        if args.recycle_pages:
            _new_file_mib_s(work / "recycle", 3 * size)
        write_floor = _new_file_mib_s(work / "write-floor", size)
        fetches = _metric(us.url, r'nixcache_tier_lookups_total\{kind="nar",result="hit",tier="origin"\}')

        # Push time: plain vs write-through.
        pushes = [make_entry() for _ in range(args.pushes * 2)]
        timings = {}
        for name, server, token, entries in (
            ("plain", plain, plain_token, pushes[: args.pushes]),
            ("write-through", eu, eu_token, pushes[args.pushes :]),
        ):
            with httpx.Client(base_url=server.url, timeout=60) as client:
                start = time.perf_counter()
                for entry in entries:
                    push(client, entry, token)
                timings[name] = time.perf_counter() - start
        rss = {n: peak_rss_mib(s.proc.pid) for n, s in (("eu", eu), ("us", us), ("before", before)) if s}
    finally:
        for server in servers:
            server.stop()
        weed.stop()
        shutil.rmtree(work, ignore_errors=True)

    n = len(small)
    print(f"SeaweedFS {weed.endpoint} on loopback; {n} narinfos; NARs of {args.nar_mib} MiB (uncompressed)")
    if n:
        print("narinfo, one keep-alive connection (curl)      total       per request")
        for label, seconds in (
            ("local hit (eu), median", local_t),
            ("pull-through from origin (us), cold", cold),
            ("direct S3 GET (SigV4), median", direct_t),
        ):
            print(f"  {label:42}{seconds * 1000:>8.1f} ms {seconds / n * 1e6:>9.0f} us")
    print(f"NAR throughput, median of {args.nar_rounds} rounds            1 conn      16 conns")

    def row(label: str, one: float, sixteen: float, unit: str = "MiB/s", digits: int = 1) -> None:
        print(f"  {label:44}{one:>8.{digits}f} {unit:6}{sixteen:>8.{digits}f} {unit}")

    for label in pullers:
        row(f"pull-through from origin, cold, {label}", rate[label, 1], rate[label, 16])
    row("direct S3 GET", rate["direct", 1], rate["direct", 16])
    for label in pullers:
        one, sixteen = (rate[label, c] / rate["direct", c] for c in (1, 16))
        row(f"ratio {label} (target >= 0.8x)", one, sixteen, "x", 2)
    row("hot: local after the pull", hot_rate[1], hot_rate[16])
    print("CPU per NAR, median (all on this machine's cores)   1 conn             16 conns")
    for label in (*pullers, "direct"):
        parts = []
        for connections in (1, 16):
            used = {name: statistics.median(v) * 1000 for name, v in cpu[label, connections].items()}
            parts.append(" + ".join(f"{name} {ms:.0f}" for name, ms in used.items()) + " ms")
        print(f"  {label:14}{parts[0]:>36}   {parts[1]}")
    print(f"  reference: writing a {args.nar_mib} MiB new file here{write_floor:>14.1f} MiB/s")
    pulled = 2 * args.nar_rounds
    print(f"  origin NAR fetches by us: {fetches:.0f} (for {pulled} NARs pulled by 1 or 16 clients)")
    if args.pushes:
        print(f"push of {args.pushes} small paths (NAR + narinfo PUT, one connection)")
        for name, seconds in timings.items():
            print(f"  {name:42}{seconds:>8.2f} s {seconds / args.pushes * 1000:>9.1f} ms/path")
    peaks = ", ".join(f"{name} {mib:.1f} MiB" for name, mib in rss.items())
    print(f"peak RSS: {peaks} (target < 100 MiB)")
    print(f"load average (1 min) at start {load_start:.1f}, at end {os.getloadavg()[0]:.1f}")
    return 0


def _metric(base: str, pattern: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    match = re.search(pattern + r" ([\d.e+]+)", text)
    return float(match.group(1)) if match else 0.0


@contextlib.contextmanager
def _cpu(into: dict, key: tuple[str, int], pids: dict[str, int]) -> Iterator[None]:
    """Record the CPU seconds the processes `pids` and this script's children (curl) used."""
    before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    yield
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = {name: _cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    used["client"] = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    for name, seconds in used.items():
        into.setdefault(key, {}).setdefault(name, []).append(seconds)


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of process `pid` and its children (a server's workers), all their threads:
    the scheduler's nanosecond count (/proc/…/schedstat), not /proc/…/stat's 10 ms ticks, which
    are too coarse for the ~100 ms a NAR costs."""
    own = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            own += int((task / "schedstat").read_text().split()[0])
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own / 1e9 + sum(_cpu_seconds(int(child)) for child in children)


def _new_file_mib_s(path: Path, size: int, chunk: int = 256 * 1024) -> float:
    """MiB/s of writing `size` bytes into a new file in `chunk`s (no fsync), as the store does."""
    data = memoryview(os.urandom(chunk))
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(size // chunk):
            handle.write(data)
    elapsed = time.perf_counter() - start
    path.unlink()
    return size / elapsed / 1024**2


if __name__ == "__main__":
    sys.exit(main())

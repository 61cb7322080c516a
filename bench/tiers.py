#!/usr/bin/env python3
"""Benchmark the tiers: local hits, pull-through from the origin, direct S3, write-through pushes.

    python bench/tiers.py [--paths 200] [--nar-mib 64] [--pushes 500] [--rounds 5]

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
Prints a table; writes nothing outside its temp dir. The S3 credentials are throwaway ones and go
to curl in a config file, not on its command line.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import httpx  # noqa: E402
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


def start_cache(work: Path, name: str, config: Path | None) -> tuple[object, str]:
    base = work / name
    base.mkdir()
    key_file, _ = write_key(base, f"bench-{name}-1")
    token = secrets.token_urlsafe(16)
    (base / "token").write_text(token)
    args = ["--listen", "127.0.0.1:0", "--store", str(base / "store"), "--signing-key", str(key_file),
            "--push-token-file", str(base / "token"), "--log-level", "warning"]  # fmt: skip
    if config is not None:
        args += ["--config", str(config)]
    return start_server(args, home=base, log=base / "server.log"), token


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", type=int, default=200)
    parser.add_argument("--nar-mib", type=int, default=64)
    parser.add_argument("--pushes", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not shutil.which("curl"):
        raise SystemExit("curl not found: apt-get install curl")

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
        s3 = f"{weed.endpoint}/{bucket}"

        small = [make_entry() for _ in range(args.paths)]
        size = args.nar_mib * 1024 * 1024
        big = [make_entry(os.urandom(size - 112), compression="none") for _ in range(4)]
        with httpx.Client(base_url=eu.url, timeout=300) as client:
            for entry in small + big:
                push(client, entry, eu_token)

        # narinfo latency: local (eu), cold pull-through (us, each path once), direct S3.
        local = [f"{eu.url}/{e.hash_part}.narinfo" for e in small]
        direct = [f"{s3}/{e.hash_part}.narinfo" for e in small]
        narinfo_round(work, local)  # warm the signed-narinfo cache, as a busy cache has it
        narinfo_round(work, direct, weed)
        cold = narinfo_round(work, [f"{us.url}/{e.hash_part}.narinfo" for e in small])
        local_t = statistics.median(narinfo_round(work, local) for _ in range(args.rounds))
        direct_t = statistics.median(narinfo_round(work, direct, weed) for _ in range(args.rounds))

        # NAR throughput: cold pull-through (us has never seen these) vs direct S3.
        for entry in big:  # the narinfo first, as a client does; the NAR stays cold
            httpx.get(f"{us.url}/{entry.hash_part}.narinfo", timeout=30).raise_for_status()
        size = len(big[0].file_bytes)
        pull_one = nar_mib_s(work, f"{us.url}/nar/{big[0].nar_file}", size, 1)
        direct_one = nar_mib_s(work, f"{s3}/nar/{big[1].nar_file}", size, 1, weed)
        pull_16 = nar_mib_s(work, f"{us.url}/nar/{big[2].nar_file}", size, 16)
        direct_16 = nar_mib_s(work, f"{s3}/nar/{big[3].nar_file}", size, 16, weed)
        hot_one = nar_mib_s(work, f"{us.url}/nar/{big[0].nar_file}", size, 1)
        hot_16 = nar_mib_s(work, f"{us.url}/nar/{big[2].nar_file}", size, 16)
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
        rss = {n: _peak_rss(s.proc.pid) for n, s in (("eu", eu), ("us", us))}
    finally:
        for server in servers:
            server.stop()
        weed.stop()
        shutil.rmtree(work, ignore_errors=True)

    n = len(small)
    print(f"SeaweedFS {weed.endpoint} on loopback; {n} narinfos; NARs of {args.nar_mib} MiB (uncompressed)")
    print("narinfo, one keep-alive connection (curl)      total       per request")
    for label, seconds in (
        ("local hit (eu), median", local_t),
        ("pull-through from origin (us), cold", cold),
        ("direct S3 GET (SigV4), median", direct_t),
    ):
        print(f"  {label:42}{seconds * 1000:>8.1f} ms {seconds / n * 1e6:>9.0f} us")
    print("NAR throughput                                   1 conn      16 conns")
    print(f"  pull-through from origin, cold (one fetch)  {pull_one:>8.1f} MiB/s {pull_16:>8.1f} MiB/s")
    print(f"  direct S3 GET                               {direct_one:>8.1f} MiB/s {direct_16:>8.1f} MiB/s")
    ratios = f"{pull_one / direct_one:>8.2f}x      {pull_16 / direct_16:>8.2f}x"
    print(f"  ratio (target >= 0.8x)                      {ratios}")
    print(f"  hot: local after the pull                   {hot_one:>8.1f} MiB/s {hot_16:>8.1f} MiB/s")
    print(f"  origin NAR fetches by us: {fetches:.0f} (for 2 NARs pulled by 1 + 16 clients)")
    print(f"push of {args.pushes} small paths (NAR + narinfo PUT, one connection)")
    for name, seconds in timings.items():
        print(f"  {name:42}{seconds:>8.2f} s {seconds / args.pushes * 1000:>9.1f} ms/path")
    print(f"peak RSS: eu {rss['eu']:.1f} MiB, us {rss['us']:.1f} MiB (target < 100 MiB)")
    return 0


def _metric(base: str, pattern: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    match = re.search(pattern + r" ([\d.e+]+)", text)
    return float(match.group(1)) if match else 0.0


def _peak_rss(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


if __name__ == "__main__":
    sys.exit(main())

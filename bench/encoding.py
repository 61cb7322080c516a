#!/usr/bin/env python3
"""Benchmark on-the-fly zstd Content-Encoding of NAR downloads (`download_compression`) against
identity (today's bytes, sendfile), side by side in one run.

    python bench/encoding.py [--packages git,bash,…] [--link-mib 48] [--rates 100mbit,20mbit]
                             [--rounds 3] [--no-link]

Real NAR content: for each Debian package installed here, its files (`dpkg -L`) copied into a
tree and dumped with `nix-store --dump` (through nixcache.nixenv), one NAR per package. Then:
- CPU per MiB: each NAR compressed in this process at zstd levels 1 and 3 (and harmonia's
  default, level 1 with long-distance matching, window 2^25), one thread: CPU ms per MiB of NAR,
  MiB/s per core, ratio; and the client's decompression CPU;
- throughput: two `nixcache serve` (download_compression_level 1 and 3, each store holding every
  NAR uncompressed) run in their own network namespace; curl (libcurl, as Nix) fetches the whole
  set on 1 connection, and split over 16 concurrent connections (each keep-alive), plain
  (identity) or `--compressed` (Accept-Encoding: deflate, gzip, br, zstd: what Nix sends); NAR
  MiB/s is decoded payload per wall second, wire MiB what crossed the link, server CPU seconds
  per GiB of NAR served. First on loopback inside the server's namespace (median of --rounds),
  then from a second namespace over a veth pair shaped with tc (tbf at each --rates on the server's
  egress; this kernel has no netem, so no delay is added), on the first --link-mib MiB of the set.
The namespaces (`nxenc<pid>s`, `nxenc<pid>c`) are made here, with an unused 10.233.X.0/24, and
deleted at the end. Needs root. Prints tables; writes nothing outside its temp dir.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import os
import re
import resource
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

import zstandard  # noqa: E402
from server.helpers import SERVE, write_key  # noqa: E402

from nixcache import nixenv  # noqa: E402
from nixcache.lab import network  # noqa: E402
from nixcache.server import base32  # noqa: E402

PACKAGES = (
    "coreutils,bash,libpython3.11-stdlib,perl-modules-5.36,openssh-client,restic,libc6,systemd,"
    "git,perl-base,python3.11-minimal,libssl3,openssl,util-linux,tar,libsqlite3-0,sqlite3,"
    "iproute2,libcurl4,curl,nix-bin,libicu72,postgresql-15"
)
NICE = ["nice", "-n", "-10"] if os.geteuid() == 0 else []
MIB = 1024 * 1024
_LISTENING = re.compile(r"serving .* on http://([\d.]+):(\d+)")


# -- corpus -----------------------------------------------------------------------------------------


def package_nar(package: str, work: Path) -> bytes:
    """The NAR of `package`'s installed files (regular files and symlinks, paths as installed)."""
    tree = work / "trees" / package
    tree.mkdir(parents=True)
    listed = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    for line in listed.splitlines():
        source = Path(line)
        if not line.startswith("/") or source.is_dir():  # directories (and links to them) come with files
            continue
        if not (source.is_symlink() or source.is_file()):
            continue
        target = tree / line.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    out = work / f"{package}.nar"
    with open(out, "wb") as handle:
        subprocess.run(
            ["nix-store", "--dump", str(tree)],
            stdout=handle,
            check=True,
            env=nixenv.environ(work / "home-dump"),
        )
    shutil.rmtree(tree)
    return out.read_bytes()


def compressor(mode: str) -> zstandard.ZstdCompressor:
    if mode == "ldm1":
        params = zstandard.ZstdCompressionParameters.from_level(
            1, enable_ldm=True, window_log=25, write_checksum=True
        )
        return zstandard.ZstdCompressor(compression_params=params)
    return zstandard.ZstdCompressor(level=int(mode), write_checksum=True)


def cpu_table(nars: dict[str, bytes]) -> None:
    total = sum(len(n) for n in nars.values())
    print(f"\nCPU per MiB ({len(nars)} NARs, {total / MIB:.0f} MiB; one thread, this process)")
    print(f"{'zstd':<18}{'ratio':>8}{'ms CPU/MiB':>12}{'MiB/s/core':>12}{'decode ms/MiB':>15}")
    for mode, label in (("1", "level 1"), ("3", "level 3"), ("ldm1", "level 1 + LDM")):
        cpu = out = dcpu = 0.0
        for nar in nars.values():
            best = (float("inf"), 0, float("inf"))
            for _ in range(2):  # best of two: the first call of a mode pays for its tables
                start = time.thread_time()
                frame = compressor(mode).compressobj(size=len(nar))
                pieces = [frame.compress(nar[i : i + MIB]) for i in range(0, len(nar), MIB)]
                data = b"".join([*pieces, frame.flush()])
                encode = time.thread_time() - start
                start = time.thread_time()
                decoded = zstandard.ZstdDecompressor().decompress(data)
                decode = time.thread_time() - start
                assert decoded == nar
                best = (min(best[0], encode), len(data), min(best[2], decode))
            cpu += best[0]
            out += best[1]
            dcpu += best[2]
        mib = total / MIB
        speed = f"{cpu * 1000 / mib:>12.2f}{mib / cpu:>12.0f}{dcpu * 1000 / mib:>15.2f}"
        print(f"{label:<18}{total / out:>8.2f}{speed}")


# -- namespaces and servers -------------------------------------------------------------------------


def sh(*argv: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, check=check)


class Namespaces:
    """Server namespace `s` and client namespace `c`, joined by a veth pair."""

    def __init__(self) -> None:
        tag = f"nxenc{os.getpid()}"
        self.s, self.c = f"{tag}s", f"{tag}c"
        self.vs, self.vc = f"nxe{os.getpid() % 100000}s", f"nxe{os.getpid() % 100000}c"
        used = network.used_networks()
        for third in range(256):
            net = ipaddress.ip_network(f"10.233.{third}.0/24")
            if not any(net.overlaps(u) for u in used):
                break
        else:
            raise SystemExit("no free 10.233.X.0/24 for the bench's namespaces")
        self.server_ip, self.client_ip = str(net.network_address + 1), str(net.network_address + 2)

    def __enter__(self) -> Namespaces:
        sh("ip", "netns", "add", self.s)
        sh("ip", "netns", "add", self.c)
        sh(
            "ip",
            "link",
            "add",
            self.vs,
            "netns",
            self.s,
            "type",
            "veth",
            "peer",
            "name",
            self.vc,
            "netns",
            self.c,
        )
        for ns, dev, ip in ((self.s, self.vs, self.server_ip), (self.c, self.vc, self.client_ip)):
            sh("ip", "addr", "add", f"{ip}/24", "dev", dev, ns=ns)
            sh("ip", "link", "set", dev, "up", ns=ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        return self

    def shape(self, rate: str | None) -> None:
        """tbf at `rate` on the server's egress (the NAR direction); None: unshaped. No added delay:
        this kernel has no netem (`Specified qdisc kind is unknown`), so the round trip stays a veth's."""
        sh("tc", "qdisc", "del", "dev", self.vs, "root", ns=self.s, check=False)
        if rate is None:
            return
        bits = int(rate.removesuffix("mbit")) * 1_000_000
        burst = max(64 * 1024, bits // 8 // 250)  # at least one 4 ms tick of the rate
        sh("tc", "qdisc", "add", "dev", self.vs, "root", "tbf", "rate", rate, "burst", str(burst),
           "latency", "50ms", ns=self.s)  # fmt: skip

    def __exit__(self, *_: object) -> None:
        for ns in (self.s, self.c):
            sh("ip", "netns", "delete", ns, check=False)


class Server:
    def __init__(self, work: Path, name: str, level: int, ns: str, port: int):
        base = work / name
        base.mkdir()
        key_file, _ = write_key(base, f"bench-{name}-1")
        (base / "token").write_text("bench-token\n")
        config = base / "config.toml"
        config.write_text(f'download_compression = "zstd"\ndownload_compression_level = {level}\n')
        args = ["--config", str(config), "--listen", f"0.0.0.0:{port}", "--store", str(base / "store"),
                "--signing-key", str(key_file), "--push-token-file", str(base / "token"),
                "--log-level", "warning"]  # fmt: skip
        log = base / "server.log"
        env = {**os.environ, "HOME": str(base), "XDG_DATA_HOME": str(base / "data")}
        with open(log, "wb") as handle:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *NICE, *SERVE, *args],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 20
        while not _LISTENING.search(log.read_text()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"nixcache serve did not start: {log.read_text()}")
            time.sleep(0.05)
        self.port = port
        self.ns = ns
        self.base = base

    def push(self, nars: dict[str, Path]) -> dict[str, str]:
        """PUT every NAR (Compression: none) and its narinfo with curl; name -> URL path."""
        paths = {}
        for name, path in nars.items():
            data = path.read_bytes()
            digest = hashlib.sha256(data).digest()
            file_hash = base32.encode(digest)
            hash_part = base32.encode(hashlib.sha256(name.encode()).digest()[:20])
            narinfo = self.base / f"{hash_part}.narinfo"
            narinfo.write_text(
                f"StorePath: /nix/store/{hash_part}-{name}\nURL: nar/{file_hash}.nar\nCompression: none\n"
                f"FileHash: sha256:{file_hash}\nFileSize: {len(data)}\nNarHash: sha256:{file_hash}\n"
                f"NarSize: {len(data)}\nReferences: \n"
            )
            for url, body in ((f"nar/{file_hash}.nar", path), (f"{hash_part}.narinfo", narinfo)):
                sh("curl", "-sS", "--fail", "-u", "nix:bench-token", "-T", str(body),
                   f"http://127.0.0.1:{self.port}/{url}", ns=self.ns)  # fmt: skip
            paths[name] = f"nar/{file_hash}.nar"
            self.narinfo = f"{hash_part}.narinfo"  # any one, for the latency probe
        return paths

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- transfers --------------------------------------------------------------------------------------


def fetch(
    work: Path, ns: str, base_url: str, paths: list[str], connections: int, compressed: bool
) -> tuple[float, int, float]:
    """Wall seconds, wire bytes and client CPU seconds to GET every path, split round-robin over
    `connections` concurrent curl processes (one keep-alive connection each)."""
    configs = []
    for i in range(connections):
        mine = paths[i::connections]
        if not mine:
            continue
        lines = ["fail", "silent", "show-error"] + (["compressed"] if compressed else [])
        for path in mine:
            lines += [
                f'url = "{base_url}/{path}"',
                'output = "/dev/null"',
                r'write-out = "%{size_download}\n"',
            ]
        config = work / f"curl-{connections}-{i}.cfg"
        config.write_text("\n".join(lines) + "\n")
        configs.append(config)

    def one(config: Path) -> int:
        out = sh(*NICE, "curl", "--config", str(config), ns=ns).stdout
        return sum(int(x) for x in out.split())

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with ThreadPoolExecutor(len(configs)) as pool:
        wire = sum(pool.map(one, configs))
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return elapsed, wire, client


def transfer_table(
    title: str, work: Path, ns: str, host: str, servers: dict[str, Server], paths: dict[str, dict[str, str]],
    names: list[str], sizes: dict[str, int], rounds: int,
) -> None:  # fmt: skip
    total = sum(sizes[n] for n in names)
    print(f"\n{title}: {len(names)} NARs, {total / MIB:.1f} MiB per run, median of {rounds}")
    print(f"{'mode':<16}{'conns':>6}{'NAR MiB/s':>11}{'wire MiB':>10}{'ratio':>7}{'server CPU s/GiB':>18}"
          f"{'client CPU s/GiB':>18}")  # fmt: skip
    modes = (("identity", "1", False), ("zstd level 1", "1", True), ("zstd level 3", "3", True))
    for connections in (1, 16):
        results: dict[str, list[tuple[float, int, float, float]]] = {m: [] for m, _, _ in modes}
        for _ in range(rounds):
            for mode, server_name, compressed in modes:  # the contenders one after the other per round
                server = servers[server_name]
                urls = [paths[server_name][n] for n in names]
                cpu = server.cpu()
                elapsed, wire, client = fetch(
                    work, ns, f"http://{host}:{server.port}", urls, connections, compressed
                )
                if not compressed and wire != total:
                    raise SystemExit(f"identity downloads gave {wire} bytes, expected {total}")
                results[mode].append((elapsed, wire, server.cpu() - cpu, client))
        for mode, _, _ in modes:
            elapsed = statistics.median(r[0] for r in results[mode])
            wire = statistics.median(r[1] for r in results[mode])
            server_cpu = statistics.median(r[2] for r in results[mode])
            client_cpu = statistics.median(r[3] for r in results[mode])
            gib = total / 1024**3
            print(f"{mode:<16}{connections:>6}{total / MIB / elapsed:>11.1f}{wire / MIB:>10.1f}"
                  f"{total / wire:>7.2f}{server_cpu / gib:>18.2f}{client_cpu / gib:>18.2f}")  # fmt: skip


def latency_table(work: Path, ns: str, servers: dict[str, Server], paths: dict[str, dict[str, str]]) -> None:
    """narinfo latency on one keep-alive connection while 16 connections download NARs: the
    compression runs in the thread pool, so the event loop should keep answering."""
    print("\nnarinfo latency (ms, 300 GETs on one connection) while 16 connections download, loopback")
    print(f"{'during':<22}{'median':>8}{'p90':>8}{'p99':>8}")
    names = list(paths["1"])

    def probe(server: Server) -> list[float]:
        config = work / "narinfo.cfg"
        line = f'url = "http://127.0.0.1:{server.port}/{server.narinfo}"\noutput = "/dev/null"\n'
        config.write_text("silent\nfail\n" + line * 300 + 'write-out = "%{time_total}\\n"\n')
        out = sh(*NICE, "curl", "--config", str(config), ns=ns).stdout
        return sorted(float(x) * 1000 for x in out.split())

    for label, level, compressed in (
        ("nothing", "1", None),
        ("identity", "1", False),
        ("zstd level 1", "1", True),
    ):
        server = servers[level]
        if compressed is None:
            times = probe(server)
        else:
            with ThreadPoolExecutor(1) as pool:
                urls = [paths[level][n] for n in names] * 2
                load = pool.submit(fetch, work, ns, f"http://127.0.0.1:{server.port}", urls, 16, compressed)
                time.sleep(0.3)
                times = probe(server)
                load.result()
        median, p90, p99 = (times[min(len(times) - 1, int(q * len(times)))] for q in (0.5, 0.9, 0.99))
        print(f"{label:<22}{median:>8.2f}{p90:>8.2f}{p99:>8.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--packages", default=PACKAGES)
    parser.add_argument("--link-mib", type=int, default=48)
    parser.add_argument("--rates", default="100mbit,20mbit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-link", action="store_true", help="loopback only")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/encoding.py makes network namespaces and tc qdiscs: run it as root")
    print(
        f"measured {time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.2f} (a shared machine: other work runs beside this bench)"
    )
    with tempfile.TemporaryDirectory(prefix="nixcache-bench-encoding-") as tmp:
        work = Path(tmp)
        nar_files: dict[str, Path] = {}
        for package in args.packages.split(","):
            package_nar(package, work)
            nar_files[package] = work / f"{package}.nar"
        nars = {name: path.read_bytes() for name, path in nar_files.items()}
        sizes = {name: len(data) for name, data in nars.items()}
        print("NARs (MiB): " + ", ".join(f"{n} {s / MIB:.1f}" for n, s in sizes.items()))
        cpu_table(nars)
        del nars
        with Namespaces() as spaces:
            servers = {
                "1": Server(work, "level1", 1, spaces.s, 5001),
                "3": Server(work, "level3", 3, spaces.s, 5003),
            }
            try:
                paths = {level: server.push(nar_files) for level, server in servers.items()}
                names = list(sizes)
                transfer_table(
                    "Loopback (inside the server's namespace)", work, spaces.s, "127.0.0.1", servers, paths,
                    names, sizes, args.rounds,
                )  # fmt: skip
                latency_table(work, spaces.s, servers, paths)
                if not args.no_link:
                    subset, total = [], 0
                    for name in names:
                        if total >= args.link_mib * MIB:
                            break
                        subset.append(name)
                        total += sizes[name]
                    for rate in args.rates.split(","):
                        spaces.shape(rate)
                        transfer_table(
                            f"Link {rate} (tbf), namespace to namespace", work, spaces.c,
                            spaces.server_ip, servers, paths, subset, sizes, 1,
                        )  # fmt: skip
                    spaces.shape(None)
            finally:
                for server in servers.values():
                    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

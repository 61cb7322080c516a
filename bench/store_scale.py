#!/usr/bin/env python3
"""Benchmark the server and `nixcache gc` on a large store, and pushes while reads run.

    python bench/store_scale.py [--entries 1000000] [--seconds 10] [--checkout DIR]
                                [--push-paths 500] [--push-rounds 1] [--skip-store] [--skip-push]

Store scale (issue 15): writes `--entries` entries in the store's own layout (narinfo, NAR,
nar-meta; last served spread over 30 days, everything older than gc's grace period) with a
few syscalls per file, then measures:
- seconds from starting `nixcache serve` until the first narinfo is answered 200;
- hits at 16 connections rotating over every entry (a sample of up to 100,000 spread over the
  store), `--seconds` per round, two rounds each of the server and of nginx serving the same
  signed/ files (bench/reference_nginx.py), alternating after a warm-up: requests/s, the ratio and
  CPU per hit of each;
- the server's RSS (VmHWM) after those rounds (each process's peak; the store-usage scan has
  finished by then);
- `nixcache gc --max-size <half of the store>`: wall time and peak RSS.
`--checkout DIR` runs another checkout's code (e.g. `git archive <base> | tar -x -C DIR`) the
same way first, so before and after print side by side.

Pushes (`--push-paths` small paths built with nix-build into /nix/store, root): time of
`nix copy --to` this server vs `nix copy --to file://` (a local directory), and narinfo latency
(p50/p99 of GETs at a fixed rate on one keep-alive connection) idle, while the file:// copy runs
(the client's own CPU and disk load, nothing uploaded to the server) and while the push runs;
and the server's CPU per path pushed. `--push-rounds N` alternates the checkouts N times.
Prints the load average with each measurement: the machine may be shared. Writes nothing
outside its temp dirs, which it removes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import multiprocessing
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import reference_nginx
from serve import wait_port
from serve_front import cpu_seconds as cpu_seconds_of
from serve_front import workers as child_pids
from serve_front import wrk_rps

from nixcache import nixenv
from nixcache.keys import SecretKey, fingerprint
from nixcache.server import base32, narinfo
from nixcache.server.usage import StoreUsage

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
DAY = 86400
ROTATE_SAMPLE = 100_000


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def fast_base32(digest: bytes) -> str:
    """Nix base32 of `digest` (as base32.encode, checked below), a few times faster."""
    x = int.from_bytes(digest, "little")
    n = (len(digest) * 8 - 1) // 5 + 1
    return "".join(ALPHABET[(x >> (5 * i)) & 31] for i in range(n - 1, -1, -1))


def nar_of(contents: bytes) -> bytes:
    """A valid uncompressed NAR of one regular file."""

    def s(b: bytes) -> bytes:
        return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)

    return b"".join(s(p) for p in (b"nix-archive-1", b"(", b"type", b"regular", b"contents", contents, b")"))


def _write(path: str, data: bytes, times: tuple[int, int] | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if times is not None:
            os.utime(fd, ns=times)
    finally:
        os.close(fd)


KEY_FILE = "bench-signing-key"  # in a generated store's root: the key its signed/ texts carry
USAGE_TOTALS = "bench-usage.json"  # and its usage totals, written fresh into each copy of it


def _entry_hash(i: int, what: bytes) -> str:
    return fast_base32(hashlib.sha256(b"%s-%d" % (what, i)).digest())[:32]


def _write_chunk(root: str, key_text: str, start: int, stop: int, now_ns: int) -> tuple[list[str], int, int]:
    """Entries start..stop-1 (each a function of its index alone, so chunks run in parallel):
    NAR, meta, narinfo as the server stores them, and the signed text it serves."""
    key = SecretKey.parse(key_text)
    uploaded = (now_ns - 31 * DAY * 10**9,) * 2  # older than gc's grace period, and than any atime
    rng = random.Random(start)
    hashes = []
    narinfo_bytes = nar_bytes = 0
    for i in range(start, stop):
        nar = nar_of(i.to_bytes(8, "little") * (16 + i % 300))
        file_hash = fast_base32(hashlib.sha256(nar).digest())
        name = f"{file_hash}.nar"
        _write(f"{root}/nar/{name}", nar, uploaded)
        _write(f"{root}/nar-meta/{name}", f"sha256:{file_hash} {len(nar)}\n".encode(), None)
        h = _entry_hash(i, b"path")
        refs = [f"{_entry_hash(j, b'path')}-scale-{j}" for j in range(max(0, i - 3), i)]
        store_path = f"/nix/store/{h}-scale-{i}"
        text = (
            f"StorePath: {store_path}\nURL: nar/{name}\nCompression: none\n"
            f"FileHash: sha256:{file_hash}\nFileSize: {len(nar)}\nNarHash: sha256:{file_hash}\n"
            f"NarSize: {len(nar)}\nReferences: {' '.join(refs)}\n"
            f"Deriver: {_entry_hash(i, b'drv')}-scale-{i}.drv\n"
        )
        message = fingerprint(store_path, f"sha256:{file_hash}", len(nar), [f"/nix/store/{r}" for r in refs])
        signed = f"{text}Sig: {key.sign(message)}\n"
        served = now_ns - rng.randrange(30 * DAY) * 10**9
        _write(f"{root}/narinfo/{h}.narinfo", text.encode(), (served, uploaded[1]))
        _write(f"{root}/signed/{h}.narinfo", signed.encode(), uploaded)
        hashes.append(h)
        narinfo_bytes += len(text)
        nar_bytes += len(nar)
    return hashes, narinfo_bytes, nar_bytes


def _write_chunk_args(args: tuple) -> tuple[list[str], int, int]:
    return _write_chunk(*args)


def generate(root: Path, entries: int, processes: int | None = None) -> list[str]:
    """`entries` narinfos with their NARs, metas and signed texts (signed/KEYS: the key in
    `root/KEY_FILE`) under `root`, written by one process per core, and their usage totals
    (as the server keeps them, in `root/usage`); returns the hash parts."""
    assert fast_base32(b"\x01" * 32) == base32.encode(b"\x01" * 32)
    for d in ("narinfo", "nar", "nar-meta", "signed", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    key = SecretKey.generate("bench-1")
    (root / KEY_FILE).write_text(key.serialize())
    (root / "signed" / "KEYS").write_text(f"{key.public()}\n")
    now_ns = time.time_ns()
    step = 5000
    jobs = [(str(root), key.serialize(), n, min(n + step, entries), now_ns) for n in range(0, entries, step)]
    hashes: list[str] = []
    usage = StoreUsage(scanned_at=time.time())
    with multiprocessing.get_context("fork").Pool(processes or os.cpu_count()) as pool:
        for done, narinfo_bytes, nar_bytes in pool.imap(_write_chunk_args, jobs):
            hashes += done
            usage = usage.plus(StoreUsage(len(done), narinfo_bytes, len(done), nar_bytes))
    (root / USAGE_TOTALS).write_text(json.dumps(dataclasses.asdict(usage)))
    # What the server would serve for one of them, from the stored narinfo: the same bytes.
    sample = narinfo.parse((root / "narinfo" / f"{hashes[-1]}.narinfo").read_text())
    assert sample.signed([key], "/nix/store") == (root / "signed" / f"{hashes[-1]}.narinfo").read_text()
    return hashes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nixcache(*args: str) -> list[str]:
    return [sys.executable, "-c", "from nixcache.cli import main; main()", *args]


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User plus system CPU time of process `pid` (or of its `thread`) so far (load-independent,
    unlike wall time)."""
    stat = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_narinfo(port: int, hash_part: str, timeout: float = 300) -> float:
    """Poll until GET /<hash>.narinfo answers 200; the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", f"/{hash_part}.narinfo")
            if conn.getresponse().status == 200:
                return time.monotonic()
        except OSError:
            time.sleep(0.005)
    raise SystemExit(f"no narinfo from 127.0.0.1:{port} within {timeout}s")


WRK_ROTATE = """
local hashes = {}
for line in io.lines("%s") do hashes[#hashes + 1] = line end
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "/" .. hashes[(i * 7919) %% #hashes + 1] .. ".narinfo")
end
"""


def serve(checkout: Path | None, store: Path, work: Path, port: int, extra: list[str]) -> subprocess.Popen:
    key = work / "key"
    if not key.exists():
        key.write_text(SecretKey.generate("bench-1").serialize())
    key.chmod(0o600)
    return subprocess.Popen(
        nixcache("serve", "--listen", f"127.0.0.1:{port}", "--store", str(store),
                 "--signing-key", str(key), "--log-level", "warning", *extra),
        stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "ab"), cwd=checkout,
    )  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def prepared(store: Path, entries: int) -> list[str]:
    """The store at `store`, generated unless a complete one of `entries` is there (`--prepared`
    saves the generation time once, e.g. for a 1,000,000-entry run: each run uses a copy)."""
    marker = store / f"generated-{entries}"
    if marker.exists():
        return marker.read_text().split()
    if store.exists() and any(store.iterdir()):
        raise SystemExit(f"{store} holds something other than a complete store of {entries}: remove it")
    started = time.monotonic()
    hashes = generate(store, entries)
    print(f"wrote {entries} entries in {time.monotonic() - started:.0f} s (load {load()})", flush=True)
    subprocess.run(["sync"], check=True)
    marker.write_text("\n".join(hashes) + "\n")
    return hashes


def run_copy(pristine: Path, copy: Path, served: list[str]) -> None:
    """`copy`: the store `pristine` hard-linked (seconds, not a rewrite of 3 files an entry),
    so gc's unlinks leave `pristine` whole. What the server and gc change in place gets its
    own inode first: the usage totals (rewritten in place; written fresh, as a running server
    keeps them) and the narinfos that will be served (their atime is the last-served mark)."""
    started = time.monotonic()
    subprocess.run(["cp", "-al", str(pristine), str(copy)], check=True)
    usage = copy / "usage"
    usage.unlink(missing_ok=True)
    totals = json.loads((copy / USAGE_TOTALS).read_text())
    usage.write_text(json.dumps({**totals, "scanned_at": time.time()}).ljust(256))
    for hash_part in served:
        path = copy / "narinfo" / f"{hash_part}.narinfo"
        st = path.stat()
        tmp = path.with_name(f".{path.name}")
        tmp.write_bytes(path.read_bytes())
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, path)
    print(f"hard-linked copy of {pristine} in {time.monotonic() - started:.0f} s (load {load()})", flush=True)


def hits_against_nginx(
    name: str, server: int, port: int, store: Path, work: Path, seconds: int, sample: list[str]
) -> dict:
    """Hits at 16 connections rotating over the sample, the server against nginx serving the
    same signed/ files (reference_nginx: 2 workers, access log on, open_file_cache off as the
    server opens each file): the sample's files read into the page cache and a short wrk of
    each first, then two rounds each, alternating; medians of requests/s and CPU per hit."""
    nginx_port = free_port()
    prefix = work / f"nginx-{name}"
    conf = reference_nginx.conf(
        prefix, nginx_port, [reference_nginx.NARINFO.format(dir=store / "signed")],
        extra="open_file_cache off;",
    )  # fmt: skip
    nginx = reference_nginx.start(prefix, conf, [], stderr=open(work / "nginx.log", "ab"))  # noqa: SIM115
    script = work / "rotate.lua"
    try:
        wait_port(nginx_port)
        servers = {
            "nginx": (f"http://127.0.0.1:{nginx_port}", lambda: [nginx.pid, *child_pids(nginx.pid)]),
            "nixcache": (f"http://127.0.0.1:{port}", lambda: [server, *child_pids(server)]),
        }
        # Hits from the page cache, as both serve a hot store: the sample's files read first
        # (a fresh copy of a cold 1M store was I/O-bound in the rounds: nginx 3,310-7,187/s).
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as readers:
            signed = store / "signed"
            list(readers.map(lambda h: (signed / f"{h}.narinfo").read_bytes(), sample))
        print(f"[{name}] read the sample's signed files in {time.monotonic() - started:.0f} s", flush=True)
        for url, _ in servers.values():
            wrk_rps(url, 16, 2, script, [])  # warm-up, not counted
        rates: dict[str, list[float]] = {"nginx": [], "nixcache": []}
        cpu: dict[str, list[float]] = {"nginx": [], "nixcache": []}
        for number in (1, 2):
            for who, (url, pids) in servers.items():
                before = cpu_seconds_of(pids())
                rate, count = wrk_rps(url, 16, seconds, script, [])
                cpu[who].append((cpu_seconds_of(pids()) - before) / count * 1e6)
                rates[who].append(rate)
                print(f"[{name}] round {number} {who:>8}: {rate:7.0f} hits/s rotating over {len(sample)} "
                      f"entries, {cpu[who][-1]:5.1f} us CPU per hit (load {load()})", flush=True)  # fmt: skip
    finally:
        stop(nginx)
    rps, nginx_rps = statistics.median(rates["nixcache"]), statistics.median(rates["nginx"])
    return {
        "rps": rps,
        "nginx_rps": nginx_rps,
        "vs_nginx": statistics.median(a / b for a, b in zip(rates["nixcache"], rates["nginx"], strict=True)),
        "cpu_us": statistics.median(cpu["nixcache"]),
        "nginx_cpu_us": statistics.median(cpu["nginx"]),
    }


def store_round(
    name: str, checkout: Path | None, entries: int, seconds: int, work: Path, pristine: Path | None
) -> dict:
    hashes = prepared(pristine or work / f"store-{name}", entries)
    # wrk's Lua takes minutes to load a million lines: a sample spread over the whole store.
    sample = random.Random(2).sample(hashes, min(len(hashes), ROTATE_SAMPLE))
    first = hashes[len(hashes) // 2]
    if pristine is None:
        store = work / f"store-{name}"
    else:
        store = pristine.with_name(f"{pristine.name}-run")
        shutil.rmtree(store, ignore_errors=True)
        run_copy(pristine, store, [*sample, first])
    key = work / "key"
    key.write_text((store / KEY_FILE).read_text())  # the key signed/ was signed with
    (work / "hashes").write_text("\n".join(sample) + "\n")
    (work / "rotate.lua").write_text(WRK_ROTATE % (work / "hashes"))
    result: dict = {}
    port = free_port()
    begin = time.monotonic()
    proc = serve(checkout, store, work, port, [])
    try:
        result["first"] = first_narinfo(port, first) - begin
        result["first_cpu"] = cpu_seconds(proc.pid)
        print(f"[{name}] first narinfo {result['first']:.2f} s after start, server CPU until then "
              f"{result['first_cpu']:.2f} s (load {load()})", flush=True)  # fmt: skip
        result.update(hits_against_nginx(name, proc.pid, port, store, work, seconds, sample))
        result["rss"] = peak_rss_mib(proc.pid)
        print(f"[{name}] server peak RSS {result['rss']:.1f} MiB", flush=True)
    finally:
        stop(proc)
    # The server's usage totals (narinfos and NARs; gc also counts the NARs' metas, a few %).
    usage = json.loads((store / "usage").read_text())
    size = usage["narinfo_bytes"] + usage["nar_bytes"]
    begin = time.monotonic()
    gc = subprocess.run(
        ["/usr/bin/time", "-f", "%M %U %S",
         *nixcache("gc", "--store", str(store), "--max-size", str(size // 2))],
        capture_output=True, text=True, cwd=checkout,
    )  # fmt: skip
    result["gc"] = time.monotonic() - begin
    if gc.returncode != 0:
        raise SystemExit(f"gc failed: {gc.stderr}")
    rss_kib, user, system = gc.stderr.strip().splitlines()[-1].split()
    result["gc_rss"], result["gc_cpu"] = int(rss_kib) / 1024, float(user) + float(system)
    result["gc_line"] = gc.stdout.strip().splitlines()[-1]
    print(f"[{name}] gc --max-size half: {result['gc']:.1f} s, CPU {result['gc_cpu']:.1f} s, ", end="")
    print(f"RSS {result['gc_rss']:.0f} MiB", end="")
    print(f" (load {load()})")
    for line in gc.stdout.strip().splitlines()[:-1]:  # gc's progress: where the time went
        print(f"[{name}]   {line}")
    print(f"[{name}] {result['gc_line']}", flush=True)
    started = time.monotonic()
    shutil.rmtree(store)
    print(f"(removed {store} in {time.monotonic() - started:.0f} s)", flush=True)
    return result


# -- pushes ------------------------------------------------------------------------------------

SMALL_CLOSURE = """
let
  mk = i: derivation {
    name = "bench-push-${toString i}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo @SALT@ ${toString i} > $out" ];
  };
in builtins.genList mk @PATHS@
"""


def build_paths(work: Path, paths: int) -> list[str]:
    expr = work / "push.nix"
    expr.write_text(SMALL_CLOSURE.replace("@PATHS@", str(paths)).replace("@SALT@", "store-scale"))
    built = nixenv.run(["nix-build", "--no-out-link", str(expr)], home=work / "home-build", timeout=1800)
    if built.returncode != 0:
        raise SystemExit(f"nix-build failed: {built.stderr.strip().splitlines()[-3:]}")
    return built.stdout.split()


def nix_copy(to: str, paths: list[str], work: Path, tag: str) -> float:
    netrc = work / "netrc"
    begin = time.monotonic()
    copied = nixenv.run(
        ["nix", "copy", "--to", to, *paths, "--option", "netrc-file", str(netrc)],
        home=work / f"home-{tag}",
        timeout=1800,
    )
    elapsed = time.monotonic() - begin
    if copied.returncode != 0:
        raise SystemExit(f"nix copy --to {to} failed: {copied.stderr.strip()[-500:]}")
    return elapsed


class Reader(threading.Thread):
    """GET one narinfo every `interval` seconds on one keep-alive connection; latencies in ms."""

    def __init__(self, port: int, hash_part: str, interval: float = 0.005):
        super().__init__(daemon=True)
        self.port, self.hash_part, self.interval = port, hash_part, interval
        self.latencies: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        next_at = time.monotonic()
        while not self.done.is_set():
            start = time.monotonic()
            conn.request("GET", f"/{self.hash_part}.narinfo")
            response = conn.getresponse()
            response.read()
            self.latencies.append((time.monotonic() - start) * 1000)
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def server_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds of server `pid` and its workers, and of their event loops alone (each
    worker's main thread: what every other request on that worker waits for)."""
    children = [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    loops = sum(cpu_seconds(worker, worker) for worker in children or [pid])
    return cpu_seconds(pid) + sum(map(cpu_seconds, children)), loops


def push_round(name: str, checkout: Path | None, paths: list[str], work: Path) -> dict:
    """Reads idle, while `nix copy --to file://` runs (the client's own load on the machine: no
    upload reaches the server) and while the same paths are pushed to the server."""
    store = work / f"push-store-{name}"
    token = secrets.token_urlsafe(16)
    (work / "token").write_text(token + "\n")
    (work / "netrc").write_text(f"machine 127.0.0.1\nlogin nix\npassword {token}\n")
    port = free_port()
    proc = serve(checkout, store, work, port, ["--push-token-file", str(work / "token")])
    result: dict = {}
    try:
        probe = "0" * 32
        first_narinfo_or_404(port, probe)
        idle = Reader(port, probe)
        idle.start()
        time.sleep(5)
        idle.done.set()
        idle.join()
        client = Reader(port, probe)
        client.start()
        target = work / f"file-cache-{name}"
        result["file"] = nix_copy(f"file://{target}", paths, work, f"file-{name}")
        client.done.set()
        client.join()
        shutil.rmtree(target)
        reader = Reader(port, probe)
        reader.start()
        cpu, loop = server_cpu_seconds(proc.pid)
        result["push"] = nix_copy(f"http://127.0.0.1:{port}", paths, work, f"push-{name}")
        cpu_after, loop_after = server_cpu_seconds(proc.pid)
        result["cpu_ms"] = (cpu_after - cpu) * 1000 / len(paths)
        result["loop_ms"] = (loop_after - loop) * 1000 / len(paths)
        reader.done.set()
        reader.join()
    finally:
        stop(proc)
    for key, measured in (("idle", idle), ("file", client), ("busy", reader)):
        result[f"{key}_p50"] = pct(measured.latencies, 0.5)
        result[f"{key}_p99"] = pct(measured.latencies, 0.99)
    shutil.rmtree(store)
    print(
        f"[{name}] nix copy --to file:// {result['file']:.1f} s, --to http {result['push']:.1f} s "
        f"(server CPU {result['cpu_ms']:.2f} ms per path, {result['loop_ms']:.2f} on the event loops); "
        f"narinfo p50/p99 idle "
        f"{result['idle_p50']:.2f}/{result['idle_p99']:.2f} ms, while copying to file:// "
        f"{result['file_p50']:.2f}/{result['file_p99']:.2f} ms, while pushing "
        f"{result['busy_p50']:.2f}/{result['busy_p99']:.2f} ms (load {load()})",
        flush=True,
    )
    return result


def first_narinfo_or_404(port: int, hash_part: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", f"/{hash_part}.narinfo")
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing answers on 127.0.0.1:{port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--checkout", type=Path, help="also run this checkout's code, first (before)")
    parser.add_argument("--push-paths", type=int, default=500)
    parser.add_argument("--push-rounds", type=int, default=1, help="push rounds, alternating the checkouts")
    parser.add_argument("--skip-store", action="store_true")
    parser.add_argument("--skip-push", action="store_true")
    parser.add_argument("--work", type=Path, help="temp dir parent (needs ~12 KiB per entry)")
    parser.add_argument(
        "--prepared",
        type=Path,
        help="a store generated by an earlier `--prepare-only`, left as it is: each run serves "
        "and collects a hard-linked copy of it, DIR-run, beside it",
    )
    parser.add_argument("--prepare-only", action="store_true", help="generate --prepared and exit")
    args = parser.parse_args()
    if args.prepare_only:
        if not args.prepared:
            raise SystemExit("--prepare-only needs --prepared DIR")
        prepared(args.prepared, args.entries)
        return 0
    work = Path(tempfile.mkdtemp(prefix="nixcache-scale-", dir=args.work))
    runs = ([("before", args.checkout.resolve())] if args.checkout else []) + [("after", None)]
    try:
        store_results = {}
        if not args.skip_store:
            for name, checkout in runs:
                store_results[name] = store_round(
                    name, checkout, args.entries, args.seconds, work, args.prepared
                )
        push_results: dict[str, list[dict]] = {}
        if not args.skip_push:
            paths = build_paths(work, args.push_paths)
            for _ in range(args.push_rounds):
                for name, checkout in runs:
                    push_results.setdefault(name, []).append(push_round(name, checkout, paths, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nload average at the end: {load()} (2 cores, shared with other work)")
    if store_results:
        print(f"{args.entries} entries{'':16}" + "".join(f"{n:>12}" for n in store_results) + "   target")
        for label, key, unit, target in (
            ("first narinfo after start", "first", "s", "< 1 s"),
            ("  server CPU until then", "first_cpu", "s", ""),
            ("hits, 16 conns (100k-entry sample)", "rps", "/s", ""),
            ("  nginx, same files and client", "nginx_rps", "/s", ""),
            ("  nixcache / nginx (median of rounds)", "vs_nginx", "x", ">= 0.7x"),
            ("  server CPU per hit", "cpu_us", "us", ""),
            ("  nginx CPU per hit", "nginx_cpu_us", "us", ""),
            ("server peak RSS", "rss", "MiB", "< 100 MiB"),
            ("gc --max-size half", "gc", "s", "< 60 s"),
            ("  gc CPU (user + system)", "gc_cpu", "s", ""),
            ("gc peak RSS", "gc_rss", "MiB", ""),
        ):
            digits = 2 if unit == "x" else 1
            cells = "".join(f"{r[key]:>9.{digits}f} {unit:<3}" for r in store_results.values())
            print(f"{label:35}{cells}   {target}")
    if push_results:
        # Per round, each push against the file:// copy and the idle reads of its own round;
        # the medians of those ratios over the rounds.
        print(f"\nnix copy of {args.push_paths} small paths, medians of {args.push_rounds} round(s):")
        for name, rounds in push_results.items():

            def median(key: str, rounds: list[dict] = rounds) -> float:
                return statistics.median(r[key] for r in rounds)

            def ratio(a: str, b: str, rounds: list[dict] = rounds) -> float:
                return statistics.median(r[a] / r[b] for r in rounds)

            print(
                f"  {name:>6}: http {median('push'):.1f} s vs file:// {median('file'):.1f} s = "
                f"{ratio('push', 'file'):.2f}x (target <= 3x), server CPU {median('cpu_ms'):.2f} ms/path "
                f"({median('loop_ms'):.2f} on the event loops); "
                f"narinfo p99 idle {median('idle_p99'):.2f} ms, while copying to file:// "
                f"{median('file_p99'):.2f} ms ({ratio('file_p99', 'idle_p99'):.2f}x: the client's share), "
                f"while pushing {median('busy_p99'):.2f} ms = {ratio('busy_p99', 'idle_p99'):.2f}x idle "
                f"(target <= 2x)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

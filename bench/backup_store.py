"""restic through the repository host's append-only REST server, side by side with a local repository.

    python bench/backup_store.py                 # 2000 files of 16 KiB and 4 of 8 MiB (64 MiB)
    python bench/backup_store.py --files 5000    # more small files

Runs the real `restic` against: a repository directory on local disk (the reference: no
server at all), and `rclone serve restic --append-only --private-repos` on loopback, once with
the deploy's `{SHA}` htpasswd and once with a bcrypt (cost 10) one, which rclone checks on
every request. Times a first backup, an unchanged second one, `snapshots`, a full restore,
and 50 `cat config` calls (one authenticated request each, to show the cost per request), and
rclone's peak resident memory.
Prints one table; nothing is asserted. Loopback only: nothing leaves this machine.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bcrypt

REQUESTS = 50


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_tree(root: Path, files: int) -> int:
    """Small files like narinfos and config, a few big ones like NARs; returns total bytes."""
    total = 0
    for i in range(files):
        path = root / f"d{i % 64:02d}" / f"f{i:05d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(16 * 1024))
        total += 16 * 1024
    for i in range(4):
        (root / f"big{i}.nar").write_bytes(os.urandom(8 * 1024 * 1024))
        total += 8 * 1024 * 1024
    return total


def serve(data: Path, htpasswd: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = ["rclone", "serve", "restic", "--config", "/dev/null", "--addr", f"127.0.0.1:{port}",
            "--append-only", "--private-repos", "--htpasswd", str(htpasswd), "--cache-objects=false",
            str(data)]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("rclone serve restic did not start")


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), for backup_store_memory_max."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def timed(env: dict[str, str], *args: str, times: int = 1) -> float:
    started = time.monotonic()
    for _ in range(times):
        subprocess.run(["restic", *args], env=env, check=True, capture_output=True)
    return time.monotonic() - started


def measure(name: str, repository: str, work: Path, tree: Path) -> dict[str, float]:
    env = dict(os.environ, RESTIC_REPOSITORY=repository, RESTIC_PASSWORD_FILE=str(work / "password"))
    env["RESTIC_CACHE_DIR"] = str(work / f"cache-{name}")
    timed(env, "init")
    target = work / f"restore-{name}"
    return {
        "first backup": timed(env, "backup", "--host", "bench", str(tree)),
        "unchanged backup": timed(env, "backup", "--host", "bench", str(tree)),
        "snapshots": timed(env, "snapshots", "--no-lock"),
        "restore": timed(env, "restore", "latest", "--target", str(target)),
        f"{REQUESTS} x cat config": timed(env, "cat", "config", "--no-lock", times=REQUESTS),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000, help="small files in the tree")
    args = parser.parse_args()
    for tool in ("restic", "rclone"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install {tool})")
    work = Path(tempfile.mkdtemp(prefix="bench-backup-store-"))
    servers = []
    try:
        (work / "password").write_text(secrets.token_urlsafe(32))
        tree = work / "tree"
        size = make_tree(tree, args.files)
        token = secrets.token_urlsafe(32)
        sha = base64.b64encode(hashlib.sha1(token.encode()).digest()).decode()  # noqa: S324 - what the deploy writes
        lines = {
            "sha": f"bench:{{SHA}}{sha}\n",
            "bcrypt": f"bench:{bcrypt.hashpw(token.encode(), bcrypt.gensalt(10)).decode()}\n",
        }
        results = {"local directory (reference)": measure("local", str(work / "local"), work, tree)}
        peaks: dict[str, float] = {}
        for kind, line in lines.items():
            (work / f"htpasswd-{kind}").write_text(line)
            data = work / f"served-{kind}"
            data.mkdir()
            process, port = serve(data, work / f"htpasswd-{kind}")
            servers.append(process)
            url = f"rest:http://bench:{token}@127.0.0.1:{port}/bench/"
            results[f"rclone REST, {kind} htpasswd"] = measure(kind, url, work, tree)
            peaks[kind] = peak_rss_mib(process.pid)
        columns = list(results)
        print(f"restic {args.files} x 16 KiB + 4 x 8 MiB ({size / 2**20:.0f} MiB), seconds;"
              " measured on a shared machine under other engineers' load")  # fmt: skip
        print(f"{'':<22}" + "".join(f"{c:>30}" for c in columns))
        for step in results[columns[0]]:
            print(f"{step:<22}" + "".join(f"{results[c][step]:>30.2f}" for c in columns))
        print("rclone peak resident memory: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items()))
    finally:
        for process in servers:
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

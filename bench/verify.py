#!/usr/bin/env python3
"""Benchmark `nixcache verify` against coreutils reading and hashing the same store.

    python bench/verify.py [--entries 60] [--nar-mib 5] [--rounds 3]

Builds a synthetic store (--entries NARs of --nar-mib MiB each, half xz and half zstd as
`nix copy` and Lix write them, contents half random and half text-like so the decompressors do
real work) in a temp dir, then times, on the same files, best of --rounds:

- `cat nar/* > /dev/null`            reading only (the page cache's speed once warm)
- `sha256sum nar/*`                  the reference for hashing every file (FileHash)
- `nixcache verify`                  FileHash/FileSize and nar-meta, what the timer runs
- `xz -dc / zstd -dc | sha256sum`    the reference for decompressing and hashing (NarHash)
- `nixcache verify --nar-hash`       FileHash plus the decompressed content (NarHash/NarSize)

The store fits in the page cache, so after the first round these measure CPU, not the disk:
on a real store of hundreds of GiB the disk sets the pace of the default run. Rates are MiB of
NAR files (compressed bytes) per second. Prints a table; writes nothing outside the temp dir.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

from nixcache.server import base32

WORDS = [
    bytes(random.Random(i).choices(range(97, 123), k=random.Random(i).randint(2, 9))) for i in range(4096)
]


def nar_of(contents: bytes) -> bytes:
    def string(data: bytes) -> bytes:
        return len(data).to_bytes(8, "little") + data + b"\0" * (-len(data) % 8)

    parts = [b"nix-archive-1", b"(", b"type", b"regular", b"contents", contents, b")"]
    return b"".join(string(p) for p in parts)


def contents(size: int, seed: int) -> bytes:
    """Half random bytes (binaries, already compressed data), half text (scripts, docs)."""
    rng = random.Random(seed)
    text = b" ".join(rng.choices(WORDS, k=size // 6))[: size // 2]
    return os.urandom(size - len(text)) + text


def build_store(root: Path, entries: int, nar_mib: int) -> int:
    for directory in ("narinfo", "nar", "nar-meta", "tmp"):
        (root / directory).mkdir(parents=True)
    total = 0
    for i in range(entries):
        nar = nar_of(contents(nar_mib << 20, i))
        if i % 2:
            data, ext, compression = lzma.compress(nar, preset=1), ".nar.xz", "xz"
        else:
            data, ext, compression = zstandard.ZstdCompressor(level=3).compress(nar), ".nar.zst", "zstd"
        name = base32.encode(hashlib.sha256(data).digest()) + ext
        nar_hash = "sha256:" + base32.encode(hashlib.sha256(nar).digest())
        (root / "nar" / name).write_bytes(data)
        (root / "nar-meta" / name).write_text(f"{nar_hash} {len(nar)}\n")
        hash_part = base32.encode(os.urandom(20))
        (root / "narinfo" / f"{hash_part}.narinfo").write_text(
            f"StorePath: /nix/store/{hash_part}-bench-{i}\nURL: nar/{name}\nCompression: {compression}\n"
            f"FileHash: sha256:{name[:52]}\nFileSize: {len(data)}\nNarHash: {nar_hash}\n"
            f"NarSize: {len(nar)}\nReferences: \n"
        )
        total += len(data)
    return total


def timed(argv: list[str] | str, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        result = subprocess.run(argv, shell=isinstance(argv, str), capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"{argv!r} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
        best = min(best, elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=60)
    parser.add_argument("--nar-mib", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for tool in ("sha256sum", "xz", "zstd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install coreutils xz-utils zstd")
    with tempfile.TemporaryDirectory(prefix="nixcache-bench-verify-") as tmp:
        store = Path(tmp) / "store"
        total = build_store(store, args.entries, args.nar_mib)
        mib = total / (1 << 20)
        nixcache = [
            sys.executable,
            "-c",
            "from nixcache.cli import main; main()",
            "verify",
            "--store",
            str(store),
        ]
        nar = f"{store}/nar"
        decompress = (
            f"for f in {nar}/*.xz; do xz -dc $f | sha256sum; done; "
            f"for f in {nar}/*.zst; do zstd -dcq $f | sha256sum; done"
        )
        rows = [
            ("cat nar/* > /dev/null (read only)", f"cat {nar}/* > /dev/null"),
            ("sha256sum nar/* (reference)", f"sha256sum {nar}/* > /dev/null"),
            ("nixcache verify", nixcache),
            ("xz/zstd -dc | sha256sum (reference)", decompress + " > /dev/null"),
            ("nixcache verify --nar-hash", [*nixcache, "--nar-hash"]),
        ]
        timed(f"cat {nar}/* > /dev/null", 1)  # warm the page cache for every row alike
        load = os.getloadavg()[0]
        print(
            f"store: {args.entries} NARs, {mib:.0f} MiB of files (half xz, half zstd); best of {args.rounds}"
        )
        print(f"load average at start: {load:.1f} (a shared 2-core machine: numbers under load)")
        print(f"{'what':<40} {'seconds':>8} {'MiB/s':>8}")
        for label, argv in rows:
            seconds = timed(argv, args.rounds)
            print(f"{label:<40} {seconds:8.2f} {mib / seconds:8.1f}")


if __name__ == "__main__":
    main()

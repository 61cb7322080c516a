"""Test helpers: start `nixcache serve` on an ephemeral loopback port, build NARs and narinfos."""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import zstandard
from support import process

from nixcache.keys import SecretKey
from nixcache.server import base32

_LISTENING = re.compile(r"serving .* on http://([\d.]+):(\d+)")


def nixcache_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from nixcache.cli import main; main()", *args]


SERVE = nixcache_cmd("serve")


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> None:
        process.stop(self.proc)

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()


def start_server(
    args: list[str],
    home: Path,
    log: Path,
    timeout: float = 60.0,
    checkout: Path | None = None,
    preamble: str = "",
) -> ServerProcess:
    """Run `nixcache serve ARGS` and wait (bounded) until it prints where it listens (60 s: with
    one worker per core, a start-up on a loaded 2-core machine took 20-30 s).
    `checkout`: run that checkout's code (bench/ compares a branch point with this one);
    `preamble`: Python run in the server process first (a test's stand-in for a slow disk)."""
    env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data")}
    handle = open(log, "wb")  # noqa: SIM115 - the child writes to it for its whole life
    command = SERVE if not preamble else nixcache_cmd("serve")
    if preamble:
        command[2] = f"{preamble}\n{command[2]}"
    proc = subprocess.Popen([*command, *args], stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=checkout)
    handle.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = _LISTENING.search(log.read_text())
        if match:
            return ServerProcess(proc, f"http://{match.group(1)}:{match.group(2)}", log)
        if proc.poll() is not None:
            raise RuntimeError(f"nixcache serve exited {proc.returncode}: {log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"nixcache serve did not start within {timeout}s: {log.read_text()}")


def write_key(directory: Path, name: str = "test-cache-1") -> tuple[Path, SecretKey]:
    key = SecretKey.generate(name)
    path = directory / f"{name}.secret"
    path.write_text(key.serialize())
    path.chmod(0o600)
    return path, key


def nar_string(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + b"\0" * (-len(data) % 8)


def make_nar(contents: bytes) -> bytes:
    """The NAR serialisation of a single regular file holding `contents`."""
    parts = [b"nix-archive-1", b"(", b"type", b"regular", b"contents", contents, b")"]
    return b"".join(nar_string(p) for p in parts)


COMPRESSORS = {
    "none": (lambda b: b, ".nar"),
    "xz": (lzma.compress, ".nar.xz"),
    "bzip2": (bz2.compress, ".nar.bz2"),
    "zstd": (lambda b: zstandard.ZstdCompressor().compress(b), ".nar.zst"),
}


def random_hash() -> str:
    return base32.encode(os.urandom(20))


@dataclass
class Entry:
    """A store path ready to push: its NAR file bytes and narinfo text."""

    hash_part: str
    store_path: str
    nar_file: str
    file_bytes: bytes
    nar: bytes
    compression: str
    references: list[str]

    def narinfo(self, **override: str | None) -> str:
        fields: dict[str, str | None] = {
            "StorePath": self.store_path,
            "URL": f"nar/{self.nar_file}",
            "Compression": self.compression,
            "FileHash": "sha256:" + base32.encode(hashlib.sha256(self.file_bytes).digest()),
            "FileSize": str(len(self.file_bytes)),
            "NarHash": "sha256:" + base32.encode(hashlib.sha256(self.nar).digest()),
            "NarSize": str(len(self.nar)),
            "References": " ".join(self.references),
        }
        fields.update(override)
        return "".join(f"{k}: {v}\n" for k, v in fields.items() if v is not None)


def make_entry(
    contents: bytes | None = None,
    compression: str = "xz",
    references: list[str] | None = None,
    name: str = "pkg",
) -> Entry:
    nar = make_nar(contents if contents is not None else os.urandom(64))
    compress, ext = COMPRESSORS[compression]
    file_bytes = compress(nar)
    hash_part = random_hash()
    file_hash = base32.encode(hashlib.sha256(file_bytes).digest())
    return Entry(
        hash_part=hash_part,
        store_path=f"/nix/store/{hash_part}-{name}",
        nar_file=file_hash + ext,
        file_bytes=file_bytes,
        nar=nar,
        compression=compression,
        references=references or [],
    )


def push(client: httpx.Client, entry: Entry, token: str) -> None:
    """PUT the NAR, then the narinfo, as nix copy does; assert both are stored."""
    auth = ("nix", token)
    response = client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes, auth=auth)
    assert response.status_code == 201, response.text
    response = client.put(f"/{entry.hash_part}.narinfo", content=entry.narinfo(), auth=auth)
    assert response.status_code == 201, response.text

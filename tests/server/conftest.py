"""Fixtures: a running `nixcache serve` on an ephemeral loopback port with a fresh store, key and token."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from nixcache.keys import SecretKey
from server.helpers import ServerProcess, start_server, write_key


@dataclass
class Cache:
    server: ServerProcess
    store: Path
    key: SecretKey
    key_file: Path
    token: str
    read_token: str | None
    client: httpx.Client

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def auth(self) -> tuple[str, str]:
        return ("nix", self.token)


StartCache = Callable[..., Cache]


@pytest.fixture
def start_cache(tmp_path: Path) -> Iterator[StartCache]:
    """Start caches on demand; `extra` flags are appended, `read_token=True` also sets a read token."""
    started: list[Cache] = []

    def start(
        *extra: str, read_token: bool = False, store: Path | None = None, name: str = "c", preamble: str = ""
    ) -> Cache:
        base = tmp_path / name
        base.mkdir(exist_ok=True)
        key_file, key = write_key(base)
        token = secrets.token_urlsafe(24)
        (base / "push-token").write_text(token + "\n")
        args = [
            "--listen", "127.0.0.1:0",
            "--store", str(store or base / "store"),
            "--signing-key", str(key_file),
            "--push-token-file", str(base / "push-token"),
        ]  # fmt: skip
        read = None
        if read_token:
            read = secrets.token_urlsafe(24)
            (base / "read-token").write_text(read)
            args += ["--read-token-file", str(base / "read-token")]
        if "--workers" not in extra:
            # One process unless a test asks for more: many tests read the order of the log or
            # in-process state (negative cache, one fetch per NAR); test_workers.py covers N.
            args += ["--workers", "1"]
        server = start_server([*args, *extra], home=base, log=base / "server.log", preamble=preamble)
        cache = Cache(
            server=server,
            store=store or base / "store",
            key=key,
            key_file=key_file,
            token=token,
            read_token=read,
            client=httpx.Client(base_url=server.url, timeout=30),
        )
        started.append(cache)
        return cache

    yield start
    for cache in started:
        cache.client.close()
        cache.server.stop()


@pytest.fixture
def cache(start_cache: StartCache) -> Cache:
    return start_cache()

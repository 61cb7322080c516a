"""pytest fixtures around the Connect emulator: a running server and OP_CONNECT_* pointing at it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from support.opconnect import ConnectEmulator, serve


@dataclass
class Connect:
    emulator: ConnectEmulator
    url: str
    token: str
    vault_id: str  # the vault named "Infra"


@pytest.fixture
def op_connect(monkeypatch) -> Iterator[Connect]:
    """A fresh emulator with one vault "Infra", and the environment pointed at it with a valid token."""
    emulator = ConnectEmulator()
    vault_id = emulator.add_vault("Infra")
    token = emulator.issue_token()
    with serve(emulator) as url:
        monkeypatch.setenv("OP_CONNECT_HOST", url)
        monkeypatch.setenv("OP_CONNECT_TOKEN", token)
        monkeypatch.delenv("OP_CONNECT_CA_FILE", raising=False)
        yield Connect(emulator, url, token, vault_id)

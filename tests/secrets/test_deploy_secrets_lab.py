"""End to end: cache hosts whose signing key and push token come from Vault and from 1Password.

pyinfra runs at its most verbose (-vvv --debug-all: every library's debug log too) against two
lab hosts: lab1 takes its secrets from a real Vault-API server (OpenBao dev), lab2 from the
Connect API emulator. Neither secret
exists before the first deploy, so the deploy generates them, stores them, and installs them.
Then: no secret value in pyinfra's output or in the hosts' journals; the key each host serves at
/pubkey is the stored one; a second deploy reuses the stored values; and a deploy that cannot
reach the secret store fails before it changes anything on a fresh host.
"""

from __future__ import annotations

import os
import secrets as random_secrets
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from support.bao import bao, free_port  # noqa: F401
from support.opconnect import ConnectEmulator, serve

from nixcache.keys import SecretKey

# Fixtures come from tests/support (imported, so test arguments "redefine" them).
# ruff: noqa: F811

REPO = Path(__file__).resolve().parents[2]
DEPLOY_TIMEOUT = 900
CACHE_PORT = 5000

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from nixcache.lab.lab import Lab

    instance = Lab(tmp_path_factory.mktemp("secrets-lab") / "lab", progress=lambda line: None)
    try:
        instance.up(3)
        yield instance
    finally:
        instance.down()


def write_inventory(root: Path, lab, refs: dict[str, dict[str, object]]) -> Path:
    """An inventory with group `lab` (so inventories/group_data/lab.py applies) and per-host refs."""
    hosts = []
    for name, data in refs.items():
        host = lab.host(name)
        connection = {
            "ssh_hostname": host.address,
            "ssh_user": host.ssh_user,
            "ssh_key": host.ssh_key,
            "ssh_known_hosts_file": str(lab.known_hosts),
            "ssh_strict_host_key_checking": "no",
        }
        hosts.append((name, {**connection, **data}))
    inventory = root / "secrets_lab.py"
    inventory.write_text(f"lab = {hosts!r}\n")
    return inventory


def pyinfra(inventory: Path, lab, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the main deploy at pyinfra's highest verbosity; output also kept in a file beside the inventory."""
    command = [
        "pyinfra", "-y", "-vvv", "--debug-all",
        "--group-data", str(REPO / "inventories" / "group_data"),
        str(inventory), "deploys/cache.py",
    ]  # fmt: skip
    full_env = {**os.environ, **env, "NIXCACHE_LAB_DIR": str(lab.state_dir)}
    log = inventory.with_suffix(f".{len(list(inventory.parent.glob('*.log')))}.log")
    with log.open("w") as out:
        process = subprocess.run(
            command, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True,
            timeout=DEPLOY_TIMEOUT, check=False,
        )  # fmt: skip
    return subprocess.CompletedProcess(command, process.returncode, log.read_text(), "")


def journal(lab, name: str) -> str:
    code, output = lab.run(name, ["journalctl", "--no-pager", "-o", "cat"], timeout=60)
    assert code == 0, output
    return output


def secret_pieces(values: list[str]) -> list[str]:
    """Each value and, for keys, its base64 half on its own (a log could cut off the name)."""
    pieces = []
    for value in values:
        pieces.append(value)
        if ":" in value:
            pieces.append(value.split(":", 1)[1])
    return pieces


def test_deploy_with_secrets_from_vault_and_1password(lab, bao, tmp_path):
    run = uuid.uuid4().hex[:8]
    vault_path = f"nixcache/lab-{run}"
    emulator = ConnectEmulator()
    emulator.add_vault("Infra")
    op_token = emulator.issue_token()
    refs = {
        "lab1": {
            "signing_key_ref": f"vault://secret/{vault_path}#signing_key",
            "push_token_ref": f"vault://secret/{vault_path}#push_token",
            "signing_key_generate": True,
            "push_token_generate": True,
        },
        "lab2": {
            "signing_key_ref": f"op://Infra/nixcache lab2 {run}/signing key",
            "push_token_ref": f"op://Infra/nixcache lab2 {run}/push token",
            "signing_key_generate": True,
            "push_token_generate": True,
        },
    }
    inventory = write_inventory(tmp_path, lab, refs)
    with serve(emulator) as op_url:
        env = {
            "VAULT_ADDR": bao.addr,
            "VAULT_TOKEN": bao.root_token,
            "OP_CONNECT_HOST": op_url,
            "OP_CONNECT_TOKEN": op_token,
        }
        first = pyinfra(inventory, lab, env)
        assert first.returncode == 0, (first.stdout + first.stderr)[-6000:]

        os.environ.update(env)  # resolve the stored values as the deploy did (restored below)
        try:
            from nixcache import secrets

            stored = {
                name: {k: secrets.resolve(v) for k, v in r.items() if k.endswith("_ref")}
                for name, r in refs.items()
            }
        finally:
            for key in env:
                os.environ.pop(key, None)

        # What each host serves is the key the store holds.
        for name, values in stored.items():
            response = httpx.get(f"http://{lab.host(name).address}:{CACHE_PORT}/pubkey", timeout=10)
            assert response.status_code == 200
            assert response.text.strip() == str(SecretKey.parse(values["signing_key_ref"]).public())

        # No secret value in pyinfra's most verbose output, nor in the hosts' journals.
        pieces = secret_pieces([value for values in stored.values() for value in values.values()])
        pieces += [bao.root_token, op_token]
        output = first.stdout + first.stderr
        assert "[pyinfra.connectors.ssh] Running command" in output  # debug output was on
        for name in stored:
            log = journal(lab, name)
            assert "nixcache" in log  # the service's own lines are in the journal read
            for piece in pieces:
                assert piece not in output, f"a secret value appears in pyinfra's output ({name})"
                assert piece not in log, f"a secret value appears in {name}'s journal"

        # A second deploy reuses what is stored and installs nothing new.
        writes_before = [r for r in emulator.requests if r[0] in ("POST", "PUT", "PATCH")]
        version_before = bao.client().secrets.kv.v2.read_secret_metadata(
            path=vault_path, mount_point="secret"
        )["data"]["current_version"]
        second = pyinfra(inventory, lab, env)
        assert second.returncode == 0, (second.stdout + second.stderr)[-6000:]
        assert [r for r in emulator.requests if r[0] in ("POST", "PUT", "PATCH")] == writes_before
        assert (
            bao.client().secrets.kv.v2.read_secret_metadata(path=vault_path, mount_point="secret")["data"][
                "current_version"
            ]
            == version_before
        )
        for name, values in stored.items():
            response = httpx.get(f"http://{lab.host(name).address}:{CACHE_PORT}/pubkey", timeout=10)
            assert response.text.strip() == str(SecretKey.parse(values["signing_key_ref"]).public())


def test_unreachable_store_fails_before_any_change(lab, tmp_path):
    before = set(os.listdir(Path(lab.host("lab3").root) / "etc"))
    inventory = write_inventory(
        tmp_path,
        lab,
        {
            "lab3": {
                "signing_key_ref": f"vault://secret/nixcache/never-{uuid.uuid4().hex[:8]}#signing_key",
                "push_token_ref": "vault://secret/nixcache/never#push_token",
                "signing_key_generate": True,
                "push_token_generate": True,
            }
        },
    )
    token = random_secrets.token_urlsafe(16)
    result = pyinfra(inventory, lab, {"VAULT_ADDR": f"http://127.0.0.1:{free_port()}", "VAULT_TOKEN": token})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "server unreachable" in output and "check VAULT_ADDR" in output
    assert token not in output
    etc = Path(lab.host("lab3").root) / "etc"
    assert not (etc / "nixcache").exists()
    assert set(os.listdir(etc)) == before
    code, _ = lab.run("lab3", ["test", "-e", "/opt/nixcache"])
    assert code != 0

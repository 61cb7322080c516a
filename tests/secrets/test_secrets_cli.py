"""`nixcache secrets check|get|put|signing-key` as an operator runs them (the real entry point)."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

from support.bao import bao, free_port, vault_env  # noqa: F401
from support.opfixtures import op_connect  # noqa: F401

from nixcache.keys import SecretKey

# Fixtures come from tests/support (imported, so test arguments "redefine" them).
# ruff: noqa: F811


# The checkout these tests belong to: the `nixcache` entry point may be an editable install of
# another checkout (or worktree), so PYTHONPATH makes the command run this one's code.
CHECKOUT = Path(__file__).resolve().parents[2]


def nixcache(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
    return subprocess.run(
        ["nixcache", *args],
        cwd=cwd, input=stdin, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def write_inventory(root: Path, refs: dict[str, str]) -> Path:
    """inventories/test.py with two groups, and group_data/caches.py next to it holding the refs."""
    (root / "inventories" / "group_data").mkdir(parents=True)
    inventory = root / "inventories" / "test.py"
    inventory.write_text(
        textwrap.dedent("""
        caches = [("cache-a", {"ssh_hostname": "10.0.0.1"}), ("cache-b", {"ssh_hostname": "10.0.0.2"})]
        edge = [("edge-1", {"ssh_hostname": "10.0.0.3", "push_token_ref": "file://secrets/edge-push"})]
        """)
    )
    body = "".join(f"{key} = {value!r}\n" for key, value in refs.items())
    (root / "inventories" / "group_data" / "caches.py").write_text(body)
    return inventory


def test_check_reports_each_reference_once_without_values(tmp_path, vault_env, op_connect):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "edge-push").write_text("edge-push-value-xyz")
    vault_env.client().secrets.kv.v2.create_or_update_secret(
        path="cli/check", secret={"push": "vault-push-value-xyz"}, mount_point="secret"
    )
    op_connect.emulator.add_item(op_connect.vault_id, "cache", {"read": "op-read-value-xyz"})
    inventory = write_inventory(
        tmp_path,
        {
            "push_token_ref": "vault://secret/cli/check#push",
            "read_token_ref": "op://Infra/cache/read",
            "backup_password_ref": "vault://secret/cli/check#absent",
            "tls_key_ref": "vault:/secret/typo#k",
            "signing_key_ref": "file://secrets/signing-key",
            "signing_key_generate": True,
            "cache_port": 5000,
        },
    )
    result = nixcache("secrets", "check", str(inventory), cwd=tmp_path)
    out = result.stdout
    assert result.returncode == 1, result.stderr
    lines = sorted(out.splitlines())
    assert "ok  vault://secret/cli/check#push  (hosts: cache-a, cache-b)" in lines
    assert "ok  op://Infra/cache/read  (hosts: cache-a, cache-b)" in lines
    assert "ok  file://secrets/edge-push  (hosts: edge-1)" in lines
    assert any(
        line.startswith("FAIL vault://secret/cli/check#absent: secret secret/cli/check has no key 'absent'")
        for line in lines
    ), out
    assert any(
        line.startswith("FAIL vault:/secret/typo#k: tls_key_ref is not a secret reference") for line in lines
    )
    assert any(line.startswith("new file://secrets/signing-key: absent;") for line in lines), out
    assert len(lines) == 6
    for value in ("edge-push-value-xyz", "vault-push-value-xyz", "op-read-value-xyz", vault_env.root_token):
        assert value not in out and value not in result.stderr
    assert not (tmp_path / "secrets" / "signing-key").exists()  # check never generates


def test_check_resolves_op_references_with_a_section(tmp_path, op_connect):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "edge-push").write_text("x")
    op_connect.emulator.add_item(
        op_connect.vault_id, "cache", {"push": "op-outside-xyz"}, sections={"prod": {"push": "op-prod-xyz"}}
    )
    inventory = write_inventory(
        tmp_path,
        {"push_token_ref": "op://Infra/cache/prod/push", "read_token_ref": "op://Infra/cache/staging/push"},
    )
    result = nixcache("secrets", "check", str(inventory), cwd=tmp_path)
    out = result.stdout
    assert result.returncode == 1, result.stderr
    lines = out.splitlines()
    assert "ok  op://Infra/cache/prod/push  (hosts: cache-a, cache-b)" in lines, out
    assert any(
        line.startswith("FAIL op://Infra/cache/staging/push: item 'cache' has no section 'staging'")
        for line in lines
    ), out
    assert "op-prod-xyz" not in out + result.stderr and "op-outside-xyz" not in out + result.stderr


def test_check_validates_signing_keys(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "edge-push").write_text("x")
    (tmp_path / "secrets" / "signing").write_text("cache-1:bm90LWEta2V5")
    inventory = write_inventory(tmp_path, {"signing_key_ref": "file://secrets/signing"})
    result = nixcache("secrets", "check", str(inventory), cwd=tmp_path)
    assert result.returncode == 1
    assert (
        "FAIL file://secrets/signing: not a Nix secret key (secret key 'cache-1' holds 9 bytes, expected 64)"
        in result.stdout
    )
    assert "bm90LWEta2V5" not in result.stdout + result.stderr


def test_check_never_prints_a_secret_pasted_where_its_reference_belongs(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "edge-push").write_text("x")
    pasted = SecretKey.generate("cache-1").serialize()
    inventory = write_inventory(tmp_path, {"signing_key_ref": pasted, "push_token_ref": 12345})
    result = nixcache("secrets", "check", str(inventory), cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    shown = f"<str of {len(pasted)} characters, not shown>"
    assert lines[1].startswith(f"FAIL {shown}: signing_key_ref is not a secret reference"), result.stdout
    assert lines[0].startswith("FAIL <int, not shown>: push_token_ref is not a secret reference")
    assert pasted.partition(":")[2] not in result.stdout + result.stderr


def test_check_passes_when_everything_resolves(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "edge-push").write_text("x")
    inventory = write_inventory(tmp_path, {})
    result = nixcache("secrets", "check", str(inventory), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "ok  file://secrets/edge-push  (hosts: edge-1)\n"


def test_check_unreachable_vault_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("VAULT_ADDR", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("VAULT_TOKEN", "t")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "edge-push").write_text("x")
    inventory = write_inventory(
        tmp_path, {"signing_key_ref": "vault://secret/k#key", "signing_key_generate": True}
    )
    result = nixcache("secrets", "check", str(inventory), cwd=tmp_path)
    assert result.returncode == 1
    assert "FAIL vault://secret/k#key: server unreachable" in result.stdout  # generate does not excuse this


def test_put_reads_stdin_and_get_reveals_only_when_asked(tmp_path):
    result = nixcache("secrets", "put", "file://s/token", cwd=tmp_path, stdin="tok-value-123\n")
    assert result.returncode == 0, result.stderr
    assert "tok-value-123" not in result.stdout
    assert (tmp_path / "s" / "token").read_text() == "tok-value-123"
    assert oct((tmp_path / "s" / "token").stat().st_mode & 0o777) == "0o600"

    hidden = nixcache("secrets", "get", "file://s/token", cwd=tmp_path)
    assert hidden.returncode == 0
    assert hidden.stdout == "file://s/token exists (13 characters); pass --reveal to print it\n"
    shown = nixcache("secrets", "get", "--reveal", "file://s/token", cwd=tmp_path)
    assert shown.stdout == "tok-value-123\n"

    again = nixcache("secrets", "put", "file://s/token", cwd=tmp_path, stdin="other")
    assert again.returncode == 1 and "must not be overwritten" in again.stderr
    forced = nixcache("secrets", "put", "--force", "file://s/token", cwd=tmp_path, stdin="other")
    assert forced.returncode == 0 and (tmp_path / "s" / "token").read_text() == "other"


def test_get_exit_codes(tmp_path, monkeypatch):
    absent = nixcache("secrets", "get", "file://nope", cwd=tmp_path)
    assert absent.returncode == 3 and absent.stderr.startswith("error: file://nope: ")
    bad = nixcache("secrets", "get", "s3://x", cwd=tmp_path)
    assert bad.returncode == 1 and "unknown scheme s3://" in bad.stderr
    empty = nixcache("secrets", "put", "file://x", cwd=tmp_path, stdin="")
    assert empty.returncode == 2 and "no value on stdin" in empty.stderr


def test_signing_key_command_generates_once(tmp_path, vault_env):
    ref = "vault://secret/cli/signing#key"
    absent = nixcache("secrets", "signing-key", ref, "--name", "cache-x", cwd=tmp_path)
    assert absent.returncode == 3
    first = nixcache("secrets", "signing-key", ref, "--name", "cache-x", "--generate", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    stored = vault_env.client().secrets.kv.v2.read_secret_version(
        path="cli/signing", mount_point="secret", raise_on_deleted_version=True
    )["data"]["data"]["key"]
    assert first.stdout.strip() == str(SecretKey.parse(stored).public())
    assert stored.split(":")[1] not in first.stdout + first.stderr
    second = nixcache("secrets", "signing-key", ref, "--name", "cache-x", "--generate", cwd=tmp_path)
    assert second.stdout == first.stdout
    other = nixcache("secrets", "signing-key", ref, "--name", "cache-y", "--generate", cwd=tmp_path)
    assert other.returncode == 1 and other.stdout == ""
    assert other.stderr == (
        f"error: {ref}: holds the signing key 'cache-x', not 'cache-y'; pass --name cache-x to use it, "
        "or give another reference for a new key\n"
    )


def test_generate_stores_a_new_token_without_printing_it(tmp_path, vault_env):
    ref = "vault://secret/cli/push#token"
    first = nixcache("secrets", "generate", ref, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    value = vault_env.client().secrets.kv.v2.read_secret_version(
        path="cli/push", mount_point="secret", raise_on_deleted_version=True
    )["data"]["data"]["token"]
    assert len(value) == 43 and value not in first.stdout + first.stderr  # 32 random bytes, base64url
    assert first.stdout == (
        f"stored a new token at {ref}; read it with `nixcache secrets get {ref} --reveal`\n"
    )

    kept = nixcache("secrets", "generate", ref, cwd=tmp_path)
    assert kept.returncode == 1 and "must not be overwritten" in kept.stderr
    assert nixcache("secrets", "get", "--reveal", ref, cwd=tmp_path).stdout == value + "\n"
    rotated = nixcache("secrets", "generate", "--force", ref, cwd=tmp_path)
    assert rotated.returncode == 0
    assert nixcache("secrets", "get", "--reveal", ref, cwd=tmp_path).stdout not in ("", value + "\n")


def test_check_resolves_a_per_host_reference_for_each_host(tmp_path):
    """`{host}` in a ref is the inventory name, as the backup deploy reads it: one secret per host."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "edge-push").write_text("x")
    (tmp_path / "secrets" / "backup-credential-cache-a").write_text("x" * 43)
    inventory = write_inventory(
        tmp_path, {"backup_credential_ref": "file://secrets/backup-credential-{host}"}
    )
    result = nixcache("secrets", "check", str(inventory), cwd=tmp_path)
    assert result.returncode == 1
    assert "ok  file://secrets/backup-credential-cache-a  (hosts: cache-a)" in result.stdout
    assert "FAIL file://secrets/backup-credential-cache-b: " in result.stdout

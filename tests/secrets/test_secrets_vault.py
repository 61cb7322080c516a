"""vault:// references against a real Vault-API server (OpenBao dev mode on loopback)."""

# Fixtures come from tests/support (imported, so test arguments "redefine" them).
# ruff: noqa: F811

from __future__ import annotations

import uuid

import pytest
from support.bao import bao, free_port, vault_env  # noqa: F401

from nixcache import secrets
from nixcache.keys import SecretKey
from nixcache.secrets import SecretError, SecretNotFound


def unique_path() -> str:
    return f"nixcache/{uuid.uuid4().hex[:12]}"


def test_store_merges_into_existing_secret_and_resolves(vault_env):
    path = unique_path()
    client = vault_env.client()
    client.secrets.kv.v2.create_or_update_secret(path=path, secret={"other": "keep-me"}, mount_point="secret")
    secrets.store(f"vault://secret/{path}#push_token", "tok-123")
    assert secrets.resolve(f"vault://secret/{path}#push_token") == "tok-123"
    stored = client.secrets.kv.v2.read_secret_version(
        path=path, mount_point="secret", raise_on_deleted_version=True
    )
    assert stored["data"]["data"] == {"other": "keep-me", "push_token": "tok-123"}
    assert stored["data"]["metadata"]["version"] == 2


def test_store_creates_a_new_secret(vault_env):
    ref = f"vault://secret/{unique_path()}#k"
    assert not secrets.exists(ref)
    secrets.store(ref, "v1")
    secrets.store(ref, "v2")
    assert secrets.resolve(ref) == "v2"


def test_missing_secret_and_missing_key_are_not_found(vault_env):
    path = unique_path()
    with pytest.raises(SecretNotFound) as caught:
        secrets.resolve(f"vault://secret/{path}#k")
    assert f"no secret {path} in KV v2 mount secret" in str(caught.value)
    secrets.store(f"vault://secret/{path}#present", "x")
    with pytest.raises(SecretNotFound) as caught:
        secrets.resolve(f"vault://secret/{path}#absent")
    message = str(caught.value)
    assert message.startswith(f"vault://secret/{path}#absent: ")
    assert "has no key 'absent'" in message and f"[vault {vault_env.addr}]" in message


def test_bad_token_is_an_error_naming_the_fix(vault_env, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", "wrong-token-value")
    ref = f"vault://secret/{unique_path()}#k"
    with pytest.raises(SecretError) as caught:
        secrets.exists(ref)
    message = str(caught.value)
    assert isinstance(caught.value, secrets.SecretStoreUnavailable)
    assert "the token from VAULT_TOKEN is invalid or expired" in message
    assert "export a fresh VAULT_TOKEN" in message
    assert "wrong-token-value" not in message


def test_unreachable_server_never_generates_a_key(vault_env, monkeypatch):
    monkeypatch.setenv("VAULT_ADDR", f"http://127.0.0.1:{free_port()}")
    ref = f"vault://secret/{unique_path()}#signing_key"
    with pytest.raises(SecretError) as caught:
        secrets.ensure_signing_key(ref, "cache-1", generate=True)
    assert "server unreachable" in str(caught.value) and "check VAULT_ADDR" in str(caught.value)
    assert isinstance(caught.value, secrets.SecretStoreUnavailable)


def test_signing_key_lifecycle(vault_env):
    path = unique_path()
    ref = f"vault://secret/{path}#signing_key"
    key = secrets.ensure_signing_key(ref, "cache-eu-1", generate=True)
    stored = vault_env.client().secrets.kv.v2.read_secret_version(
        path=path, mount_point="secret", raise_on_deleted_version=True
    )
    assert stored["data"]["data"]["signing_key"] == key
    assert SecretKey.parse(key).name == "cache-eu-1"
    assert secrets.ensure_signing_key(ref, "cache-eu-1", generate=True) == key
    with pytest.raises(SecretError, match="must not be overwritten"):
        secrets.store(ref, SecretKey.generate("x").serialize(), overwrite=False)
    assert secrets.resolve(ref) == key


def test_missing_mount_is_reported(vault_env):
    with pytest.raises(SecretError) as caught:
        secrets.resolve(f"vault://nomount/{unique_path()}#k")
    assert "KV v2 mount nomount" in str(caught.value)


def test_approle_login(vault_env, monkeypatch):
    client = vault_env.client()
    if "approle/" not in client.sys.list_auth_methods()["data"]:
        client.sys.enable_auth_method("approle")
    path = unique_path()
    client.sys.create_or_update_policy(
        name=f"nixcache-{path.split('/')[1]}",
        policy=f'path "secret/data/{path}" {{ capabilities = ["create", "read", "update"] }}',
    )
    role = f"deploy-{path.split('/')[1]}"
    client.auth.approle.create_or_update_approle(role, token_policies=[f"nixcache-{path.split('/')[1]}"])
    role_id = client.auth.approle.read_role_id(role)["data"]["role_id"]
    secret_id = client.auth.approle.generate_secret_id(role)["data"]["secret_id"]
    monkeypatch.delenv("VAULT_TOKEN")
    monkeypatch.setenv("VAULT_ROLE_ID", role_id)
    monkeypatch.setenv("VAULT_SECRET_ID", secret_id)
    token = secrets.ensure_token(f"vault://secret/{path}#push_token", generate=True)
    assert secrets.resolve(f"vault://secret/{path}#push_token") == token
    # the policy covers only that path: elsewhere the error says permission denied, not "absent"
    with pytest.raises(SecretError, match="permission denied") as caught:
        secrets.exists(f"vault://secret/{unique_path()}#k")
    assert "AppRole" in str(caught.value)
    monkeypatch.setenv("VAULT_SECRET_ID", "not-the-secret-id")
    with pytest.raises(SecretError) as caught:
        secrets.resolve(f"vault://secret/{path}#push_token")
    assert "AppRole login at auth/approle failed" in str(caught.value)
    assert "not-the-secret-id" not in str(caught.value) and secret_id not in str(caught.value)


def test_deleted_latest_version_reads_as_absent_and_can_be_stored_again(vault_env):
    path = unique_path()
    ref = f"vault://secret/{path}#k"
    secrets.store(ref, "v1")
    vault_env.client().secrets.kv.v2.delete_latest_version_of_secret(path=path, mount_point="secret")
    assert not secrets.exists(ref)
    secrets.store(ref, "v2", overwrite=False)
    assert secrets.resolve(ref) == "v2"


def test_kv_version_1_mount_is_reported(vault_env):
    client = vault_env.client()
    if "kv1/" not in client.sys.list_mounted_secrets_engines()["data"]:
        client.sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
    client.secrets.kv.v1.create_or_update_secret(path="x", secret={"k": "v"}, mount_point="kv1")
    with pytest.raises(SecretError) as caught:
        secrets.resolve("vault://kv1/x#k")
    assert not isinstance(caught.value, SecretNotFound)
    assert "mount kv1 is KV version 1, not KV version 2" in str(caught.value)
    with pytest.raises(SecretError, match="mount kv1 is KV version 1"):
        secrets.store("vault://kv1/y#k", "v")
    assert client.secrets.kv.v1.list_secrets(path="", mount_point="kv1")["data"]["keys"] == [
        "x"
    ]  # nothing written

"""file:// references, the public API and the signing-key lifecycle on local files."""

from __future__ import annotations

import os
import stat

import pytest

from nixcache import secrets
from nixcache.keys import SecretKey
from nixcache.secrets import SecretError


def test_store_then_resolve_round_trips_with_private_modes(tmp_path):
    target = tmp_path / "new" / "dir" / "token"
    ref = f"file://{target}"
    assert not secrets.exists(ref)
    secrets.store(ref, "s3cr3t-value")
    assert secrets.resolve(ref) == "s3cr3t-value"
    assert secrets.exists(ref)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert [p.name for p in target.parent.iterdir()] == ["token"]  # no temp file left behind


def test_relative_refs_resolve_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "push").write_text("tok\n")
    assert secrets.resolve("file://secrets/push") == "tok"  # one trailing newline is not part of it


def test_missing_file_error_names_ref_backend_and_fix(tmp_path):
    ref = f"file://{tmp_path}/absent"
    with pytest.raises(SecretError) as caught:
        secrets.resolve(ref)
    message = str(caught.value)
    assert message.startswith(ref + ": ")
    assert "[file]" in message and "does not exist" in message and "nixcache secrets put" in message
    assert "\n" not in message


def test_unreadable_file_is_an_error_not_absent(tmp_path):
    if os.geteuid() == 0:
        # root reads anything; a directory in place of the file is the unreadable case then
        (tmp_path / "key").mkdir()
    else:
        (tmp_path / "key").write_text("x")
        (tmp_path / "key").chmod(0)
    with pytest.raises(SecretError) as caught:
        secrets.exists(f"file://{tmp_path}/key")
    assert not isinstance(caught.value, secrets.SecretNotFound)


@pytest.mark.parametrize(
    ("ref", "cause"),
    [
        ("s3://bucket/key", "unknown scheme s3://"),
        ("plain-string", "unknown scheme (none)"),
        ("op://vault/item", "expected 3 or 4 path segments, got 2"),
        ("op://v/i/s/f/x", "expected 3 or 4 path segments, got 5"),
        ("op://vault/item//field", "vault, item, section and field must all be non-empty"),
        ("op://vault//field", "must all be non-empty"),
        ("vault://secret/nixcache", "no '#<key>'"),
        ("vault://secret#key", "expected a mount and a path"),
        ("file://", "empty path"),
    ],
)
def test_bad_references_say_what_is_wrong(ref, cause):
    with pytest.raises(SecretError) as caught:
        secrets.parse(ref)
    assert cause in str(caught.value)
    assert str(caught.value).startswith(ref)


def test_parse_shapes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert secrets.parse("op://Infra/cache key/secret key").item == "cache key"
    parsed = secrets.parse("vault://secret/nixcache/prod#signing_key")
    assert (parsed.mount, parsed.path, parsed.key) == ("secret", "nixcache/prod", "signing_key")
    assert secrets.parse("file://keys/k").path == tmp_path / "keys" / "k"


def test_resolve_hidden_masks_the_value(tmp_path):
    ref = f"file://{tmp_path}/t"
    secrets.store(ref, "hunter2-hidden")
    hidden = secrets.resolve_hidden(ref)
    assert hidden.unmask() == "hunter2-hidden"
    assert "hunter2" not in str(hidden) and "hunter2" not in repr(hidden)
    from pyinfra.api import HiddenValue, StringCommand

    assert isinstance(hidden, HiddenValue)
    assert "hunter2" not in StringCommand("echo", hidden).get_masked_value()


def test_signing_key_generated_once_stored_first_then_reused(tmp_path):
    ref = f"file://{tmp_path}/keys/signing"
    first = secrets.ensure_signing_key(ref, "cache-1", generate=True)
    assert SecretKey.parse(first).name == "cache-1"
    assert (tmp_path / "keys" / "signing").read_text() == first  # it was stored before being returned
    again = secrets.ensure_signing_key(ref, "cache-1", generate=True)
    assert again == first


def test_dry_run_generates_a_stand_in_but_stores_nothing(tmp_path, caplog):
    ref = f"file://{tmp_path}/keys/signing"
    with caplog.at_level("WARNING", logger="nixcache.secrets"):
        key = secrets.ensure_signing_key(ref, "cache-1", generate=True, dry_run=True)
        token = secrets.ensure_token(f"file://{tmp_path}/keys/token", generate=True, dry_run=True)
    assert SecretKey.parse(key).name == "cache-1"
    assert len(token) >= 43
    assert not (tmp_path / "keys").exists()
    assert f"dry run: {ref} does not exist yet" in caplog.text
    assert key.partition(":")[2] not in caplog.text


def test_dry_run_returns_an_existing_value_unchanged(tmp_path):
    ref = f"file://{tmp_path}/signing"
    stored = secrets.ensure_signing_key(ref, "cache-1", generate=True)
    assert secrets.ensure_signing_key(ref, "cache-1", generate=True, dry_run=True) == stored


def test_ssh_key_generated_once_stored_first_then_reused(tmp_path):
    ref = f"file://{tmp_path}/backup-ssh-key"
    first = secrets.ensure_ssh_key(ref, generate=True)
    assert first.startswith("-----BEGIN OPENSSH " + "PRIVATE KEY-----")
    assert (tmp_path / "backup-ssh-key").read_text() == first
    assert secrets.ensure_ssh_key(ref, generate=True) == first
    with pytest.raises(SecretError, match="ssh key does not exist"):
        secrets.ensure_ssh_key(f"file://{tmp_path}/absent", generate=False)


def test_signing_key_absent_without_generate_fails(tmp_path):
    ref = f"file://{tmp_path}/signing"
    with pytest.raises(SecretError, match="signing key does not exist"):
        secrets.ensure_signing_key(ref, "cache-1", generate=False)
    assert not (tmp_path / "signing").exists()


def test_invalid_stored_signing_key_is_rejected_without_showing_it(tmp_path):
    (tmp_path / "signing").write_text("cache-1:bm90LWEta2V5LXRvcC1zZWNyZXQ=")
    with pytest.raises(SecretError) as caught:
        secrets.ensure_signing_key(f"file://{tmp_path}/signing", "cache-1", generate=True)
    assert "not a Nix secret key" in str(caught.value)
    assert "bm90LWEta2V5" not in str(caught.value)
    assert (tmp_path / "signing").read_text() == "cache-1:bm90LWEta2V5LXRvcC1zZWNyZXQ="  # never overwritten


def test_unreadable_store_never_generates(tmp_path):
    (tmp_path / "signing").mkdir()  # the store answers with an error that is not "absent"
    with pytest.raises(SecretError) as caught:
        secrets.ensure_signing_key(f"file://{tmp_path}/signing", "cache-1", generate=True)
    assert "is a directory" in str(caught.value)
    assert list((tmp_path / "signing").iterdir()) == []


def test_create_only_store_refuses_to_replace(tmp_path):
    ref = f"file://{tmp_path}/t"
    secrets.store(ref, "first")
    with pytest.raises(SecretError, match="must not be overwritten"):
        secrets.store(ref, "second", overwrite=False)
    assert secrets.resolve(ref) == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_tokens_are_generated_once(tmp_path):
    ref = f"file://{tmp_path}/push-token"
    token = secrets.ensure_token(ref, generate=True)
    assert len(token) >= 43
    assert secrets.ensure_token(ref, generate=False) == token


def test_bad_key_name_is_a_secret_error_and_nothing_is_stored(tmp_path):
    with pytest.raises(SecretError, match="cannot name a signing key") as caught:
        secrets.ensure_signing_key(f"file://{tmp_path}/k", "bad name:x", generate=True)
    assert str(caught.value).startswith(f"file://{tmp_path}/k: ")
    assert not (tmp_path / "k").exists()


def test_package_imports_without_controller_dependencies(tmp_path):
    """Cache hosts install only the runtime dependencies: pyinfra, hvac and the 1Password SDK load lazily."""
    import subprocess
    import sys

    (tmp_path / "t").write_text("v")
    code = (
        "import sys, nixcache.secrets as s\n"
        f"assert s.resolve('file://{tmp_path}/t') == 'v'\n"
        "loaded = [m for m in ('pyinfra', 'hvac', 'onepasswordconnectsdk', 'httpx') if m in sys.modules]\n"
        "print(loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

"""op:// references through onepasswordconnectsdk against the loopback Connect API emulator."""

from __future__ import annotations

import pytest
from support.bao import free_port
from support.opfixtures import op_connect  # noqa: F401

from nixcache import secrets
from nixcache.keys import SecretKey
from nixcache.secrets import SecretError, SecretNotFound

# Fixtures come from tests/support (imported, so test arguments "redefine" them).
# ruff: noqa: F811


def test_resolve_by_titles_and_by_ids(op_connect):
    item_id = op_connect.emulator.add_item(op_connect.vault_id, "cache signing", {"secret key": "k-value-1"})
    assert secrets.resolve("op://Infra/cache signing/secret key") == "k-value-1"
    assert secrets.resolve(f"op://{op_connect.vault_id}/{item_id}/secret key") == "k-value-1"


def test_store_creates_item_then_adds_and_updates_fields(op_connect):
    emulator = op_connect.emulator
    secrets.store("op://Infra/nixcache eu-1/push token", "push-1")
    (item_id,) = emulator.items[op_connect.vault_id]
    item = emulator.items[op_connect.vault_id][item_id]
    assert item["category"] == "API_CREDENTIAL"
    assert [(f["label"], f["type"]) for f in item["fields"]] == [("push token", "CONCEALED")]
    secrets.store("op://Infra/nixcache eu-1/read token", "read-1")
    secrets.store("op://Infra/nixcache eu-1/push token", "push-2")
    assert emulator.field_value(op_connect.vault_id, item_id, "push token") == "push-2"
    assert emulator.field_value(op_connect.vault_id, item_id, "read token") == "read-1"
    assert emulator.items[op_connect.vault_id][item_id]["version"] == 3
    assert secrets.resolve("op://Infra/nixcache eu-1/read token") == "read-1"
    # values travel in request bodies only, never in a URL
    assert not any("push-" in line or "read-1" in line for _, line in emulator.requests)


def test_missing_vault_item_and_field(op_connect):
    op_connect.emulator.add_item(op_connect.vault_id, "present", {"user": "u"})
    cases = {
        "op://Nope/present/user": "no vault 'Nope' visible to this token",
        "op://Infra/absent/user": "no item 'absent' in vault 'Infra'",
        "op://Infra/present/password": "item 'present' has no field 'password'",
    }
    for ref, cause in cases.items():
        with pytest.raises(SecretNotFound) as caught:
            secrets.resolve(ref)
        message = str(caught.value)
        assert message.startswith(f"{ref}: {cause} [1password {op_connect.url}]; "), message
        assert not secrets.exists(ref)


def test_wrong_token_is_an_error_not_absent(op_connect, monkeypatch):
    monkeypatch.setenv("OP_CONNECT_TOKEN", "eyJ-not-a-valid-token")
    with pytest.raises(SecretError) as caught:
        secrets.exists("op://Infra/anything/field")
    message = str(caught.value)
    assert not isinstance(caught.value, SecretNotFound)
    assert "token rejected (Invalid token signature)" in message
    assert "set OP_CONNECT_TOKEN to a valid Connect access token" in message
    assert "eyJ-not-a-valid-token" not in message


def test_token_without_access_to_the_vault(op_connect, monkeypatch):
    other = op_connect.emulator.add_vault("Other")
    monkeypatch.setenv("OP_CONNECT_TOKEN", op_connect.emulator.issue_token(vaults={other}))
    with pytest.raises(SecretError, match="no vault 'Infra' visible to this token"):
        secrets.resolve("op://Infra/x/y")
    with pytest.raises(SecretError) as caught:
        secrets.resolve(f"op://{op_connect.vault_id}/x/y")
    assert "grant the Connect token access" in str(caught.value)


def test_store_into_missing_vault_fails_without_creating(op_connect):
    with pytest.raises(SecretError) as caught:
        secrets.store("op://Nope/item/field", "value")
    assert not isinstance(caught.value, SecretNotFound)
    assert all(not items for items in op_connect.emulator.items.values())


def test_duplicate_titles_are_reported(op_connect):
    op_connect.emulator.add_item(op_connect.vault_id, "twin", {"f": "1"})
    op_connect.emulator.add_item(op_connect.vault_id, "twin", {"f": "2"})
    with pytest.raises(SecretError, match="2 items are titled 'twin'"):
        secrets.resolve("op://Infra/twin/f")


def test_titles_with_quotes_are_filtered_exactly(op_connect):
    op_connect.emulator.add_item(op_connect.vault_id, 'say "hi"', {"f": "quoted"})
    op_connect.emulator.add_item(op_connect.vault_id, "say", {"f": "plain"})
    assert secrets.resolve('op://Infra/say "hi"/f') == "quoted"


def test_unreachable_connect_server_never_generates(monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("OP_CONNECT_HOST", url)
    monkeypatch.setenv("OP_CONNECT_TOKEN", "eyJ-whatever")
    with pytest.raises(SecretError) as caught:
        secrets.ensure_signing_key("op://Infra/cache/secret key", "cache-1", generate=True)
    assert str(caught.value).startswith(
        f"op://Infra/cache/secret key: server unreachable (ConnectError) [1password {url}]"
    )


def test_missing_environment(monkeypatch):
    monkeypatch.delenv("OP_CONNECT_HOST", raising=False)
    with pytest.raises(SecretError, match="OP_CONNECT_HOST is not set"):
        secrets.resolve("op://Infra/a/b")


def test_signing_key_lifecycle(op_connect):
    emulator = op_connect.emulator
    ref = "op://Infra/nixcache cache-1/secret key"
    key = secrets.ensure_signing_key(ref, "cache-1", generate=True)
    (item_id,) = emulator.items[op_connect.vault_id]
    assert emulator.field_value(op_connect.vault_id, item_id, "secret key") == key
    assert SecretKey.parse(key).name == "cache-1"
    writes = [r for r in emulator.requests if r[0] in ("POST", "PUT", "PATCH")]
    assert secrets.ensure_signing_key(ref, "cache-1", generate=True) == key
    assert [r for r in emulator.requests if r[0] in ("POST", "PUT", "PATCH")] == writes  # nothing rewritten
    with pytest.raises(SecretError, match="must not be overwritten"):
        secrets.store(ref, "other", overwrite=False)
    assert secrets.resolve(ref) == key


def test_emulator_speaks_connect_shapes_to_the_sdk(op_connect):
    """The SDK's own calls (vaults, items by title and id, generate, delete) work against the emulator."""
    from onepasswordconnectsdk.client import new_client
    from onepasswordconnectsdk.models import Field, Item, ItemVault

    client = new_client(op_connect.url, op_connect.token)
    (vault,) = client.get_vaults()
    assert (vault.name, len(vault.id), vault.type) == ("Infra", 26, "USER_CREATED")
    assert client.get_vault_by_title("Infra").id == vault.id
    created = client.create_item(
        vault.id,
        Item(vault=ItemVault(id=vault.id), title="db", category="DATABASE",
             fields=[Field(label="password", type="CONCEALED", generate=True)]),
    )  # fmt: skip
    assert len(created.id) == 26 and created.id.islower() and created.version == 1
    assert len(created.fields[0].value) == 32 and len(created.fields[0].id) == 26
    assert client.get_item("db", "Infra").id == created.id
    (summary,) = client.get_items(vault.id, 'title eq "db"')
    assert (summary.title, summary.category, summary.version) == ("db", "DATABASE", 1)
    client.delete_item(created.id, vault.id)
    with pytest.raises(Exception, match="Received 404"):
        client.get_item_by_id(created.id, vault.id)


def test_emulator_applies_json_patch_sent_through_the_sdk_session(op_connect):
    from onepasswordconnectsdk.client import new_client

    item_id = op_connect.emulator.add_item(op_connect.vault_id, "patched", {"a": "1"})
    client = new_client(op_connect.url, op_connect.token)
    field_id = client.get_item_by_id(item_id, op_connect.vault_id).fields[0].id
    url = f"/v1/vaults/{op_connect.vault_id}/items/{item_id}"
    patch = [
        {"op": "replace", "path": f"/fields/{field_id}/value", "value": "2"},
        {"op": "add", "path": "/fields", "value": {"label": "b", "type": "CONCEALED", "value": "3"}},
        {"op": "replace", "path": "/title", "value": "patched twice"},
    ]
    response = client.build_request("PATCH", url, patch)
    assert response.status_code == 200
    item = client.deserialize(response.content, "Item")
    assert (item.title, item.version) == ("patched twice", 2)
    assert [(f.label, f.value) for f in item.fields] == [("a", "2"), ("b", "3")]
    bad = client.build_request("PATCH", url, [{"op": "move", "path": "/title"}])
    assert bad.status_code == 400 and bad.json()["status"] == 400
    unauthorised = new_client(op_connect.url, "eyJ-wrong").build_request("GET", "/v1/vaults")
    assert (unauthorised.status_code, unauthorised.json()) == (
        401,
        {"status": 401, "message": "Invalid token signature"},
    )

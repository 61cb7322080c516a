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


def test_parse_four_part_refs_name_a_section():
    parsed = secrets.parse("op://Infra/cache eu-1/prod/push%2Ftoken")
    assert (parsed.vault, parsed.item, parsed.section, parsed.field) == (
        "Infra", "cache eu-1", "prod", "push/token",
    )  # fmt: skip
    assert secrets.parse("op://Infra/cache/push token").section is None
    for ref, cause in {
        "op://Infra/cache/a/b/c": "expected 3 or 4 path segments, got 5",
        "op://Infra/cache/ /field": "vault, item, section and field must all be non-empty",
    }.items():
        with pytest.raises(SecretError) as caught:
            secrets.parse(ref)
        assert str(caught.value) == (
            f"{ref}: {cause} [1password]; write it as op://<vault>/<item>/[<section>/]<field>"
        )


def test_resolve_a_field_inside_a_section(op_connect):
    emulator = op_connect.emulator
    item_id = emulator.add_item(
        op_connect.vault_id,
        "cache",
        {"token": "outside"},
        sections={"prod": {"token": "in-prod"}, "staging": {"token": "in-staging"}},
    )
    assert secrets.resolve("op://Infra/cache/prod/token") == "in-prod"
    assert secrets.resolve("op://Infra/cache/staging/token") == "in-staging"
    # a section by its id works as well as by its label
    staging_id = next(s["id"] for s in emulator.items[op_connect.vault_id][item_id]["sections"]
                      if s["label"] == "staging")  # fmt: skip
    assert secrets.resolve(f"op://Infra/cache/{staging_id}/token") == "in-staging"
    # without a section, the label is looked up in the whole item: three fields, so ambiguous
    with pytest.raises(SecretError) as caught:
        secrets.resolve("op://Infra/cache/token")
    message = str(caught.value)
    assert not isinstance(caught.value, SecretNotFound)
    assert message.startswith("op://Infra/cache/token: item 'cache' has 3 fields labelled 'token'"), message
    assert "name the section: write it as op://<vault>/<item>/<section>/<field>" in message


def test_a_field_outside_any_section_still_resolves_without_one(op_connect):
    op_connect.emulator.add_item(
        op_connect.vault_id, "cache", {"read": "plain"}, sections={"prod": {"push": "p"}}
    )
    assert secrets.resolve("op://Infra/cache/read") == "plain"
    assert secrets.resolve("op://Infra/cache/push") == "p"  # as before: a unique label, in any section
    with pytest.raises(SecretNotFound, match="item 'cache' has no field 'read' in section 'prod'"):
        secrets.resolve("op://Infra/cache/prod/read")


def test_missing_section(op_connect):
    op_connect.emulator.add_item(op_connect.vault_id, "cache", {"token": "t"}, sections={"prod": {"x": "1"}})
    ref = "op://Infra/cache/staging/token"
    with pytest.raises(SecretNotFound) as caught:
        secrets.resolve(ref)
    assert str(caught.value).startswith(
        f"{ref}: item 'cache' has no section 'staging' [1password {op_connect.url}]; "
        f"add it (nixcache secrets put {ref})"
    ), str(caught.value)
    assert not secrets.exists(ref)


def test_duplicate_section_labels_are_ambiguous(op_connect):
    from onepasswordconnectsdk.client import new_client
    from onepasswordconnectsdk.models import Field, FieldSection, Item, ItemVault, Section

    client = new_client(op_connect.url, op_connect.token)
    a, b = "a" * 26, "b" * 26
    client.create_item(
        op_connect.vault_id,
        Item(vault=ItemVault(id=op_connect.vault_id), title="twins", category="LOGIN",
             sections=[Section(id=a, label="prod"), Section(id=b, label="prod")],
             fields=[Field(label="t", value="1", section=FieldSection(id=a)),
                     Field(label="t", value="2", section=FieldSection(id=b))]),
    )  # fmt: skip
    with pytest.raises(SecretError) as caught:
        secrets.resolve("op://Infra/twins/prod/t")
    assert "item 'twins' has 2 sections labelled 'prod'" in str(caught.value)
    assert "use the section's id in the reference" in str(caught.value)
    assert secrets.resolve(f"op://Infra/twins/{b}/t") == "2"


def test_store_into_sections_then_resolve(op_connect):
    emulator = op_connect.emulator
    # a new item: created with the section, the field inside it
    secrets.store("op://Infra/nixcache eu-1/prod/push token", "push-prod")
    (item_id,) = emulator.items[op_connect.vault_id]
    item = emulator.items[op_connect.vault_id][item_id]
    (prod,) = item["sections"]
    assert prod["label"] == "prod" and len(prod["id"]) == 26
    assert [(f["label"], f["section"]) for f in item["fields"]] == [("push token", {"id": prod["id"]})]
    # an existing item: a second section is added, the same label lives in both, and outside them
    secrets.store("op://Infra/nixcache eu-1/staging/push token", "push-staging")
    secrets.store("op://Infra/nixcache eu-1/prod/read token", "read-prod")
    with pytest.raises(SecretError, match="has 2 fields labelled 'push token'"):
        secrets.store("op://Infra/nixcache eu-1/push token", "ambiguous")
    item = emulator.items[op_connect.vault_id][item_id]
    assert [s["label"] for s in item["sections"]] == ["prod", "staging"]
    assert secrets.resolve("op://Infra/nixcache eu-1/prod/push token") == "push-prod"
    assert secrets.resolve("op://Infra/nixcache eu-1/staging/push token") == "push-staging"
    assert secrets.resolve("op://Infra/nixcache eu-1/read token") == "read-prod"
    # updating a field in a section touches that field only
    secrets.store("op://Infra/nixcache eu-1/prod/push token", "push-prod-2")
    assert secrets.resolve("op://Infra/nixcache eu-1/prod/push token") == "push-prod-2"
    assert secrets.resolve("op://Infra/nixcache eu-1/staging/push token") == "push-staging"
    with pytest.raises(SecretError, match="must not be overwritten"):
        secrets.store("op://Infra/nixcache eu-1/staging/push token", "x", overwrite=False)
    item = emulator.items[op_connect.vault_id][item_id]
    assert len(item["fields"]) == 3 and item["version"] == 4
    assert secrets.exists("op://Infra/nixcache eu-1/staging/push token")
    assert not secrets.exists("op://Infra/nixcache eu-1/dev/push token")


def test_emulator_round_trips_sections_through_the_sdk(op_connect):
    from onepasswordconnectsdk.client import new_client
    from onepasswordconnectsdk.models import Field, FieldSection, Item, ItemVault, Section

    client = new_client(op_connect.url, op_connect.token)
    vault = op_connect.vault_id
    section_id = "s" * 26
    created = client.create_item(
        vault,
        Item(vault=ItemVault(id=vault), title="sectioned", category="LOGIN",
             sections=[Section(id=section_id, label="prod")],
             fields=[Field(label="t", value="1", section=FieldSection(id=section_id)),
                     Field(label="u", value="2")]),
    )  # fmt: skip
    read = client.get_item_by_id(created.id, vault)
    assert [(s.id, s.label) for s in read.sections] == [(section_id, "prod")]
    assert [(f.label, f.section.id if f.section else None) for f in read.fields] == [
        ("t", section_id),
        ("u", None),
    ]
    read.sections.append(Section(id="n" * 26, label="new"))
    read.fields[1].section = FieldSection(id="n" * 26)
    updated = client.update_item(created.id, vault, read)
    assert [s.label for s in updated.sections] == ["prod", "new"]
    assert [f.section.id for f in client.get_item_by_id(created.id, vault).fields] == [section_id, "n" * 26]
    (summary,) = client.get_items(vault, 'title eq "sectioned"')
    assert summary.to_dict().get("sections") is None
    plain = client.create_item(vault, Item(vault=ItemVault(id=vault), title="plain", category="LOGIN"))
    assert "sections" not in op_connect.emulator.items[vault][plain.id]  # absent stays absent
    read.fields[0].section = FieldSection(id="x" * 26)
    with pytest.raises(Exception, match=r"Received 400.*no section with this id"):
        client.update_item(created.id, vault, read)

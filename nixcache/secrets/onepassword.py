"""`op://<vault>/<item>/[<section>/]<field>` secrets: 1Password through Connect (onepasswordconnectsdk).

Configuration comes from the environment, as for 1Password's own tools: OP_CONNECT_HOST (the
Connect server's URL) and OP_CONNECT_TOKEN (a Connect access token); OP_CONNECT_CA_FILE
optionally names the CA bundle that signed the server's certificate. Vaults and items are found
by id or title, sections and fields by label (or id). Without a section, the field is looked up
among all of the item's fields, in whichever section; with one, only among that section's fields.
"""

from __future__ import annotations

import os
import re
import string
from secrets import choice
from typing import Any

from nixcache.httpcompat import make_httpx_importable
from nixcache.secrets.backend import TIMEOUT_SECONDS
from nixcache.secrets.errors import SecretError, SecretNotFound, SecretStoreUnavailable
from nixcache.secrets.refs import OnePasswordRef

ID_LENGTH = 26
# Category of the items nixcache creates: a credential with one concealed field per secret.
NEW_ITEM_CATEGORY = "API_CREDENTIAL"


def _new_section_id() -> str:
    """An id for a section nixcache adds: 26 characters of [a-z0-9], like the ids 1Password generates."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(choice(alphabet) for _ in range(ID_LENGTH))


def _is_id(text: str) -> bool:
    return len(text) == ID_LENGTH and text.isascii() and text.isalnum() and text.islower()


def _quote(title: str) -> str:
    return '"' + title.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Session:
    """One reference's conversation with Connect, turning SDK failures into one-line SecretErrors."""

    def __init__(self, ref: OnePasswordRef) -> None:
        self.ref = ref
        host = os.environ.get("OP_CONNECT_HOST", "").rstrip("/")
        token = os.environ.get("OP_CONNECT_TOKEN", "")
        if not host:
            raise SecretStoreUnavailable(
                ref.ref,
                "1password",
                "OP_CONNECT_HOST is not set",
                "export OP_CONNECT_HOST=https://connect.example:8080",
            )
        self.backend = f"1password {host}"
        if not token:
            raise SecretStoreUnavailable(
                ref.ref,
                self.backend,
                "OP_CONNECT_TOKEN is not set",
                "export OP_CONNECT_TOKEN with a Connect access token for this vault",
            )
        make_httpx_importable()
        from onepasswordconnectsdk.client import new_client
        from onepasswordconnectsdk.config import ClientConfig

        ca_file = os.environ.get("OP_CONNECT_CA_FILE") or None
        config = ClientConfig(ca_file=ca_file, timeout=TIMEOUT_SECONDS)
        self.client = new_client(host, token, config=config)

    def error(self, cause: str, fix: str, *, absent: bool = False, store_down: bool = False) -> SecretError:
        kind = SecretNotFound if absent else SecretStoreUnavailable if store_down else SecretError
        return kind(self.ref.ref, self.backend, cause, fix)

    def call(self, what: str, function, /, *args) -> Any:
        """Run one SDK call; map transport and HTTP failures to SecretError."""
        import httpx
        from onepasswordconnectsdk.errors import OnePasswordConnectSDKError

        try:
            return function(*args)
        except httpx.TimeoutException:
            raise self.error(
                f"no answer within {TIMEOUT_SECONDS:.0f}s while trying to {what}",
                "check OP_CONNECT_HOST and that the Connect server is up",
                store_down=True,
            ) from None
        except httpx.TransportError as error:
            raise self.error(
                f"server unreachable ({type(error).__name__})",
                "check OP_CONNECT_HOST and that the Connect server is running",
                store_down=True,
            ) from None
        except ValueError:
            # The SDK decodes every error body as JSON: a non-JSON answer means another kind of server.
            raise self.error(
                f"the answer to '{what}' is not from a 1Password Connect API",
                "point OP_CONNECT_HOST at the Connect server (e.g. http://host:8080)",
                store_down=True,
            ) from None
        except OnePasswordConnectSDKError as error:
            raise self._http_error(what, error) from None

    def _http_error(self, what: str, error: Exception) -> SecretError:
        text = " ".join(str(error).split())
        status = getattr(error, "status_code", None)
        if status is None:
            found = re.search(r"Received (\d{3})", text)
            status = int(found.group(1)) if found else None
        found = re.search(r"with message:? (.*)$", text)
        message = (found.group(1) if found else text)[:200]
        if status == 401:
            return self.error(
                f"token rejected ({message})",
                "set OP_CONNECT_TOKEN to a valid Connect access token",
                store_down=True,
            )
        if status == 403:
            return self.error(
                f"token may not {what} ({message})",
                f"grant the Connect token access to vault '{self.ref.vault}'",
            )
        if status == 404:
            return self.error(
                f"not found while trying to {what} ({message})", "check the reference", absent=True
            )
        return self.error(f"cannot {what}: HTTP {status} ({message})", "check the Connect server's logs")

    def vault_id(self) -> str:
        wanted = self.ref.vault
        vaults = self.call("list vaults", self.client.get_vaults)
        matches = [v for v in vaults if v.id == wanted] or [v for v in vaults if v.name == wanted]
        if not matches:
            raise self.error(
                f"no vault '{wanted}' visible to this token",
                "create the vault or grant the Connect token access to it",
                absent=True,
            )
        if len(matches) > 1:
            raise self.error(
                f"{len(matches)} vaults are named '{wanted}'", "use the vault's id in the reference"
            )
        return matches[0].id

    def item(self, vault_id: str):
        """The full item the reference names, or None when the vault holds no such item."""
        wanted = self.ref.item
        if _is_id(wanted):
            try:
                return self.call("read item", self.client.get_item_by_id, wanted, vault_id)
            except SecretNotFound:
                pass  # a title that happens to look like an id, as the SDK's own get_item() assumes
        summaries = self.call("list items", self.client.get_items, vault_id, f"title eq {_quote(wanted)}")
        if not summaries:
            return None
        if len(summaries) > 1:
            raise self.error(
                f"{len(summaries)} items are titled '{wanted}' in vault '{self.ref.vault}'",
                "use the item's id in the reference, or rename the duplicates",
            )
        return self.call("read item", self.client.get_item_by_id, summaries[0].id, vault_id)

    def section(self, item):
        """The item's section the reference names (by label, else by id), or None when it has none."""
        wanted = self.ref.section
        sections = item.sections or []
        matches = [s for s in sections if s.label == wanted] or [s for s in sections if s.id == wanted]
        if len(matches) > 1:
            raise self.error(
                f"item '{self.ref.item}' has {len(matches)} sections labelled '{wanted}'",
                "use the section's id in the reference, or give the sections distinct labels",
            )
        return matches[0] if matches else None

    def field(self, item, section=None):
        """The field the reference names, or None.

        Without a section in the reference, every field of the item is a candidate; with one,
        only the fields of `section` (the item's section the reference names, found by the caller).
        """
        fields = item.fields or []
        where = ""
        if self.ref.section is not None:
            fields = [f for f in fields if f.section is not None and f.section.id == section.id]
            where = f" in section '{self.ref.section}'"
        matches = [f for f in fields if f.label == self.ref.field] or [
            f for f in fields if f.id == self.ref.field
        ]
        if len(matches) > 1:
            fix = "give the fields distinct labels"
            if self.ref.section is None:
                fix += ", or name the section: write it as op://<vault>/<item>/<section>/<field>"
            raise self.error(
                f"item '{self.ref.item}' has {len(matches)} fields labelled '{self.ref.field}'{where}", fix
            )
        return matches[0] if matches else None


class OnePasswordBackend:
    """Reads fields of items; writes create the item or add/replace just that field."""

    def get(self, ref: OnePasswordRef) -> str:
        session = _Session(ref)
        vault_id = session.vault_id()
        item = session.item(vault_id)
        if item is None:
            raise session.error(
                f"no item '{ref.item}' in vault '{ref.vault}'",
                f"create it (nixcache secrets put {ref.ref}) or fix the item title",
                absent=True,
            )
        section = None
        if ref.section is not None:
            section = session.section(item)
            if section is None:
                raise session.error(
                    f"item '{ref.item}' has no section '{ref.section}'",
                    f"add it (nixcache secrets put {ref.ref}) or fix the section label",
                    absent=True,
                )
        field = session.field(item, section)
        if field is None or not field.value:
            state = "an empty" if field is not None else "no"
            where = f" in section '{ref.section}'" if ref.section is not None else ""
            raise session.error(
                f"item '{ref.item}' has {state} field '{ref.field}'{where}",
                f"add it (nixcache secrets put {ref.ref}) or fix the field label",
                absent=True,
            )
        return field.value

    def put(self, ref: OnePasswordRef, value: str, *, overwrite: bool) -> None:
        from onepasswordconnectsdk.models import Field, FieldSection, Item, ItemVault, Section

        session = _Session(ref)
        try:
            vault_id = session.vault_id()
        except SecretNotFound as missing:
            # Connect tokens cannot create vaults: this needs a person.
            raise SecretError(ref.ref, session.backend, missing.cause, missing.fix) from None
        item = session.item(vault_id)

        def new_field(section) -> Field:
            placed = FieldSection(id=section.id) if section is not None else None
            return Field(label=ref.field, value=value, type="CONCEALED", section=placed)

        if item is None:
            # With a section in the reference, the new item gets that section, holding the field.
            section = Section(id=_new_section_id(), label=ref.section) if ref.section is not None else None
            new = Item(
                title=ref.item,
                category=NEW_ITEM_CATEGORY,
                vault=ItemVault(id=vault_id),
                tags=["nixcache"],
                sections=[section] if section is not None else None,
                fields=[new_field(section)],
            )
            session.call("create item", session.client.create_item, vault_id, new)
            return
        section = None
        if ref.section is not None:
            section = session.section(item)
            if section is None:
                section = Section(id=_new_section_id(), label=ref.section)
                item.sections = [*(item.sections or []), section]
        field = session.field(item, section)
        if field is None:
            item.fields = [*(item.fields or []), new_field(section)]
        elif field.value and not overwrite:
            raise session.error(
                f"field '{ref.field}' of item '{ref.item}' already has a value and must not be overwritten",
                "use the existing value",
            )
        else:
            field.value = value
        session.call("update item", session.client.update_item, item.id, vault_id, item)


def backend() -> OnePasswordBackend:
    return OnePasswordBackend()

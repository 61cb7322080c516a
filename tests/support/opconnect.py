"""A loopback emulator of the 1Password Connect REST API, for tests driven through onepasswordconnectsdk.

It follows the shapes of the real server (Connect API v1):

- `GET /v1/vaults[?filter=name eq "…"]`, `GET /v1/vaults/{vault}`;
- `GET /v1/vaults/{vault}/items[?filter=title eq "…"]` (summaries, without fields),
  `POST /v1/vaults/{vault}/items`, `GET|PUT|PATCH|DELETE /v1/vaults/{vault}/items/{item}`;
  PATCH takes an RFC 6902 JSON Patch (`add`/`replace`/`remove` on `/title`, `/tags`,
  `/fields`, `/fields/{id}`, `/fields/{id}/value`, …);
- ids are 26 characters of `[a-z0-9]`; items carry `version`, `createdAt`, `updatedAt`;
  fields get ids, CONCEALED fields with `generate: true` get a generated value;
- items keep `sections: [{"id", "label"}]` and fields keep `section: {"id"}` as sent, through
  POST, PUT, PATCH and GET (item summaries carry neither); a field whose section id names none of
  the item's sections is refused with 400, as 1Password refuses a field linked to a missing section;
- `Authorization: Bearer <token>` on every /v1 call; a token may be limited to some vaults;
- errors are JSON `{"status": <code>, "message": "…"}` with the real server's status codes
  (400 malformed, 401 bad token, 403 vault out of scope, 404 absent).

`GET /heartbeat` answers `.` without a token, as the real server does.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import secrets
import string
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from socketserver import ThreadingMixIn
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

ID_ALPHABET = string.ascii_lowercase + string.digits
ID_LENGTH = 26
CATEGORIES = {
    "LOGIN", "PASSWORD", "API_CREDENTIAL", "SERVER", "DATABASE", "CREDIT_CARD", "MEMBERSHIP", "PASSPORT",
    "SOFTWARE_LICENSE", "OUTDOOR_LICENSE", "SECURE_NOTE", "WIRELESS_ROUTER", "BANK_ACCOUNT", "DRIVER_LICENSE",
    "IDENTITY", "REWARD_PROGRAM", "DOCUMENT", "EMAIL_ACCOUNT", "SOCIAL_SECURITY_NUMBER", "MEDICAL_RECORD",
    "SSH_KEY", "CUSTOM",
}  # fmt: skip
FIELD_TYPES = {"STRING", "EMAIL", "CONCEALED", "URL", "TOTP", "DATE", "MONTH_YEAR", "MENU", "PHONE", "OTP"}
FILTER = re.compile(r'^\s*(\w+)\s+eq\s+"((?:[^"\\]|\\.)*)"\s*$')


def new_id() -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


def is_id(text: str) -> bool:
    return len(text) == ID_LENGTH and all(c in ID_ALPHABET for c in text)


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ConnectEmulator:
    """In-memory vaults and items behind a WSGI app; `serve()` runs it on a loopback port."""

    def __init__(self) -> None:
        self.vaults: dict[str, dict] = {}
        self.items: dict[str, dict[str, dict]] = {}
        self.tokens: dict[str, set[str] | None] = {}
        # (method, path with query) of every request: lets tests assert what went over the wire.
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    # -- test setup -------------------------------------------------------------------------

    def issue_token(self, vaults: set[str] | None = None) -> str:
        """A new bearer token, allowed every vault or only the ids in `vaults`."""
        token = "eyJ" + secrets.token_urlsafe(48)
        self.tokens[token] = vaults
        return token

    def add_vault(self, name: str, description: str = "") -> str:
        vault_id = new_id()
        stamp = now()
        self.vaults[vault_id] = {
            "id": vault_id, "name": name, "description": description, "attributeVersion": 1,
            "contentVersion": 1, "items": 0, "type": "USER_CREATED", "createdAt": stamp, "updatedAt": stamp,
        }  # fmt: skip
        self.items[vault_id] = {}
        return vault_id

    def add_item(
        self,
        vault_id: str,
        title: str,
        fields: dict[str, str],
        category: str = "LOGIN",
        sections: dict[str, dict[str, str]] | None = None,
    ) -> str:
        """An item with CONCEALED `fields` outside any section, plus `sections` (label -> fields)."""
        body = {
            "vault": {"id": vault_id},
            "title": title,
            "category": category,
            "fields": [
                {"label": label, "value": value, "type": "CONCEALED"} for label, value in fields.items()
            ],
        }
        for section_label, section_fields in (sections or {}).items():
            section_id = new_id()
            body.setdefault("sections", []).append({"id": section_id, "label": section_label})
            body["fields"] += [
                {"label": label, "value": value, "type": "CONCEALED", "section": {"id": section_id}}
                for label, value in section_fields.items()
            ]
        return self._create_item(vault_id, body)["id"]

    def field_value(self, vault_id: str, item_id: str, label: str) -> str | None:
        for field in self.items[vault_id][item_id].get("fields", []):
            if field.get("label") == label:
                return field.get("value")
        return None

    # -- WSGI ---------------------------------------------------------------------------------

    def __call__(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        self.requests.append((method, path + (f"?{query}" if query else "")))
        try:
            if path == "/heartbeat" and method == "GET":
                return self._respond(start_response, 200, ".", "text/plain")
            if path == "/health" and method == "GET":
                return self._respond(
                    start_response, 200, {"name": "1Password Connect API", "version": "1.7.3"}
                )
            token = self._authenticate(environ)
            body = self._read_json(environ) if method in ("POST", "PUT", "PATCH") else None
            with self.lock:
                status, payload = self._route(token, method, path, parse_qs(query), body)
        except ApiError as error:
            return self._respond(
                start_response, error.status, {"status": error.status, "message": error.message}
            )
        return self._respond(start_response, status, payload)

    @staticmethod
    def _respond(start_response, status: int, payload, content_type: str = "application/json"):
        reasons = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
                   404: "Not Found", 405: "Method Not Allowed", 409: "Conflict"}  # fmt: skip
        data = (
            b""
            if payload is None
            else (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        )
        start_response(f"{status} {reasons.get(status, 'Error')}",
                       [("Content-Type", content_type), ("Content-Length", str(len(data)))])  # fmt: skip
        return [data]

    def _authenticate(self, environ) -> str:
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or not token:
            raise ApiError(401, "Invalid bearer token")
        if token not in self.tokens:
            raise ApiError(401, "Invalid token signature")
        return token

    @staticmethod
    def _read_json(environ):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(400, "Unable to parse request body as JSON") from None

    def _route(self, token: str, method: str, path: str, query: dict, body):
        parts = path.strip("/").split("/")
        if parts[:1] != ["v1"] or len(parts) < 2 or parts[1] != "vaults":
            raise ApiError(404, "Resource not found")
        if len(parts) == 2:
            self._allow(method, "GET")
            return 200, self._list_vaults(token, query)
        vault_id = parts[2]
        vault = self._vault(token, vault_id)
        if len(parts) == 3:
            self._allow(method, "GET")
            return 200, vault
        if parts[3] != "items" or len(parts) > 5:
            raise ApiError(404, "Resource not found")
        if len(parts) == 4:
            self._allow(method, "GET", "POST")
            if method == "GET":
                return 200, self._list_items(vault_id, query)
            return 200, self._create_item(vault_id, body)
        item_id = parts[4]
        if not is_id(item_id):
            raise ApiError(400, "Invalid Item UUID")
        item = self.items[vault_id].get(item_id)
        if item is None:
            raise ApiError(404, "Item not found")
        self._allow(method, "GET", "PUT", "PATCH", "DELETE")
        if method == "GET":
            return 200, item
        if method == "DELETE":
            del self.items[vault_id][item_id]
            vault["items"] -= 1
            return 204, None
        if method == "PUT":
            return 200, self._replace_item(vault_id, item, body)
        return 200, self._patch_item(vault_id, item, body)

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise ApiError(405, f"Method {method} not allowed")

    @staticmethod
    def _filter(query: dict, attribute: str) -> str | None:
        if "filter" not in query:
            return None
        match = FILTER.match(query["filter"][0])
        if not match or match.group(1) != attribute:
            raise ApiError(400, f"Invalid filter query: {query['filter'][0]}")
        return re.sub(r"\\(.)", r"\1", match.group(2))

    def _list_vaults(self, token: str, query: dict) -> list[dict]:
        allowed = self.tokens[token]
        name = self._filter(query, "name")
        return [
            vault
            for vault in self.vaults.values()
            if (allowed is None or vault["id"] in allowed) and (name is None or vault["name"] == name)
        ]

    def _vault(self, token: str, vault_id: str) -> dict:
        if not is_id(vault_id):
            raise ApiError(400, "Invalid Vault UUID")
        allowed = self.tokens[token]
        if allowed is not None and vault_id not in allowed:
            raise ApiError(403, f"Authorization: vault {vault_id} is not in scope for this token")
        if vault_id not in self.vaults:
            raise ApiError(404, f"vault {vault_id} not found")
        return self.vaults[vault_id]

    def _list_items(self, vault_id: str, query: dict) -> list[dict]:
        title = self._filter(query, "title")
        return [
            {key: value for key, value in item.items() if key not in ("fields", "sections")}
            for item in self.items[vault_id].values()
            if title is None or item["title"] == title
        ]

    def _validated(self, vault_id: str, body, existing: dict | None) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "Validation: item must be a JSON object")
        item = copy.deepcopy(body)
        if (item.get("vault") or {}).get("id") != vault_id:
            raise ApiError(400, "Validation: item vault id does not match the vault in the URL")
        if item.get("category") not in CATEGORIES:
            raise ApiError(400, f"Validation: invalid item category {item.get('category')!r}")
        if existing is None and not item.get("title"):
            raise ApiError(400, "Validation: item title is required")
        sections = item.get("sections", [])  # kept absent when the client sent none
        if not isinstance(sections, list) or not all(
            isinstance(section, dict) and isinstance(section.get("id"), str) and section["id"]
            for section in sections
        ):
            raise ApiError(400, "Validation: sections must be objects with an id")
        section_ids = [section["id"] for section in sections]
        if len(set(section_ids)) != len(section_ids):
            raise ApiError(400, "Validation: duplicate section id")
        seen = set()
        for field in item.setdefault("fields", []):
            if not isinstance(field, dict):
                raise ApiError(400, "Validation: fields must be objects")
            section = field.get("section")
            linked = section.get("id") if isinstance(section, dict) else section
            if section is not None and linked not in section_ids:
                raise ApiError(
                    400,
                    f"Validation: field {field.get('label')!r} is linked to section "
                    f"{linked!r}, but the item has no section with this id",
                )
            field.setdefault("type", "STRING")
            if field["type"] not in FIELD_TYPES:
                raise ApiError(400, f"Validation: invalid field type {field['type']!r}")
            field.setdefault("id", new_id())
            if field["id"] in seen:
                raise ApiError(400, f"Validation: duplicate field id {field['id']}")
            seen.add(field["id"])
            if field.pop("generate", False):
                length = int((field.pop("recipe", None) or {}).get("length", 32))
                field["value"] = "".join(
                    secrets.choice(string.ascii_letters + string.digits) for _ in range(length)
                )
                field["entropy"] = round(length * 5.95, 2)
        return item

    def _create_item(self, vault_id: str, body) -> dict:
        item = self._validated(vault_id, body, None)
        item_id = new_id()
        stamp = now()
        item.update(id=item_id, version=1, createdAt=stamp, updatedAt=stamp, lastEditedBy=new_id().upper())
        item.setdefault("favorite", False)
        item.setdefault("tags", [])
        item.setdefault("trashed", False)
        self.items[vault_id][item_id] = item
        self.vaults[vault_id]["items"] += 1
        self.vaults[vault_id]["contentVersion"] += 1
        return item

    def _replace_item(self, vault_id: str, current: dict, body) -> dict:
        if isinstance(body, dict) and body.get("id") not in (None, current["id"]):
            raise ApiError(400, "Validation: item id does not match the item in the URL")
        item = self._validated(vault_id, body, current)
        item.update(
            id=current["id"], createdAt=current["createdAt"], updatedAt=now(), version=current["version"] + 1
        )
        self.items[vault_id][current["id"]] = item
        self.vaults[vault_id]["contentVersion"] += 1
        return item

    def _patch_item(self, vault_id: str, current: dict, body) -> dict:
        if not isinstance(body, list):
            raise ApiError(400, "Validation: PATCH body must be a JSON Patch array")
        item = copy.deepcopy(current)
        for operation in body:
            self._apply(item, operation)
        return self._replace_item(vault_id, current, item)

    @staticmethod
    def _apply(item: dict, operation) -> None:
        if not isinstance(operation, dict) or operation.get("op") not in ("add", "replace", "remove"):
            raise ApiError(400, f"Invalid patch operation {operation!r:.80}")
        op, path, value = operation["op"], str(operation.get("path", "")), operation.get("value")
        parts = path.strip("/").split("/")
        if (
            parts[0] in ("title", "tags", "favorite", "urls", "category")
            and len(parts) == 1
            and op != "remove"
        ):
            item[parts[0]] = value
            return
        if parts[0] != "fields":
            raise ApiError(400, f"Unsupported patch path {path}")
        fields = item.setdefault("fields", [])
        if len(parts) == 1:
            if op != "add" or not isinstance(value, dict):
                raise ApiError(400, "Patch /fields: only 'add' of one field object is supported")
            fields.append(value)
            return
        index = next((i for i, field in enumerate(fields) if field.get("id") == parts[1]), None)
        if index is None:
            raise ApiError(404, f"Field {parts[1]} not found")
        if len(parts) == 2:
            if op == "remove":
                del fields[index]
            else:
                fields[index] = value
        elif len(parts) == 3:
            if op == "remove":
                fields[index].pop(parts[2], None)
            else:
                fields[index][parts[2]] = value
        else:
            raise ApiError(400, f"Unsupported patch path {path}")


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


@contextmanager
def serve(emulator: ConnectEmulator) -> Iterator[str]:
    """Serve `emulator` on a free 127.0.0.1 port for the duration of the block; yields its base URL."""
    server = make_server("127.0.0.1", 0, emulator, server_class=_Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

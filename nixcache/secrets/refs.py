"""Parse secret references: `op://vault/item/[section/]field`, `vault://mount/path#key`, `file://path`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from nixcache.secrets.errors import SecretError

SCHEMES = ("op", "vault", "file")
REF_PREFIXES = tuple(f"{scheme}://" for scheme in SCHEMES)


@dataclass(frozen=True)
class OnePasswordRef:
    """`op://<vault>/<item>/[<section>/]<field>`: vault and item by title or id, section and field by
    label or id. `section` is None for the 3-segment form (the field is looked up in the whole item).
    """

    ref: str
    vault: str
    item: str
    field: str
    section: str | None = None
    backend = "1password"


@dataclass(frozen=True)
class VaultRef:
    """`vault://<mount>/<path>#<key>`: key `key` of the KV v2 secret `path` under `mount`."""

    ref: str
    mount: str
    path: str
    key: str
    backend = "vault"


@dataclass(frozen=True)
class FileRef:
    """`file://<path>`: the whole content of a local file; relative paths are from the cwd."""

    ref: str
    path: Path
    backend = "file"


Reference = OnePasswordRef | VaultRef | FileRef


def looks_like_ref(value: object) -> bool:
    """True for strings that claim to be a secret reference (whether or not they parse)."""
    return isinstance(value, str) and value.startswith(REF_PREFIXES)


def _bad(ref: str, backend: str, cause: str, example: str) -> SecretError:
    return SecretError(ref, backend, cause, f"write it as {example}")


def parse(ref: str) -> Reference:
    """Parse `ref` into a typed reference, or raise SecretError saying what is wrong with it."""
    if not isinstance(ref, str):
        raise SecretError(
            repr(type(ref).__name__),
            "refs",
            "a secret reference must be a string",
            "write it as op://vault/item/[section/]field, vault://mount/path#key or file://path",
        )
    scheme, sep, rest = ref.partition("://")
    if not sep or scheme not in SCHEMES:
        raise SecretError(
            ref,
            "refs",
            f"unknown scheme {scheme + '://' if sep else '(none)'}",
            "use op://vault/item/[section/]field, vault://mount/path#key or file://path",
        )
    if scheme == "op":
        return _parse_op(ref, rest)
    if scheme == "vault":
        return _parse_vault(ref, rest)
    return _parse_file(ref, rest)


def _parse_op(ref: str, rest: str) -> OnePasswordRef:
    example = "op://<vault>/<item>/[<section>/]<field>"
    parts = [unquote(part) for part in rest.split("/")]
    if len(parts) not in (3, 4):
        raise _bad(ref, "1password", f"expected 3 or 4 path segments, got {len(parts)}", example)
    if not all(part.strip() for part in parts):
        what = "vault, item, section and field" if len(parts) == 4 else "vault, item and field"
        raise _bad(ref, "1password", f"{what} must all be non-empty", example)
    if len(parts) == 4:
        vault, item, section, field = parts
        return OnePasswordRef(ref, vault, item, field, section)
    vault, item, field = parts
    return OnePasswordRef(ref, vault, item, field)


def _parse_vault(ref: str, rest: str) -> VaultRef:
    example = "vault://<mount>/<path>#<key>"
    location, sep, key = rest.partition("#")
    if not sep or not key:
        raise _bad(ref, "vault", "no '#<key>' naming the key inside the secret", example)
    mount, slash, path = location.strip("/").partition("/")
    if not mount or not slash or not path.strip("/"):
        raise _bad(ref, "vault", "expected a mount and a path", example)
    return VaultRef(ref, mount, path.strip("/"), key)


def _parse_file(ref: str, rest: str) -> FileRef:
    if not rest:
        raise _bad(ref, "file", "empty path", "file://relative/path or file:///absolute/path")
    # file:///abs → "/abs"; file://~/k → under the home directory; file://rel/path → resolved
    # against the cwd (the repo root where pyinfra runs), so inventories can say file://secrets/key.
    return FileRef(ref, Path(rest).expanduser().absolute())

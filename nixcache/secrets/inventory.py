"""Find and check every secret reference that a pyinfra inventory's data uses.

The inventory is loaded with pyinfra's own loader, so `group_data/` next to the inventory file
(and in the current directory) is merged exactly as `pyinfra INVENTORY DEPLOY` would merge it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nixcache.secrets.api import resolve
from nixcache.secrets.errors import SecretError, SecretNotFound, SecretStoreUnavailable
from nixcache.secrets.lifecycle import check_signing_key
from nixcache.secrets.refs import SCHEMES, looks_like_ref, parse

REF_SUFFIX = "_ref"
GENERATE_SUFFIX = "_generate"
# Data keys whose value must be a Nix secret key (signing_key_ref, signing_key_next_ref, …).
SIGNING_KEY_SUFFIXES = ("signing_key_ref", "signing_key_next_ref")


@dataclass
class RefUse:
    """One distinct reference and where the inventory uses it."""

    ref: str
    hosts: set[str] = field(default_factory=set)
    keys: set[str] = field(default_factory=set)
    # Hosts whose data says this value may be generated at deploy time (`<name>_generate = True`
    # beside `<name>_ref`): for those an absent value is expected, not a failure.
    generate_hosts: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Result:
    ref: str
    status: str  # "ok", "new" (absent, will be generated), "FAIL"
    detail: str
    hosts: tuple[str, ...]


def load_inventory(path: Path):
    """A pyinfra Inventory from an inventory file, with its group_data merged (pyinfra's loader)."""
    from pyinfra.api import State
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory

    cwd = os.getcwd()
    if cwd not in sys.path:  # inventories may import project modules, as under the pyinfra CLI
        sys.path.append(cwd)
    # pyinfra executes inventory and group_data files with a current State, as its CLI does.
    with ctx_state.use(State()):
        return make_inventory(str(path), cwd=cwd)


def _walk(value: Any, key_path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _walk(inner, f"{key_path}.{key}" if key_path else str(key))
    elif isinstance(value, list | tuple | set):
        for index, inner in enumerate(value):
            yield from _walk(inner, f"{key_path}[{index}]")
    else:
        yield key_path, value


def _shown(value: object) -> str:
    """How a `*_ref` value that is not a reference is printed.

    A mistyped reference ("vault:/secret/x#k") is shown as written; anything else only by type
    and length, because it may be the secret value itself, pasted where its reference belongs.
    """
    if isinstance(value, str) and re.match(rf"(?:{'|'.join(SCHEMES)}):", value, re.IGNORECASE):
        return value
    size = f" of {len(value)} characters" if isinstance(value, str) else ""
    return f"<{type(value).__name__}{size}, not shown>"


def collect(inventory) -> tuple[dict[str, RefUse], list[Result]]:
    """Every distinct reference in the hosts' data, plus `*_ref` keys whose value is not a reference."""
    uses: dict[str, RefUse] = {}
    malformed: dict[tuple[str, str], set[str]] = {}
    for host in inventory:
        data = host.data.dict()
        for key_path, value in _walk(data, ""):
            leaf = key_path.rsplit(".", 1)[-1]
            if isinstance(value, str):
                # One line of group data, one secret per host (backup_credential_ref = "…-{host}").
                value = value.replace("{host}", host.name)
            if looks_like_ref(value):
                use = uses.setdefault(value, RefUse(value))
                use.hosts.add(host.name)
                use.keys.add(key_path)
                stem = key_path.removesuffix(REF_SUFFIX)
                if key_path.endswith(REF_SUFFIX) and data.get(stem + GENERATE_SUFFIX) is True:
                    use.generate_hosts.add(host.name)
            elif leaf.endswith(REF_SUFFIX) and value is not None:
                # A typo such as "vault:/secret/x#k" would otherwise be silently skipped.
                malformed.setdefault((key_path, _shown(value)), set()).add(host.name)
    problems = [
        Result(
            text,
            "FAIL",
            f"{key} is not a secret reference;"
            " write op://vault/item/[section/]field, vault://mount/path#key or file://path",
            tuple(sorted(hosts)),
        )
        for (key, text), hosts in sorted(malformed.items())
    ]
    return uses, problems


def check(uses: dict[str, RefUse]) -> list[Result]:
    """Resolve each reference once; never keep or return the values."""
    results = []
    # scheme -> the failure that made a store unusable: its other references are not asked again,
    # so a dead server costs one timeout, not one per reference.
    unavailable: dict[str, SecretStoreUnavailable] = {}
    for ref in sorted(uses):
        use = uses[ref]
        hosts = tuple(sorted(use.hosts))
        try:
            backend = parse(ref).backend
            if backend in unavailable:
                down = unavailable[backend]
                raise SecretStoreUnavailable(ref, down.backend, down.cause, down.fix)
            value = resolve(ref)
            if any(key.endswith(SIGNING_KEY_SUFFIXES) for key in use.keys):
                check_signing_key(ref, value)
        except SecretError as error:
            if isinstance(error, SecretNotFound) and use.generate_hosts == use.hosts:
                results.append(Result(ref, "new", "absent; the deploy will generate and store it", hosts))
                continue
            if isinstance(error, SecretStoreUnavailable):
                unavailable[backend] = error
            results.append(Result(ref, "FAIL", f"{error.cause} [{error.backend}]; {error.fix}", hosts))
        else:
            results.append(Result(ref, "ok", "", hosts))
    return results

"""`<hash>.ls`: the JSON listing of a store path's NAR (Nix's `write-nar-listing`).

Nix writes `{"version":1,"root":<node>}` (BinaryCacheStore::uploadData, from the NAR it is
uploading; `nix store ls --store http://…` reads it back). A node is
`{"type":"regular","size":N[,"executable":true][,"narOffset":N]}`,
`{"type":"symlink","target":"…"}` or `{"type":"directory","entries":{"<name>":<node>,…}}`.

Verified on upload: that shape, walked without recursion (a deep tree is no stack overflow).
Nix uploads the listing before the NAR and the narinfo, so it cannot be checked against them
then; `nixcache verify` compares sizes with the narinfo's NarSize. Kept while the narinfo of the
same hash is (extras/gc.py).
"""

from __future__ import annotations

from typing import Any

from nixcache.server.extras import ExtraError, Kind, parse_json

LIMIT = 32 * 1024 * 1024  # a listing of some 300 000 files; Nix holds the whole listing in memory too
HASH = "[0-9a-df-np-sv-z]{32}"


def validate(name: str, data: bytes) -> dict[str, Any]:
    listing = parse_json(name, data)
    if not isinstance(listing, dict) or listing.get("version") != 1 or "root" not in listing:
        raise ExtraError(f'{name}: a NAR listing is {{"version":1,"root":…}}')
    stack: list[tuple[str, Any]] = [("/", listing["root"])]
    while stack:
        where, node = stack.pop()
        kind = node.get("type") if isinstance(node, dict) else None
        if kind == "regular":
            for field in ("size", "narOffset"):
                value = node.get(field, 0)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ExtraError(f"{name}: {where}: {field} is not a non-negative integer")
        elif kind == "symlink":
            if not isinstance(node.get("target"), str):
                raise ExtraError(f"{name}: {where}: a symlink needs a target string")
        elif kind == "directory":
            entries = node.get("entries", {})
            if not isinstance(entries, dict):
                raise ExtraError(f"{name}: {where}: entries is not an object")
            for child, value in entries.items():
                if child in ("", ".", "..") or "/" in child or "\0" in child:
                    raise ExtraError(f"{name}: {where}: {child[:80]!r} is not a file name")
                stack.append((f"{where.rstrip('/')}/{child}", value))
        else:
            raise ExtraError(f"{name}: {where}: type must be regular, symlink or directory")
    return listing


def total_size(listing: dict[str, Any]) -> int:
    """The bytes of file contents the listing names (a NAR is always larger)."""
    total = 0
    stack = [listing["root"]]
    while stack:
        node = stack.pop()
        if node["type"] == "regular":
            total += node.get("size", 0)
        elif node["type"] == "directory":
            stack.extend(node.get("entries", {}).values())
    return total


KIND = Kind(
    name="listing",
    pattern=rf"/({HASH}\.ls)",
    directory="ls",
    content_type="application/json",
    limit=LIMIT,
    validate=validate,
)

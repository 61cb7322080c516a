"""`<hash>.ls`: the JSON listing of a store path's NAR that Nix writes with `write-nar-listing`.

`nix store ls --store http://…` reads it. Same shape, key order and compact separators as Nix's
own file (`{"version":1,"root":{…}}`, no trailing newline); `narOffset` is where a file's
contents start in the NAR, found by the same walk that generates the NAR (dump.walk).
"""

from __future__ import annotations

import json
import os
from typing import Any

from nixcache.server.nixstore.dump import Contents, Entry, PathChanged, walk


def listing(root: str | bytes, nar_size: int) -> bytes:
    """The listing JSON of the store path `root`, whose NAR is `nar_size` bytes long;
    PathChanged when the tree does not add up to that (it changed, or is not what Nix registered)."""
    tree: dict[str, Any] = {}
    nodes: dict[tuple[bytes, ...], dict[str, Any]] = {}
    pos = 0
    last_file: dict[str, Any] | None = None
    for item in walk(root):
        if isinstance(item, bytes):
            pos += len(item)
        elif isinstance(item, Contents):
            assert last_file is not None  # walk() yields a file's Entry before its Contents
            last_file["narOffset"] = pos
            pos += item.size
        else:
            node = _node(item)
            if item.kind == "regular":
                last_file = node
            nodes[item.names] = node
            if item.names:
                parent = nodes[item.names[:-1]]
                parent["entries"][_name(item.names[-1])] = node
            else:
                tree = node
    if pos != nar_size:
        raise PathChanged(f"{os.fsdecode(root)} gives a NAR of {pos} bytes, not its NarSize of {nar_size}")
    text = json.dumps({"version": 1, "root": tree}, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogateescape")  # names that are not UTF-8 go out as they are


def _node(entry: Entry) -> dict[str, Any]:
    """A listing node, keys in the order Nix writes them."""
    if entry.kind == "directory":
        return {"type": "directory", "entries": {}}
    if entry.kind == "symlink":
        return {"type": "symlink", "target": _name(entry.target or b"")}
    node: dict[str, Any] = {"type": "regular", "size": entry.size}
    if entry.executable:
        node["executable"] = True
    return node


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)

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


# -- the listing of a NAR file (nixcache verify) ------------------------------------------------

_MAX_DEPTH = 512  # directories deeper than any store path; a crafted NAR cannot exhaust the stack


class _Nar:
    """An uncompressed NAR file read by its framing; file contents are skipped with seek."""

    def __init__(self, handle: Any):
        self.handle = handle
        self.pos = 0

    def _read(self, count: int) -> bytes:
        data = self.handle.read(count)
        if len(data) != count:
            raise ValueError(f"the NAR ends early, at byte {self.pos + len(data)}")
        self.pos += count
        return data

    def u64(self) -> int:
        return int.from_bytes(self._read(8), "little")

    def string(self, limit: int = 4096) -> bytes:
        size = self.u64()
        if size > limit:
            raise ValueError(f"a NAR string of {size} bytes at byte {self.pos}")
        data = self._read(size + (-size % 8))
        return data[:size]

    def expect(self, *words: bytes) -> None:
        for word in words:
            found = self.string()
            if found != word:
                raise ValueError(f"expected {word!r} at byte {self.pos}, found {found[:40]!r}")

    def skip(self, size: int) -> None:
        padded = size + (-size % 8)
        self.handle.seek(padded, 1)
        self.pos += padded

    def node(self, depth: int = 0) -> dict[str, Any]:
        if depth > _MAX_DEPTH:
            raise ValueError("directories nested deeper than any store path")
        self.expect(b"(", b"type")
        kind = self.string()
        if kind == b"regular":
            node: dict[str, Any] = {"type": "regular"}
            tag = self.string()
            if tag == b"executable":
                self.expect(b"")
                node["executable"] = True
                tag = self.string()
            if tag != b"contents":
                raise ValueError(f"expected 'contents' at byte {self.pos}")
            node["size"] = size = self.u64()
            node["narOffset"] = self.pos
            self.skip(size)
            self.expect(b")")
            return node
        if kind == b"symlink":
            self.expect(b"target")
            target = self.string().decode("utf-8", "surrogateescape")
            self.expect(b")")
            return {"type": "symlink", "target": target}
        if kind != b"directory":
            raise ValueError(f"node type {kind[:40]!r} at byte {self.pos}")
        entries: dict[str, Any] = {}
        while (tag := self.string()) == b"entry":
            self.expect(b"(", b"name")
            name = self.string().decode("utf-8", "surrogateescape")
            self.expect(b"node")
            entries[name] = self.node(depth + 1)
            self.expect(b")")
        if tag != b")":
            raise ValueError(f"expected 'entry' or ')' at byte {self.pos}")
        return {"type": "directory", "entries": entries}


def of_nar(handle: Any) -> dict[str, Any]:
    """The listing of the uncompressed NAR read from `handle` (seekable); ValueError when the
    NAR's framing is broken. The same tree as Nix's listing, whatever order its keys come in."""
    reader = _Nar(handle)
    reader.expect(b"nix-archive-1")
    return {"version": 1, "root": reader.node()}


def same(uploaded: dict[str, Any], computed: dict[str, Any]) -> bool:
    """Whether an uploaded listing describes the computed one (Nix 2.8 writes narOffset only
    for some files; where it is absent it is not compared)."""
    stack = [(uploaded["root"], computed["root"])]
    while stack:
        mine, theirs = stack.pop()
        if mine.get("type") != theirs["type"]:
            return False
        if theirs["type"] == "regular":
            if mine.get("size", 0) != theirs["size"]:
                return False
            if bool(mine.get("executable")) != bool(theirs.get("executable")):
                return False
            if "narOffset" in mine and mine["narOffset"] != theirs["narOffset"]:
                return False
        elif theirs["type"] == "symlink":
            if mine.get("target") != theirs["target"]:
                return False
        else:
            entries = mine.get("entries", {})
            if set(entries) != set(theirs["entries"]):
                return False
            stack.extend((entries[name], theirs["entries"][name]) for name in entries)
    return True

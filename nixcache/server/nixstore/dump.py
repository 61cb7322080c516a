"""NARs generated from a store path, byte for byte what `nix-store --dump` writes, streamed.

A NAR is a tree walk: every directory's entries in byte order of their names, each node framed by
length-prefixed strings ("(", "type", "regular", "contents", <u64 size>, <bytes>, padding, ")").
`walk()` yields that walk without reading any file: framing as `bytes`, a file's contents as a
`Contents` placeholder, and an `Entry` before each node (what a listing needs; ignored by the
dump). `generate()` turns it into the response body: `bytes` chunks, and `FileRegion`s for large
files so the HTTP layer can send them with sendfile(2). Memory stays flat whatever the path's
size: one directory listing per level of depth, and bounded chunks.

A Range starting at N walks the metadata up to N (lstat, readdir, readlink) but reads no file
contents before it.

Store paths are immutable, but the garbage collector may delete one under a download and a broken
disk may change one. The generator raises `PathChanged` when what it finds does not add up
(a file vanished, a size differs from the walk, the NAR would not be NarSize long), and it holds
back the last byte of the response until the walk has ended where NarSize says it must: the HTTP
layer then closes the connection, so a client never receives a complete-looking wrong body.
Files already open stay readable after deletion, so a GC racing a download usually costs nothing.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

# Files up to this size are read into the chunk (one read beats a sendfile round trip for them).
SMALL_FILE = 64 * 1024
# Chunks of framing and small files are yielded once they reach this size.
CHUNK = 256 * 1024
_READ = 256 * 1024


class PathChanged(OSError):
    """The store path changed or vanished while its NAR was generated.

    An OSError, so the HTTP layer treats it like a broken socket: it closes the connection
    instead of finishing a response whose body would be wrong.
    """


def _str(data: bytes) -> bytes:
    """A NAR string: little-endian u64 length, the bytes, zero padding to a multiple of 8."""
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


MAGIC = _str(b"nix-archive-1")
_OPEN = _str(b"(")
_CLOSE = _str(b")")
_DIRECTORY = _OPEN + _str(b"type") + _str(b"directory")
_REGULAR = _OPEN + _str(b"type") + _str(b"regular")
_EXECUTABLE = _str(b"executable") + _str(b"")
_CONTENTS = _str(b"contents")
_SYMLINK = _OPEN + _str(b"type") + _str(b"symlink") + _str(b"target")
_ENTRY = _str(b"entry") + _OPEN + _str(b"name")
_NODE = _str(b"node")


@dataclass(frozen=True, slots=True)
class Entry:
    """A node of the tree, yielded before its framing. `names` are the components below the root."""

    names: tuple[bytes, ...]
    kind: str  # "regular", "directory" or "symlink", as in Nix's listings
    size: int = 0
    executable: bool = False
    target: bytes | None = None


@dataclass(frozen=True, slots=True)
class Contents:
    """The contents of a regular file, at this point of the NAR; read only when it is sent."""

    path: bytes
    size: int


@dataclass(frozen=True, slots=True)
class FileRegion:
    """`count` bytes of an open file from `offset`: the HTTP layer sends it with sendfile(2).

    The same attributes as the server's FileBody, so one sendfile helper serves both. Valid until
    the generator that yielded it is resumed (it then closes the file)."""

    handle: BinaryIO
    offset: int
    count: int

    def __iter__(self) -> Iterator[bytes]:
        """The bytes, for consumers without sendfile; PathChanged when the file came up short."""
        yield from _read_exactly(self.handle, self.offset, self.count)


def _read_exactly(handle: BinaryIO, offset: int, count: int) -> Iterator[bytes]:
    handle.seek(offset)
    remaining = count
    while remaining > 0:
        chunk = handle.read(min(remaining, _READ))
        if not chunk:
            raise PathChanged(f"{os.fsdecode(handle.name)} shrank while its NAR was being sent")
        remaining -= len(chunk)
        yield chunk


def _vanished(path: bytes, error: OSError) -> PathChanged:
    return PathChanged(f"{os.fsdecode(path)} changed or became unreadable under its NAR: {error.strerror}")


def walk(root: str | bytes) -> Iterator[bytes | Entry | Contents]:
    """The NAR of `root` as framing bytes, `Entry` markers and `Contents` placeholders."""
    path = os.fsencode(root)
    yield MAGIC
    yield from _node(path, (), _lstat(path))


def _lstat(path: bytes) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as error:
        raise _vanished(path, error) from None


def _node(path: bytes, names: tuple[bytes, ...], st: os.stat_result) -> Iterator[bytes | Entry | Contents]:
    mode = st.st_mode
    try:
        if stat.S_ISREG(mode):
            executable = bool(mode & stat.S_IXUSR)  # Nix's own test: the owner's execute bit
            yield Entry(names, "regular", size=st.st_size, executable=executable)
            head = _REGULAR + _EXECUTABLE if executable else _REGULAR
            yield head + _CONTENTS + struct.pack("<Q", st.st_size)
            yield Contents(path, st.st_size)
            yield b"\0" * (-st.st_size % 8) + _CLOSE
        elif stat.S_ISLNK(mode):
            target = os.readlink(path)
            yield Entry(names, "symlink", target=target)
            yield _SYMLINK + _str(target) + _CLOSE
        elif stat.S_ISDIR(mode):
            yield Entry(names, "directory")
            yield _DIRECTORY
            for name in sorted(os.listdir(path)):  # bytes sort as Nix's std::map<std::string> does
                child = path + b"/" + name
                yield _ENTRY + _str(name) + _NODE
                yield from _node(child, (*names, name), _lstat(child))
                yield _CLOSE
            yield _CLOSE
        else:
            raise PathChanged(f"{os.fsdecode(path)} is neither a file, a directory nor a symlink")
    except PathChanged:
        raise
    except OSError as error:
        raise _vanished(path, error) from None


def generate(
    root: str | bytes, nar_size: int, offset: int = 0, count: int | None = None
) -> Iterator[bytes | FileRegion]:
    """Bytes `offset` to `offset + count` of the NAR of `root`, which must be `nar_size` long.

    Yields `bytes` and `FileRegion`s; a consumer sends each item completely before asking for the
    next. Raises PathChanged (before the last byte) when the tree is not what it was.
    """
    end = nar_size if count is None else min(nar_size, offset + count)
    if offset >= end:
        return
    pos = 0  # NAR position of the next item
    out = bytearray()
    for item in walk(root):
        if isinstance(item, Entry):
            continue
        size = len(item) if isinstance(item, bytes) else item.size
        if pos + size > nar_size:
            raise PathChanged(f"{os.fsdecode(root)} is now larger than its NarSize of {nar_size} bytes")
        lo, hi = max(pos, offset), min(pos + size, end)
        if hi > lo:
            if isinstance(item, bytes):
                out += item[lo - pos : hi - pos]
            elif item.size <= SMALL_FILE:
                with _open(item) as handle:
                    for chunk in _read_exactly(handle, lo - pos, hi - lo):
                        out += chunk
            else:
                if out:
                    yield bytes(out)
                    out.clear()
                with _open(item) as handle:
                    yield FileRegion(handle, lo - pos, hi - lo)
        pos += size
        if pos >= end and end < nar_size:
            break  # a Range ending before the NAR does: what follows is not asked for
        if len(out) >= CHUNK and pos < end:
            # Never flush the response's last byte before the walk has ended where it must.
            yield bytes(out)
            out.clear()
    else:
        if pos != nar_size:
            raise PathChanged(
                f"{os.fsdecode(root)} gives a NAR of {pos} bytes, not its NarSize of {nar_size}"
            )
    if out:
        yield bytes(out)


def _open(item: Contents) -> BinaryIO:
    """Open a file for its contents; PathChanged unless it is the file the walk saw."""
    try:
        handle = open(item.path, "rb")  # noqa: SIM115 - closed by the caller's with
    except OSError as error:
        raise _vanished(item.path, error) from None
    st = os.fstat(handle.fileno())
    if not stat.S_ISREG(st.st_mode) or st.st_size != item.size:
        handle.close()
        raise PathChanged(f"{os.fsdecode(item.path)} changed size while its NAR was being sent")
    return handle


def iter_bytes(items: Iterator[bytes | FileRegion]) -> Iterator[bytes]:
    """The body as plain bytes chunks (file regions read in bounded chunks)."""
    for item in items:
        if isinstance(item, bytes):
            yield item
        else:
            yield from item

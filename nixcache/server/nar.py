"""NAR files: decompress (xz, bzip2 with the stdlib, zstd with `zstandard`) and hash in bounded memory."""

from __future__ import annotations

import bz2
import hashlib
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from nixcache.server import base32

CHUNK = 1 << 20
# Every NAR starts with the length-prefixed string "nix-archive-1".
NAR_MAGIC = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1"


class NarError(ValueError):
    """A NAR file is not valid data in its declared compression."""


@dataclass(frozen=True)
class NarDigest:
    """NarHash (sha256:<base32> of the decompressed NAR) and NarSize."""

    nar_hash: str
    nar_size: int

    def serialize(self) -> str:
        return f"{self.nar_hash} {self.nar_size}\n"

    @classmethod
    def parse(cls, text: str) -> NarDigest:
        nar_hash, size = text.split()
        return cls(nar_hash, int(size))


def _decompressed(handle: BinaryIO, compression: str) -> BinaryIO:
    if compression == "none":
        return handle
    if compression == "xz":
        return lzma.open(handle)  # type: ignore[return-value]
    if compression == "bzip2":
        return bz2.open(handle)  # type: ignore[return-value]
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(handle, read_across_frames=True)  # type: ignore[return-value]
    raise NarError(f"unknown compression {compression!r}")


def digest(path: Path, compression: str) -> NarDigest:
    """Hash the decompressed content of `path`, reading 1 MiB at a time whatever the ratio."""
    sha = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as raw, _decompressed(raw, compression) as stream:
            head = b""
            while True:
                chunk = stream.read(CHUNK)
                if not chunk:
                    break
                if size < len(NAR_MAGIC):
                    head += chunk[: len(NAR_MAGIC) - size]
                sha.update(chunk)
                size += len(chunk)
    except (lzma.LZMAError, EOFError, OSError, zstandard.ZstdError) as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise  # a real I/O error, not bad data
        raise NarError(f"not valid {compression} data: {error}") from None
    if head != NAR_MAGIC:
        raise NarError(
            f"decompressed content ({compression}) is not a NAR: it lacks the nix-archive-1 header"
        )
    return NarDigest(base32.format_sha256(sha.digest()), size)


def plain_digest(path: Path, sha256: bytes, size: int) -> NarDigest:
    """The digest of an uncompressed NAR whose file sha256 and size are known (computed while it
    was received): only the header is read again."""
    with open(path, "rb") as handle:
        if handle.read(len(NAR_MAGIC)) != NAR_MAGIC:
            raise NarError("decompressed content (none) is not a NAR: it lacks the nix-archive-1 header")
    return NarDigest(base32.format_sha256(sha256), size)

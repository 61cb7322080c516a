"""NAR files: decompress (every compression of `narinfo.COMPRESSIONS`, through `codecs`) and hash in
bounded memory."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from nixcache.server import base32, codecs, narinfo

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


def digest(path: Path | bytes, compression: str) -> NarDigest:
    """Hash the decompressed content of `path` (or of these bytes: a small upload held in
    memory), reading 1 MiB at a time whatever the ratio."""
    sha = hashlib.sha256()
    size = 0
    try:
        opened = io.BytesIO(path) if isinstance(path, bytes) else open(path, "rb")  # noqa: SIM115
        with opened as raw, codecs.decoder(raw, compression) as stream:
            head = b""
            while True:
                chunk = stream.read(CHUNK)
                if not chunk:
                    break
                if size < len(NAR_MAGIC):
                    head += chunk[: len(NAR_MAGIC) - size]
                sha.update(chunk)
                size += len(chunk)
    except codecs.DATA_ERRORS as error:
        if not codecs.is_data_error(error):
            raise  # a real I/O error, not bad data
        raise NarError(f"not valid {compression} data: {error}") from None
    if head != NAR_MAGIC:
        raise NarError(
            f"decompressed content ({compression}) is not a NAR: it lacks the nix-archive-1 header"
        )
    return NarDigest(base32.format_sha256(sha.digest()), size)


def plain_digest(path: Path | bytes, sha256: bytes, size: int) -> NarDigest:
    """The digest of an uncompressed NAR whose file sha256 and size are known (computed while it
    was received): only the header is read again (of the file, or of these bytes)."""
    if isinstance(path, bytes):
        head = path[: len(NAR_MAGIC)]
    else:
        with open(path, "rb") as handle:
            head = handle.read(len(NAR_MAGIC))
    if head != NAR_MAGIC:
        found = codecs.sniff(head)
        if found is not None:
            # Nix names the NARs it compresses with gzip, lzma, lzop, … plain `.nar` (its URL
            # has an extension only for xz, bzip2, zstd, br, lz4 and lzip).
            raise NarError(
                f"holds {found} data, not a NAR (Nix names {found} NARs plain .nar); push with "
                f"?compression= one of {narinfo.SUPPORTED}"
            )
        raise NarError("decompressed content (none) is not a NAR: it lacks the nix-archive-1 header")
    return NarDigest(base32.format_sha256(sha256), size)

"""Streaming decoders for the compressions Nix writes: NAR files and encoded uploads share them.

One table, `DECODERS`: Nix's own name of a compression (what `Compression:` in a narinfo and
`Content-Encoding` on an upload say, `showCompressionAlgo` in Nix's libutil/compression-algo.cc)
→ a function that wraps a readable binary stream in one that yields the decoded bytes. Every
decoder reads in bounded pieces and returns bounded pieces, whatever the ratio: a small
upload that decodes to gigabytes is stopped by the caller's size limit, not by memory.

Libraries: the stdlib for xz, lzma, bzip2, gzip and deflate; `zstandard` for zstd; `brotli`
(Google's bindings) for br; `lz4` (python-lz4, the frame format libarchive writes) for lz4.
Nix can also write lzip, lzop, compress, grzip and lrzip (through libarchive); no maintained
Python library decodes them, so they are refused with a message naming what is supported.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO

import brotli
import lz4.frame
import zstandard

CHUNK = 1 << 20


class CodecError(ValueError):
    """The data is not valid in the compression it claims."""


class _Brotli:
    """A brotli stream read in bounded pieces (`output_buffer_limit`, brotli ≥ 1.2)."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._decoder = brotli.Decompressor()

    def read(self, size: int = -1) -> bytes:
        limit = size if size > 0 else CHUNK
        decoder = self._decoder
        while True:
            if not decoder.can_accept_more_data():
                out = decoder.process(b"", output_buffer_limit=limit)
            elif decoder.is_finished():
                if self._raw.read(1):
                    raise CodecError("data after the end of the brotli stream")
                return b""
            else:
                data = self._raw.read(CHUNK)
                if not data:
                    raise CodecError("the brotli stream ends early")
                out = decoder.process(data, output_buffer_limit=limit)
            if out:
                return out

    def close(self) -> None:
        pass

    def __enter__(self) -> _Brotli:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Deflate:
    """Content-Encoding `deflate` (RFC 9110 8.4.1.2: the zlib format), read in bounded pieces."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._decoder = zlib.decompressobj()

    def read(self, size: int = -1) -> bytes:
        limit = size if size > 0 else CHUNK
        decoder = self._decoder
        while True:
            if decoder.unconsumed_tail:
                out = decoder.decompress(decoder.unconsumed_tail, limit)
            elif decoder.eof:
                if decoder.unused_data or self._raw.read(1):
                    raise CodecError("data after the end of the deflate stream")
                return b""
            else:
                data = self._raw.read(CHUNK)
                if not data:
                    raise CodecError("the deflate stream ends early")
                out = decoder.decompress(data, limit)
            if out:
                return out

    def close(self) -> None:
        pass

    def __enter__(self) -> _Deflate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _none(raw: BinaryIO) -> Any:
    return raw


# The returned streams are closed by the caller's `with` (SIM115 cannot see that through a table).
DECODERS: dict[str, Callable[[BinaryIO], Any]] = {
    "none": _none,
    "xz": lambda raw: lzma.open(raw),  # noqa: SIM115
    "lzma": lambda raw: lzma.open(raw, format=lzma.FORMAT_ALONE),  # noqa: SIM115
    "bzip2": lambda raw: bz2.open(raw),  # noqa: SIM115
    "gzip": lambda raw: gzip.GzipFile(fileobj=raw),
    "deflate": _Deflate,
    "zstd": lambda raw: zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True),
    "br": _Brotli,
    "lz4": lambda raw: lz4.frame.LZ4FrameFile(raw),
}
# What decoding errors look like from these libraries (OSError: gzip's BadGzipFile, and any
# OSError without an errno; one with an errno is a real I/O error and is not caught as bad data).
DATA_ERRORS: tuple[type[BaseException], ...] = (
    CodecError,
    EOFError,
    OSError,
    RuntimeError,  # lz4.frame
    lzma.LZMAError,
    zlib.error,
    zstandard.ZstdError,
    brotli.error,
)
# Nix compressions no maintained Python library decodes (libarchive filters in Nix).
UNSUPPORTED = ("lzip", "lzop", "compress", "grzip", "lrzip")


def is_data_error(error: BaseException) -> bool:
    """True when `error`, raised while decoding, means bad data rather than a failed read."""
    if isinstance(error, OSError) and not isinstance(error, CodecError):
        return error.errno is None
    return isinstance(error, DATA_ERRORS)


def decoder(raw: BinaryIO, name: str) -> Any:
    """`raw` decoded from the compression `name` (a key of DECODERS): `read(n)`, a context manager."""
    return DECODERS[name](raw)


# The first bytes of each compression's files: what a `.nar` upload that is not a NAR holds
# (Nix names NARs it compresses with gzip, lzma, lzop, compress, grzip or lrzip plain `.nar`).
MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"\x1f\x9d", "compress"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x89LZO", "lzop"),
    (b"LRZI", "lrzip"),
    (b"GRZip", "grzip"),
    (b"LZIP", "lzip"),
    (b"\xfd7zXZ", "xz"),
    (b"BZh", "bzip2"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x04\x22\x4d\x18", "lz4"),
)


def sniff(head: bytes) -> str | None:
    """The compression whose magic `head` starts with, or None."""
    return next((name for magic, name in MAGIC if head.startswith(magic)), None)

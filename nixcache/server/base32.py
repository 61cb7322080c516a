"""Nix's base32 encoding and the `sha256:<base32>` hash strings used in narinfos.

Nix's base32 is not RFC 4648: its alphabet omits e, o, u, t and it emits the bits of the
digest starting from the last character, so a 32-byte digest becomes 52 characters.
"""

from __future__ import annotations

import binascii
import hashlib

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_VALUE = {c: i for i, c in enumerate(ALPHABET)}
ALPHABET_SET = frozenset(ALPHABET)
SHA256_B32_LEN = 52


def encoded_length(size: int) -> int:
    """Characters Nix's base32 uses for `size` bytes."""
    return (size * 8 - 1) // 5 + 1


def encode(data: bytes) -> str:
    """Encode bytes as Nix base32 (as `nix hash to-base32` prints)."""
    chars = []
    for n in range(encoded_length(len(data)) - 1, -1, -1):
        bit = n * 5
        i, j = divmod(bit, 8)
        c = data[i] >> j
        if i + 1 < len(data):
            c |= data[i + 1] << (8 - j)
        chars.append(ALPHABET[c & 0x1F])
    return "".join(chars)


def decode(text: str, size: int) -> bytes:
    """Decode `text` (Nix base32 of `size` bytes); ValueError when it is not."""
    if len(text) != encoded_length(size):
        raise ValueError(f"expected {encoded_length(size)} base32 characters, got {len(text)}")
    out = bytearray(size)
    for n, char in enumerate(reversed(text)):
        digit = _VALUE.get(char)
        if digit is None:
            raise ValueError(f"{char!r} is not a Nix base32 character")
        bit = n * 5
        i, j = divmod(bit, 8)
        out[i] |= (digit << j) & 0xFF
        carry = digit >> (8 - j)
        if i + 1 < size:
            out[i + 1] |= carry
        elif carry:
            raise ValueError("base32 value has bits beyond the digest length")
    return bytes(out)


def is_base32(text: str, length: int) -> bool:
    """True when `text` is `length` characters of Nix's base32 alphabet."""
    return len(text) == length and ALPHABET_SET.issuperset(text)


def parse_sha256(text: str) -> bytes:
    """The digest of a narinfo hash field: `sha256:` + 52 base32 chars (or 64 hex, normalised)."""
    algo, sep, value = text.partition(":")
    if not sep or algo != "sha256":
        raise ValueError(f"{text!r} must start with 'sha256:'")
    if len(value) == 64:
        try:
            return binascii.unhexlify(value)
        except binascii.Error:
            raise ValueError(f"{value!r} is not hexadecimal") from None
    return decode(value, 32)


def normalize_sha256(text: str) -> str:
    """`text` as `sha256:<base32>`; ValueError when it is not a sha256 hash string.

    The canonical form is checked without decoding (this runs for every narinfo parsed): 52
    alphabet characters whose first one carries only the digest's top bit ('0' or '1').
    """
    if (
        len(text) == 59
        and text.startswith("sha256:")
        and text[7] in "01"
        and ALPHABET_SET.issuperset(text[7:])
    ):
        return text
    return format_sha256(parse_sha256(text))


def format_sha256(digest: bytes) -> str:
    """`sha256:<base32>`, the form Nix writes and signs."""
    return "sha256:" + encode(digest)


def sha256_b32(data: bytes) -> str:
    """The base32 sha256 of `data` without prefix (handy in tests)."""
    return encode(hashlib.sha256(data).digest())

"""Nix binary cache signing keys: the formats `nix-store --generate-binary-cache-key` writes.

A secret key file holds `name:base64(64 bytes)` (ed25519 seed followed by the public key,
as libsodium lays it out) and a public key `name:base64(32 bytes)`. A narinfo signature is
`name:base64(ed25519 signature of the fingerprint)`, the fingerprint being
`1;<store path>;<NarHash>;<NarSize>;<comma-separated full reference paths>`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

_RAW = serialization.Encoding.Raw


class KeyFormatError(ValueError):
    """A key or signature is not in Nix's `name:base64` format."""


def _split(text: str, what: str, length: int) -> tuple[str, bytes]:
    name, sep, encoded = text.strip().partition(":")
    if not sep or not name:
        raise KeyFormatError(f"{what} must look like 'name:base64', got no name")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error as error:
        raise KeyFormatError(f"{what} '{name}' is not valid base64: {error}") from None
    if len(raw) != length:
        raise KeyFormatError(f"{what} '{name}' holds {len(raw)} bytes, expected {length}")
    return name, raw


def check_key_name(name: str) -> None:
    """Raise KeyFormatError unless `name` can name a key (the part before ':' in every format)."""
    if not name or ":" in name or any(c.isspace() for c in name):
        raise KeyFormatError(f"key name {name!r} must be non-empty, without ':' or spaces")


def fingerprint(store_path: str, nar_hash: str, nar_size: int, references: Iterable[str]) -> bytes:
    """The bytes a narinfo signature covers; `references` are full store paths."""
    return f"1;{store_path};{nar_hash};{nar_size};{','.join(references)}".encode()


@dataclass(frozen=True)
class PublicKey:
    name: str
    key: Ed25519PublicKey

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        name, raw = _split(text, "public key", 32)
        return cls(name, Ed25519PublicKey.from_public_bytes(raw))

    def raw(self) -> bytes:
        return self.key.public_bytes(_RAW, serialization.PublicFormat.Raw)

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.raw()).decode()}"

    def verify(self, signature: str, message: bytes) -> bool:
        """True when `signature` (`name:base64`) is this key's signature of `message`."""
        try:
            name, raw = _split(signature, "signature", 64)
        except KeyFormatError:
            return False
        if name != self.name:
            return False
        try:
            self.key.verify(raw, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, repr=False)
class SecretKey:
    """An ed25519 signing key with its Nix name. `repr` never shows key material."""

    name: str
    key: Ed25519PrivateKey

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        check_key_name(name)
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        name, raw = _split(text, "secret key", 64)
        key = Ed25519PrivateKey.from_private_bytes(raw[:32])
        if key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw) != raw[32:]:
            raise KeyFormatError(f"secret key '{name}': its public half does not match its seed")
        return cls(name, key)

    def public(self) -> PublicKey:
        return PublicKey(self.name, self.key.public_key())

    def serialize(self) -> str:
        """The secret key file's content (no trailing newline, as Nix writes it)."""
        seed = self.key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        return f"{self.name}:{base64.b64encode(seed + self.public().raw()).decode()}"

    def sign(self, message: bytes) -> str:
        return f"{self.name}:{base64.b64encode(self.key.sign(message)).decode()}"

    def __repr__(self) -> str:
        return f"SecretKey(name={self.name!r}, key=<hidden>)"

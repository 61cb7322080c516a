"""Secrets that nixcache creates itself: the cache signing key, the push/read tokens, the backup
password and the backup repository's ssh key.

A new value is stored first and read back before it is returned, so nothing is ever installed
on a host that the secret store does not already hold. Existing values are never overwritten.

With `dry_run=True` (a `pyinfra --dry` run) an absent value is generated but not stored: the
run can show what it would change, and the secret store is left exactly as it was.
"""

from __future__ import annotations

import logging
import secrets as _random

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nixcache.keys import KeyFormatError, SecretKey, check_key_name
from nixcache.secrets.api import resolve, store
from nixcache.secrets.errors import SecretError, SecretNotFound
from nixcache.secrets.refs import parse

TOKEN_BYTES = 32

log = logging.getLogger(__name__)


def _fetch_or_create(ref: str, generate: bool, what: str, make, dry_run: bool = False) -> str:
    parsed = parse(ref)
    try:
        return resolve(ref)
    except SecretNotFound as missing:
        # Only a definite "absent" answer from the store leads here; unreachable stores and bad
        # credentials raise SecretError out of resolve() before anything is generated.
        if not generate:
            raise SecretNotFound(
                ref,
                parsed.backend,
                f"{what} does not exist ({missing.cause})",
                "store one there, or set the deploy's generate option to create it",
            ) from None
    value = make()
    if dry_run:
        # A throwaway value stands in so the dry run can render what depends on it.
        log.warning("dry run: %s does not exist yet; a real run generates and stores a new %s", ref, what)
        return value
    # overwrite=False: if another deploy stored one since we looked, fail rather than replace it.
    store(ref, value, overwrite=False)
    try:
        stored = resolve(ref)
    except SecretError as error:
        raise SecretError(
            ref,
            parsed.backend,
            f"new {what} was stored but cannot be read back ({error.cause})",
            "check the store, then rerun; nothing was installed",
        ) from None
    if stored != value:
        # Someone else stored a different value concurrently, or the store mangles it; either way
        # the store's copy is the truth and ours was never used.
        raise SecretError(
            ref,
            parsed.backend,
            f"new {what} read back differs from what was stored",
            "check for a concurrent deploy or a store that alters values, then rerun",
        )
    return stored


def ensure_signing_key(ref: str, name: str, generate: bool, *, dry_run: bool = False) -> str:
    """The Nix secret key (`name:base64`) at `ref`, generated and stored first when absent and allowed.

    Raises SecretError when the store cannot be reached, when the key is absent and `generate` is
    false, or when the stored value is not a Nix secret key (the message never shows the value).
    """
    try:
        check_key_name(name)  # before the store is touched
    except KeyFormatError as error:
        raise SecretError(
            ref,
            parse(ref).backend,
            f"cannot name a signing key: {error}",
            "set a key name without ':' or spaces, e.g. cache.example.org-1",
        ) from None
    value = _fetch_or_create(
        ref, generate, "signing key", lambda: SecretKey.generate(name).serialize(), dry_run
    )
    check_signing_key(ref, value)
    return value


def check_signing_key(ref: str, value: str) -> None:
    """Raise SecretError unless `value`, read from `ref`, is a Nix secret key; never shows the value."""
    try:
        SecretKey.parse(value)
    except KeyFormatError as error:
        # KeyFormatError messages carry the key name and sizes, never key material.
        raise SecretError(
            ref,
            parse(ref).backend,
            f"not a Nix secret key ({error})",
            "replace it with a key made by 'nixcache keys generate' or nix-store --generate-binary-cache-key"
            " (nixcache secrets put --force)",
        ) from None


def new_token() -> str:
    """A new URL-safe token of TOKEN_BYTES random bytes: push/read tokens, passwords."""
    return _random.token_urlsafe(TOKEN_BYTES)


def ensure_token(ref: str, generate: bool, *, dry_run: bool = False) -> str:
    """The token or password at `ref`; when absent and allowed, a new URL-safe 256-bit one, stored first."""
    return _fetch_or_create(ref, generate, "token", new_token, dry_run)


def ensure_ssh_key(ref: str, generate: bool, *, dry_run: bool = False) -> str:
    """The OpenSSH private key at `ref`; when absent and allowed, a new ed25519 one, stored first."""
    return _fetch_or_create(ref, generate, "ssh key", _new_ssh_key, dry_run)


def _new_ssh_key() -> str:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    # Without the final newline: some stores strip it, and the read-back must compare equal.
    # Whoever writes the key file adds it back (OpenSSH refuses a key file without it).
    return pem.decode().rstrip("\n")

"""`nixcache keys export|import`: an offline, passphrase-encrypted copy of the signing key.

For the day the secret store itself is lost. The file is a small JSON envelope:

    {"format": "nixcache-key-export", "version": 1, "key_name": "cache-1",
     "public_key": "cache-1:base64…",
     "kdf": {"name": "argon2id", "memory_cost_kib": 65536, "iterations": 3, "lanes": 4, "salt": "base64…"},
     "cipher": {"name": "aes-256-gcm", "nonce": "base64…"},
     "ciphertext": "base64…"}

The key comes from Argon2id (RFC 9106's second recommended parameter set) over the passphrase
with a random salt; AES-256-GCM encrypts the secret key file's content, with every other field
of the envelope as associated data, so a changed name, public key or parameter is detected
exactly like a changed ciphertext. The passphrase is prompted for (hidden) or read from a file,
never taken from argv.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from pathlib import Path
from typing import Any

import click
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from nixcache.keys import KeyFormatError, SecretKey

FORMAT = "nixcache-key-export"
VERSION = 1
DEFAULT_SECRET_KEY_FILE = Path("/etc/nixcache/signing-key")
MIN_PASSPHRASE = 12

# RFC 9106 §4, second recommended option: 64 MiB, 3 passes, 4 lanes (about 0.2 s here).
KDF_DEFAULTS = {"memory_cost_kib": 64 * 1024, "iterations": 3, "lanes": 4}
# A crafted file must not make import allocate gigabytes or spin for hours.
KDF_LIMITS = {"memory_cost_kib": 1024 * 1024, "iterations": 64, "lanes": 64}


class ExportFormatError(ValueError):
    """The file is not a key export this version can read."""


class WrongPassphrase(ValueError):
    """Decryption failed: wrong passphrase, or the file was altered."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(envelope: dict[str, Any], *keys: str) -> bytes:
    value: Any = envelope
    for key in keys:
        value = value[key]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError):
        raise ExportFormatError(f"field {'.'.join(keys)} is not base64") from None


def _derive(passphrase: str, kdf: dict[str, Any]) -> bytes:
    return Argon2id(
        salt=_unb64(kdf, "salt"),
        length=32,
        iterations=kdf["iterations"],
        lanes=kdf["lanes"],
        memory_cost=kdf["memory_cost_kib"],
    ).derive(passphrase.encode())


def _associated_data(envelope: dict[str, Any]) -> bytes:
    header = {k: v for k, v in envelope.items() if k != "ciphertext"}
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def encrypt(key: SecretKey, passphrase: str, kdf_params: dict[str, int] | None = None) -> str:
    """The export file's text for `key`, encrypted under `passphrase`."""
    kdf = {"name": "argon2id", **(kdf_params or KDF_DEFAULTS), "salt": _b64(os.urandom(16))}
    envelope: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "key_name": key.name,
        "public_key": str(key.public()),
        "kdf": kdf,
        "cipher": {"name": "aes-256-gcm", "nonce": _b64(os.urandom(12))},
    }
    sealed = AESGCM(_derive(passphrase, kdf)).encrypt(
        _unb64(envelope, "cipher", "nonce"), key.serialize().encode(), _associated_data(envelope)
    )
    envelope["ciphertext"] = _b64(sealed)
    return json.dumps(envelope, indent=2) + "\n"


def _checked_envelope(text: str) -> dict[str, Any]:
    try:
        envelope = json.loads(text)
    except json.JSONDecodeError:
        raise ExportFormatError("not JSON") from None
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise ExportFormatError(f"no format '{FORMAT}'")
    if envelope.get("version") != VERSION:
        raise ExportFormatError(f"version {envelope.get('version')!r}, this nixcache reads {VERSION}")
    try:
        kdf, cipher = envelope["kdf"], envelope["cipher"]
        if kdf["name"] != "argon2id" or cipher["name"] != "aes-256-gcm":
            raise ExportFormatError(f"unknown kdf {kdf['name']!r} or cipher {cipher['name']!r}")
        for name, limit in KDF_LIMITS.items():
            value = kdf[name]
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
                raise ExportFormatError(f"kdf {name} {value!r} is outside 1..{limit}")
        for field in ("key_name", "public_key", "ciphertext"):
            if not isinstance(envelope[field], str):
                raise ExportFormatError(f"field {field} is not a string")
    except (KeyError, TypeError) as error:
        raise ExportFormatError(f"missing or malformed field {error}") from None
    return envelope


def decrypt(text: str, passphrase: str) -> SecretKey:
    """The key in an export file; raises ExportFormatError or WrongPassphrase."""
    envelope = _checked_envelope(text)
    nonce = _unb64(envelope, "cipher", "nonce")
    sealed = _unb64(envelope, "ciphertext")
    try:
        plain = AESGCM(_derive(passphrase, envelope["kdf"])).decrypt(
            nonce, sealed, _associated_data(envelope)
        )
    except (InvalidTag, ValueError):
        raise WrongPassphrase() from None
    try:
        key = SecretKey.parse(plain.decode())
    except (KeyFormatError, UnicodeDecodeError) as error:
        raise ExportFormatError(f"the decrypted content is not a Nix secret key ({error})") from None
    if key.name != envelope["key_name"] or str(key.public()) != envelope["public_key"]:
        raise ExportFormatError("the decrypted key does not match the envelope's name and public key")
    return key


def _passphrase_from_file(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise click.ClickException(
            f"cannot read passphrase file {path}: {error.strerror}; check the path and its permissions"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        click.echo(f"warning: passphrase file {path} is readable by others; chmod 600 it", err=True)
    passphrase = text.removesuffix("\n").removesuffix("\r")
    if not passphrase:
        raise click.ClickException(f"passphrase file {path} is empty; put the passphrase in it")
    return passphrase


passphrase_file_option = click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read the passphrase from this file (final newline ignored) instead of prompting.",
)


@click.command(name="export")
@click.option(
    "--secret-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_SECRET_KEY_FILE,
    show_default=True,
    help="The signing key to export.",
)
@click.option(
    "--to", "to", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Export file."
)
@passphrase_file_option
@click.option("--force", is_flag=True, help="Overwrite an existing export file.")
def export_key(secret_key_file: Path, to: Path, passphrase_file: Path | None, force: bool) -> None:
    """Write an offline copy of the signing key (mode 0600), under a passphrase of 12+ characters."""
    from nixcache.keycli import write_private  # keycli registers this command: import late

    try:
        key = SecretKey.parse(secret_key_file.read_text())
    except OSError as error:
        raise click.ClickException(
            f"cannot read {secret_key_file}: {error.strerror};"
            f" pass --secret-key-file or run as the key's owner"
        ) from None
    except KeyFormatError as error:
        raise click.ClickException(f"{secret_key_file}: {error}") from None
    if to.exists() and not force:
        raise click.ClickException(f"{to} already exists; pass --force to overwrite it")
    if passphrase_file:
        passphrase = _passphrase_from_file(passphrase_file)
    else:
        passphrase = click.prompt("Passphrase for the export", hide_input=True, confirmation_prompt=True)
    if len(passphrase) < MIN_PASSPHRASE:
        raise click.ClickException(
            f"the passphrase has {len(passphrase)} characters;"
            f" use at least {MIN_PASSPHRASE} (a few random words)"
        )
    write_private(to, encrypt(key, passphrase), force=force)
    click.echo(f"exported key {key.name} ({key.public()}) to {to}; keep the passphrase apart from it")


@click.command(name="import")
@click.option(
    "--from", "source", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Export file."
)
@click.option(
    "--secret-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the signing key (mode 0600).",
)
@passphrase_file_option
@click.option("--force", is_flag=True, help="Overwrite an existing secret key file.")
def import_key(source: Path, secret_key_file: Path, passphrase_file: Path | None, force: bool) -> None:
    """Decrypt an export file and write the signing key it holds (mode 0600)."""
    from nixcache.keycli import write_private  # keycli registers this command: import late

    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise click.ClickException(f"cannot read {source}: {reason}; check the path") from None
    if secret_key_file.exists() and not force:
        raise click.ClickException(f"{secret_key_file} already exists; pass --force to overwrite it")
    passphrase = _passphrase_from_file(passphrase_file) if passphrase_file else None
    try:
        _checked_envelope(text)  # refuse a wrong file before asking for a passphrase
        if passphrase is None:
            passphrase = click.prompt("Passphrase of the export", hide_input=True)
        key = decrypt(text, passphrase)
    except ExportFormatError as error:
        raise click.ClickException(
            f"{source} is not a usable nixcache key export ({error});"
            f" use a file written by `nixcache keys export`"
        ) from None
    except WrongPassphrase:
        raise click.ClickException(
            f"cannot decrypt {source}: wrong passphrase, or the file was altered;"
            f" retry with the export's passphrase, or use another copy"
        ) from None
    write_private(secret_key_file, key.serialize(), force=force)
    click.echo(f"imported key {key.name} ({key.public()}) into {secret_key_file}")

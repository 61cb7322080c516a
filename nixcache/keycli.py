"""`nixcache keys`: create and inspect cache signing keys."""

from __future__ import annotations

from pathlib import Path

import click

from nixcache.atomicfile import write_atomically
from nixcache.keys import KeyFormatError, SecretKey


def write_private(path: Path, content: str, *, force: bool) -> None:
    """Write `content` to `path` with mode 0600 from the first byte; refuse to overwrite unless forced.

    The data is on disk before the rename: a key file left empty by a crash would be a lost key.
    """
    if path.exists() and not force:
        raise click.ClickException(f"{path} already exists; pass --force to overwrite it")
    write_atomically(path, content.encode())


@click.group()
def keys() -> None:
    """Create and inspect cache signing keys (Nix's own key formats)."""


@keys.command()
@click.argument("name")
@click.option("--secret-key-file", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--public-key-file", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def generate(name: str, secret_key_file: Path, public_key_file: Path, force: bool) -> None:
    """Generate a key pair NAME, as `nix-store --generate-binary-cache-key` does."""
    try:
        key = SecretKey.generate(name)
    except KeyFormatError as error:
        raise click.BadParameter(str(error), param_hint="NAME") from None
    if public_key_file.exists() and not force:
        raise click.ClickException(f"{public_key_file} already exists; pass --force to overwrite it")
    write_private(secret_key_file, key.serialize(), force=force)
    public_key_file.write_text(str(key.public()))
    click.echo(str(key.public()))


@keys.command()
@click.argument("secret_key_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def public(secret_key_file: Path) -> None:
    """Print the public key of SECRET_KEY_FILE."""
    try:
        key = SecretKey.parse(secret_key_file.read_text())
    except KeyFormatError as error:
        raise click.ClickException(f"{secret_key_file}: {error}") from None
    click.echo(str(key.public()))


def _register_offline_copies() -> None:
    """`keys export` / `keys import` live in nixcache.keyexport (passphrase-encrypted offline copies)."""
    from nixcache.keyexport import export_key, import_key

    keys.add_command(export_key)
    keys.add_command(import_key)


_register_offline_copies()

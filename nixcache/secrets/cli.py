"""`nixcache secrets`: check an inventory's references, read and write single secrets.

Values are printed only by `get --reveal`, and are read only from stdin (never argv, which any
local user can read through /proc).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nixcache.secrets.api import resolve, store
from nixcache.secrets.errors import SecretError, SecretNotFound
from nixcache.secrets.refs import parse

# Exit codes: 0 success; 1 a reference failed (unreachable store, bad credentials, bad ref…);
# 2 usage error (click's own); 3 the secret does not exist (get).
EXIT_FAILED = 1
EXIT_ABSENT = 3


def _fail(error: SecretError, code: int = EXIT_FAILED) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(code)


@click.group()
def secrets() -> None:
    """Secret references: op://vault/item/[section/]field, vault://mount/path#key, file://path.

    \b
    Vault:     VAULT_ADDR + VAULT_TOKEN, or VAULT_ROLE_ID + VAULT_SECRET_ID (AppRole)
    1Password: OP_CONNECT_HOST + OP_CONNECT_TOKEN (a 1Password Connect server)
    file:      paths relative to the current directory (the repository root)
    """


@secrets.command()
@click.argument("inventory", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def check(inventory: Path) -> None:
    """Resolve every reference INVENTORY's host and group data uses; print which resolve, never values.

    Exits 1 when any reference fails. A reference that is absent but marked for generation
    (`<name>_generate = True` beside `<name>_ref`) is reported as `new`, not as a failure.
    """
    from nixcache.secrets.inventory import check as check_refs
    from nixcache.secrets.inventory import collect, load_inventory

    try:
        loaded = load_inventory(inventory)
    except Exception as error:  # pyinfra wraps errors in user code in many types
        raise click.ClickException(f"cannot load inventory {inventory}: {error}") from None
    uses, problems = collect(loaded)
    results = problems + check_refs(uses)
    if not results:
        click.echo(f"no secret references in {inventory}")
        return
    for result in results:
        hosts = ", ".join(result.hosts)
        if result.status == "FAIL":
            click.echo(f"FAIL {result.ref}: {result.detail}  (hosts: {hosts})")
        elif result.status == "new":
            click.echo(f"new {result.ref}: {result.detail}  (hosts: {hosts})")
        else:
            click.echo(f"ok  {result.ref}  (hosts: {hosts})")
    failed = sum(result.status == "FAIL" for result in results)
    click.echo(f"{len(results) - failed} of {len(results)} references usable", err=True)
    if failed:
        sys.exit(EXIT_FAILED)


@secrets.command()
@click.argument("ref")
@click.option("--reveal", is_flag=True, help="Print the value itself (to stdout).")
def get(ref: str, reveal: bool) -> None:
    """Say whether REF resolves (and its length); print the value only with --reveal.

    Exits 3 when the secret does not exist, 1 when it cannot be read.
    """
    try:
        value = resolve(ref)
    except SecretNotFound as error:
        _fail(error, EXIT_ABSENT)
    except SecretError as error:
        _fail(error)
    if reveal:
        click.echo(value)
    else:
        click.echo(f"{ref} exists ({len(value)} characters); pass --reveal to print it")


@secrets.command()
@click.argument("ref")
@click.option("--force", is_flag=True, help="Replace an existing value (for example to rotate a token).")
def put(ref: str, force: bool) -> None:
    """Store the value read from stdin at REF (one trailing newline is dropped).

    On a terminal the value is prompted for without echo. An existing value is kept unless --force.
    """
    try:
        parse(ref)
    except SecretError as error:
        _fail(error)
    if sys.stdin.isatty():
        value = click.prompt(f"value for {ref}", hide_input=True, confirmation_prompt=True)
    else:
        value = sys.stdin.read().removesuffix("\n")
    if not value:
        raise click.UsageError("no value on stdin; pipe it in, e.g. `nixcache secrets put REF < file`")
    try:
        store(ref, value, overwrite=force)
    except SecretError as error:
        _fail(error)
    click.echo(f"stored {ref} ({len(value)} characters)")


@secrets.command()
@click.argument("ref")
@click.option("--force", is_flag=True, help="Replace an existing value (rotation); the old one is gone.")
def generate(ref: str, force: bool) -> None:
    """Generate a random token or password (URL-safe, 256 bits) and store it at REF.

    For push and read tokens, backup passwords and any other secret the deploys only read. The
    value is never printed (read it with `get --reveal`). An existing value is kept unless --force.
    """
    from nixcache.secrets.lifecycle import new_token

    try:
        parse(ref)
        store(ref, new_token(), overwrite=force)
    except SecretError as error:
        _fail(error)
    click.echo(f"stored a new token at {ref}; read it with `nixcache secrets get {ref} --reveal`")


@secrets.command("signing-key")
@click.argument("ref")
@click.option("--name", required=True, help="Key name, e.g. cache.example.org-1 (the part before ':').")
@click.option("--generate", is_flag=True, help="Generate and store a new key when REF does not exist.")
def signing_key(ref: str, name: str, generate: bool) -> None:
    """Print the public key of the signing key at REF, generating and storing it first with --generate.

    Never replaces an existing key; never generates when the store cannot be reached.
    """
    from nixcache.keys import SecretKey
    from nixcache.secrets.lifecycle import ensure_signing_key

    try:
        key = SecretKey.parse(ensure_signing_key(ref, name, generate))
    except SecretNotFound as error:
        _fail(error, EXIT_ABSENT)
    except SecretError as error:
        _fail(error)
    if key.name != name:  # a key is never replaced: say so rather than print another name's key
        click.echo(
            f"error: {ref}: holds the signing key {key.name!r}, not {name!r}; pass --name {key.name} "
            "to use it, or give another reference for a new key",
            err=True,
        )
        sys.exit(EXIT_FAILED)
    click.echo(str(key.public()))

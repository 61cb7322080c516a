"""resolve / store / exists: the three calls everything else in nixcache uses."""

from __future__ import annotations

from nixcache.secrets.backend import backend_for
from nixcache.secrets.errors import SecretError, SecretNotFound
from nixcache.secrets.refs import parse


def resolve(ref: str) -> str:
    """The value `ref` points at; SecretError (SecretNotFound when absent) otherwise."""
    parsed = parse(ref)
    value = backend_for(parsed).get(parsed)
    if not isinstance(value, str):  # defensive: a backend bug must not leak a non-string value
        raise SecretError(ref, parsed.backend, "backend returned a non-text value", "report this as a bug")
    return value


def store(ref: str, value: str, *, overwrite: bool = True) -> None:
    """Create or replace the value at `ref`, leaving everything else in the store untouched.

    With `overwrite=False` an existing value is left alone and SecretError is raised instead.
    """
    parsed = parse(ref)
    if not isinstance(value, str) or value == "":
        raise SecretError(
            ref, parsed.backend, "refusing to store an empty or non-text value", "pass a non-empty string"
        )
    backend_for(parsed).put(parsed, value, overwrite=overwrite)


def exists(ref: str) -> bool:
    """True when `ref` resolves, False when the store says it is absent.

    Any other failure (unreachable server, bad token, bad reference) raises SecretError, so that
    "cannot ask" is never mistaken for "does not exist" (which would trigger key generation).
    """
    try:
        resolve(ref)
    except SecretNotFound:
        return False
    return True

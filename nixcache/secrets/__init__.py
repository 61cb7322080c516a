"""Secret references resolved on the controller: `op://`, `vault://`, `file://` behind one interface.

    resolve(ref) -> str          the value (SecretError when it cannot be had)
    store(ref, value) -> None    create or replace just that value
    exists(ref) -> bool          False only when the store says it is absent
    resolve_hidden(ref)          a pyinfra HiddenValue, masked in all pyinfra output
    ensure_signing_key(ref, name, generate) / ensure_token(ref, generate) / ensure_ssh_key(ref, generate)

Backends import their client libraries (hvac, onepasswordconnectsdk) and pyinfra lazily, so this
package imports on cache hosts that only have nixcache's runtime dependencies.
"""

from __future__ import annotations

from nixcache.secrets.api import exists, resolve, store
from nixcache.secrets.errors import SecretError, SecretNotFound, SecretStoreUnavailable
from nixcache.secrets.hidden import resolve_hidden
from nixcache.secrets.lifecycle import ensure_signing_key, ensure_ssh_key, ensure_token
from nixcache.secrets.refs import looks_like_ref, parse

__all__ = [
    "SecretError",
    "SecretNotFound",
    "SecretStoreUnavailable",
    "ensure_signing_key",
    "ensure_ssh_key",
    "ensure_token",
    "exists",
    "looks_like_ref",
    "parse",
    "resolve",
    "resolve_hidden",
    "store",
]

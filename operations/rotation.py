"""Signing key rotation: which keys a cache signs with and which keys its clients trust.

One rule, read from host data by the cache deploy, the client deploy and deploys/rotate_key.py:

  no signing_key_next_ref            sign with signing_key_ref            clients trust it
  next ref, rotate_phase=introduce   sign with both (current first)       clients trust both
  next ref, rotate_phase=retire      sign with the next key only          clients trust only it

After a retire run the inventory is updated (signing_key_ref := the next ref, next keys removed),
which names the same single key again: the rule has no state of its own to get out of step.

The next key is created (stored first, read back) by whichever deploy needs it first: the cache's
own, or a client's that must trust it. pyinfra prepares hosts in parallel, in no fixed order, so a
client is often prepared before the caches it trusts; both ask `next_key`, one at a time per ref.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import gevent.lock
from pyinfra.api import HiddenValue

from nixcache.keys import SecretKey
from operations.settings import CONFIG_DIR, ROTATE_PHASES, SIGNING_KEY_FILE, SettingsError, host_secret

NEXT_SIGNING_KEY_FILE = f"{CONFIG_DIR}/signing-key.next"


def _get(data: Any, key: str) -> Any:
    return data.get(key) if hasattr(data, "get") else getattr(data, key, None)


def phase(data: Any) -> str | None:
    """None when no rotation is under way, else "introduce" or "retire"."""
    if not _get(data, "signing_key_next_ref"):
        return None
    value = str(_get(data, "rotate_phase") or "introduce")
    # `data` may be another host's raw data (client deploys), not checked by settings.from_data.
    if value not in ROTATE_PHASES:
        raise SettingsError(f"host data 'rotate_phase' is {value!r}; give introduce or retire")
    return value


def signing_refs(data: Any) -> list[str]:
    """Secret refs of the keys a cache signs with, in the order they sign."""
    current, upcoming = _get(data, "signing_key_ref"), _get(data, "signing_key_next_ref")
    step = phase(data)
    if step is None:
        return [current] if current else []
    if step == "retire":
        return [upcoming]
    return [ref for ref in (current, upcoming) if ref]


def key_files(data: Any) -> list[str]:
    """The key files on the cache host, in signing order (the server config's signing_key_files)."""
    step = phase(data)
    if step is None:
        return [SIGNING_KEY_FILE]
    if step == "retire":
        return [NEXT_SIGNING_KEY_FILE]
    return [SIGNING_KEY_FILE, NEXT_SIGNING_KEY_FILE]


def next_name(current: str) -> str:
    """The next generation's key name: `cache-eu-1` -> `cache-eu-2`, `mykey` -> `mykey-2`."""
    match = re.fullmatch(r"(.*-)(\d+)", current)
    return f"{match.group(1)}{int(match.group(2)) + 1}" if match else f"{current}-2"


def trusted_public_keys(host_name: str, data: Any, resolve) -> list[str]:
    """The public keys clients must trust for cache `host_name` with host `data`.

    `resolve` reads a secret ref's value (the current key must exist); the next key is created
    when absent, with the cache's own name rule (`next_key`), so a client prepared before its
    caches trusts the very key they will sign with.
    """
    from operations.settings import from_data

    upcoming = next_key(from_data(host_name, data), host_name)
    values = {_get(data, "signing_key_next_ref"): upcoming.unmask()} if upcoming is not None else {}
    return [
        str(SecretKey.parse((values[ref] if ref in values else resolve(ref)).strip()).public())
        for ref in signing_refs(data)
    ]


# One creation at a time per ref: hosts are prepared in parallel greenlets, and a secret store
# reached over the network yields between "absent" and "stored".
_NEXT_KEY_LOCKS: dict[str, gevent.lock.Semaphore] = {}


def next_key(s: Any, host_name: str) -> HiddenValue | None:
    """The next key's secret file content when a rotation is under way, generated and stored first.

    The next key is created by the rotation itself (it is the one moment a new key is wanted),
    so it is always allowed to be generated; it is stored in the secret store before any host sees
    it. Named `signing_key_next_name`, else the current name with its generation bumped.
    """
    if not s.signing_key_next_ref:
        return None
    from nixcache.secrets import ensure_signing_key  # the secrets package only when rotating

    name = s.signing_key_next_name or next_name(s.key_name(host_name))
    with _NEXT_KEY_LOCKS.setdefault(s.signing_key_next_ref, gevent.lock.Semaphore()):
        return host_secret(
            "next signing key",
            "signing_key_next_ref",
            s.signing_key_next_ref,
            functools.partial(ensure_signing_key, name=name, generate=True),
        )

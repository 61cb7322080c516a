"""The interface every secret backend implements, and the registry that picks one per reference."""

from __future__ import annotations

import importlib
from typing import Protocol

from nixcache.secrets.refs import Reference

# Network calls to secret stores give up after this long, so a deploy never hangs on a dead server.
TIMEOUT_SECONDS = 10.0


class Backend(Protocol):
    """Reads and writes secret values for one reference scheme.

    `get` raises SecretNotFound when the store says the secret is absent and SecretError for
    every other failure; `put` creates or replaces only the addressed
    value, and with `overwrite=False` raises SecretError instead of replacing an existing one.
    """

    def get(self, ref: Reference) -> str: ...

    def put(self, ref: Reference, value: str, *, overwrite: bool) -> None: ...


# reference backend name -> "module:function" returning a Backend. Imported on first use so
# that hvac and onepasswordconnectsdk are needed only by those who use them.
_REGISTRY: dict[str, str] = {
    "file": "nixcache.secrets.filestore:backend",
    "vault": "nixcache.secrets.vault:backend",
    "1password": "nixcache.secrets.onepassword:backend",
}


def backend_for(ref: Reference) -> Backend:
    """The backend that serves `ref`."""
    module_name, attribute = _REGISTRY[ref.backend].split(":")
    return getattr(importlib.import_module(module_name), attribute)()

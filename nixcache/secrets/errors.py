"""The one exception type callers of `nixcache.secrets` catch.

Messages name the reference, the backend, the cause and the fix in one line, and never a
secret value: they end up in pyinfra output, CI logs and bug reports.
"""

from __future__ import annotations


class SecretError(ValueError):
    """A secret reference could not be parsed, resolved or stored.

    `str(error)` reads `<ref>: <cause> [<backend>]; <fix>`.
    """

    def __init__(self, ref: str, backend: str, cause: str, fix: str) -> None:
        self.ref = ref
        self.backend = backend
        self.cause = cause
        self.fix = fix
        super().__init__(f"{ref}: {cause} [{backend}]; {fix}")


class SecretNotFound(SecretError):
    """The store answered, and the vault, item, field, path or key does not exist.

    Kept apart from other failures so `exists()` can say "no" only when the store actually
    said so, and never when it could not be asked.
    """


class SecretStoreUnavailable(SecretError):
    """The store itself cannot be used: unreachable, timing out, not configured, or refusing the login.

    Every other reference to the same store would fail the same way, so callers that resolve
    many references (`nixcache secrets check`) can stop asking it.
    """

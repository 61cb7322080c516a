"""`vault://<mount>/<path>#<key>` secrets: HashiCorp Vault (or OpenBao) KV v2 through hvac.

Configuration comes from the environment, as for the `vault` CLI: VAULT_ADDR, and either
VAULT_TOKEN or VAULT_ROLE_ID + VAULT_SECRET_ID (AppRole, mounted at VAULT_APPROLE_MOUNT,
default `approle`); optional VAULT_NAMESPACE and VAULT_CACERT.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from nixcache.secrets.backend import TIMEOUT_SECONDS
from nixcache.secrets.errors import SecretError, SecretNotFound, SecretStoreUnavailable
from nixcache.secrets.refs import VaultRef

# How often a merge-write is retried when another writer bumped the secret's version in between.
CAS_ATTEMPTS = 5


def _settings(ref: VaultRef) -> dict[str, str | None]:
    addr = os.environ.get("VAULT_ADDR", "").rstrip("/")
    if not addr:
        raise SecretStoreUnavailable(
            ref.ref, "vault", "VAULT_ADDR is not set", "export VAULT_ADDR=https://vault.example:8200"
        )
    token = os.environ.get("VAULT_TOKEN") or None
    role_id = os.environ.get("VAULT_ROLE_ID") or None
    secret_id = os.environ.get("VAULT_SECRET_ID") or None
    if not token and not (role_id and secret_id):
        raise SecretStoreUnavailable(
            ref.ref,
            f"vault {addr}",
            "no credentials: VAULT_TOKEN or VAULT_ROLE_ID + VAULT_SECRET_ID is not set",
            "export VAULT_TOKEN, or VAULT_ROLE_ID and VAULT_SECRET_ID for AppRole",
        )
    return {
        "addr": addr,
        "token": token,
        "role_id": role_id,
        "secret_id": secret_id,
        "approle_mount": os.environ.get("VAULT_APPROLE_MOUNT") or "approle",
        "namespace": os.environ.get("VAULT_NAMESPACE") or None,
        "cacert": os.environ.get("VAULT_CACERT") or None,
    }


def _backend_name(ref: VaultRef) -> str:
    """The backend as error messages name it: `vault <VAULT_ADDR>`."""
    return f"vault {_settings(ref)['addr']}"


@functools.lru_cache(maxsize=8)
def _client(addr: str, token, role_id, secret_id, approle_mount: str, namespace, cacert):
    # One login per process and credentials: an AppRole login per secret would mint a token each time.
    import hvac

    client = hvac.Client(
        url=addr, token=token, namespace=namespace, verify=cacert or True, timeout=TIMEOUT_SECONDS
    )
    if not token:
        client.auth.approle.login(role_id=role_id, secret_id=secret_id, mount_point=approle_mount)
    return client


class VaultBackend:
    """Reads and merges single keys of KV v2 secrets."""

    def _call(self, ref: VaultRef, what: str, function, /, *args, **kwargs) -> Any:
        """Run one hvac call, translating every failure into a one-line SecretError."""
        import hvac.exceptions
        import requests

        settings = _settings(ref)
        backend = f"vault {settings['addr']}"
        try:
            try:
                client = _client(**settings)
            except hvac.exceptions.VaultError as error:
                raise SecretStoreUnavailable(
                    ref.ref,
                    backend,
                    f"AppRole login at auth/{settings['approle_mount']} failed ({_reason(error)})",
                    "check VAULT_ROLE_ID and VAULT_SECRET_ID (secret ids expire) and VAULT_APPROLE_MOUNT",
                ) from None
            return function(client, *args, **kwargs)
        except requests.exceptions.Timeout:
            raise SecretStoreUnavailable(
                ref.ref,
                backend,
                f"no answer within {TIMEOUT_SECONDS:.0f}s",
                "check VAULT_ADDR and that Vault is up",
            ) from None
        except requests.exceptions.SSLError:
            raise SecretStoreUnavailable(
                ref.ref,
                backend,
                "TLS verification failed",
                "set VAULT_CACERT to the CA that signed Vault's certificate",
            ) from None
        except requests.exceptions.ConnectionError:
            raise SecretStoreUnavailable(
                ref.ref,
                backend,
                "server unreachable",
                "check VAULT_ADDR and that Vault is running and reachable",
            ) from None
        except (hvac.exceptions.Unauthorized, hvac.exceptions.Forbidden) as error:
            _client.cache_clear()  # a fresh login next time, e.g. after the operator renewed the token
            how = "AppRole login (VAULT_ROLE_ID/VAULT_SECRET_ID)" if not settings["token"] else "VAULT_TOKEN"
            if not _token_valid(client):
                raise SecretStoreUnavailable(
                    ref.ref,
                    backend,
                    f"the token from {how} is invalid or expired ({_reason(error)})",
                    "log in again and export a fresh VAULT_TOKEN"
                    if settings["token"]
                    else "check the AppRole's token_ttl and the secret id",
                ) from None
            raise SecretError(
                ref.ref,
                backend,
                f"permission denied to {what} {ref.mount}/{ref.path} ({_reason(error)})",
                f"check {how} is valid and its policy allows {what} on {ref.mount}/data/{ref.path}",
            ) from None
        except hvac.exceptions.InvalidPath as error:
            raise SecretNotFound(
                ref.ref,
                backend,
                f"no secret {ref.path} in KV v2 mount {ref.mount} ({_reason(error)})",
                f"create it (nixcache secrets put {ref.ref}) or fix the mount/path",
            ) from None
        except hvac.exceptions.VaultError as error:
            raise SecretError(
                ref.ref,
                backend,
                f"cannot {what} {ref.mount}/{ref.path}: {type(error).__name__} ({_reason(error)})",
                "check that the mount is a KV version 2 engine and that Vault is unsealed",
            ) from None

    def _read(self, ref: VaultRef) -> tuple[dict[str, Any], int]:
        """The secret's current data and version; ({}, 0) when it has never been written."""

        def read(client):
            import hvac.exceptions

            try:
                response = client.secrets.kv.v2.read_secret_version(
                    path=ref.path, mount_point=ref.mount, raise_on_deleted_version=False
                )
            except hvac.exceptions.InvalidPath:
                return None
            return response["data"]

        data = self._call(ref, "read", read)
        if data is None:
            self._check_mount(ref)
            return {}, 0
        return data.get("data") or {}, int(data["metadata"]["version"])

    def _check_mount(self, ref: VaultRef) -> None:
        """Raise SecretError when `ref.mount` is not a KV v2 engine.

        A KV v1 mount answers 404 to KV v2 reads, which would look like "absent", and it would
        accept a KV v2 write as a v1 secret at `<path>` under `data/`: both must stop here.
        """

        def describe(client):
            import hvac.exceptions

            try:
                return client.adapter.get(f"/v1/sys/internal/ui/mounts/{ref.mount}")["data"]
            except hvac.exceptions.Forbidden:
                return None  # no such mount, or the policy hides it: the caller's 404 stands

        mount = self._call(ref, "inspect mount", describe)
        if not mount:
            return
        kind, version = mount.get("type"), str((mount.get("options") or {}).get("version", "1"))
        if kind != "kv" or version != "2":
            what = f"KV version {version}" if kind == "kv" else f"a {kind} engine"
            raise SecretError(
                ref.ref,
                _backend_name(ref),
                f"mount {ref.mount} is {what}, not KV version 2",
                f"use a KV v2 mount, or upgrade it: vault kv enable-versioning {ref.mount}",
            )

    def get(self, ref: VaultRef) -> str:
        data, version = self._read(ref)
        if not version or not data:
            raise SecretNotFound(
                ref.ref,
                _backend_name(ref),
                f"no secret {ref.path} in KV v2 mount {ref.mount}",
                f"create it (nixcache secrets put {ref.ref}) or fix the mount/path",
            )
        if ref.key not in data:
            raise SecretNotFound(
                ref.ref,
                _backend_name(ref),
                f"secret {ref.mount}/{ref.path} has no key '{ref.key}'",
                f"add it (nixcache secrets put {ref.ref}) or fix the key after '#'",
            )
        value = data[ref.key]
        if not isinstance(value, str):
            raise SecretError(
                ref.ref,
                _backend_name(ref),
                f"key '{ref.key}' holds a {type(value).__name__}, not text",
                "store the secret as a string",
            )
        return value

    def put(self, ref: VaultRef, value: str, *, overwrite: bool) -> None:
        backend = _backend_name(ref)
        for _ in range(CAS_ATTEMPTS):
            data, version = self._read(ref)
            if not overwrite and ref.key in data:
                raise SecretError(
                    ref.ref,
                    backend,
                    f"key '{ref.key}' already exists and must not be overwritten",
                    "use the existing value",
                )
            merged = {**data, ref.key: value}
            # Check-and-set on the version we read: other keys of the secret are kept, and a
            # concurrent writer makes this write fail (and retry) instead of being clobbered.
            if self._write(ref, merged, version):
                return
        raise SecretError(
            ref.ref,
            backend,
            f"secret kept changing during {CAS_ATTEMPTS} write attempts",
            "retry when other writers are done",
        )

    def _write(self, ref: VaultRef, data: dict[str, Any], version: int) -> bool:
        def write(client):
            import hvac.exceptions

            try:
                client.secrets.kv.v2.create_or_update_secret(
                    path=ref.path, secret=data, cas=version, mount_point=ref.mount
                )
            except hvac.exceptions.InvalidRequest as error:
                if "check-and-set" in _reason(error):
                    return False
                raise
            return True

        return self._call(ref, "write", write)


def _token_valid(client) -> bool:
    """Whether Vault still accepts the client's token: any token may look itself up."""
    import hvac.exceptions
    import requests

    try:
        client.auth.token.lookup_self()
    except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
        return False
    except (hvac.exceptions.VaultError, requests.exceptions.RequestException):
        return True  # cannot tell: report the original permission error
    return True


def _reason(error: Exception) -> str:
    """Vault's own error text (never request data), shortened to fit one line."""
    errors = getattr(error, "errors", None)
    text = "; ".join(str(e) for e in errors) if isinstance(errors, list) and errors else str(error)
    text = " ".join(text.split())
    return text[:200] or type(error).__name__


def backend() -> VaultBackend:
    return VaultBackend()

"""The server's signing keys: the configured key files, or one generated once under the data dir.

Free of gevent: the pre-forking parent (nixcache.server.prefork) loads them before it forks, so
that a default key is generated once, not by each worker at the same time.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from nixcache.keys import KeyFormatError, SecretKey
from nixcache.server import config as configmod
from nixcache.server.config import ServerConfig, StartupError

log = logging.getLogger("nixcache.server")


def load_keys(config: ServerConfig) -> list[SecretKey]:
    """The configured signing keys, or a key generated once under the data dir when none is."""
    files = list(config.signing_key_files)
    if not files:
        files = [_default_key()]
    keys = []
    for path in files:
        try:
            text = path.read_text()
        except OSError as error:
            raise StartupError(
                f"cannot read signing key {path}: {error.strerror}; "
                "check the path and that the service user owns it"
            ) from None
        try:
            keys.append(SecretKey.parse(text))
        except KeyFormatError as error:
            raise StartupError(
                f"signing key {path} is malformed: {error}; generate one with 'nixcache keys generate'"
            ) from None
    return keys


def _default_key() -> Path:
    from nixcache.keycli import write_private

    path = configmod.default_data_dir() / "signing-key.secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = SecretKey.generate(f"{socket.gethostname()}-nixcache-1")
        write_private(path, key.serialize(), force=False)
        (path.parent / "signing-key.public").write_text(f"{key.public()}\n")
        log.warning("no signing key configured: generated %s (public key %s)", path, key.public())
    return path

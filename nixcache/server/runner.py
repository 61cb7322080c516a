"""Start the server: config + keys + tokens + store -> a listening gevent server.

Imported by `nixcache serve` only after `gevent.monkey.patch_all()`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from pathlib import Path

import gevent
import gevent.threadpool

from nixcache.keys import KeyFormatError, SecretKey
from nixcache.server import config as configmod
from nixcache.server import tiers
from nixcache.server.app import App
from nixcache.server.auth import TokenError, Tokens
from nixcache.server.config import ServerConfig
from nixcache.server.http import Server
from nixcache.server.metrics import Metrics
from nixcache.server.nixstore.db import NixDbError
from nixcache.server.nixstore.store import LocalNixStore
from nixcache.server.signed import Resigner
from nixcache.server.store import Store
from nixcache.server.workers import offload_to

log = logging.getLogger("nixcache.server")
SERVED_FLUSH_SECONDS = 30
USAGE_CHECK_SECONDS = 3600  # how often to look whether the usage totals are due a full scan


class StartupError(Exception):
    """The server cannot start; the message is the one line a person sees."""


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


def build(config: ServerConfig) -> Server:
    """Everything up to a bound, not yet serving, server. StartupError with one line otherwise."""
    keys = load_keys(config)
    try:
        tokens = Tokens.load(config.push_token_file, config.read_token_file)
    except TokenError as error:
        raise StartupError(str(error)) from None
    threadpool = gevent.get_hub().threadpool
    store = Store(config.store, config.store_dir, offload=offload_to(threadpool), keys=keys)
    try:
        store.create()
    except OSError as error:
        raise StartupError(
            f"cannot create store {config.store}: {error.strerror}; create it and give it to the service user"
        ) from None
    metrics = Metrics(store)
    nix_store = None
    if config.nix_store.serve_nix_store:
        try:
            nix_store = LocalNixStore(
                config.nix_store, config.store_dir, keys, offload=offload_to(threadpool)
            )
        except NixDbError as error:
            raise StartupError(str(error)) from None
    app = App(config, store, keys, tokens, metrics, nix_store)
    app.tiers = tiers.build(config, store, metrics, app.cache_info)
    # Its own pool, one thread per core, whose threads run at a lower priority (encoding.py).
    app.encoding.offload = offload_to(gevent.threadpool.ThreadPool(os.cpu_count() or 1))
    host, port = config.host_port()
    server = Server((host, port), app, level=config.log_level, idle_timeout=config.keepalive_timeout)
    try:
        server.init_socket()
    except OSError as error:
        raise StartupError(
            f"cannot listen on {config.listen}: {error.strerror}; "
            "stop what holds the port or choose another --listen"
        ) from None
    return server


def _every(seconds: float, fn, *args, first: float | None = None) -> None:  # type: ignore[no-untyped-def]
    gevent.sleep(seconds if first is None else first)
    while True:
        try:
            fn(*args)
        except Exception:
            log.exception("periodic task %s failed", getattr(fn, "__name__", fn))
        gevent.sleep(seconds)


def _once(fn) -> None:  # type: ignore[no-untyped-def]
    try:
        fn()
    except Exception:
        log.exception("background task %s failed", getattr(fn, "__name__", fn))


def run(config: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT."""
    logging.basicConfig(
        level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    server = build(config)
    app: App = server.app
    store = app.store
    threadpool = gevent.get_hub().threadpool

    def rescan_usage() -> None:
        # Uploads and gc keep the totals; a full scan only when they are missing or a day old,
        # in the thread pool while the server already answers (nixcache/server/usage.py).
        threadpool.apply(store.usage.rescan_if_stale, (store.root,))

    # Signed narinfos of other keys (a rotation) are served while they are re-signed.
    resigner = app.metrics.resigner = Resigner(store, threadpool.apply)
    resigner.prepare()  # before the first request: texts no client may trust are never served
    tasks = [
        gevent.spawn(_every, SERVED_FLUSH_SECONDS, store.flush_served, threadpool.apply),
        gevent.spawn(_every, USAGE_CHECK_SECONDS, rescan_usage, first=0),
        gevent.spawn(_once, resigner.run),
    ]

    def stop() -> None:
        gevent.spawn(server.stop, timeout=5)

    gevent.signal_handler(signal.SIGTERM, stop)
    gevent.signal_handler(signal.SIGINT, stop)
    host, port = server.address[:2]
    names = ", ".join(key.name for key in app.keys)
    log.warning("serving %s on http://%s:%d (signing keys: %s)", config.store, host, port, names)
    try:
        server.serve_forever()
    finally:
        gevent.killall(tasks)
        store.flush_served()


def with_overrides(config: ServerConfig, **overrides: object) -> ServerConfig:
    """`config` with the flags that were given (None and empty tuples mean not given)."""
    given = {k: v for k, v in overrides.items() if v is not None and v != ()}
    try:
        return configmod.from_mapping(given, base=config)
    except configmod.ConfigError as error:
        raise StartupError(str(error)) from None

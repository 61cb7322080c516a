"""Start the server: config + keys + tokens + store -> a listening gevent server.

Imported by `nixcache serve` only after `gevent.monkey.patch_all()`.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from pathlib import Path

import gevent

from nixcache.keys import KeyFormatError, SecretKey
from nixcache.server import config as configmod
from nixcache.server import tiers
from nixcache.server.app import App
from nixcache.server.auth import TokenError, Tokens
from nixcache.server.config import ServerConfig
from nixcache.server.front import HitsLog
from nixcache.server.http import Server
from nixcache.server.metrics import Metrics, scan
from nixcache.server.nixstore.db import NixDbError
from nixcache.server.nixstore.store import LocalNixStore
from nixcache.server.store import Store
from nixcache.server.workers import offload_to

log = logging.getLogger("nixcache.server")
SERVED_FLUSH_SECONDS = 30
FRONT_LOG_SECONDS = 1  # nginx flushes its hits log every second
USAGE_SCAN_SECONDS = 60


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
    store = Store(config.store, config.store_dir, offload=offload_to(threadpool))
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


def _every(seconds: float, fn, *args) -> None:  # type: ignore[no-untyped-def]
    while True:
        gevent.sleep(seconds)
        try:
            fn(*args)
        except Exception:
            log.exception("periodic task %s failed", getattr(fn, "__name__", fn))


def run(config: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT."""
    logging.basicConfig(
        level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    server = build(config)
    app: App = server.app
    store = app.store
    threadpool = gevent.get_hub().threadpool

    def refresh_usage() -> None:
        app.metrics.refresh_usage(threadpool.apply(scan, (store,)))

    refresh_usage()
    tasks = [
        gevent.spawn(_every, SERVED_FLUSH_SECONDS, store.flush_served, threadpool.apply),
        gevent.spawn(_every, USAGE_SCAN_SECONDS, refresh_usage),
    ]

    hits = HitsLog(config.front_hits_log, store, app.metrics) if config.front_hits_log else None
    if hits is not None:
        hits.ingest()  # what nginx served while the server was down
        tasks.append(gevent.spawn(_every, FRONT_LOG_SECONDS, hits.ingest))

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
        if hits is not None:
            hits.ingest(final=True)
            hits.close()
        store.flush_served()


def with_overrides(config: ServerConfig, **overrides: object) -> ServerConfig:
    """`config` with the flags that were given (None and empty tuples mean not given)."""
    given = {k: v for k, v in overrides.items() if v is not None and v != ()}
    try:
        return configmod.from_mapping(given, base=config)
    except configmod.ConfigError as error:
        raise StartupError(str(error)) from None

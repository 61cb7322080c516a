"""Start the server: config + keys + tokens + store -> a listening gevent server.

Imported by `nixcache serve` only after `gevent.monkey.patch_all()`: in the one process of
`workers = 1`, or in each worker that nixcache.server.prefork forked (`run(config, worker)`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys

import gevent
import gevent.threadpool

from nixcache.server import tiers
from nixcache.server.app import App
from nixcache.server.auth import TokenError, Tokens
from nixcache.server.config import ServerConfig, StartupError
from nixcache.server.front import HitsLog
from nixcache.server.http import Server
from nixcache.server.metrics import FLUSH_SECONDS, Metrics
from nixcache.server.nixstore.db import NixDbError
from nixcache.server.nixstore.store import LocalNixStore
from nixcache.server.offload import offload_to
from nixcache.server.prefork import FLUSH_SIGNAL, Worker, cannot_listen, create_store, listener
from nixcache.server.signed import Resigner
from nixcache.server.signing_keys import load_keys
from nixcache.server.store import Store

log = logging.getLogger("nixcache.server")
SERVED_FLUSH_SECONDS = 30
USAGE_CHECK_SECONDS = 3600  # how often to look whether the usage totals are due a full scan
# SIGTERM: requests in flight may finish for this long (below systemd's 90 s TimeoutStopSec, so
# the server ends them itself and says so rather than being killed).
DRAIN_SECONDS = 60.0
FRONT_LOG_SECONDS = 1  # nginx flushes its hits log every second


def build(config: ServerConfig, worker: Worker | None = None) -> Server:
    """Everything up to a bound, not yet serving, server. StartupError with one line otherwise.
    `worker`: this process is one of several, serving the parent's socket (and store, created)."""
    keys = load_keys(config)
    try:
        tokens = Tokens.load(config.push_token_file, config.read_token_file)
    except TokenError as error:
        raise StartupError(str(error)) from None
    threadpool = gevent.get_hub().threadpool
    store = Store(config.store, config.store_dir, offload=offload_to(threadpool), keys=keys)
    if worker is None:
        create_store(store)
    metrics = Metrics(store, worker.metrics_dir if worker else None)
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
    if worker is not None:
        try:
            sock = listener(worker.address, socket.socket)  # gevent's socket: patched by now
        except OSError as error:
            raise cannot_listen(config.listen, error) from None
        return Server(sock, app, level=config.log_level, idle_timeout=config.keepalive_timeout)
    host, port = config.host_port()
    server = Server((host, port), app, level=config.log_level, idle_timeout=config.keepalive_timeout)
    try:
        server.init_socket()
    except OSError as error:
        raise cannot_listen(config.listen, error) from None
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


def run(config: ServerConfig, worker: Worker | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain (see Server.drain)."""
    logging.basicConfig(
        level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    server = build(config, worker)
    app: App = server.app
    store = app.store
    threadpool = gevent.get_hub().threadpool

    def rescan_usage() -> None:
        # Uploads and gc keep the totals; a full scan only when they are missing or a day old,
        # in the thread pool while the server already answers (nixcache/server/usage.py).
        threadpool.apply(store.usage.rescan_if_stale, (store.root,))

    # Signed narinfos of other keys (a rotation) are served while they are re-signed.
    resigner = Resigner(store, threadpool.apply)
    if worker is None:  # (with workers, the parent prepared it once, before forking)
        resigner.prepare()  # before the first request: texts no client may trust are never served
    tasks = [
        gevent.spawn(_every, SERVED_FLUSH_SECONDS, store.flush_served, threadpool.apply),
        gevent.spawn(_every, USAGE_CHECK_SECONDS, rescan_usage, first=0),
        gevent.spawn(_once, resigner.run),
    ]
    if worker is not None:  # the other workers' scrapes count this one's requests
        tasks.append(gevent.spawn(_every, FLUSH_SECONDS, app.metrics.flush))
        # Another worker's scrape asks for them now (Metrics.render). The handler runs in the
        # loop between greenlets, never inside a request's code; libev installs it with
        # SA_RESTART, so a system call of the thread pools that it interrupts resumes.
        gevent.signal_handler(FLUSH_SIGNAL, app.metrics.flush)

    # nginx's disk hits: read by one process (a second would count them twice and race the
    # truncation), the first worker with several (its replacement takes over if it dies).
    reads_hits = config.front_hits_log is not None and (worker is None or worker.index == 0)
    hits = HitsLog(config.front_hits_log, store, app.metrics) if reads_hits else None
    if hits is not None:
        hits.ingest()  # what nginx served while the server was down
        tasks.append(gevent.spawn(_every, FRONT_LOG_SECONDS, hits.ingest))

    gevent.signal_handler(signal.SIGTERM, server.drain)
    gevent.signal_handler(signal.SIGINT, server.drain)
    host, port = server.address[:2]
    names = ", ".join(key.name for key in app.keys)
    if worker is None:
        log.warning("serving %s on http://%s:%d (signing keys: %s)", config.store, host, port, names)
    else:
        server.start()
        worker.ready(f"signing keys: {names}")
    try:
        server.serve_forever(stop_timeout=DRAIN_SECONDS)
    finally:
        gevent.killall(tasks)
        if hits is not None:
            hits.ingest(final=True)
            hits.close()
        store.flush_served()
        app.metrics.flush()

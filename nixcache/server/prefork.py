"""`workers > 1`: a parent that forks the worker processes, replaces one that dies, drains them.

Every worker listens on its own socket bound to the same port with SO_REUSEPORT, and the
kernel spreads new connections over them by a hash of the client's address and port. The
alternative, one socket bound by the parent before it forks and accepted on by every worker,
was tried first and measured: 64 connections opened at once (wrk) all went to one worker (each
worker's loop is woken for every connection, and the first awake takes them all, even taking
one per wake-up), so keep-alive clients used one core; with SO_REUSEPORT they split 40/24 on 2
workers (docs/benchmarks.md: on the saturated 2-core machine of that day throughput did not
show the difference; the distribution decided). The parent still binds the port first, without listening (a
bound socket that does not listen takes no connections): a busy or bad address fails before
any fork, `listen = "…:0"` gives every worker the same port, and the port stays this
service's while workers come and go. What SO_REUSEPORT costs: connections queued on a worker
that dies are reset unless net.ipv4.tcp_migrate_req=1 (Linux ≥ 5.14) moves them to the other
workers (the deploy sets it: operations/hardening.py), and another process of the service
user could join the port.

gevent and fork: the parent never imports gevent (nor prometheus_client, which imports ssl):
it has no hub, no thread pool and no patched modules, only `os.fork`, `select` and signals.
Each worker calls `gevent.monkey.patch_all()` first thing after the fork, then imports the
server (nixcache.server.runner), exactly as a single-process `nixcache serve` does; this is
how gunicorn runs its gevent workers. With `workers = 1` there is no parent at all.

Workers share nothing but the store on disk (its writes are atomic renames of temp files
whose names hold the writer's pid) and a metrics directory: every worker writes its counters
there (prometheus_client's multiprocess file format, nixcache.server.metrics), so /metrics,
answered by any worker, counts the whole server. The parent writes workers.json there (the
number of workers and of restarts, its own pid and the pids of the workers serving) and wipes
the directory at start and exit; it lives in systemd's RuntimeDirectory ($RUNTIME_DIRECTORY)
when there is one, else in a private temp dir. A worker answering a scrape sends the parent
FLUSH_SIGNAL, and the parent relays it to every serving worker, which copies its counters into
the directory at once (the scraper waits for that, bounded: nixcache.server.metrics). Through
the parent, not from worker to worker: only the parent knows, from waitpid, which pids are
still its workers, so a signal never reaches a process that merely reused a dead worker's pid.

SIGTERM or SIGINT: the parent closes its copy of the socket and sends SIGTERM to every worker,
which stops accepting, closes its idle connections, finishes the requests in flight (for up to
runner.DRAIN_SECONDS) and exits; the parent exits 0 once all have. A worker that dies
otherwise is replaced at once, then after 1, 2, 4 … 30 s while replacements keep dying
within WORKER_SETTLED seconds; each death is logged and counted (nixcache_worker_restarts).
A worker that cannot start in the first place (a bad key, say) stops the server with its
one-line error, as a single process would.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nixcache.server.config import ServerConfig, StartupError
from nixcache.server.signed import Resigner
from nixcache.server.signing_keys import load_keys
from nixcache.server.store import Store

log = logging.getLogger("nixcache.server")
BACKLOG = 1024  # as gevent's StreamServer in a single process (http.Server)
WORKER_SETTLED = 10.0  # a worker that lived this long resets its slot's backoff
BACKOFF_MAX = 30.0
KILL_AFTER = 75.0  # seconds after SIGTERM: a worker still draining is killed (DRAIN_SECONDS + margin)
WORKER_STATS = "workers.json"
_PR_SET_PDEATHSIG = 1
FLUSH_SIGNAL = signal.SIGUSR1  # a scrape asks every worker to copy its counters (see above)
_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, FLUSH_SIGNAL)


@dataclass
class Worker:
    """What a worker process gets from its parent."""

    index: int
    metrics_dir: Path
    status_fd: int  # the pipe to the parent: one line, "ready …" or "error …"
    address: socket.socket | None = None  # the parent's socket, bound to the port (see listener)

    def ready(self, detail: str) -> None:
        self._tell(f"ready {detail}")

    def failed(self, message: str) -> None:
        self._tell(f"error {message}")

    def _tell(self, line: str) -> None:
        if self.status_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.status_fd, f"{line}\n".encode())
                os.close(self.status_fd)
            self.status_fd = -1


def create_store(store: Store) -> None:
    """The store's directories, tmp/ emptied; StartupError when that cannot be done."""
    try:
        store.create()
    except OSError as error:
        raise StartupError(
            f"cannot create store {store.root}: {error.strerror}; create it and give it to the service user"
        ) from None


def cannot_listen(listen: str, error: OSError) -> StartupError:
    return StartupError(
        f"cannot listen on {listen}: {error.strerror}; stop what holds the port or choose another --listen"
    )


def reserve(config: ServerConfig) -> socket.socket:
    """The parent's socket: bound to the port (resolved when it is 0), never listening, so it
    takes no connections; the workers bind theirs beside it (`listener`)."""
    host, port = config.host_port()
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = _reuseport(socket.socket(family, kind, proto))
        sock.bind(address)
    except socket.gaierror as error:
        raise StartupError(f"cannot listen on {config.listen}: {error.strerror}; give an address") from None
    except OSError as error:
        raise cannot_listen(config.listen, error) from None
    return sock


def listener(reserved: socket.socket, socket_class: type[socket.socket]) -> socket.socket:
    """A worker's own listening socket on the parent's address (`socket_class`: gevent's)."""
    sock = _reuseport(socket_class(reserved.family, reserved.type, reserved.proto))
    sock.bind(reserved.getsockname())
    sock.listen(BACKLOG)
    return sock


def _reuseport(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def write_worker_stats(directory: Path, workers: int, restarts: int, pids: list[int]) -> None:
    """What the parent knows, for the workers' scrapes (renamed into place): `pids`, the workers
    serving, whose counts a scrape waits for; `parent`, who relays the scrape's FLUSH_SIGNAL."""
    tmp = directory / f".{WORKER_STATS}.tmp"
    stats = {"workers": workers, "restarts": restarts, "parent": os.getpid(), "pids": pids}
    tmp.write_text(json.dumps(stats))
    os.replace(tmp, directory / WORKER_STATS)


def read_worker_stats(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / WORKER_STATS).read_text())
    except (FileNotFoundError, ValueError):
        return None


def metrics_dir() -> Path:
    """A fresh private directory for the workers' metric files."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        path = Path(runtime) / "metrics"
        shutil.rmtree(path, ignore_errors=True)  # a previous run's counts are not this one's
        path.mkdir(mode=0o700)
        return path
    return Path(tempfile.mkdtemp(prefix="nixcache-metrics-"))


@dataclass
class _Slot:
    """One of the `workers` places: the process in it, and its history."""

    index: int
    pid: int = 0
    status_fd: int = -1  # the parent's end of the worker's status pipe, until it reported
    started: float = 0.0
    ready: bool = False
    failures: int = 0  # deaths in a row, each within WORKER_SETTLED of its start
    due: float | None = None  # when a replacement is to be forked
    error: str = ""
    buffer: bytes = field(default=b"", repr=False)


class Supervisor:
    """The parent: forks the workers and keeps `count` of them running until told to stop."""

    def __init__(self, config: ServerConfig, count: int):
        self.config = config
        self.count = count
        self.store = Store(config.store, config.store_dir)
        self.slots = [_Slot(index) for index in range(count)]
        self.restarts = 0
        self.announced = False  # a first worker is ready: the port answers
        self.serving = False  # every worker of the first generation reported ready
        self.stopping = False
        self.stop_since = 0.0
        self.startup_error = ""  # why the first generation could not start
        self.sock: socket.socket | None = None
        self.metrics: Path | None = None
        self._detail = ""  # what a worker said when ready (its signing keys)
        self._wake_r = self._wake_w = -1

    # -- the parent's loop -------------------------------------------------------------------

    def run(self) -> None:
        self.sock = reserve(self.config)
        create_store(self.store)
        # Once, before forking: a default key is generated by one process, and signed texts no
        # client may trust are set aside before any worker serves (nixcache.server.signed).
        keys = load_keys(self.config)
        Resigner(Store(self.config.store, self.config.store_dir, keys=keys)).prepare()
        _preload()
        self.metrics = metrics_dir()
        self._publish()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)
        for signum in _SIGNALS:
            signal.signal(signum, _note)  # the number lands in the wakeup pipe; the loop acts
        try:
            for slot in self.slots:
                self._fork(slot)
            self._loop()
        finally:
            self._stop_all()
            shutil.rmtree(self.metrics, ignore_errors=True)

    def _loop(self) -> None:
        while not (self.stopping and not any(slot.pid for slot in self.slots)):
            now = time.monotonic()
            dues = [slot.due for slot in self.slots if slot.due is not None]
            timeout = max(0.0, min(dues) - now) if dues else 1.0
            starting = {slot.status_fd: slot for slot in self.slots if slot.status_fd >= 0}
            readable, _, _ = select.select([self._wake_r, *starting], [], [], min(timeout, 1.0))
            signals = b""
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    signals = os.read(self._wake_r, 4096)
            for fd in readable:
                if fd in starting:
                    self._status(starting[fd])
            if (signal.SIGTERM in signals or signal.SIGINT in signals) and not self.stopping:
                self._begin_stop()
            if FLUSH_SIGNAL in signals:
                self._relay_flush()
            self._reap()
            if self.stopping:
                self._kill_stragglers()
                continue
            now = time.monotonic()
            for slot in self.slots:
                if slot.due is not None and slot.due <= now:
                    slot.due = None
                    self._fork(slot)
            if not self.announced and any(slot.ready for slot in self.slots):
                # The port answers from the first worker on; the others join as they are ready.
                self.announced = True
                host, port = self.sock.getsockname()[:2]
                log.warning(
                    "serving %s on http://%s:%d (%d workers; %s)",
                    self.config.store,
                    host,
                    port,
                    self.count,
                    self._detail,
                )
            if not self.serving and all(slot.ready for slot in self.slots):
                self.serving = True
                pids = " ".join(str(slot.pid) for slot in self.slots)
                log.info("all %d workers ready, pids %s", self.count, pids)

    def _status(self, slot: _Slot) -> None:
        """Read the worker's one status line (or the end of its pipe: it died first)."""
        try:
            data = os.read(slot.status_fd, 4096)
        except OSError:
            data = b""
        slot.buffer += data
        if data and not slot.buffer.endswith(b"\n"):
            return
        os.close(slot.status_fd)
        slot.status_fd = -1
        line = slot.buffer.decode(errors="replace").strip()
        slot.buffer = b""
        kind, _, detail = line.partition(" ")
        if kind == "ready":
            slot.ready = True
            self._detail = detail
            self._publish()  # from now on scrapes wait for its counts
            if self.serving:
                log.warning("worker %d (pid %d) is serving again", slot.index, slot.pid)
        else:
            slot.error = detail if kind == "error" else "exited before it was ready"

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((slot for slot in self.slots if slot.pid == pid), None)
            if slot is not None:
                self._died(slot, status)

    def _died(self, slot: _Slot, status: int) -> None:
        if slot.status_fd >= 0:
            self._status(slot)  # its last words, if any
        pid, slot.pid = slot.pid, 0
        self.store.drop_leftovers(pid)  # an upload or fetch it had in tmp/
        if self.serving and not self.stopping:
            self.restarts += 1
        self._publish()  # scrapes no longer wait for it
        if self.stopping:
            return
        how = _exit_description(status)
        if not self.serving:
            # The first generation: a worker that cannot start is a server that cannot start.
            self._begin_stop()
            self.startup_error = slot.error or f"worker {slot.index} {how}; see the log above"
            return
        lived = time.monotonic() - slot.started
        slot.failures = slot.failures + 1 if lived < WORKER_SETTLED or not slot.ready else 0
        delay = 0.0 if slot.failures <= 1 else min(BACKOFF_MAX, 2.0 ** (slot.failures - 2))
        slot.due = time.monotonic() + delay
        log.error(
            "worker %d (pid %d) %s after %.1f s%s; starting another in %.0f s (%d restarts so far)",
            slot.index,
            pid,
            how,
            lived,
            f": {slot.error}" if slot.error else "",
            delay,
            self.restarts,
        )

    def _publish(self) -> None:
        serving = [slot.pid for slot in self.slots if slot.pid and slot.ready]
        write_worker_stats(self.metrics, self.count, self.restarts, serving)

    def _relay_flush(self) -> None:
        """A worker's scrape asked: every serving worker copies its counters now. Signals that
        arrived together were merged into one; one copy after the asking serves them all."""
        for slot in self.slots:
            if slot.pid and slot.ready:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, FLUSH_SIGNAL)

    def _begin_stop(self) -> None:
        """Stop accepting (the workers' copies of the socket close as they drain), SIGTERM all."""
        self.stopping = True
        self.stop_since = time.monotonic()
        if self.sock is not None:
            self.sock.close()
        for slot in self.slots:
            slot.due = None
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)
        if self.serving:
            log.warning("stopping: %d workers drain their connections", sum(1 for s in self.slots if s.pid))

    def _kill_stragglers(self) -> None:
        if time.monotonic() - self.stop_since > KILL_AFTER:
            for slot in self.slots:
                if slot.pid:
                    log.error("worker %d (pid %d) still draining: killed", slot.index, slot.pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(slot.pid, signal.SIGKILL)

    def _stop_all(self) -> None:
        """On the way out (also after an exception in the loop): no worker outlives the parent."""
        if not self.stopping:
            self._begin_stop()
        deadline = time.monotonic() + KILL_AFTER
        while any(slot.pid for slot in self.slots):
            if time.monotonic() > deadline:
                for slot in self.slots:
                    if slot.pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(slot.pid, signal.SIGKILL)
            self._reap()
            time.sleep(0.05)

    # -- the worker's side ------------------------------------------------------------------

    def _fork(self, slot: _Slot) -> None:
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        # Signals wait while the child replaces the parent's handlers: a SIGTERM sent to it
        # meanwhile is then acted on, not swallowed by the parent's handler.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        pid = os.fork()
        if pid == 0:
            os.close(status_r)
            self._worker(slot.index, status_w, parent)  # never returns
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        os.close(status_w)
        slot.pid, slot.status_fd, slot.started = pid, status_r, time.monotonic()
        slot.ready, slot.error = False, ""

    def _worker(self, index: int, status_fd: int, parent: int) -> None:
        code = 1
        worker = Worker(index, self.metrics, status_fd)
        try:
            signal.set_wakeup_fd(-1)
            for signum in _SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            # Ignored until the worker's loop takes it (runner.run), never its default (exit).
            signal.signal(FLUSH_SIGNAL, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            os.close(self._wake_r)
            os.close(self._wake_w)
            for other in self.slots:
                if other.status_fd >= 0:
                    os.close(other.status_fd)
            _die_with(parent)
            worker.address = self.sock
            from gevent import monkey

            monkey.patch_all()

            from nixcache.server import runner

            runner.run(self.config, worker)
            code = 0
        except StartupError as error:
            worker.failed(str(error))
        except BaseException as error:  # a worker's end is reported, never raised into click
            if not isinstance(error, SystemExit | KeyboardInterrupt):
                traceback.print_exc()
            worker.failed(f"{type(error).__name__}: {error}")
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os._exit(code)


def _preload() -> None:
    """Import here, once, the slow imports of a worker that gevent does not patch (no ssl,
    socket or threads in them): every worker, replacements included, starts with them loaded
    and shares their pages. About a third of a worker's start-up on this machine."""
    import importlib.metadata  # noqa: F401 - gevent reads plugin entry points when it patches

    import httptools  # noqa: F401
    import platformdirs  # noqa: F401

    import nixcache.keys
    import nixcache.server.nixstore.store  # noqa: F401 - sqlite3


def _note(signum: int, frame: object) -> None:
    """A Python-level handler, so that the signal's number is written to the wakeup fd."""


def _die_with(parent: int) -> None:
    """The kernel sends this worker SIGTERM when its parent dies (killed, say), so no worker
    keeps the port after its parent is gone; prctl(2) PR_SET_PDEATHSIG."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the prctl
        os._exit(0)


def _exit_description(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def run(config: ServerConfig) -> None:
    """Serve with `config.worker_count()` workers until SIGTERM or SIGINT; StartupError when the
    port, the store or a first worker cannot be had."""
    logging.basicConfig(
        level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    supervisor = Supervisor(config, config.worker_count())
    supervisor.run()
    if supervisor.startup_error:
        raise StartupError(supervisor.startup_error)

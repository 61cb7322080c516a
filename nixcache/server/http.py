"""Serving the WSGI app with gevent: TCP_NODELAY, idle timeouts, sendfile, request log and metrics.

Imports gevent: only `nixcache.server.cli.serve` imports this, after `monkey.patch_all()`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from typing import Any

from gevent import pywsgi
from gevent.socket import wait_write

from nixcache.server.app import App, FileBody

log = logging.getLogger("nixcache.server")
IDLE_TIMEOUT = 75.0  # seconds a keep-alive connection may sit idle (nginx's default)
SENDFILE_CHUNK = 1 << 24


class _Input(pywsgi.Input):
    """Request body that the app can abandon: refused large uploads close the connection
    instead of being read to the end."""

    __slots__ = ("abandoned",)

    def abandon(self) -> None:
        self.abandoned = True

    def _discard(self) -> None:
        if getattr(self, "abandoned", False):
            return
        super()._discard()


def sendfile(sock: socket.socket, body: FileBody) -> int:
    """Send `body` with sendfile(2), waiting cooperatively when the socket buffer is full."""
    out_fd = sock.fileno()
    in_fd = body.handle.fileno()
    offset, remaining = body.offset, body.count
    timeout = sock.gettimeout()
    sent_total = 0
    while remaining > 0:
        try:
            sent = os.sendfile(out_fd, in_fd, offset, min(remaining, SENDFILE_CHUNK))
        except BlockingIOError:
            wait_write(out_fd, timeout=timeout)
            continue
        if sent == 0:
            # The file shrank under us (deleted files stay readable, so this is truncation).
            raise OSError(f"{body.handle.name} ended {remaining} bytes early")
        offset += sent
        remaining -= sent
        sent_total += sent
    return sent_total


class Handler(pywsgi.WSGIHandler):
    """pywsgi's handler, tuned for a cache: small responses leave at once, big ones by sendfile."""

    def handle(self) -> None:
        # Without TCP_NODELAY a narinfo waits for Nagle's algorithm to meet the client's delayed ACK.
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket.settimeout(IDLE_TIMEOUT)
        super().handle()

    def get_environ(self) -> dict[str, Any]:
        env = super().get_environ()
        old = self.wsgi_input
        self.wsgi_input = _Input(
            old.rfile, old.content_length, socket=old.socket, chunked_input=old.chunked_input
        )
        env["wsgi.input"] = self.wsgi_input
        return env

    def process_result(self) -> None:
        if isinstance(self.result, FileBody):
            self.write(b"")  # the headers
            self.response_length += sendfile(self.socket, self.result)
            return
        super().process_result()

    def log_request(self) -> None:
        self.server.record(self)


class Server(pywsgi.WSGIServer):
    """The WSGI server: records every request in the log and the metrics."""

    handler_class = Handler

    def __init__(self, listener: tuple[str, int], app: App, level: str = "info"):
        super().__init__(listener, app, log=None, error_log=_ErrorLog(), backlog=1024)
        self.app = app
        # info: every request; warning: 4xx and 5xx; error: 5xx only
        self.min_status = {"debug": 0, "info": 0, "warning": 400, "error": 500}[level]

    def record(self, handler: Handler) -> None:
        env = getattr(handler, "environ", None) or {}
        code = getattr(handler, "code", None) or 0
        route = env.get("nixcache.route", "other")
        elapsed = (handler.time_finish or time.time()) - handler.time_start
        metrics = self.app.metrics
        metrics.requests.labels(route, env.get("REQUEST_METHOD", "-"), str(abs(code))).inc()
        metrics.duration.labels(route).observe(elapsed)
        served = env.get("nixcache.body_bytes")
        if served and code > 0:
            metrics.served_bytes.labels(route).inc(served)
        if abs(code) < self.min_status:
            return
        line = {
            "client": handler.client_address[0] if isinstance(handler.client_address, tuple) else "-",
            "method": env.get("REQUEST_METHOD", "-"),
            "path": env.get("PATH_INFO", "-")[:200],
            "status": code,
            "bytes": handler.response_length,
            "ms": round(elapsed * 1000, 3),
            "route": route,
        }
        if "nixcache.reason" in env:
            line["reason"] = env["nixcache.reason"]
        if code < 0:
            line["aborted"] = True  # socket error while sending
        sys.stderr.write(json.dumps(line) + "\n")


class _ErrorLog:
    """pywsgi's error log, routed to logging (tracebacks of 500s)."""

    def write(self, message: str) -> None:
        if message.strip():
            log.error(message.rstrip())

    def flush(self) -> None:
        pass

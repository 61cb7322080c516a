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
COALESCE_LIMIT = 64 * 1024  # bodies up to this size leave in the same send() as the headers
MAX_HEADER_LINE = 8192
MAX_HEADERS = 100


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


class _Headers:
    """Request headers, parsed without the email package (pywsgi's default costs ~50 us a request).

    Implements what pywsgi's handler uses of its MessageClass: get/getheader, `del`, `status`,
    `headers` (raw lines) and `typeheader`.
    """

    __slots__ = ("_lines", "_map", "status")

    def __init__(self, rfile: Any, *_: Any):
        self.status = ""
        self._lines: list[str] = []
        self._map: dict[str, str] = {}
        while True:
            line = rfile.readline(MAX_HEADER_LINE + 1)
            if line in (b"\r\n", b"\n", b""):
                return
            if len(line) > MAX_HEADER_LINE:
                self.status = "Line too long"
                return
            if len(self._lines) >= MAX_HEADERS:
                self.status = "Too many headers"
                return
            text = line.decode("latin-1")
            self._lines.append(text)
            if text[0] in " \t":
                continue  # an obsolete folded continuation: pywsgi joins it from `headers`
            name, sep, value = text.partition(":")
            if not sep or not name or name != name.strip():
                self.status = f"Invalid header line {text[:40]!r}"
                return
            self._map.setdefault(name.lower(), value.strip())

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._map.get(name.lower(), default)

    getheader = get

    def __delitem__(self, name: str) -> None:
        key = name.lower()
        del self._map[key]
        self._lines = [line for line in self._lines if line.partition(":")[0].lower() != key]

    @property
    def headers(self) -> list[str]:
        return self._lines

    @property
    def typeheader(self) -> str | None:
        return self._map.get("content-type")


class Handler(pywsgi.WSGIHandler):
    """pywsgi's handler, tuned for a cache: small responses leave at once, big ones by sendfile."""

    def MessageClass(self, *args: Any) -> _Headers:
        return _Headers(*args)

    def _write_with_headers(self, data: bytes) -> None:
        # pywsgi sends headers and body in two send() calls; with TCP_NODELAY that is two
        # segments and twice the syscall cost for every narinfo. Small bodies go in one.
        if self.response_use_chunked or len(data) > COALESCE_LIMIT:
            super()._write_with_headers(data)
            return
        self.headers_sent = True
        self.finalize_headers()
        out = bytearray(b"HTTP/1.1 ")
        out += self.status
        out += b"\r\n"
        for header, value in self.response_headers:
            out += header
            out += b": "
            out += value
            out += b"\r\n"
        out += b"\r\n"
        out += data
        self._sendall(out)

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
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}

    def record(self, handler: Handler) -> None:
        env = getattr(handler, "environ", None) or {}
        code = getattr(handler, "code", None) or 0
        route = env.get("nixcache.route", "other")
        elapsed = (handler.time_finish or time.time()) - handler.time_start
        metrics = self.app.metrics
        method = env.get("REQUEST_METHOD", "-")
        key = (route, method, abs(code))
        children = self._children.get(key)
        if children is None:
            # labels() costs microseconds per call; the set of label values is small and fixed.
            children = (
                metrics.requests.labels(route, method, str(abs(code))),
                metrics.duration.labels(route),
                metrics.served_bytes.labels(route),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(elapsed)
        served = env.get("nixcache.body_bytes")
        if served and code > 0:
            children[2].inc(served)
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

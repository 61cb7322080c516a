"""Serving the WSGI app with gevent: TCP_NODELAY, idle timeouts, sendfile, request log and metrics.

Imports gevent: only `nixcache.server.cli.serve` imports this, after `monkey.patch_all()`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import gevent
from gevent import pywsgi
from gevent.pywsgi import _InvalidClientInput
from gevent.server import StreamServer
from gevent.socket import wait_write

from nixcache.server.app import App, FileBody

log = logging.getLogger("nixcache.server")
IDLE_TIMEOUT = 75.0  # seconds a keep-alive connection may sit idle (nginx's default)
SENDFILE_CHUNK = 1 << 24
COALESCE_LIMIT = 64 * 1024  # bodies up to this size leave in the same send() as the headers
MAX_HEADER_LINE = 8192
MAX_HEADERS = 100
MAX_REQUEST_LINE = 8192
LOG_BATCH = 256  # request lines written at once at most …
LOG_FLUSH_SECONDS = 0.25  # … and at the latest this long after the first of a batch


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

    def items(self) -> Iterator[tuple[str, str]]:
        return iter(self._map.items())

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


_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    505: "HTTP Version Not Supported",
}


class _Response:
    """What the app passed to start_response."""

    __slots__ = ("close", "code", "head", "length")

    def __init__(self) -> None:
        self.head = b""
        self.code = 0
        self.close = False
        self.length: int | None = None

    def start(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        lines = [f"HTTP/1.1 {status}\r\n"]
        for name, value in headers:
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"newline in response header {name!r}")
            lower = name.lower()
            if lower == "content-length":
                self.length = int(value)
            elif lower == "connection" and value.lower() == "close":
                self.close = True
            lines.append(f"{name}: {value}\r\n")
        self.code = int(status[:3])
        self.head = "".join(lines).encode("latin-1")


class Server(StreamServer):
    """A lean HTTP/1.1 server for the WSGI app on gevent's StreamServer.

    pywsgi spent ~3x nginx's time per narinfo on one keep-alive connection (bench/serve.py);
    this loop parses only what the cache needs, answers small responses in one send(), streams
    files with sendfile(2), and reuses pywsgi's Input for request bodies (Content-Length,
    chunked, Expect: 100-continue). Every request is logged as one JSON line and counted.
    """

    def __init__(self, listener: tuple[str, int], app: App, level: str = "info"):
        super().__init__(listener, backlog=1024)
        self.app = app
        # info: every request; warning: 4xx and 5xx; error: 5xx only
        self.min_status = {"debug": 0, "info": 0, "warning": 400, "error": 500}[level]
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}
        self._date = (0, b"")
        self._log_lines: list[str] = []
        self._log_flush_pending = False

    # -- connection loop -------------------------------------------------------------------------

    def handle(self, sock: socket.socket, address: tuple[str, int]) -> None:
        # Without TCP_NODELAY a narinfo waits for Nagle's algorithm to meet the client's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(IDLE_TIMEOUT)
        rfile = sock.makefile("rb", -1)
        try:
            while self._one_request(sock, rfile, address):
                pass
        except (OSError, _InvalidClientInput):
            pass  # the client went away, timed out or sent garbage: nothing to answer
        finally:
            rfile.close()
            sock.close()

    def _date_header(self) -> bytes:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, b"Date: " + pywsgi.format_date_time(now) + b"\r\n")
        return self._date[1]

    def _one_request(self, sock: socket.socket, rfile: Any, address: tuple[str, int]) -> bool:
        """Serve one request; True to keep the connection for another."""
        line = rfile.readline(MAX_REQUEST_LINE + 1)
        if not line:
            return False
        start = time.perf_counter()
        if len(line) > MAX_REQUEST_LINE:
            return self._reject(sock, 414, "request line too long", address, start)
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
            return self._reject(sock, 400, f"malformed request line {line[:60]!r}", address, start)
        method, target, version = parts
        headers = _Headers(rfile)
        if headers.status:
            return self._reject(
                sock, 431 if "long" in headers.status else 400, headers.status, address, start
            )
        path, _, query = target.partition("?")
        env: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "PATH_INFO": unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "SERVER_PROTOCOL": version,
            "SCRIPT_NAME": "",
            "SERVER_NAME": self.server_host,
            "SERVER_PORT": str(self.server_port),
            "REMOTE_ADDR": address[0],
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in headers.items():
            if "_" in name:
                continue  # as pywsgi: X_Foo must not pass for X-Foo behind a proxy
            env["HTTP_" + name.upper().replace("-", "_")] = value
        if "HTTP_CONTENT_TYPE" in env:
            env["CONTENT_TYPE"] = env.pop("HTTP_CONTENT_TYPE")
        chunked = env.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
        length: int | None = None
        raw_length = env.pop("HTTP_CONTENT_LENGTH", None)
        if raw_length is not None and not chunked:  # chunked wins over Content-Length (RFC 9112)
            if not raw_length.isdigit():
                return self._reject(sock, 400, f"bad Content-Length {raw_length[:20]!r}", address, start)
            length = int(raw_length)
            env["CONTENT_LENGTH"] = raw_length
        expect_continue = env.get("HTTP_EXPECT", "").lower() == "100-continue"
        body = _Input(rfile, length, socket=sock if expect_continue else None, chunked_input=chunked)
        env["wsgi.input"] = body
        connection = env.get("HTTP_CONNECTION", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"

        response = _Response()
        sent = 0
        result: Any = None
        try:
            result = self.app(env, response.start)
            if isinstance(result, FileBody):
                sock.sendall(self._head(response, keep_alive))
                sent = sendfile(sock, result)
            else:
                data = b"".join(result)
                if response.length is None:
                    response.head += f"Content-Length: {len(data)}\r\n".encode()
                elif response.length != len(data) and method != "HEAD":
                    raise RuntimeError(f"Content-Length {response.length} but {len(data)} body bytes")
                sock.sendall(self._head(response, keep_alive) + data)
                sent = len(data)
        except OSError:
            self._record(env, response.code or 499, sent, address, start, aborted=True)
            raise
        except Exception:
            log.exception("error answering %s %s", method, path[:200])
            env["nixcache.reason"] = "internal error: see the server log"
            self._record(env, 500, 0, address, start, aborted=False)
            if not sent:
                self._send_error(sock, 500, "internal error; see the server log")
            return False
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        keep = keep_alive and not response.close
        if keep:
            body._discard()  # read what the app left of the body, to find the next request
        self._record(env, response.code, sent, address, start, aborted=False)
        return keep

    def _head(self, response: _Response, keep_alive: bool) -> bytes:
        extra = self._date_header()
        if not keep_alive and not response.close:
            extra += b"Connection: close\r\n"
            response.close = True
        return response.head + extra + b"\r\n"

    def _send_error(self, sock: socket.socket, code: int, reason: str) -> None:
        body = f"{reason}\n".encode()
        head = (
            f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            sock.sendall(head.encode() + body)

    def _reject(
        self, sock: socket.socket, code: int, reason: str, address: tuple[str, int], start: float
    ) -> bool:
        """Answer a request we cannot parse, and close: we no longer know where the next one starts."""
        self._send_error(sock, code, reason)
        self._record({"nixcache.reason": reason}, code, 0, address, start, aborted=False)
        return False

    # -- log and metrics -------------------------------------------------------------------------

    def _record(
        self,
        env: dict[str, Any],
        code: int,
        sent: int,
        address: tuple[str, int],
        start: float,
        *,
        aborted: bool,
    ) -> None:
        elapsed = time.perf_counter() - start
        route = env.get("nixcache.route", "other")
        method = env.get("REQUEST_METHOD", "-")
        key = (route, method, code)
        children = self._children.get(key)
        if children is None:
            # labels() costs microseconds per call; the set of label values is small and fixed.
            metrics = self.app.metrics
            children = (
                metrics.requests.labels(route, method, str(code)),
                metrics.duration.labels(route),
                metrics.served_bytes.labels(route),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(elapsed)
        served = env.get("nixcache.body_bytes")
        if served and not aborted:
            children[2].inc(served)
        if code < self.min_status:
            return
        line = {
            "client": address[0] if isinstance(address, tuple) else "-",
            "method": method,
            "path": env.get("PATH_INFO", "-")[:200],
            "status": code,
            "bytes": sent,
            "ms": round(elapsed * 1000, 3),
            "route": route,
        }
        if "nixcache.reason" in env:
            line["reason"] = env["nixcache.reason"]
        if aborted:
            line["aborted"] = True  # the connection broke while answering
        self._log_lines.append(json.dumps(line))
        if len(self._log_lines) >= LOG_BATCH:
            self.flush_log()
        elif not self._log_flush_pending:
            self._log_flush_pending = True
            gevent.spawn_later(LOG_FLUSH_SECONDS, self.flush_log)

    def flush_log(self) -> None:
        """Write the batched request lines: one write(2) per batch instead of one per request."""
        self._log_flush_pending = False
        if self._log_lines:
            lines, self._log_lines = self._log_lines, []
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()

    def stop(self, timeout: float | None = None) -> None:
        super().stop(timeout)
        self.flush_log()

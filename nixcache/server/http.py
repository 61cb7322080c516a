"""Serving the WSGI app with gevent: HTTP/1.1 keep-alive, TCP_NODELAY, idle timeouts, sendfile,
one JSON log line and metrics per request.

Imports gevent: only `nixcache.server.cli.serve` imports this, after `monkey.patch_all()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from json.encoder import encode_basestring_ascii
from typing import Any
from urllib.parse import unquote

import gevent
from gevent import pywsgi
from gevent.pywsgi import _InvalidClientInput
from gevent.server import StreamServer
from gevent.socket import wait_write

from nixcache.server.app import App, FileBody, StreamBody

log = logging.getLogger("nixcache.server")
IDLE_TIMEOUT = 75.0  # seconds a keep-alive connection may sit idle (nginx's default)
REAP_INTERVALS = 4  # the idle reaper looks this many times per idle timeout
SENDFILE_CHUNK = 1 << 24
MAX_HEADERS = 100
MAX_REQUEST_LINE = 8192
MAX_HEAD = 64 * 1024
RECV_SIZE = 64 * 1024
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


class HeadError(ValueError):
    """A request head we cannot parse; `code` is the status to answer with."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code


class _Reader:
    """Buffered reads from a socket: whole request heads at once, and the `read`/`readline`
    that pywsgi's Input needs for bodies. Cheaper than socket.makefile()'s three layers, which
    cost measurable time on every narinfo request."""

    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(RECV_SIZE)
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self) -> bytes | None:
        """The next request head without its blank line; None at a clean end of the connection."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head, self.buf = self.buf[:end], self.buf[end + 4 :]
                return head
            end = self.buf.find(b"\n\n")
            if end >= 0:
                head, self.buf = self.buf[:end], self.buf[end + 2 :]
                return head
            if len(self.buf) > MAX_HEAD:
                raise HeadError(431, f"request head larger than {MAX_HEAD} bytes")
            if not self._fill():
                if self.buf.strip():
                    raise HeadError(400, "connection closed in the middle of a request head")
                return None

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (fewer only at EOF)."""
        if size < 0:
            while self._fill():
                pass
            data, self.buf = self.buf, b""
            return data
        while len(self.buf) < size:
            if not self.buf and size >= RECV_SIZE:
                return self._read_direct(size)
            if not self._fill():
                break
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def _read_direct(self, size: int) -> bytes:
        # Large body reads skip the buffer: one recv per chunk into a preallocated bytearray.
        out = bytearray(size)
        view = memoryview(out)
        got = 0
        while got < size:
            n = self.sock.recv_into(view[got:], size - got)
            if not n:
                break
            got += n
        return bytes(view[:got])

    def readline(self, size: int = -1) -> bytes:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0 and (size < 0 or end < size):
                line, self.buf = self.buf[: end + 1], self.buf[end + 1 :]
                return line
            if 0 <= size <= len(self.buf):
                line, self.buf = self.buf[:size], self.buf[size:]
                return line
            if not self._fill():
                line, self.buf = self.buf, b""
                return line


def send_small(sock: socket.socket, data: bytes) -> None:
    """sendall() for a response that usually fits the socket buffer: one send(2), the rest if any.

    gevent's sendall() asks the kernel for SO_SNDBUF on every call to size its chunks; for a
    narinfo that extra syscall is a measurable share of the request."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """(method, target, version, headers with lower-case names) of a request head; HeadError."""
    lines = head.decode("latin-1").split("\n")
    parts = lines[0].split()
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise HeadError(400, f"malformed request line {lines[0][:60]!r}")
    if len(lines[0]) > MAX_REQUEST_LINE:
        raise HeadError(414, "request line too long")
    if len(lines) > MAX_HEADERS + 1:
        raise HeadError(431, f"more than {MAX_HEADERS} header lines")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or name[0] in " \t":
            # also refuses obsolete line folding (RFC 9112 allows a 400 for it)
            raise HeadError(400, f"invalid header line {line[:40]!r}")
        name = name.lower()
        value = value.strip()
        if name in headers:
            if name in ("content-length", "transfer-encoding", "host"):
                raise HeadError(400, f"duplicate {name} header")
            headers[name] += ", " + value
        else:
            headers[name] = value
    return parts[0], parts[1], parts[2], headers


_js = encode_basestring_ascii  # a str as a JSON string literal, quotes included


def _close(result: Any) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()


def _continue_pending(body: _Input) -> bool:
    """True when the client waits for "100 Continue" that was never sent: the app answered
    without reading the body. The client may or may not send it now, so the only safe way on
    is to close the connection after the answer."""
    return body.socket is not None and (body.content_length or body.chunked_input)


_NARINFO_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/x-nix-narinfo\r\nContent-Length: "
_REASONS = {
    400: "Bad Request",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
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

    def __init__(
        self, listener: tuple[str, int], app: App, level: str = "info", idle_timeout: float = IDLE_TIMEOUT
    ):
        super().__init__(listener, backlog=1024)
        self.app = app
        self.idle_timeout = idle_timeout
        # Connection -> when its current request began (the wait for its head). Until the general
        # path sets a socket timeout, and through the whole narinfo fast path, the socket has
        # none: that spares every keep-alive request a gevent Timeout (~20 us of a narinfo's
        # ~200, measured with bench/serve.py), and the reaper closes what overstays instead.
        self._waiting: dict[socket.socket, float] = {}
        self._reaper: gevent.Greenlet | None = None
        # info: every request; warning: 4xx and 5xx; error: 5xx only
        self.min_status = {"debug": 0, "info": 0, "warning": 400, "error": 500}[level]
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}
        self._date = (0, b"")
        self._log_lines: list[str] = []
        self._log_flush_pending = False

    # -- connection loop -------------------------------------------------------------------------

    def start(self) -> None:
        super().start()
        if self._reaper is None:
            self._reaper = gevent.spawn(self._reap_idle)

    def _reap_idle(self) -> None:
        """Close connections whose current request (from the wait for its head until the general
        path sets a socket timeout, or until a fast-path answer is sent) is older than the idle
        timeout: idle keep-alive connections, slow heads, clients that stopped reading."""
        while True:
            gevent.sleep(self.idle_timeout / REAP_INTERVALS)
            limit = time.monotonic() - self.idle_timeout
            for sock, since in list(self._waiting.items()):
                if since < limit:
                    # The handler's blocked recv raises (closed in another greenlet) and it ends.
                    self._waiting.pop(sock, None)
                    sock.close()

    def handle(self, sock: socket.socket, address: tuple[str, int]) -> None:
        # Without TCP_NODELAY a narinfo waits for Nagle's algorithm to meet the client's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = _Reader(sock)
        try:
            while self._one_request(sock, reader, address):
                pass
        except (OSError, _InvalidClientInput):
            pass  # the client went away, timed out or sent garbage: nothing to answer
        finally:
            self._waiting.pop(sock, None)
            sock.close()

    def _date_header(self) -> bytes:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, b"Date: " + pywsgi.format_date_time(now) + b"\r\n")
        return self._date[1]

    def _one_request(self, sock: socket.socket, reader: _Reader, address: tuple[str, int]) -> bool:
        """Serve one request; True to keep the connection for another."""
        # Until the general path below takes over, no socket timeout: the reaper closes the
        # connection if this request is not done within the idle timeout (see __init__).
        sock.settimeout(None)
        self._waiting[sock] = time.monotonic()
        try:
            head = reader.read_head()
        except HeadError as error:
            return self._reject(sock, error.code, str(error), address, time.perf_counter())
        if head is None:
            return False
        start = time.perf_counter()
        try:
            method, target, version, headers = parse_head(head.replace(b"\r\n", b"\n"))
        except HeadError as error:
            return self._reject(sock, error.code, str(error), address, start)
        path, _, query = target.partition("?")
        if (
            method == "GET"
            and "%" not in path
            and "content-length" not in headers
            and "transfer-encoding" not in headers
            and version == "HTTP/1.1"
            and headers.get("connection", "").lower() != "close"
        ):
            body_bytes = self.app.narinfo_hit(path, headers.get("authorization"))
            if body_bytes is not None:
                # The hot path (a narinfo that is here, on a keep-alive connection): no WSGI
                # environ, no start_response; one send. Everything else goes through the app.
                send_small(
                    sock,
                    b"%s%d\r\n%s\r\n%s" % (_NARINFO_HEAD, len(body_bytes), self._date_header(), body_bytes),
                )
                self._record(
                    {"REQUEST_METHOD": method, "PATH_INFO": path, "nixcache.route": "narinfo",
                     "nixcache.body_bytes": len(body_bytes)},
                    200, len(body_bytes), address, start, aborted=False,
                )  # fmt: skip
                return True
        # Bodies and responses of any size: the socket's own timeout drops a stalled client.
        self._waiting.pop(sock, None)
        sock.settimeout(self.idle_timeout)
        env: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "PATH_INFO": unquote(path, "latin-1") if "%" in path else path,
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
        coding = headers.get("transfer-encoding")
        chunked = coding is not None
        if chunked and coding.lower() != "chunked":
            # RFC 9112: unless chunked is the (only) coding the body's end is unknown: 400, close.
            reason = f"Transfer-Encoding {coding[:40]!r} is not supported; send chunked or Content-Length"
            return self._reject(sock, 400, reason, address, start)
        length: int | None = None
        raw_length = env.pop("HTTP_CONTENT_LENGTH", None)
        if raw_length is not None and not chunked:  # chunked wins over Content-Length (RFC 9112)
            if not (raw_length.isascii() and raw_length.isdigit()):  # int() refuses "²"
                return self._reject(sock, 400, f"bad Content-Length {raw_length[:20]!r}", address, start)
            length = int(raw_length)
            env["CONTENT_LENGTH"] = raw_length
        expect_continue = env.get("HTTP_EXPECT", "").lower() == "100-continue"
        body = _Input(reader, length, socket=sock if expect_continue else None, chunked_input=chunked)
        env["wsgi.input"] = body
        connection = env.get("HTTP_CONNECTION", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        if chunked and raw_length is not None:
            keep_alive = False  # RFC 9112 6.3: both framings given, a smuggling attempt: close after

        response = _Response()
        sent = 0
        result: Any = None
        data = b""
        try:
            result = self.app(env, response.start)
            if not isinstance(result, FileBody | StreamBody):
                data = b"".join(result)
                if response.length is None:
                    response.head += f"Content-Length: {len(data)}\r\n".encode()
                elif response.length != len(data) and method != "HEAD":
                    raise RuntimeError(f"Content-Length {response.length} but {len(data)} body bytes")
        except Exception:
            # A bug or an unexpected OSError of the app (not of the socket): 500, never a hang-up.
            log.exception("error answering %s %s", method, path[:200])
            _close(result)
            env["nixcache.reason"] = "internal error: see the server log"
            self._record(env, 500, 0, address, start, aborted=False)
            self._send_error(sock, 500, "internal error; see the server log")
            return False
        try:
            head = self._head(response, keep_alive and not _continue_pending(body))
            if isinstance(result, FileBody):
                sock.sendall(head)
                sent = sendfile(sock, result)
            elif isinstance(result, StreamBody):
                # Sent as produced (bytes, or file segments sent with sendfile); an OSError from
                # it (a failed pull-through) cuts the connection.
                sock.sendall(head)
                for part in result:
                    if isinstance(part, FileBody):
                        sent += sendfile(sock, part)
                    else:
                        sock.sendall(part)
                        sent += len(part)
            else:
                send_small(sock, head + data)
                sent = len(data)
        except OSError:
            self._record(env, response.code or 499, sent, address, start, aborted=True)
            raise
        finally:
            _close(result)
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
        # One JSON object per line. Built by hand with the json module's C string escaper:
        # json.dumps of a dict cost a measurable share of a narinfo request (bench/serve.py).
        reason = env.get("nixcache.reason")
        self._log_lines.append(
            f'{{"client": {_js(address[0])}, "method": {_js(method)}, '
            f'"path": {_js(env.get("PATH_INFO", "-")[:200])}, "status": {code}, "bytes": {sent}, '
            f'"ms": {elapsed * 1000:.3f}, "route": "{route}"'
            + (f', "reason": {_js(reason)}' if reason else "")
            + (', "aborted": true}' if aborted else "}")  # aborted: the connection broke while answering
        )
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
        if self._reaper is not None:
            self._reaper.kill(block=False)
            self._reaper = None
        super().stop(timeout)
        self.flush_log()

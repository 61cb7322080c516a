"""The server's HTTP/1.1 loop on gevent: llhttp (through httptools) parses, this module owns the socket.

Per connection, bytes from recv(2) go into llhttp; its callbacks fill `_Message`s (head fields,
then body chunks) that queue up in order, so pipelined requests are answered one after the
other. A head goes through `wire.frame` (framing and connection rules), `App.handle` (the route
table) and `wire.response_head`; small answers leave in one send(2), files with sendfile(2).
Every request ends as one `wire.Record`, which makes its JSON log line (written in batches) and
its counters. Why the loop is ours and the parser is not: docs/decisions/0005-http-loop-on-llhttp.md.

Imports gevent: only `nixcache.server.cli.serve` imports this, after `monkey.patch_all()`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import socket
import sys
import time
from email.utils import formatdate
from json.encoder import encode_basestring_ascii
from typing import Any

import gevent
import httptools
from gevent.pool import Pool
from gevent.server import StreamServer
from gevent.socket import wait_write

from nixcache.server import wire
from nixcache.server.app import NARINFO_PATH, App
from nixcache.server.wire import (
    ChunkedBody,
    FileBody,
    Framing,
    Record,
    Refusal,
    Request,
    Response,
    StreamBody,
)

log = logging.getLogger("nixcache.server")
IDLE_TIMEOUT = 75.0  # seconds a keep-alive connection may sit idle (nginx's default)
REAP_INTERVALS = 4  # the idle reaper looks this many times per idle timeout
SENDFILE_CHUNK = 1 << 24
MAX_HEADERS = 100  # header fields per request (nginx and Node refuse about this many too)
MAX_TARGET = 8192  # bytes of a request target (414 past it)
MAX_HEAD = 64 * 1024  # bytes of a request head (431 past it); llhttp itself has no limit
RECV_SIZE = 64 * 1024
BODY_RECV_SIZE = 256 * 1024  # bodies are read in larger pieces: uploads are NARs
DRAIN_LIMIT = 64 * 1024  # an unread body up to this size is read to keep the connection; larger: close
LOG_BATCH = 256  # request lines written at once at most …
LOG_FLUSH_SECONDS = 0.25  # … and at the latest this long after the first of a batch
_ONCE = frozenset({"host", "content-length"})  # fields a request must not repeat (RFC 9112 3.2, RFC 9110 8.6)
_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS")}
_NAMES: dict[bytes, str] = {}  # field names as sent -> lower-case str (a cache: decoding costs per field)
_OWS = ("", " ", "\t")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NARINFO = re.compile(NARINFO_PATH.encode())  # the route table's own pattern, for the fast path
# Current Nix asks "is this path here" with HEAD <hash>.narinfo (fileExists): as fast as a GET.
_FAST_METHODS = ("GET", "HEAD")


def parse_refusal(reason: str, *, invalid_method: bool = False) -> Refusal:
    """The answer to a request llhttp refused. llhttp's reasons are fixed strings of its own
    ("Invalid header value char"), never request bytes; they are kept printable and short anyway."""
    reason = "".join(c for c in reason if " " <= c <= "~")[:80]
    if invalid_method:
        return Refusal(501, "request method not implemented by this server")  # RFC 9110 9.1
    lowered = reason.lower()
    if "content-length" in lowered:
        return Refusal(400, f"bad Content-Length: {reason}")
    if "transfer-encoding" in lowered:
        return Refusal(400, f"bad Transfer-Encoding: {reason}")
    if "chunk" in lowered:
        return Refusal(400, f"bad chunked body: {reason}")
    return Refusal(400, f"malformed request: {reason}")


class BodyError(OSError):
    """The request body cannot be read to its end (the client left, or sent a broken body).
    An OSError, as for any read: the store answers 400 "upload interrupted" and keeps nothing."""


class _Message:
    """One request as llhttp delivered it so far: head fields, then body chunks."""

    __slots__ = (
        "body",
        "complete",
        "count",
        "duplicate",
        "headers",
        "limit",
        "method",
        "seen",
        "size",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.count = 0  # header field lines
        self.size = 0  # bytes of the target and the field names and values
        self.duplicate: str | None = None  # a field of _ONCE that appeared again
        self.limit: Refusal | None = None  # a limit of ours that the head passed
        self.method = ""
        self.version = (1, 1)
        self.body: collections.deque[bytes] | None = None  # made for the first body bytes
        self.seen = 0  # body bytes parsed so far
        self.complete = False


class _Connection:
    """A client connection: what recv(2) returns goes into llhttp, whose callbacks (the methods
    named on_*) queue up parsed messages in `ready`."""

    __slots__ = ("eof", "error", "parser", "parsing", "raw", "ready", "sock", "timed", "upgraded")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.raw = raw_socket(sock)
        self.parser = httptools.HttpRequestParser(self)
        # Both are RFC behaviour, not leniency: a higher HTTP/1.x minor version is served as 1.1
        # (RFC 9110 6.2; wire.frame answers other major versions with 505), and a request with
        # Content-Length and chunked is read as chunked, then the connection closes (RFC 9112 6.3).
        self.parser.set_dangerous_leniencies(lenient_version=True, lenient_chunked_length=True)
        self.ready: collections.deque[_Message] = collections.deque()
        self.parsing: _Message | None = None
        self.error: Refusal | None = None  # llhttp refused the stream here; nothing after is parsed
        self.upgraded = False  # CONNECT or Upgrade: answered as HTTP/1.1 (RFC 9110 7.8), then closed
        self.eof = False
        self.timed = False  # the socket has a timeout (see Server.__init__)

    # -- llhttp's callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.parsing = _Message()

    def on_url(self, url: bytes) -> None:
        message = self.parsing
        message.size += len(url)
        if len(message.url) + len(url) > MAX_TARGET:  # RFC 9112 3: 414 for a target too long
            message.limit = Refusal(414, f"request target longer than {MAX_TARGET} bytes")
        else:
            message.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        message = self.parsing
        message.count += 1
        message.size += len(name) + len(value)
        if message.count > MAX_HEADERS:
            message.limit = Refusal(431, f"more than {MAX_HEADERS} header fields")
            return
        if message.size > MAX_HEAD:
            message.limit = Refusal(431, f"request head larger than {MAX_HEAD} bytes")
            return
        key = _NAMES.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
            if len(_NAMES) < 512:  # the usual few dozen names, bounded whatever clients send
                _NAMES[name] = key
        text = value.decode("latin-1")
        if text[-1:] in _OWS:
            text = text.rstrip(" \t")  # RFC 9110 5.5: trailing whitespace is not part of the value
        headers = message.headers
        old = headers.get(key)
        if old is None:
            headers[key] = text
        else:
            if key in _ONCE:
                message.duplicate = key
            headers[key] = f"{old}, {text}"  # RFC 9110 5.3: repeated lines form one list

    def on_headers_complete(self) -> None:
        message = self.parsing
        parser = self.parser
        method = parser.get_method()  # a name from llhttp's own table
        message.method = _METHODS.get(method) or method.decode("ascii")
        version = parser.get_http_version()
        message.version = _VERSIONS.get(version) or tuple(map(int, version.split(".")))  # type: ignore[assignment]
        self.ready.append(message)

    def on_body(self, data: bytes) -> None:
        message = self.parsing
        if message.body is None:
            message.body = collections.deque()
        message.body.append(data)
        message.seen += len(data)

    def on_message_complete(self) -> None:
        self.parsing.complete = True
        self.parsing = None

    # -- reading -----------------------------------------------------------------------------------

    def _fill(self, size: int) -> int:
        """Read once from the socket into the parser; the bytes read, 0 at the end of the stream."""
        try:
            data = self.raw.recv(size)  # what the client sent already, without gevent's wrapper
        except BlockingIOError:
            wait_readable(self.sock)
            data = self.sock.recv(size)  # gevent's: should the wake-up have been spurious, it waits again
        if not data:
            self.eof = True
            return 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.upgraded = True
        except httptools.HttpParserError as error:
            invalid = isinstance(error, httptools.HttpParserInvalidMethodError)
            self.error = parse_refusal(str(error), invalid_method=invalid)
        return len(data)

    def _stopped(self) -> bool:
        return self.eof or self.error is not None or self.upgraded

    def next_message(self) -> _Message | None:
        """The next request whose head is complete; None when the client is done. Refusal for a
        head llhttp or a limit refused (only after the requests before it were answered)."""
        waited = 0
        while not self.ready:
            if self.error is not None:
                raise self.error
            if self._stopped():
                if self.parsing is not None and not self.upgraded:
                    raise Refusal(400, "connection closed in the middle of a request head")
                return None
            if waited > MAX_HEAD:  # also guards a field that never ends (httptools buffers it)
                raise Refusal(431, f"request head larger than {MAX_HEAD} bytes")
            waited += self._fill(RECV_SIZE)
        return self.ready.popleft()

    def more_body(self, message: _Message) -> None:
        """Read until `message` has a body chunk or is complete; BodyError when it cannot be."""
        while not message.body and not message.complete:
            if message is not self.parsing or self._stopped():
                if self.error is not None:
                    raise BodyError(f"the request body is malformed ({self.error.reason})")
                raise BodyError(f"the connection ended after {message.seen} body bytes")
            self._fill(BODY_RECV_SIZE)


class _Body:
    """The body of one request, read through the parser: `read(size)` returns up to `size` bytes
    (one chunk as llhttp delivered it when `size` < 0), b"" at the end of the body."""

    __slots__ = ("_conn", "_message", "_record", "continue_sent", "expect_continue", "length")

    def __init__(self, conn: _Connection, message: _Message, framing: Framing, record: Record):
        self._conn = conn
        self._message = message
        self._record = record
        self.length = framing.length
        self.expect_continue = framing.expect_continue
        self.continue_sent = False

    def read(self, size: int = -1) -> bytes:
        message = self._message
        chunks = message.body
        if not chunks:
            if message.complete:
                return b""
            if self.expect_continue and not self.continue_sent:
                self.continue_sent = True  # RFC 9110 10.1.1: the client waits for this before the body
                self._conn.sock.sendall(_CONTINUE)
            self._conn.more_body(message)
            chunks = message.body
            if not chunks:
                return b""
        data = chunks.popleft()
        if 0 <= size < len(data):
            chunks.appendleft(data[size:])
            data = data[:size]
        self._record.received += len(data)
        return data

    def left(self) -> int | None:
        """Body bytes the client has still to send: None when unknown (chunked, unfinished)."""
        message = self._message
        if message.complete:
            return 0
        if self.length is None:
            return None
        return self.length - message.seen

    def drain(self) -> None:
        """Read what the handler left of the body, to find the next request after it."""
        while self.read(-1):
            pass


class _NoBody:
    """The body of a request without one (most requests): nothing to read, nothing left."""

    __slots__ = ()
    length = 0
    continue_sent = False

    def read(self, size: int = -1) -> bytes:
        return b""

    def left(self) -> int:
        return 0

    def drain(self) -> None:
        pass


_NO_BODY = _NoBody()


def raw_socket(sock: socket.socket) -> socket.socket:
    """The non-blocking socket under gevent's cooperative one (the same file descriptor).

    A recv(2) or send(2) that can proceed is called on it directly: gevent's methods are Python
    code around the same call (~1.5 us per request of a narinfo hit, bench/serve.py --rps); only
    when the call would block do they take over, to wait on the event loop. When gevent closes
    its socket (the idle reaper, drain) it closes this one too: a call then raises OSError."""
    return getattr(sock, "_sock", sock)  # not a gevent socket (tests): the socket itself


def wait_readable(sock: socket.socket) -> None:
    """Wait on the event loop until `sock` is readable, as gevent's own recv does after EAGAIN
    (the socket's timeout applies; OSError once another greenlet closed it). Called after our
    raw recv found nothing, it spares gevent's recv a second recv(2) that would fail alike: with
    one keep-alive connection every request waits so."""
    event = getattr(sock, "_read_event", None)
    if event is not None:
        sock._wait(event)  # type: ignore[attr-defined]


def send_small(sock: socket.socket, data: bytes, raw: socket.socket | None = None) -> None:
    """sendall() for an answer that usually fits the socket buffer: one send(2), the rest if any.

    gevent's sendall() asks the kernel for SO_SNDBUF on every call to size its chunks; for a
    narinfo that extra syscall is a measurable share of the request. `raw`: the socket under
    `sock` (raw_socket), tried first."""
    try:
        sent = (raw or sock).send(data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def sendfile(sock: socket.socket, body: FileBody, record: Record) -> None:
    """Send `body` with sendfile(2), waiting cooperatively when the socket buffer is full;
    `record.sent` counts what left, also when the connection breaks midway."""
    out_fd = sock.fileno()
    in_fd = body.handle.fileno()
    offset, remaining = body.offset, body.count
    timeout = sock.gettimeout()
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
        record.sent += sent


def send_stream(sock: socket.socket, body: StreamBody, record: Record) -> None:
    """Send a generated body: bytes with sendall, file regions with sendfile. When the generator
    raises (the path changed under it) or comes up short, the reason goes to the log and the
    OSError closes the connection: the client sees a short body, never a wrong complete one."""
    start = record.sent
    try:
        for item in body.items:
            if isinstance(item, bytes):
                sock.sendall(item)
                record.sent += len(item)
            else:
                sendfile(sock, item, record)
    except OSError as error:
        record.reason = str(error)
        raise
    if record.sent - start != body.count:
        record.reason = f"generated {record.sent - start} of {body.count} body bytes"
        raise OSError(record.reason)


def send_chunked(sock: socket.socket, body: ChunkedBody, record: Record, *, framed: bool) -> None:
    """Send a body of unknown length: each piece as one chunk, then the last chunk (RFC 9112 7.1);
    unframed (HTTP/1.0) the closing connection ends it. `record.sent` counts body bytes, framing
    aside. An OSError of the source leaves the last chunk unsent and closes the connection."""
    try:
        for chunk in body.chunks:
            if chunk:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if framed else chunk)
                record.sent += len(chunk)
    except OSError as error:
        record.reason = str(error)
        raise
    if framed:
        sock.sendall(b"0\r\n\r\n")


_js = encode_basestring_ascii  # a str as a JSON string literal, quotes included
# (client, method) -> the start of their log lines, escaped once rather than per request.
_OPENINGS: dict[tuple[str, str], str] = {}


class Server(StreamServer):
    """The cache's HTTP/1.1 server on gevent's StreamServer (see the module docstring)."""

    def __init__(
        self,
        listener: tuple[str, int] | socket.socket,
        app: App,
        level: str = "info",
        idle_timeout: float = IDLE_TIMEOUT,
    ):
        backlog = None if isinstance(listener, socket.socket) else 1024  # a given socket listens already
        # An unbounded pool of the connection handlers, so that stop() waits for them (gevent's
        # default spawn keeps none, and a SIGTERM would cut every download in flight).
        super().__init__(listener, backlog=backlog, spawn=Pool())
        self.app = app
        self.idle_timeout = idle_timeout
        # Connection -> when its current request began (the wait for its head). A request without
        # a body whose answer is not a file runs with no socket timeout: that spares every
        # keep-alive narinfo request a gevent Timeout (~20 us of ~200, measured with
        # bench/serve.py), and the reaper closes what overstays instead. Bodies and files, which
        # may rightly take longer, get the socket's own timeout and leave the reaper's watch.
        self._waiting: dict[socket.socket, float] = {}
        self._reaper: gevent.Greenlet | None = None
        # Connections blocked reading their next request head; drain() closes those that have
        # received nothing of it. Once draining, every answer closes its connection.
        self._idle: set[_Connection] = set()
        self.draining = False
        # info: every request; warning: 4xx and 5xx; error: 5xx only
        self.min_status = {"debug": 0, "info": 0, "warning": 400, "error": 500}[level]
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}
        self._date = (0, b"")
        self._log_lines: list[str] = []
        # A timer of the event loop, not a greenlet per batch (spawn_later made one, ~2 % of a
        # narinfo hit's CPU): it calls flush_log in the hub, which only writes what is batched.
        self._log_timer: Any = None

    # -- connection loop -------------------------------------------------------------------------

    def start(self) -> None:
        super().start()
        if self._reaper is None:
            self._reaper = gevent.spawn(self._reap_idle)

    def _reap_idle(self) -> None:
        """Close connections whose current request (from the wait for its head until it reads a
        body or sends a file, or until its answer is sent) is older than the idle timeout: idle
        keep-alive connections, slow heads, clients that stopped reading."""
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
        conn = _Connection(sock)
        try:
            while self._serve_one(conn, address[0]):
                pass
        except OSError:
            pass  # the client went away or timed out: nothing to answer
        finally:
            self._waiting.pop(sock, None)
            self._idle.discard(conn)
            sock.close()

    def _date_header(self) -> bytes:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, f"Date: {formatdate(now, usegmt=True)}\r\n".encode())
        return self._date[1]

    def _timed(self, conn: _Connection) -> None:
        """From here on this request may take long: the socket's timeout guards it, not the reaper."""
        if not conn.timed:
            self._waiting.pop(conn.sock, None)
            conn.sock.settimeout(self.idle_timeout)
            conn.timed = True

    def _serve_one(self, conn: _Connection, client: str) -> bool:
        """Serve one request; True to keep the connection for another."""
        sock = conn.sock
        if conn.timed:
            sock.settimeout(None)
            conn.timed = False
        self._waiting[sock] = time.monotonic()
        idle = self._idle
        idle.add(conn)
        try:
            message = conn.next_message()
        except Refusal as refusal:
            idle.discard(conn)
            return self._refuse(sock, Record(client, time.perf_counter()), refusal, None)
        idle.discard(conn)
        if message is None:
            return False
        record = Record(client, time.perf_counter(), message.method)
        try:
            if message.limit is not None:
                raise message.limit
            framing = wire.frame(message.version, message.headers, message.duplicate)
            if (
                framing is wire.NO_BODY_11
                and message.method in _FAST_METHODS
                and _NARINFO.fullmatch(message.url)  # an origin-form target, nothing to decode
            ):
                path = record.path = message.url.decode("ascii")  # "/<32 chars>.narinfo"
                authorization = message.headers.get("authorization")
                return self._narinfo(conn, record, path[1:33], authorization, message.method == "HEAD")
            path, query = wire.split_target(message.url.decode("latin-1"))
        except Refusal as refusal:
            return self._refuse(sock, record, refusal, message)
        record.path = path
        if framing.has_body:
            self._timed(conn)
        body = _Body(conn, message, framing, record) if framing.has_body else _NO_BODY
        try:
            response = self.app.handle(Request(message.method, path, query, message.headers, body, record))
        except Exception:
            # A bug or an unexpected OSError of the app (not of the socket): 500, never a hang-up.
            log.exception("error answering %s %s", message.method, path[:200])
            refusal = Refusal(500, "internal error: see the server log")
            return self._refuse(sock, record, refusal, message)
        record.status = response.status
        record.reason = response.reason
        left = body.left()
        fate = wire.after_response(
            framing, continue_sent=body.continue_sent, body_left=left, drain_limit=DRAIN_LIMIT
        )
        if conn.upgraded or (left and conn._stopped()) or self.draining:
            fate = "close"
        out = response.body
        if framing.http10 and isinstance(out, ChunkedBody):
            fate = "close"  # RFC 9112 6.3: without chunked framing, the close ends the body
        head = wire.response_head(
            response, keep_alive=fate != "close", http10=framing.http10, date=self._date_header()
        )
        try:
            if isinstance(out, (FileBody, StreamBody, ChunkedBody)):
                try:
                    if message.method == "HEAD":
                        send_small(sock, head)
                    else:
                        self._timed(conn)
                        sock.sendall(head)
                        if isinstance(out, FileBody):
                            sendfile(sock, out, record)
                        elif isinstance(out, StreamBody):
                            send_stream(sock, out, record)
                        else:
                            send_chunked(sock, out, record, framed=not framing.http10)
                finally:
                    out.close()
            elif message.method == "HEAD":
                send_small(sock, head, conn.raw)
            else:
                send_small(sock, head + out, conn.raw)
                record.sent = len(out)
            if fate == "drain":
                body.drain()
        except OSError:
            record.aborted = True
            self._record(record)
            raise
        self._record(record)
        return fate != "close"

    def _narinfo(
        self, conn: _Connection, record: Record, hash_part: str, authorization: str | None, head: bool
    ) -> bool:
        """The fast path of the most frequent requests, a narinfo GET or HEAD (current Nix checks
        presence with HEAD, mostly of absent paths) on a kept HTTP/1.1 connection without a body:
        the route table's answer (`App.narinfo`, hit or miss), without building the Request that
        no other handler needs: about 15 % less Python work per narinfo (in-process)."""
        record.route = "narinfo"
        response = self.app.narinfo(hash_part, authorization)
        record.status = response.status
        record.reason = response.reason
        keep = not self.draining
        response_head = wire.response_head(response, keep_alive=keep, http10=False, date=self._date_header())
        body = b"" if head else response.body
        try:
            send_small(conn.sock, response_head + body, conn.raw)  # type: ignore[operator]
        except OSError:
            record.aborted = True
            self._record(record)
            raise
        record.sent = len(body)  # type: ignore[arg-type]
        self._record(record)
        return keep

    def _refuse(
        self, sock: socket.socket, record: Record, refusal: Refusal, message: _Message | None
    ) -> bool:
        """Answer a request refused before (or instead of) its handler, and close: after a
        refused head the next request's start is unknown."""
        record.status = refusal.status
        record.reason = refusal.reason
        response = Response(refusal.status, f"{refusal.reason}\n".encode(), headers=refusal.headers)
        head = wire.response_head(response, keep_alive=False, http10=False, date=self._date_header())
        with contextlib.suppress(OSError):
            send_small(
                sock, head if message is not None and message.method == "HEAD" else head + response.body
            )
        self._record(record)
        return False

    # -- log and metrics -------------------------------------------------------------------------

    def _record(self, record: Record) -> None:
        elapsed = time.perf_counter() - record.start
        route, method, status = record.route, record.method, record.status
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            # labels() costs microseconds per call; the set of label values is small and fixed.
            metrics = self.app.metrics
            children = (
                metrics.requests.labels(route, method, str(status)),
                metrics.duration.labels(route),
                metrics.served_bytes.labels(route),
            )
            self._children[key] = children
        requests, duration, served = children
        requests.inc()
        duration.observe(elapsed)
        sent = record.sent
        if sent and 200 <= status < 300 and method == "GET" and not record.aborted:
            served.inc(sent)
        if status < self.min_status:
            return
        # One JSON object per line, built by hand with the json module's C string escaper
        # (json.dumps of a dict cost a measurable share of a narinfo request, bench/serve.py).
        # Method, path (without its query) and route come from parsed, known fields; the reason
        # is the server's own words: no line ever holds bytes copied from a request head.
        reason = record.reason
        opening = _OPENINGS.get((record.client, method))
        if opening is None:
            opening = f'{{"client": {_js(record.client)}, "method": {_js(method)}, '
            if len(_OPENINGS) < 4096:  # the few clients and methods of a cache, bounded anyway
                _OPENINGS[(record.client, method)] = opening
        self._log_lines.append(
            f'{opening}"path": {_js(record.path[:200])}, "status": {status}, "bytes": {sent}, '
            f'"ms": {elapsed * 1000:.3f}, "route": "{route}"'
            + (f', "received": {record.received}' if record.received else "")
            + (f', "reason": {_js(reason)}' if reason else "")
            + (
                ', "aborted": true}' if record.aborted else "}"
            )  # aborted: the connection broke while answering
        )
        if len(self._log_lines) >= LOG_BATCH:
            self.flush_log()
        elif self._log_timer is None:
            self._log_timer = timer = gevent.get_hub().loop.timer(LOG_FLUSH_SECONDS)
            timer.start(self.flush_log)

    def flush_log(self) -> None:
        """Write the batched request lines: one write(2) per batch instead of one per request."""
        if self._log_timer is not None:
            self._log_timer.close()  # flushed now: the next line starts the next batch's timer
            self._log_timer = None
        if self._log_lines:
            lines, self._log_lines = self._log_lines, []
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()

    def drain(self) -> None:
        """Stop accepting and close the idle keep-alive connections; requests in flight are
        answered (with Connection: close) and serve_forever() returns once they are done, or
        once its stop_timeout has passed (then what is left is cut). nginx shuts down alike."""
        self.draining = True
        self.close()
        for conn in list(self._idle):
            if conn.parsing is None and not conn.ready:  # nothing of a next request arrived
                conn.sock.close()  # its handler's blocked recv raises and the handler ends

    def stop(self, timeout: float | None = None) -> None:
        if self._reaper is not None:
            self._reaper.kill(block=False)
            self._reaper = None
        super().stop(timeout)
        self.flush_log()

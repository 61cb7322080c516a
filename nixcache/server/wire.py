"""HTTP/1.1 message rules as pure functions, and the types that carry a request through the server.

llhttp (`nixcache.server.http`) splits the bytes into a request line, header fields and a body;
what those mean for the server is decided here, without I/O, so each rule is tested case by case
against its RFC 9110/9112 section (tests/server/test_wire.py):

- `frame`: version, Host, Content-Length, Transfer-Encoding, Expect and Connection → how the body
  is delimited and whether the connection may stay open, or a `Refusal`;
- `split_target`: origin-form and absolute-form request targets → path and query;
- `parse_range`: a `Range` field against a file size;
- `after_response`: keep, drain or close the connection once the answer is out;
- `response_head`: the status line and header fields of an answer;
- `bounded_int`: every number taken from a request or an upload.

Nothing here copies request bytes into a reason: reasons are read by operators in the log, and
a request carries tokens (RFC 9110 11.6.2) in places a careless client puts them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote

MAX_DIGITS = 19  # 10**19 > 2**63: more digits than any size this server handles, far below int()'s limit

# RFC 9110 7.2: Host = uri-host [ ":" port ]; uri-host is an IP-literal, IPv4 or reg-name (RFC 3986 3.2.2).
_HOST = re.compile(r"(?:\[[0-9A-Za-z:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")
# RFC 9112 3.2.2: absolute-form is an absolute-URI; this server is reached over http only.
_ABSOLUTE = re.compile(r"(?i:https?)://([^/?#]*)([^?#]*)(?:\?([^#]*))?(?:#.*)?", re.DOTALL)
_DIGITS = re.compile(r"[0-9]+")
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE)
PHRASES = {status.value: status.phrase for status in HTTPStatus}
PHRASES[413] = "Content Too Large"  # RFC 9110's name; http.HTTPStatus still says "Request Entity Too Large"


class Refusal(Exception):
    """A request this server answers with `status` and `reason` (written by the server, never
    copied from the request); `close` when the connection cannot be trusted any further."""

    def __init__(
        self, status: int, reason: str, *, close: bool = True, headers: Sequence[tuple[str, str]] = ()
    ):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.close = close
        self.headers = tuple(headers)


def bounded_int(text: str, name: str, status: int = 400) -> int:
    """`text` as a non-negative integer of at most MAX_DIGITS ASCII digits; Refusal naming `name`
    otherwise (int() alone accepts '²', '1_000' and ' 1', and stalls or refuses past 4300 digits)."""
    if len(text) > MAX_DIGITS or not _DIGITS.fullmatch(text):
        raise Refusal(status, f"{name} is not a number of at most {MAX_DIGITS} digits", close=False)
    return int(text)


# -- the request as the parser delivered it ---------------------------------------------------------


@dataclass(slots=True)
class Framing:
    """How a request's body is delimited and what the connection does afterwards."""

    length: int | None  # Content-Length, 0 when there is no body, None when chunked
    keep_alive: bool  # the client allows another request on this connection
    expect_continue: bool  # the client waits for "100 Continue" before sending the body
    http10: bool  # the request said HTTP/1.0: a kept connection must be confirmed in the answer

    @property
    def has_body(self) -> bool:
        return self.length != 0


# The framing of most requests (no body, no Connection field), shared: they are never modified.
NO_BODY_11 = Framing(0, keep_alive=True, expect_continue=False, http10=False)
NO_BODY_10 = Framing(0, keep_alive=False, expect_continue=False, http10=True)


_GOOD_HOSTS: set[str] = set()


def _tokens(value: str | None) -> set[str]:
    """The comma-separated, case-insensitive tokens of a list-valued field (RFC 9110 5.6.1)."""
    if not value:
        return set()
    return {token.strip().lower() for token in value.split(",")}


def frame(version: tuple[int, int], headers: dict[str, str], duplicate: str | None = None) -> Framing:
    """The framing of a request head (field names lower-case; `duplicate` names a field that must
    appear once but appeared more often); Refusal for a head this server does not accept."""
    major, minor = version
    if major != 1:  # RFC 9110 6.2, 15.6.6: 505 for a major version it does not implement
        raise Refusal(505, f"HTTP/{major}.{minor} is not supported; use HTTP/1.1")
    http10 = minor == 0  # RFC 9110 6.2: a higher minor version is handled as the highest we know
    if duplicate is not None:  # RFC 9112 3.2 (Host), RFC 9110 8.6 (Content-Length)
        raise Refusal(400, f"more than one {duplicate} field")
    host = headers.get("host")
    if host is None:
        if not http10:  # RFC 9112 3.2: MUST answer 400 to an HTTP/1.1 request without Host
            raise Refusal(400, "HTTP/1.1 request without a Host field")
    elif host not in _GOOD_HOSTS:
        if not _HOST.fullmatch(host):  # RFC 9112 3.2: … or with an invalid Host value
            raise Refusal(400, "the Host field is not host[:port]")
        if len(_GOOD_HOSTS) < 64:  # clients send the same few: remember them, boundedly
            _GOOD_HOSTS.add(host)
    if len(headers) <= 4 and "content-length" not in headers and "transfer-encoding" not in headers:
        connection_field = headers.get("connection")
        if connection_field is None:  # the usual narinfo request: nothing else to decide
            return NO_BODY_10 if http10 else NO_BODY_11
    else:
        connection_field = headers.get("connection")
    connection = _tokens(connection_field)
    keep_alive = "keep-alive" in connection if http10 else "close" not in connection  # RFC 9112 9.3
    coding = headers.get("transfer-encoding")
    raw_length = headers.get("content-length")
    if coding is not None:
        if http10:  # RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty
            raise Refusal(400, "Transfer-Encoding in an HTTP/1.0 request; send Content-Length")
        if coding.strip().lower() != "chunked":
            # RFC 9112 6.1: unless chunked is the final (here: only) coding, the end is unknown
            raise Refusal(
                400, "Transfer-Encoding other than chunked is not supported; send chunked or Content-Length"
            )
        length = None
        if raw_length is not None:
            keep_alive = False  # RFC 9112 6.3: chunked wins, and the connection MUST close after
    elif raw_length is not None:
        try:
            length = bounded_int(raw_length.strip(), "Content-Length")  # RFC 9110 8.6
        except Refusal as refusal:
            refusal.close = True  # the end of the body is unknown
            raise
    else:
        length = 0  # RFC 9112 6.3 (rule 7): a request without either has no body
    if length == 0 and keep_alive and not http10:
        return NO_BODY_11  # a kept request without a body, with more fields (Nix's curl sends 5)
    # RFC 9110 10.1.1: 100-continue is for HTTP/1.1; an HTTP/1.0 client's expectation is ignored.
    expect = not http10 and length != 0 and _tokens(headers.get("expect")) == {"100-continue"}
    return Framing(length, keep_alive, expect, http10)


def split_target(target: str) -> tuple[str, str]:
    """(path, query) of a request target, the path percent-decoded. Origin-form is what clients
    send; absolute-form MUST be accepted too (RFC 9112 3.2.2), its authority then overrides Host."""
    if target[:1] == "/":
        path, _, query = target.partition("?")
    else:
        absolute = _ABSOLUTE.fullmatch(target)
        if absolute is None:
            # authority-form is for CONNECT, asterisk-form for OPTIONS (RFC 9112 3.2.3, 3.2.4)
            raise Refusal(400, "the request target is neither /path nor http://host/path", close=False)
        path, query = absolute.group(2) or "/", absolute.group(3) or ""
    if "#" in path:
        path = path.partition("#")[0]  # a fragment is never sent (RFC 9110 4.2.5); ignore one
    return (unquote(path, "latin-1") if "%" in path else path), query


# -- answers ---------------------------------------------------------------------------------------


class FileBody:
    """A (part of a) file as a response body; the HTTP layer sends it with sendfile(2)."""

    __slots__ = ("count", "handle", "offset")

    def __init__(self, handle: BinaryIO, offset: int, count: int):
        self.handle = handle
        self.offset = offset
        self.count = count

    def __iter__(self) -> Iterator[bytes]:
        # For callers without sendfile (tests): bounded chunks.
        self.handle.seek(self.offset)
        remaining = self.count
        while remaining > 0:
            chunk = self.handle.read(min(remaining, 256 * 1024))
            if not chunk:
                raise OSError(f"{self.handle.name} shrank while being sent")
            remaining -= len(chunk)
            yield chunk

    def close(self) -> None:
        self.handle.close()


class StreamBody:
    """A body generated while it is sent, whose length is known first (a NAR of the local Nix
    store): `items` yields bytes and file regions (objects with a FileBody's handle, offset and
    count, sent with sendfile) adding up to `count`. An OSError from it closes the connection,
    so a body that went wrong never arrives complete under its status."""

    __slots__ = ("count", "items")

    def __init__(self, items: Iterator[Any], count: int):
        self.items = items
        self.count = count

    def close(self) -> None:
        close = getattr(self.items, "close", None)
        if close is not None:
            close()


class ChunkedBody:
    """A body whose length is known only at its end (an encoded NAR, nixcache.server.encoding):
    `chunks` yields bytes, sent with chunked framing (RFC 9112 7.1; HTTP/1.0: until the connection
    closes). An OSError from it closes the connection before the last chunk, so a body that went
    wrong never looks complete; `close` releases the source."""

    __slots__ = ("chunks", "close")
    count = None

    def __init__(self, chunks: Iterator[bytes], close: Callable[[], None]):
        self.chunks = chunks
        self.close = close


@dataclass(slots=True)
class Response:
    """An answer: status, body, extra header fields, and the reason logged for it (not sent)."""

    status: int
    body: bytes | FileBody | StreamBody | ChunkedBody = b""
    content_type: str | None = "text/plain; charset=utf-8"
    headers: Sequence[tuple[str, str]] = ()
    reason: str | None = None

    @property
    def length(self) -> int | None:
        """Body bytes; None for a ChunkedBody, whose length is unknown until it ends."""
        body = self.body
        return body.count if isinstance(body, (FileBody, StreamBody, ChunkedBody)) else len(body)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(offset, count) of the part of a `size`-byte file that a `Range` field asks for, or None
    for the whole file. Refusal(416) when it cannot be satisfied (RFC 9110 14.1.2, 15.5.17)."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None  # RFC 9110 14.2: other units and several ranges MAY be ignored: whole file
    first, last = match.groups()

    def unsatisfiable(reason: str) -> Refusal:  # RFC 9110 14.4: a 416 tells the size
        return Refusal(416, reason, close=False, headers=[("Content-Range", f"bytes */{size}")])

    if len(first) > MAX_DIGITS or len(last) > MAX_DIGITS:
        raise unsatisfiable(f"Range position longer than {MAX_DIGITS} digits")
    if not first:
        if not last:
            return None  # "bytes=-" is no range at all: ignore it
        count = min(int(last), size)  # suffix-range: the last N bytes
        if count == 0:
            raise unsatisfiable(f"Range of 0 bytes from the end of {size} bytes")
        start = size - count
    else:
        start = int(first)
        # RFC 9110 14.1.2: a last-pos past the end means the end
        end = min(int(last), size - 1) if last else size - 1
        if start >= size or end < start:
            raise unsatisfiable(f"Range is not satisfiable for {size} bytes")
        count = end - start + 1
    return None if count == size else (start, count)


def after_response(framing: Framing, *, continue_sent: bool, body_left: int | None, drain_limit: int) -> str:
    """What the connection does once an answer is out: "keep", "drain" (read the rest of a small
    unread body, then keep) or "close". `body_left` is None when unknown (chunked, unfinished)."""
    if not framing.keep_alive:
        return "close"
    if body_left == 0:
        return "keep"
    if framing.expect_continue and not continue_sent:
        # RFC 9110 10.1.1: the client may or may not send the body now; only closing is safe.
        return "close"
    if body_left is None or body_left > drain_limit:
        return "close"  # do not read gigabytes that were refused
    return "drain"


_STATUS_LINES: dict[int, bytes] = {}
# (status, content type, keep-alive, HTTP/1.0) -> the head up to the Content-Length value, for
# answers without extra fields (most of them: narinfos, misses): built once, not per request.
_PREFIXES: dict[tuple[int, str | None, bool, bool], bytes] = {}


def response_head(response: Response, *, keep_alive: bool, http10: bool, date: bytes) -> bytes:
    """The status line and fields of `response`, blank line included; `date` is a whole
    `Date: …\\r\\n` line (RFC 9110 6.6.1)."""
    status = response.status
    if not response.headers and status >= 200 and status != 204:
        prefix = _PREFIXES.get((status, response.content_type, keep_alive, http10))
        if prefix is None:
            head = _head(response, keep_alive, http10)
            prefix = head[: head.index(b"Content-Length: ") + len(b"Content-Length: ")]
            _PREFIXES[(status, response.content_type, keep_alive, http10)] = prefix
        body = response.body
        length = len(body) if type(body) is bytes else response.length  # most answers: bytes
        return b"%s%d\r\n%s\r\n" % (prefix, length, date)
    return _head(response, keep_alive, http10) + date + b"\r\n"


def _head(response: Response, keep_alive: bool, http10: bool) -> bytes:
    status = response.status
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {PHRASES.get(status, 'Unknown')}\r\n".encode()
    fields = []
    if response.content_type is not None and status != 204:
        fields.append(f"Content-Type: {response.content_type}\r\n")
    for name, value in response.headers:
        if "\r" in value or "\n" in value or "\0" in value or not name.isascii() or ":" in name:
            raise ValueError(f"unsafe response header {name!r}")  # a bug of the server, not of the client
        fields.append(f"{name}: {value}\r\n")
    if not keep_alive:
        fields.append("Connection: close\r\n")
    elif http10:
        fields.append("Connection: keep-alive\r\n")  # RFC 9112 9.3, C.2.2: an HTTP/1.0 client needs it
    if status >= 200 and status != 204:  # RFC 9110 8.6: never on 1xx or 204
        length = response.length
        if length is not None:
            fields.append(f"Content-Length: {length}\r\n")
        elif not http10:  # RFC 9112 6.1: no chunked for HTTP/1.0; the close ends the body
            fields.append("Transfer-Encoding: chunked\r\n")
    return line + "".join(fields).encode("latin-1")


# -- the record of one request ----------------------------------------------------------------------


@dataclass(slots=True)
class Record:
    """What one request did, filled in as it is served; the log line and the metrics come from it.

    `method` and `path` are set only once the head parsed (the path without its query);
    `reason` is always written by the server."""

    client: str
    start: float
    method: str = "-"
    path: str = "-"
    route: str = "other"
    status: int = 0
    sent: int = 0  # body bytes actually sent
    received: int = 0  # body bytes actually read from the client
    reason: str | None = None
    aborted: bool = False  # the connection broke while answering


class Body(Protocol):
    """A request body as handlers read it."""

    length: int | None  # Content-Length, None when chunked

    def read(self, size: int = -1) -> bytes: ...


@dataclass(slots=True)
class Request:
    """A parsed request: what handlers see."""

    method: str
    path: str  # percent-decoded, without the query
    query: str
    headers: dict[str, str]  # lower-case names
    body: Body
    record: Record

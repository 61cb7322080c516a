"""The parser integration (`nixcache.server.http._Connection` on llhttp), case by case: bytes in,
requests (method, target, body) or the refusal out. Each case's name gives its RFC section."""

from __future__ import annotations

import pytest

from nixcache.server import http, wire
from nixcache.server.wire import Record, Refusal


class FakeSocket:
    """Hands the server `data` in pieces of `step` bytes, then the end of the stream."""

    def __init__(self, data: bytes, step: int):
        self.pieces = [data[i : i + step] for i in range(0, len(data), step)]
        self.sent = b""

    def recv(self, size: int) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""

    def sendall(self, data: bytes) -> None:
        self.sent += data


def serve(data: bytes, step: int = 65536) -> list[tuple]:
    """What the server makes of `data`: ("GET", "/target", body, headers) per request, in order,
    then (status, reason) of a refusal or ("body error", message), if any."""
    conn = http._Connection(FakeSocket(data, step))
    out: list[tuple] = []
    while True:
        try:
            message = conn.next_message()
            if message is None:
                return out
            if message.limit is not None:
                raise message.limit
            framing = wire.frame(message.version, message.headers, message.duplicate)
        except Refusal as refusal:
            return [*out, (refusal.status, refusal.reason)]
        body = http._Body(conn, message, framing, Record("test", 0.0))
        received = b""
        try:
            while chunk := body.read(7):  # small reads: chunks are split and kept in order
                received += chunk
        except http.BodyError as error:
            return [*out, ("body error", str(error))]
        out.append((message.method, message.url.decode("latin-1"), received, message.headers))


GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
PUT = b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world"
CHUNKED = b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + (
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
)
A = ("GET", "/a", b"", {"host": "x"})

# name, bytes, expected outcome (requests, then a refusal); every case is also fed one byte at a time
CASES = [
    ("9112-2.1 one request", GET, [A]),
    ("9112-9.3.2 pipelined requests in order", GET + PUT + GET, [A, ("PUT", "/p", b"hello world", None), A]),
    ("9112-6.2 Content-Length body", PUT, [("PUT", "/p", b"hello world", None)]),
    ("9112-7.1 chunked body, extension ignored", CHUNKED, [("PUT", "/c", b"hello world", None)]),
    (
        "9112-7.1.2 chunked body with a trailer",
        CHUNKED[:-2] + b"X-Trailer: 1\r\n\r\n" + GET,
        [("PUT", "/c", b"hello world", None), A],
    ),
    (
        "9112-6.3 Content-Length beside chunked: read as chunked",
        CHUNKED.replace(b"Host: x\r\n", b"Host: x\r\nContent-Length: 3\r\n"),
        [("PUT", "/c", b"hello world", None)],
    ),
    (
        "9110-5.3 repeated fields are one list",
        b"GET /a HTTP/1.1\r\nHost: x\r\nAccept: a\r\naccept: b\r\n\r\n",
        [("GET", "/a", b"", {"host": "x", "accept": "a, b"})],
    ),
    (
        "9110-5.5 whitespace around a value is not part of it",
        b"GET /a HTTP/1.1\r\nHost:  x \t\r\n\r\n",
        [A],
    ),
    (
        "9112-3.2.2 absolute-form target",
        b"GET http://x:5000/nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n",
        [("GET", "http://x:5000/nix-cache-info", b"", {"host": "x"})],
    ),
    ("9112-2.2 bare LF is refused", b"GET /a HTTP/1.1\nHost: x\n\n", [(400, "malformed request")]),
    (
        "9112-2.2 a head ending in CRLF LF is refused",
        b"GET /a HTTP/1.1\r\nHost: x\r\n\n",
        [(400, "malformed")],
    ),
    (
        "9112-2.2 bare-LF request pipelined before a CRLF one: refused, nothing after",
        b"GET /a HTTP/1.1\nHost: x\n\n" + GET,
        [(400, "malformed")],
    ),
    (
        "9112-2.2 CRLF request, then a bare-LF one",
        GET + b"GET /b HTTP/1.1\nHost: x\n\n",
        [A, (400, "malformed")],
    ),
    (
        "9110-5.5 NUL in a field value",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX: a\0b\r\n\r\n",
        [(400, "header value")],
    ),
    (
        "9112-2.2 bare CR in a field value",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n",
        [(400, "malformed")],
    ),
    (
        "9112-5.2 obs-fold is refused",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
        [(400, "malformed")],
    ),
    (
        "9112-5.1 a field line without a colon",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX y\r\n\r\n",
        [(400, "header")],
    ),
    ("9112-5.1 whitespace before the colon", b"GET /a HTTP/1.1\r\nHost : x\r\n\r\n", [(400, "header")]),
    (
        "9110-8.6 5000-digit Content-Length",
        b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
        [(400, "Content-Length")],
    ),
    (
        "9110-8.6 Content-Length '²'",
        b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: \xc2\xb2\r\n\r\n",
        [(400, "Content-Length")],
    ),
    (
        "9110-8.6 two Content-Length fields",
        b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        [(400, "Content-Length")],
    ),
    (
        "9112-7.1 a chunk size of 5000 hex digits",
        CHUNKED.replace(b"5\r\nhello", b"f" * 5000 + b"\r\nhello"),
        [("body error", "malformed")],
    ),
    (
        "9112-7.1 a chunk size that is no hex number",
        CHUNKED.replace(b"5\r\nhello", b"5x\r\nhello"),
        [("body error", "malformed")],
    ),
    (
        "9112-3.2 two Host fields",
        b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        [(400, "more than one host")],
    ),
    ("9112-3.2 no Host in HTTP/1.1", b"GET /a HTTP/1.1\r\n\r\n", [(400, "without a Host")]),
    ("9110-9.1 unknown method", b"FROB /a HTTP/1.1\r\nHost: x\r\n\r\n", [(501, "not implemented")]),
    (
        "9112-3 request line with a space in the target",
        b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
        [(400, "malformed")],
    ),
    (
        "9112-3 TLS handshake bytes",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        [(501, "not implemented")],
    ),
    ("9110-15.6.6 HTTP/2.0 request line", b"GET /a HTTP/2.0\r\nHost: x\r\n\r\n", [(505, "HTTP/2.0")]),
    ("9110-6.2 HTTP/1.2 is HTTP/1.1", b"GET /a HTTP/1.2\r\nHost: x\r\n\r\n", [A]),
    (
        "9112-3 target over 8192 bytes",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        [(414, "target")],
    ),
    (
        "6585-5 more than 100 fields",
        b"GET /a HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 101 + b"\r\n",
        [(431, "header fields")],
    ),
    (
        "6585-5 a head over 64 KiB",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 70000 + b"\r\n\r\n",
        [(431, "request head")],
    ),
    (
        "6585-5 a head over 64 KiB in many fields",
        b"GET /a HTTP/1.1\r\nHost: x\r\n"
        + b"X: "
        + b"y" * 1000
        + b"\r\n" * 1
        + b"Y: "
        + b"z" * 65000
        + b"\r\n\r\n",
        [(431, "request head")],
    ),
    (
        "9112-8 closed in the middle of a head",
        b"GET /a HTTP/1.1\r\nHost:",
        [(400, "middle of a request head")],
    ),
    ("9112-8 closed in the middle of a body", PUT[:-3], [("body error", "after 8 body bytes")]),
    (
        "9110-7.8 Upgrade is served as HTTP/1.1, then the stream ends",
        b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n" + GET,
        [("GET", "/a", b"", None)],
    ),
]


@pytest.mark.parametrize("step", [65536, 1], ids=["whole", "byte by byte"])
@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parser(data: bytes, expected: list[tuple], step: int) -> None:
    if step == 1 and len(data) > 20000:
        step = 4096  # byte by byte would take long; still many pieces
    got = serve(data, step)
    assert len(got) == len(expected), got
    for seen, want in zip(got, expected, strict=True):
        if len(want) == 4:  # a request: headers checked only when given
            assert seen[:3] == want[:3]
            if want[3] is not None:
                assert seen[3] == want[3]
        else:
            assert seen[0] == want[0]
            assert want[1] in seen[1], seen


def test_refusal_reasons_hold_no_request_bytes() -> None:
    """llhttp's reasons are its own words; what a head carried never reaches a reason (nor the log)."""
    secret = b"s3cr3t-t0ken"
    heads = [
        b"GET /a?" + secret + b" x HTTP/1.1\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\nAuthorization: Basic\r\n " + secret + b"\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\nAuthorization " + secret + b"\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\nAuthorization: " + secret + b"\0\r\n\r\n",
        b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: " + secret + b"\r\n\r\n",
        b"PUT /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + secret + b"\r\n\r\n",
    ]
    for head in heads:
        outcome = serve(head)
        assert outcome and isinstance(outcome[-1][0], int), outcome
        assert secret.decode() not in outcome[-1][1]


def test_100_continue_is_sent_before_the_body_is_read() -> None:
    head = b"PUT /p HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    sock = FakeSocket(head + b"hi", len(head))  # the client sends the body only after 100 Continue
    conn = http._Connection(sock)
    message = conn.next_message()
    framing = wire.frame(message.version, message.headers)
    body = http._Body(conn, message, framing, Record("test", 0.0))
    assert sock.sent == b""
    assert body.read(10) == b"hi"
    assert sock.sent == b"HTTP/1.1 100 Continue\r\n\r\n"

"""The HTTP/1.1 rules of `nixcache.server.wire`, case by case; each case's name gives its RFC section."""

from __future__ import annotations

import pytest

from nixcache.server import wire
from nixcache.server.wire import Framing, Refusal, Response

H = {"host": "cache:5000"}

# name, version, headers, duplicate, expected Framing or (status, words of the reason)
FRAME_CASES = [
    ("9112-3.2 HTTP/1.1 with Host", (1, 1), H, None, Framing(0, True, False, False)),
    ("9112-3.2 HTTP/1.1 without Host is 400", (1, 1), {}, None, (400, "without a Host")),
    ("9112-3.2 HTTP/1.0 needs no Host", (1, 0), {}, None, Framing(0, False, False, True)),
    ("9112-3.2 two Host fields are 400", (1, 1), H, "host", (400, "more than one host")),
    ("9112-3.2 Host with a space is 400", (1, 1), {"host": "a b"}, None, (400, "Host")),
    ("9112-3.2 Host with a path is 400", (1, 1), {"host": "a/b"}, None, (400, "Host")),
    (
        "9112-3.2 Host IPv6 literal and port",
        (1, 1),
        {"host": "[::1]:5000"},
        None,
        Framing(0, True, False, False),
    ),
    ("9112-3.2 empty Host is valid", (1, 1), {"host": ""}, None, Framing(0, True, False, False)),
    ("9110-6.2 HTTP/1.2 is served as 1.1", (1, 2), H, None, Framing(0, True, False, False)),
    ("9110-15.6.6 HTTP/2.0 head is 505", (2, 0), H, None, (505, "HTTP/2.0")),
    ("9110-15.6.6 HTTP/0.9 is 505", (0, 9), {}, None, (505, "HTTP/0.9")),
    (
        "9112-9.3 HTTP/1.1 Connection: close",
        (1, 1),
        {**H, "connection": "close"},
        None,
        Framing(0, False, False, False),
    ),
    (
        "9112-9.3 Connection tokens are case-insensitive lists",
        (1, 1),
        {**H, "connection": "TE, Close"},
        None,
        Framing(0, False, False, False),
    ),
    (
        "9112-9.3 HTTP/1.0 keep-alive",
        (1, 0),
        {"connection": "Keep-Alive"},
        None,
        Framing(0, True, False, True),
    ),
    (
        "9112-9.3 HTTP/1.0 without keep-alive closes",
        (1, 0),
        {"connection": "foo"},
        None,
        Framing(0, False, False, True),
    ),
    ("9110-8.6 Content-Length", (1, 1), {**H, "content-length": "42"}, None, Framing(42, True, False, False)),
    (
        "9110-8.6 Content-Length of 19 digits",
        (1, 1),
        {**H, "content-length": "9" * 19},
        None,
        Framing(10**19 - 1, True, False, False),
    ),
    (
        "9110-8.6 Content-Length of 20 digits is 400",
        (1, 1),
        {**H, "content-length": "1" + "0" * 19},
        None,
        (400, "Content-Length"),
    ),
    (
        "9110-8.6 Content-Length of 5000 digits is 400",
        (1, 1),
        {**H, "content-length": "9" * 5000},
        None,
        (400, "Content-Length"),
    ),
    (
        "9110-8.6 Content-Length '²' is 400",
        (1, 1),
        {**H, "content-length": "\u00b2"},
        None,
        (400, "Content-Length"),
    ),
    (
        "9110-8.6 Content-Length '-1' is 400",
        (1, 1),
        {**H, "content-length": "-1"},
        None,
        (400, "Content-Length"),
    ),
    (
        "9110-8.6 Content-Length '1_0' is 400",
        (1, 1),
        {**H, "content-length": "1_0"},
        None,
        (400, "Content-Length"),
    ),
    (
        "9110-8.6 two Content-Length fields are 400",
        (1, 1),
        {**H, "content-length": "1, 1"},
        "content-length",
        (400, "content-length"),
    ),
    (
        "9112-7.1 chunked",
        (1, 1),
        {**H, "transfer-encoding": "chunked"},
        None,
        Framing(None, True, False, False),
    ),
    (
        "9112-7.1 chunked is case-insensitive",
        (1, 1),
        {**H, "transfer-encoding": "Chunked"},
        None,
        Framing(None, True, False, False),
    ),
    (
        "9112-6.1 a coding other than chunked is 400",
        (1, 1),
        {**H, "transfer-encoding": "gzip, chunked"},
        None,
        (400, "Transfer-Encoding"),
    ),
    (
        "9112-6.1 chunked not last is 400",
        (1, 1),
        {**H, "transfer-encoding": "chunked, gzip"},
        None,
        (400, "Transfer-Encoding"),
    ),
    (
        "9112-6.1 Transfer-Encoding in HTTP/1.0 is 400",
        (1, 0),
        {"transfer-encoding": "chunked"},
        None,
        (400, "HTTP/1.0"),
    ),
    (
        "9112-6.3 Content-Length beside chunked: chunked, then close",
        (1, 1),
        {**H, "transfer-encoding": "chunked", "content-length": "3"},
        None,
        Framing(None, False, False, False),
    ),
    (
        "9110-10.1.1 100-continue with a body",
        (1, 1),
        {**H, "content-length": "5", "expect": "100-Continue"},
        None,
        Framing(5, True, True, False),
    ),
    (
        "9110-10.1.1 100-continue without a body waits for nothing",
        (1, 1),
        {**H, "expect": "100-continue"},
        None,
        Framing(0, True, False, False),
    ),
    (
        "9110-10.1.1 HTTP/1.0 100-continue is ignored",
        (1, 0),
        {"content-length": "5", "expect": "100-continue"},
        None,
        Framing(5, False, False, True),
    ),
]


@pytest.mark.parametrize(
    ("version", "headers", "duplicate", "expected"),
    [c[1:] for c in FRAME_CASES],
    ids=[c[0] for c in FRAME_CASES],
)
def test_frame(version, headers, duplicate, expected) -> None:
    if isinstance(expected, Framing):
        assert wire.frame(version, headers, duplicate) == expected
    else:
        with pytest.raises(Refusal) as caught:
            wire.frame(version, headers, duplicate)
        assert caught.value.status == expected[0]
        assert expected[1] in caught.value.reason


TARGET_CASES = [
    ("9112-3.2.1 origin-form", "/nix-cache-info", ("/nix-cache-info", "")),
    ("9112-3.2.1 origin-form with a query", "/x.narinfo?token=abc", ("/x.narinfo", "token=abc")),
    ("9112-3.2.2 absolute-form", "http://cache:5000/nix-cache-info", ("/nix-cache-info", "")),
    ("9112-3.2.2 absolute-form, scheme case-insensitive", "HTTP://cache/a?b", ("/a", "b")),
    ("9112-3.2.2 absolute-form without a path is /", "http://cache:5000", ("/", "")),
    ("9112-3.2.2 absolute-form userinfo is dropped", "http://u:secret@cache/a", ("/a", "")),
    ("3986-2.1 percent-decoded path", "/nar/..%2Fetc", ("/nar/../etc", "")),
    ("3986-2.1 %0A decodes to a newline", "/abc.narinfo%0A", ("/abc.narinfo\n", "")),
    ("9110-4.2.5 a fragment is dropped", "/a#frag", ("/a", "")),
]


@pytest.mark.parametrize(
    ("target", "expected"), [c[1:] for c in TARGET_CASES], ids=[c[0] for c in TARGET_CASES]
)
def test_split_target(target: str, expected: tuple[str, str]) -> None:
    assert wire.split_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("*", id="9112-3.2.4 asterisk-form is not served"),
        pytest.param("cache:5000", id="9112-3.2.3 authority-form is for CONNECT"),
        pytest.param("ftp://cache/a", id="9112-3.2.2 absolute-form of another scheme"),
    ],
)
def test_split_target_refuses(target: str) -> None:
    with pytest.raises(Refusal) as caught:
        wire.split_target(target)
    assert caught.value.status == 400


SIZE = 1000
RANGE_CASES = [
    ("9110-14.2 no Range: whole file", None, None),
    ("9110-14.1.2 first-last", "bytes=10-99", (10, 90)),
    ("9110-14.1.2 open end", "bytes=100-", (100, 900)),
    ("9110-14.1.2 suffix", "bytes=-16", (984, 16)),
    ("9110-14.1.2 suffix longer than the file is the file", "bytes=-5000", None),
    ("9110-14.1.2 last-pos past the end is clipped", "bytes=5-99999", (5, 995)),
    ("9110-14.1.2 the whole file as a range is a 200", "bytes=0-999", None),
    ("9110-14.1.1 unit is case-insensitive", "Bytes=1-1", (1, 1)),
    ("9110-14.2 several ranges may be ignored", "bytes=0-1,5-6", None),
    ("9110-14.2 another unit is ignored", "items=0-1", None),
    ("9110-14.2 an invalid range may be ignored", "bytes=a-b", None),
    ("9110-14.1.2 'bytes=-' is no range", "bytes=-", None),
    ("9110-14.1.2 19-digit last-pos is clipped", "bytes=0-" + "9" * 19, None),
]


@pytest.mark.parametrize(
    ("header", "expected"), [c[1:] for c in RANGE_CASES], ids=[c[0] for c in RANGE_CASES]
)
def test_parse_range(header: str | None, expected) -> None:
    assert wire.parse_range(header, SIZE) == expected


@pytest.mark.parametrize(
    ("header", "words"),
    [
        pytest.param(f"bytes={SIZE}-", "not satisfiable", id="9110-15.5.17 first-pos at the end"),
        pytest.param("bytes=500-400", "not satisfiable", id="9110-14.1.1 last before first"),
        pytest.param("bytes=-0", "0 bytes", id="9110-14.1.2 empty suffix"),
        pytest.param("bytes=" + "9" * 5000 + "-", "digits", id="9110-14.1.2 5000-digit first-pos"),
        pytest.param("bytes=0-" + "9" * 5000, "digits", id="9110-14.1.2 5000-digit last-pos"),
        pytest.param("bytes=-" + "9" * 20, "digits", id="9110-14.1.2 20-digit suffix"),
    ],
)
def test_parse_range_unsatisfiable(header: str, words: str) -> None:
    with pytest.raises(Refusal) as caught:
        wire.parse_range(header, SIZE)
    assert caught.value.status == 416
    assert words in caught.value.reason
    assert ("Content-Range", f"bytes */{SIZE}") in caught.value.headers  # RFC 9110 14.4


KEEP = Framing(10, True, False, False)
AFTER_CASES = [
    ("9112-9.3 persistent connection, body read", KEEP, False, 0, "keep"),
    ("9112-9.3 Connection: close", Framing(0, False, False, False), False, 0, "close"),
    ("9112-9.3 small unread body is drained", KEEP, False, 10, "drain"),
    ("9112-9.3 large unread body closes", Framing(10**9, True, False, False), False, 10**9, "close"),
    ("9112-7.1 unfinished chunked body closes", Framing(None, True, False, False), False, None, "close"),
    ("9110-10.1.1 refused before 100 Continue closes", Framing(10, True, True, False), False, 10, "close"),
    (
        "9110-10.1.1 after 100 Continue a small rest is drained",
        Framing(10, True, True, False),
        True,
        10,
        "drain",
    ),
]


@pytest.mark.parametrize(
    ("framing", "sent", "left", "expected"), [c[1:] for c in AFTER_CASES], ids=[c[0] for c in AFTER_CASES]
)
def test_after_response(framing: Framing, sent: bool, left: int | None, expected: str) -> None:
    assert wire.after_response(framing, continue_sent=sent, body_left=left, drain_limit=64 * 1024) == expected


DATE = b"Date: Tue, 01 Dec 2026 18:00:00 GMT\r\n"
HEAD_CASES = [
    (
        "9112-4 status line and Content-Length",
        Response(200, b"abc", "text/x-nix-narinfo"),
        True,
        False,
        b"HTTP/1.1 200 OK\r\nContent-Type: text/x-nix-narinfo\r\nContent-Length: 3\r\n" + DATE + b"\r\n",
    ),
    (
        "9110-8.6 no Content-Length on 204",
        Response(204, b"", None),
        True,
        False,
        b"HTTP/1.1 204 No Content\r\n" + DATE + b"\r\n",
    ),
    (
        "9112-9.3 HTTP/1.0 kept: Connection: keep-alive",
        Response(200, b"", None),
        True,
        True,
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n" + DATE + b"\r\n",
    ),
    (
        "9112-9.6 closing: Connection: close",
        Response(404, b"x\n"),
        False,
        False,
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
        b"Content-Length: 2\r\n" + DATE + b"\r\n",
    ),
    (
        "9110-15.5.6 405 with Allow",
        Response(405, b"", None, [("Allow", "GET, HEAD")]),
        True,
        False,
        b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\nContent-Length: 0\r\n" + DATE + b"\r\n",
    ),
    (
        "9110-15.5.14 413 is Content Too Large",
        Response(413, b"", None),
        True,
        False,
        b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n" + DATE + b"\r\n",
    ),
]


@pytest.mark.parametrize(
    ("response", "keep", "http10", "expected"), [c[1:] for c in HEAD_CASES], ids=[c[0] for c in HEAD_CASES]
)
def test_response_head(response: Response, keep: bool, http10: bool, expected: bytes) -> None:
    for _ in range(2):  # the second call comes from the cache of heads
        assert wire.response_head(response, keep_alive=keep, http10=http10, date=DATE) == expected


@pytest.mark.parametrize("value", ["a\r\nSet-Cookie: x", "a\nb", "a\0b"], ids=["CRLF", "LF", "NUL"])
def test_response_head_refuses_field_injection(value: str) -> None:
    """RFC 9110 5.5: CR, LF and NUL are never valid in a field value; a server bug, not a header."""
    with pytest.raises(ValueError):
        wire.response_head(Response(200, headers=[("X", value)]), keep_alive=True, http10=False, date=DATE)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("0", True),
        ("9" * 19, True),
        ("9" * 20, False),
        ("9" * 5000, False),
        ("", False),
        ("\u00b2", False),
        (" 1", False),
        ("1_0", False),
        ("+1", False),
        ("\u0661", False),
    ],
    ids=[
        "zero",
        "19 digits",
        "20 digits",
        "5000 digits",
        "empty",
        "superscript two",
        "space",
        "underscore",
        "plus",
        "arabic-indic one",
    ],
)
def test_bounded_int(text: str, ok: bool) -> None:
    if ok:
        assert wire.bounded_int(text, "X") == int(text)
    else:
        with pytest.raises(Refusal, match="X is not a number of at most 19 digits"):
            wire.bounded_int(text, "X")

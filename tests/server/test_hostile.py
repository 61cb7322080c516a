"""Hostile and careless requests against a running server: each gets a clean answer, the server's
log stays free of tracebacks and of anything a request carried. Names give the RFC section or
the failure class of issue 11 that each case covers."""

from __future__ import annotations

import base64
import hashlib
import json
import lzma
import os
import socket
import time
from collections.abc import Callable

import pytest

from nixcache.server import base32
from server.conftest import Cache, StartCache
from server.helpers import make_entry, push

Response = tuple[bytes, dict[bytes, bytes], bytes]


def _connect(cache: Cache) -> socket.socket:
    host, port = cache.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def exchange(cache: Cache, data: bytes, *, head: bool = False) -> list[Response]:
    """Send `data`, end our side, and read every response until the server closes."""
    return split_responses(exchange_bytes(cache, data), head=head)


def exchange_bytes(cache: Cache, data: bytes) -> bytes:
    """Send `data`, end our side, and return every byte the server sends until it closes."""
    with _connect(cache) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def split_responses(data: bytes, *, head: bool = False) -> list[Response]:
    out = []
    while data:
        end = data.index(b"\r\n\r\n")
        lines = data[:end].split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head else int(headers.get(b"content-length", b"0"))
        body, data = data[end + 4 : end + 4 + length], data[end + 4 + length :]
        out.append((lines[0], headers, body))
    return out


def log_lines(cache: Cache, until: Callable[[list[dict]], bool] = bool, timeout: float = 5) -> list[dict]:
    """The server's JSON request lines, once `until(lines)` holds (they are written in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in cache.server.log_lines() if line.startswith("{")]
        if until(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def flushed_log(cache: Cache) -> str:
    """The whole server log, after a marker request's line was written (so all before it are)."""
    cache.client.get("/healthz?marker")
    log_lines(cache, lambda lines: any(line["path"] == "/healthz" for line in lines))
    return cache.server.log.read_text()


def basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"nix:{token}".encode()).decode()


# -- numbers --------------------------------------------------------------------------------------


def test_long_numbers_are_refused_naming_the_field(cache: Cache) -> None:
    entry = make_entry(bytes(range(256)) * 16, compression="none")
    push(cache.client, entry, cache.token)
    nar = f"/nar/{entry.nar_file}"
    digits = "9" * 5000
    name = base32.encode(bytes(32)) + ".nar"

    (status, _, body), = exchange(
        cache, f"PUT /nar/{name} HTTP/1.1\r\nHost: x\r\nContent-Length: {digits}\r\n\r\n".encode()
    )  # fmt: skip
    assert status.startswith(b"HTTP/1.1 400") and b"Content-Length" in body

    for header in (f"bytes={digits}-", f"bytes=0-{digits}", f"bytes=-{digits}"):
        response = cache.client.get(nar, headers={"Range": header})
        assert response.status_code == 416 and "Range" in response.text, header
        assert response.headers["content-range"] == f"bytes */{len(entry.file_bytes)}"

    other = make_entry()
    cache.client.put(f"/nar/{other.nar_file}", content=other.file_bytes, auth=cache.auth)
    for field in ("NarSize", "FileSize"):
        text = other.narinfo(**{field: digits})
        response = cache.client.put(f"/{other.hash_part}.narinfo", content=text, auth=cache.auth)
        assert response.status_code == 400 and field in response.text, response.text

    chunked = (
        f"PUT /nar/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(cache.token)}\r\n"
        f"Transfer-Encoding: chunked\r\n\r\n{'f' * 5000}\r\nxx\r\n0\r\n\r\n"
    )
    (status, _, body), = exchange(cache, chunked.encode())  # fmt: skip
    assert status.startswith(b"HTTP/1.1 400") and b"malformed" in body
    assert "Traceback" not in flushed_log(cache)
    assert sorted(p.name for p in (cache.store / "nar").iterdir()) == sorted([entry.nar_file, other.nar_file])


# -- names ----------------------------------------------------------------------------------------


def test_names_with_a_final_newline_are_not_names(cache: Cache) -> None:
    entry = make_entry()
    response = cache.client.put(f"/nar/{entry.nar_file}%0A", content=entry.file_bytes, auth=cache.auth)
    assert response.status_code == 400, response.text
    assert list((cache.store / "nar").iterdir()) == []
    assert list((cache.store / "nar-meta").iterdir()) == []
    push(cache.client, entry, cache.token)
    assert cache.client.get(f"/{entry.hash_part}.narinfo").status_code == 200
    for suffix in ("%0A", "%0D%0A", "%00"):
        response = cache.client.get(f"/{entry.hash_part}.narinfo{suffix}")
        assert response.status_code == 400, suffix
        response = cache.client.put(
            f"/{entry.hash_part}.narinfo{suffix}", content=entry.narinfo(), auth=cache.auth
        )
        assert response.status_code == 400, suffix
    assert sorted(p.name for p in (cache.store / "narinfo").iterdir()) == [f"{entry.hash_part}.narinfo"]


# -- RFC 9110/9112 server requirements ---------------------------------------------------------------

INFO = b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n"


def _statuses(responses: list[Response]) -> list[bytes]:
    return [status.split(b" ")[1] for status, _, _ in responses]


# name, request bytes, expected statuses, check of the responses
RFC_CASES = [
    ("9112-3.2 HTTP/1.1 without Host is 400", b"GET /nix-cache-info HTTP/1.1\r\n\r\n", [b"400"], None),
    (
        "9112-3.2 two Host fields are 400",
        b"GET /nix-cache-info HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        [b"400"],
        None,
    ),
    ("9112-3.2 an invalid Host is 400", b"GET /nix-cache-info HTTP/1.1\r\nHost: a b\r\n\r\n", [b"400"], None),
    ("9112-3.2 HTTP/1.0 needs no Host", b"GET /nix-cache-info HTTP/1.0\r\n\r\n", [b"200"], None),
    (
        "9112-3.2.2 absolute-form is accepted",
        b"GET http://x:1/nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n",
        [b"200"],
        lambda r: r[0][2].startswith(b"StoreDir: /nix/store\n"),
    ),
    (
        "9112-6.1 Transfer-Encoding in HTTP/1.0 is 400, then close",
        b"GET /nix-cache-info HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"0\r\n\r\n"
        + INFO,
        [b"400"],
        lambda r: r[0][1][b"connection"] == b"close",
    ),
    (
        "9110-5.5 NUL in a field value is 400",
        b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX: a\0b\r\n\r\n",
        [b"400"],
        None,
    ),
    (
        "9112-2.2 bare CR in a field value is 400",
        b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n",
        [b"400"],
        None,
    ),
    ("9112-2.2 a bare-LF head is 400", b"GET /nix-cache-info HTTP/1.1\nHost: x\n\n", [b"400"], None),
    (
        "9112-2.2 a head ending in CRLF LF is 400",
        b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\n",
        [b"400"],
        None,
    ),
    (
        "9112-2.2 bare LF pipelined before CRLF: one 400, then close",
        b"GET /nix-cache-info HTTP/1.1\nHost: x\n\n" + INFO,
        [b"400"],
        lambda r: r[0][1][b"connection"] == b"close",
    ),
    (
        "9112-2.2 CRLF pipelined before bare LF: 200, then 400",
        INFO + b"GET /nix-cache-info HTTP/1.1\nHost: x\n\n",
        [b"200", b"400"],
        None,
    ),
    (
        "9112-5.2 obs-fold is 400",
        b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
        [b"400"],
        None,
    ),
    (
        "9112-9.3 HTTP/1.0 keep-alive is confirmed and kept",
        b"GET /nix-cache-info HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" * 2,
        [b"200", b"200"],
        lambda r: all(h[b"connection"] == b"keep-alive" for _, h, _ in r),
    ),
    (
        "9112-9.3 HTTP/1.0 without keep-alive closes",
        b"GET /nix-cache-info HTTP/1.0\r\n\r\n" * 2,
        [b"200"],
        lambda r: r[0][1][b"connection"] == b"close",
    ),
    (
        "9112-9.3.2 pipelined requests are answered in order",
        INFO + b"GET /pubkey HTTP/1.1\r\nHost: x\r\n\r\n" + INFO,
        [b"200", b"200", b"200"],
        lambda r: r[0][2] == r[2][2] != r[1][2],
    ),
    ("9110-15.6.6 HTTP/2.0 is 505", b"GET /nix-cache-info HTTP/2.0\r\nHost: x\r\n\r\n", [b"505"], None),
    (
        "9110-6.2 HTTP/1.2 is served as HTTP/1.1",
        b"GET /nix-cache-info HTTP/1.2\r\nHost: x\r\n\r\n",
        [b"200"],
        None,
    ),
    (
        "9110-9.1 an unknown method is 501",
        b"FROB /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n",
        [b"501"],
        None,
    ),
    (
        "9110-15.5.6 405 names the allowed methods",
        b"DELETE /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n",
        [b"405"],
        lambda r: r[0][1][b"allow"] == b"GET, HEAD, PUT",
    ),
    (
        "9110-7.8 Upgrade is ignored: HTTP/1.1 answer, then close",
        b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n" + INFO,
        [b"200"],
        lambda r: r[0][1][b"connection"] == b"close",
    ),
    (
        "9112-3 a target over 8 KiB is 414",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        [b"414"],
        None,
    ),
    (
        "6585-5 a head over 64 KiB is 431",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
        [b"431"],
        None,
    ),
    ("9110-6.6.1 every answer has a Date", INFO, [b"200"], lambda r: r[0][1][b"date"].endswith(b" GMT")),
]


@pytest.mark.parametrize(
    ("data", "statuses", "check"), [c[1:] for c in RFC_CASES], ids=[c[0] for c in RFC_CASES]
)
def test_rfc_server_requirements(cache: Cache, data: bytes, statuses: list[bytes], check) -> None:
    responses = exchange(cache, data)
    assert _statuses(responses) == statuses, responses
    assert check is None or check(responses), responses


def test_head_has_the_get_length_and_no_body(cache: Cache) -> None:
    """RFC 9110 9.3.2: HEAD gets the same fields as GET, without content."""
    entry = make_entry(os.urandom(5000), compression="none")
    push(cache.client, entry, cache.token)
    for path in (f"/nar/{entry.nar_file}", f"/{entry.hash_part}.narinfo", "/nix-cache-info"):
        get = cache.client.get(path)
        ((status, headers, _),) = exchange(
            cache, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), head=True
        )
        assert status.startswith(b"HTTP/1.1 200")
        assert headers[b"content-length"] == str(len(get.content)).encode()
    # the answer after a HEAD starts right after its head: no body bytes were sent
    data = f"HEAD /nar/{entry.nar_file} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + INFO
    received = exchange_bytes(cache, data)
    first_end = received.index(b"\r\n\r\n") + 4
    assert received[first_end:].startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/x-nix-cache-info")


def test_204_has_no_content_length(cache: Cache) -> None:
    """RFC 9110 8.6: a server MUST NOT send Content-Length in a 204."""
    request = (
        f"PUT /nix-cache-info HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(cache.token)}\r\n"
        "Content-Length: 2\r\n\r\nhi"
    )
    ((status, headers, _),) = exchange(cache, request.encode())
    assert status.startswith(b"HTTP/1.1 204")
    assert b"content-length" not in headers


def test_no_100_continue_for_http_1_0(cache: Cache) -> None:
    """RFC 9110 10.1.1: a server MUST ignore a 100-continue expectation in an HTTP/1.0 request."""
    entry = make_entry(compression="none")
    request = (
        f"PUT /nar/{entry.nar_file} HTTP/1.0\r\nAuthorization: {basic(cache.token)}\r\n"
        f"Expect: 100-continue\r\nContent-Length: {len(entry.file_bytes)}\r\n\r\n"
    ).encode() + entry.file_bytes
    received = exchange_bytes(cache, request)
    assert received.startswith(b"HTTP/1.1 201"), received
    assert b"100 Continue" not in received


# -- handled errors: no tracebacks -------------------------------------------------------------------


def _refused_nars() -> list[tuple[str, bytes]]:
    nar = make_entry(os.urandom(4096), compression="none").file_bytes
    xz = lzma.compress(nar)
    return [
        ("bad xz", b"this is not xz at all"),
        ("truncated xz", xz[: len(xz) // 2]),
        ("xz of something that is not a NAR", lzma.compress(b"plain text, no nix-archive-1 header")),
    ]


def test_refused_compressed_nars_log_one_line_and_no_traceback(cache: Cache) -> None:
    for what, data in _refused_nars():
        name = base32.encode(hashlib.sha256(data).digest()) + ".nar.xz"
        response = cache.client.put(f"/nar/{name}", content=data, auth=cache.auth)
        assert response.status_code == 400, (what, response.text)
    log = flushed_log(cache)
    assert "Traceback" not in log
    lines = [line for line in log_lines(cache) if line["route"] == "nar" and line["method"] == "PUT"]
    assert [line["status"] for line in lines] == [400, 400, 400]
    assert all(line["reason"].startswith("nar/") and line["received"] > 0 for line in lines)


# -- the log ----------------------------------------------------------------------------------------


def test_no_token_sent_anywhere_in_a_request_reaches_the_log(start_cache: StartCache) -> None:
    cache = start_cache(read_token=True)
    tokens = [cache.token, cache.read_token]
    leaks = []
    for token in tokens:
        for request in (
            f"GET /nix-cache-info?token={token} HTTP/1.1\r\nHost: x\r\n\r\n",  # a token in the query
            f"GET /nix-cache-info?token={token} HTTP/1.1 junk\r\nHost: x\r\n\r\n",  # bad request line
            f"GET /nix-cache-info {token}\r\n\r\n",  # bad request line, no version
            f"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nAuthorization: Basic\r\n {token}\r\n\r\n",  # folded
            f"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nAuthorization Bearer {token}\r\n\r\n",  # no colon
            f"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\0\r\n\r\n",  # NUL
            f"GET /nix-cache-info HTTP/1.1\r\nHost: {token} x\r\n\r\n",  # bad Host
            f"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nRange: {token}\r\n\r\n",
            f"PUT /nix-cache-info HTTP/1.1\r\nHost: x\r\nContent-Length: {token}\r\n\r\n",
            f"PUT /nix-cache-info HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {token}\r\n\r\n",
            f"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong{token}\r\n\r\n",
            f"{token} /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n",  # the token as the method
            f"GET http://nix:{token}@x/nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n",  # userinfo
        ):
            leaks.append(exchange(cache, request.encode()))
    log = flushed_log(cache)
    assert len(log_lines(cache)) >= 2 * 13  # every request was answered and logged
    for token in tokens:
        assert token not in log


def test_a_broken_upload_logs_the_bytes_received(cache: Cache) -> None:
    name = base32.encode(bytes(32)) + ".nar"
    with _connect(cache) as sock:
        sock.sendall(
            f"PUT /nar/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(cache.token)}\r\n"
            f"Content-Length: 1000000\r\n\r\n".encode()
            + bytes(100_000)
        )
        time.sleep(0.2)
    lines = log_lines(cache, lambda lines: any(line["route"] == "nar" for line in lines))
    (line,) = [line for line in lines if line["route"] == "nar"]
    assert (line["status"], line["received"]) == (400, 100_000)
    assert "interrupted" in line["reason"]
    assert list((cache.store / "tmp").iterdir()) == []


def test_a_broken_download_logs_the_bytes_sent(cache: Cache) -> None:
    entry = make_entry(os.urandom(32 << 20), compression="none")
    push(cache.client, entry, cache.token)
    with _connect(cache) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(f"GET /nar/{entry.nar_file} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(0.2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close with RST
    lines = log_lines(
        cache, lambda lines: any(line["route"] == "nar" and line["method"] == "GET" for line in lines)
    )
    (line,) = [line for line in lines if line["route"] == "nar" and line["method"] == "GET"]
    assert line["aborted"] is True
    assert 0 < line["bytes"] < len(entry.file_bytes)


def test_the_narinfo_fast_path_answers_as_the_route_table_does(cache: Cache) -> None:
    """A plain narinfo GET takes the HTTP layer's fast path; with more fields it takes the route
    table's: hit, miss and refusal must look the same either way (Date aside)."""
    entry = make_entry()
    push(cache.client, entry, cache.token)
    extra = "Accept: */*\r\nUser-Agent: t\r\nX-One: 1\r\nX-Two: 2\r\nX-Three: 3\r\n"
    for path in (f"/{entry.hash_part}.narinfo", f"/{base32.encode(bytes(20))}.narinfo"):
        fast = exchange(cache, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        general = exchange(cache, f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        for (status, headers, body), (status2, headers2, body2) in zip(fast, general, strict=True):
            headers.pop(b"date"), headers2.pop(b"date")
            assert (status, headers, body) == (status2, headers2, body2)
    lines = log_lines(cache, lambda lines: len([line for line in lines if line["method"] == "GET"]) >= 4)
    gets = [(line["route"], line["status"], line.get("reason")) for line in lines if line["method"] == "GET"]
    assert gets[0] == gets[1] and gets[2] == gets[3], gets

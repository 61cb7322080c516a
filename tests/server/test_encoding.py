"""zstd Content-Encoding of NAR downloads (nixcache.server.encoding), as clients see it.

What a current client sends and does follows Nix 2.3x's src/libstore/filetransfer.cc: a fresh
download sets CURLOPT_ACCEPT_ENCODING "" (libcurl then sends `Accept-Encoding: deflate, gzip,
br, zstd`, as curl --compressed does), and a retry resumes with Range, without Accept-Encoding,
only when the answer had `Accept-Ranges: bytes` and no Content-Encoding. Debian's Nix 2.8
(the same file at 2.8.1) sends no Accept-Encoding: it must get exactly the bytes of before.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import httpx
import pytest
import zstandard
from conftest import require

from nixcache.server import wire
from nixcache.server.encoding import accepts
from server.conftest import Cache, StartCache
from server.helpers import make_entry, push

CURL_ENCODINGS = "deflate, gzip, br, zstd"  # what libcurl 7.88 (Debian 12) sends for ""
CONTENTS = b"".join(b"line %d of a build output that repeats a lot\n" % i for i in range(60000))


def _nar(cache: Cache, compression: str = "none"):
    entry = make_entry(CONTENTS, compression)
    push(cache.client, entry, cache.token)
    return entry


def _raw_get(
    cache: Cache, path: str, *fields: str, version: str = "1.1"
) -> tuple[bytes, dict[str, str], bytes]:
    """Status line, header fields and body bytes of one request sent exactly as given (no
    Accept-Encoding unless in `fields`), read until the server closes."""
    host, port = cache.url.removeprefix("http://").split(":")
    head = f"GET {path} HTTP/{version}\r\nHost: {host}\r\n" + "".join(f"{f}\r\n" for f in fields)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"{head}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    status, *lines = top.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def _encoded(cache: Cache, path: str, accept: str = CURL_ENCODINGS) -> tuple[httpx.Response, bytes]:
    """The answer and its body as sent (de-chunked, not decoded)."""
    with cache.client.stream("GET", path, headers={"Accept-Encoding": accept}) as response:
        return response, b"".join(response.iter_raw())


def test_a_client_accepting_zstd_gets_the_nar_encoded(cache: Cache) -> None:
    entry = _nar(cache)
    response, sent = _encoded(cache, f"/nar/{entry.nar_file}")
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "zstd"
    assert response.headers["vary"] == "Accept-Encoding"
    assert response.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.headers
    # No Accept-Ranges: a client never tries to resume what it cannot resume (Nix checks both).
    assert "accept-ranges" not in response.headers
    assert response.headers["content-type"] == "application/x-nix-nar"
    assert zstandard.ZstdDecompressor().decompress(sent) == entry.nar
    assert len(sent) < len(entry.nar) // 10  # it is compressed, not just framed
    # The frame pledges the NAR's size (a decoder can size its buffer) and carries a checksum.
    params = zstandard.get_frame_parameters(sent)
    assert params.content_size == len(entry.nar) and params.has_checksum


def test_a_client_that_asks_for_no_encoding_gets_todays_bytes(cache: Cache) -> None:
    entry = _nar(cache)
    for fields in [
        (),
        ("Accept-Encoding: identity",),
        ("Accept-Encoding: gzip, br",),
        ("Accept-Encoding: zstd;q=0",),
    ]:
        status, headers, body = _raw_get(cache, f"/nar/{entry.nar_file}", *fields)
        assert status == b"HTTP/1.1 200 OK", fields
        assert body == entry.nar, fields
        assert headers["content-length"] == str(len(entry.nar)), fields
        assert headers["accept-ranges"] == "bytes", fields
        assert "content-encoding" not in headers and "transfer-encoding" not in headers, fields
        assert headers["vary"] == "Accept-Encoding", fields  # the answer depends on the field


def test_a_range_request_is_answered_byte_exact_even_when_zstd_is_accepted(cache: Cache) -> None:
    entry = _nar(cache)
    size = len(entry.nar)
    status, headers, body = _raw_get(
        cache, f"/nar/{entry.nar_file}", "Range: bytes=1000-", f"Accept-Encoding: {CURL_ENCODINGS}"
    )
    assert status == b"HTTP/1.1 206 Partial Content"
    assert body == entry.nar[1000:]
    assert headers["content-range"] == f"bytes 1000-{size - 1}/{size}"
    assert headers["content-length"] == str(size - 1000)
    assert "content-encoding" not in headers


def test_head_keeps_its_content_length(cache: Cache) -> None:
    """A pusher HEADs a NAR before uploading it; the answer is the identity one."""
    entry = _nar(cache)
    head = cache.client.head(f"/nar/{entry.nar_file}", headers={"Accept-Encoding": CURL_ENCODINGS})
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(entry.nar))
    assert "content-encoding" not in head.headers


@pytest.mark.parametrize("compression", ["xz", "zstd", "bzip2"])
def test_a_compressed_nar_is_never_encoded(cache: Cache, compression: str) -> None:
    entry = _nar(cache, compression)
    response, sent = _encoded(cache, f"/nar/{entry.nar_file}")
    assert response.status_code == 200
    assert "content-encoding" not in response.headers and "vary" not in response.headers
    assert response.headers["content-length"] == str(len(entry.file_bytes))
    assert sent == entry.file_bytes


def test_download_compression_none_never_encodes(start_cache: StartCache, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('download_compression = "none"\n')
    cache = start_cache("--config", str(config))
    entry = _nar(cache)
    response, sent = _encoded(cache, f"/nar/{entry.nar_file}")
    assert response.status_code == 200
    assert "content-encoding" not in response.headers and "vary" not in response.headers
    assert response.headers["accept-ranges"] == "bytes"
    assert sent == entry.nar


def test_a_bad_download_compression_is_refused_at_startup(tmp_path: Path) -> None:
    from nixcache.server.config import ConfigError, load

    config = tmp_path / "config.toml"
    config.write_text('download_compression = "gzip"\n')
    with pytest.raises(ConfigError, match=r"download_compression.*give none or zstd"):
        load(config)
    config.write_text("download_compression_level = 30\n")
    with pytest.raises(ConfigError, match=r"download_compression_level.*1 to 19"):
        load(config)


def test_curl_compressed_decodes_to_the_nar_on_one_kept_connection(cache: Cache, tmp_path: Path) -> None:
    """libcurl's own decoder, as Nix uses it (CURLOPT_ACCEPT_ENCODING ""); two NARs over one
    keep-alive connection, so each chunked body ended exactly where it should."""
    features = subprocess.run(["curl", "-V"], capture_output=True, text=True, check=True).stdout
    require("zstd" in features.lower(), "this curl's libcurl has no zstd decoder")
    entry = _nar(cache)
    argv = ["curl", "-sS", "--fail", "--compressed"]
    for name in ("first", "second"):
        argv += [
            "-o",
            str(tmp_path / name),
            "-w",
            r"%{size_download} %header{content-encoding} %{num_connects}\n",
        ]
        argv.append(f"{cache.url}/nar/{entry.nar_file}")
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    (sent, coding, first_connects), (_, _, second_connects) = (
        line.split() for line in done.stdout.splitlines()
    )
    assert coding == "zstd" and int(sent) < len(entry.nar)
    assert (first_connects, second_connects) == ("1", "0")  # the second reused the connection
    assert (tmp_path / "first").read_bytes() == (tmp_path / "second").read_bytes() == entry.nar


def test_http10_gets_the_encoded_body_ended_by_the_close(cache: Cache) -> None:
    """HTTP/1.0 has no chunked framing (RFC 9112 6.1): the close ends the body."""
    entry = _nar(cache)
    status, headers, body = _raw_get(cache, f"/nar/{entry.nar_file}", "Accept-Encoding: zstd", version="1.0")
    assert status == b"HTTP/1.1 200 OK"
    assert headers["content-encoding"] == "zstd" and headers["connection"] == "close"
    assert "transfer-encoding" not in headers and "content-length" not in headers
    assert zstandard.ZstdDecompressor().decompress(body) == entry.nar


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (None, False),
        ("", False),
        ("zstd", True),
        ("deflate, gzip, br, zstd", True),
        ("ZSTD", True),  # RFC 9110 8.4.1: codings are case-insensitive
        ("gzip, br", False),
        ("zstd;q=0", False),
        ("zstd; q=0.000", False),
        ("zstd;q=0.5, gzip;q=1", True),
        ("*", True),  # RFC 9110 12.5.3: any coding not listed
        ("*;q=0", False),
        ("zstd;q=0, *", False),  # named explicitly: the wildcard does not override it
        ("identity", False),
        ("zstd;q=bogus", False),
    ],
)
def test_accepts(field: str | None, expected: bool) -> None:
    assert accepts(field) is expected


@pytest.mark.parametrize(
    ("http10", "tail"),
    [
        (False, "Content-Encoding: zstd\r\nTransfer-Encoding: chunked\r\nDate: x\r\n\r\n"),
        (True, "Content-Encoding: zstd\r\nConnection: close\r\nDate: x\r\n\r\n"),
    ],
)
def test_a_body_of_unknown_length_has_no_content_length(http10: bool, tail: str) -> None:
    """RFC 9112 6.1, 6.3: chunked in HTTP/1.1; HTTP/1.0 has no chunked, the close ends the body."""
    body = wire.ChunkedBody(iter([b"x"]), lambda: None)
    response = wire.Response(200, body, "application/x-nix-nar", [("Content-Encoding", "zstd")])
    head = wire.response_head(response, keep_alive=not http10, http10=http10, date=b"Date: x\r\n").decode()
    assert "Content-Length" not in head
    assert head.endswith(tail)

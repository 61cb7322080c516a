"""The HTTP protocol as clients see it: reads, pushes, signatures, Range, and every bad input."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

import httpx
import pytest

from nixcache.server import base32, narinfo
from server.conftest import Cache, StartCache
from server.helpers import make_entry, nar_string, push, random_hash, start_server, write_key


def test_cache_info_pubkey_and_healthz(cache: Cache) -> None:
    info = cache.client.get("/nix-cache-info")
    assert info.status_code == 200
    assert info.headers["content-type"] == "text/x-nix-cache-info"
    assert info.text == "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"
    assert cache.client.get("/pubkey").text == f"{cache.key.public()}\n"
    health = cache.client.get("/healthz")
    assert (health.status_code, health.text) == (200, "ok\n")


@pytest.mark.parametrize("compression", ["none", "xz", "zstd", "bzip2"])
def test_push_then_fetch_is_signed_and_byte_identical(cache: Cache, compression: str) -> None:
    ref = make_entry(b"dependency", compression)
    push(cache.client, ref, cache.token)
    entry = make_entry(b"hello world" * 1000, compression, references=[ref.store_path.rsplit("/", 1)[1]])
    push(cache.client, entry, cache.token)

    response = cache.client.get(f"/{entry.hash_part}.narinfo")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/x-nix-narinfo"
    served = narinfo.parse(response.text)
    assert served.store_path == entry.store_path
    assert served.compression == compression
    sigs = [line for line in response.text.splitlines() if line.startswith("Sig: ")]
    assert len(sigs) == 1
    message = served.fingerprint("/nix/store")
    assert message == (
        f"1;{entry.store_path};{served.nar_hash};{len(entry.nar)};/nix/store/{entry.references[0]}".encode()
    )
    assert cache.key.public().verify(sigs[0][len("Sig: ") :], message)

    nar = cache.client.get(f"/{served.url}", headers={"Accept-Encoding": "identity"})  # as Nix 2.8 asks
    assert nar.status_code == 200
    assert nar.headers["content-type"] == "application/x-nix-nar"
    assert nar.headers["accept-ranges"] == "bytes"
    assert nar.content == entry.file_bytes
    head = cache.client.head(f"/{served.url}")
    assert head.status_code == 200 and head.headers["content-length"] == str(len(entry.file_bytes))


def test_uploaded_signatures_are_kept_and_every_key_signs(start_cache: StartCache, tmp_path: Path) -> None:
    second_file, second = write_key(tmp_path, "second-key-1")
    cache = start_cache("--signing-key", str(second_file))
    entry = make_entry()
    cache.client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes, auth=cache.auth)
    upstream = "cache.example.org-1:" + "A" * 86 + "=="
    text = entry.narinfo() + f"Sig: {upstream}\n"
    assert cache.client.put(f"/{entry.hash_part}.narinfo", content=text, auth=cache.auth).status_code == 201
    served = cache.client.get(f"/{entry.hash_part}.narinfo").text
    sigs = [line[len("Sig: ") :] for line in served.splitlines() if line.startswith("Sig: ")]
    assert sigs[0] == upstream
    message = narinfo.parse(served).fingerprint("/nix/store")
    assert cache.key.public().verify(sigs[1], message)
    assert second.public().verify(sigs[2], message)
    assert cache.client.get("/pubkey").text.splitlines() == [str(cache.key.public()), str(second.public())]


def test_unknown_paths_are_404_not_500(cache: Cache) -> None:
    missing = base32.encode(bytes(20))
    assert cache.client.get(f"/{missing}.narinfo").status_code == 404
    assert cache.client.head(f"/{missing}.narinfo").status_code == 404
    assert cache.client.get(f"/nar/{base32.encode(bytes(32))}.nar.xz").status_code == 404
    assert cache.client.get("/no-such-thing").status_code == 404
    assert cache.client.get(f"/{missing}.ls").status_code == 404


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/abc.narinfo", "32-char base32"),
        ("/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo", "32-char base32"),  # 'e' is not in Nix base32
        ("/nar/xyz.nar", "52-char base32"),
        ("/nar/../narinfo/x.narinfo", "leave"),
        ("/nar/..%2F..%2Fetc%2Fpasswd", "leave"),
        ("/%2e%2e/%2e%2e/etc/passwd", "leave"),
        ("/log/../../etc/passwd", "leave"),
    ],
)
def test_invalid_paths_are_400_with_reason(cache: Cache, path: str, reason: str) -> None:
    for method in ("GET", "PUT"):
        response = _raw(cache, f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 400"), response
        assert reason.encode() in response


def _raw(cache: Cache, request: str | bytes) -> bytes:
    """Send bytes as written (httpx would normalise `..`) and read one response."""
    host, port = cache.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request if isinstance(request, bytes) else request.encode())
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_nothing_outside_the_store_is_written(cache: Cache, tmp_path: Path) -> None:
    outside = cache.store.parent / "escaped.narinfo"
    _raw(cache, "PUT /nar/../../escaped.narinfo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert not outside.exists()
    assert sorted(p.name for p in cache.store.iterdir()) == [
        "nar", "nar-meta", "narinfo", "signed", "tmp", "usage", "usage.scan-lock"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"StorePath": None}, "StorePath"),
        ({"StorePath": "/usr/bin/x"}, "StorePath"),
        ({"URL": "../../etc/passwd"}, "URL"),
        ({"Compression": "gzip"}, "Compression"),
        ({"Compression": "zstd"}, "URL"),  # URL ends in .nar.xz
        ({"NarHash": "md5:abc"}, "NarHash"),
        ({"NarHash": "sha256:" + "e" * 52}, "NarHash"),
        ({"NarSize": "-1"}, "NarSize"),
        ({"NarSize": "0"}, "NarSize"),
        ({"NarSize": None}, "NarSize"),
        ({"FileSize": "12x"}, "FileSize"),
        ({"References": "not-a-path"}, "References"),
        ({"Deriver": "../x.drv"}, "Deriver"),
        ({"Sig": "no colon here"}, "Sig"),
    ],
)
def test_malformed_narinfo_is_400_naming_the_field(cache: Cache, override: dict, field: str) -> None:
    entry = make_entry()
    cache.client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes, auth=cache.auth)
    response = cache.client.put(
        f"/{entry.hash_part}.narinfo", content=entry.narinfo(**override), auth=cache.auth
    )
    assert response.status_code == 400, response.text
    assert field in response.text
    assert not (cache.store / "narinfo" / f"{entry.hash_part}.narinfo").exists()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"NarHash": "sha256:" + base32.encode(hashlib.sha256(b"other").digest())}, "NarHash"),
        ({"NarSize": "12345"}, "NarSize"),
        ({"FileSize": "7"}, "FileSize"),
        ({"FileHash": "sha256:" + base32.encode(hashlib.sha256(b"other").digest())}, "FileHash"),
    ],
)
def test_narinfo_not_matching_its_nar_is_refused(cache: Cache, override: dict, field: str) -> None:
    entry = make_entry()
    cache.client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes, auth=cache.auth)
    response = cache.client.put(
        f"/{entry.hash_part}.narinfo", content=entry.narinfo(**override), auth=cache.auth
    )
    assert response.status_code == 400
    assert field in response.text
    assert cache.client.get(f"/{entry.hash_part}.narinfo").status_code == 404


def test_narinfo_before_its_nar_is_refused(cache: Cache) -> None:
    entry = make_entry()
    response = cache.client.put(f"/{entry.hash_part}.narinfo", content=entry.narinfo(), auth=cache.auth)
    assert response.status_code == 400
    assert "PUT the NAR first" in response.text


def test_narinfo_for_another_hash_is_refused(cache: Cache) -> None:
    entry, other = make_entry(), make_entry()
    cache.client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes, auth=cache.auth)
    response = cache.client.put(f"/{other.hash_part}.narinfo", content=entry.narinfo(), auth=cache.auth)
    assert response.status_code == 400 and "StorePath" in response.text


def test_nar_whose_bytes_do_not_match_its_name_is_refused(cache: Cache) -> None:
    entry = make_entry()
    response = cache.client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes + b"x", auth=cache.auth)
    assert response.status_code == 400
    assert "hashes to" in response.text
    assert list((cache.store / "nar").iterdir()) == []
    assert list((cache.store / "tmp").iterdir()) == []


@pytest.mark.parametrize("compression", ["xz", "zstd", "bzip2"])
def test_nar_that_does_not_decompress_is_refused(cache: Cache, compression: str) -> None:
    entry = make_entry(compression=compression)
    garbage = b"this is not compressed data at all" * 10
    name = base32.encode(hashlib.sha256(garbage).digest()) + entry.nar_file[52:]
    response = cache.client.put(f"/nar/{name}", content=garbage, auth=cache.auth)
    assert response.status_code == 400
    assert f"not valid {compression} data" in response.text or "not a NAR" in response.text
    assert list((cache.store / "nar").iterdir()) == []


def test_uncompressed_upload_that_is_not_a_nar_is_refused(cache: Cache) -> None:
    data = b"plain bytes"
    name = base32.encode(hashlib.sha256(data).digest()) + ".nar"
    response = cache.client.put(f"/nar/{name}", content=data, auth=cache.auth)
    assert response.status_code == 400 and "nix-archive-1" in response.text


@pytest.mark.parametrize(
    "auth",
    [None, ("nix", "wrong"), "Bearer wrong", "Basic !!notbase64", "Digest abc"],
)
def test_push_without_the_right_token_is_401(cache: Cache, auth: object) -> None:
    entry = make_entry()
    if isinstance(auth, str):
        kwargs: dict = {"headers": {"Authorization": auth}}
    else:
        kwargs = {"auth": auth}
    response = cache.client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes, **kwargs)
    assert response.status_code == 401
    assert "token" in response.text
    assert response.headers["www-authenticate"].startswith("Basic")
    assert list((cache.store / "nar").iterdir()) == []


def test_bearer_token_and_any_basic_user_name_are_accepted(cache: Cache) -> None:
    entry = make_entry()
    bearer = {"Authorization": f"Bearer {cache.token}"}
    assert (
        cache.client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes, headers=bearer).status_code
        == 201
    )
    response = cache.client.put(
        f"/{entry.hash_part}.narinfo", content=entry.narinfo(), auth=("anyone", cache.token)
    )
    assert response.status_code == 201


def test_read_token_guards_reads(start_cache: StartCache) -> None:
    cache = start_cache(read_token=True)
    entry = make_entry()
    push(cache.client, entry, cache.token)
    for path in ("/nix-cache-info", f"/{entry.hash_part}.narinfo", f"/nar/{entry.nar_file}"):
        assert cache.client.get(path).status_code == 401
        assert cache.client.get(path, auth=("nix", "wrong")).status_code == 401
        assert cache.client.get(path, auth=("nix", cache.read_token)).status_code == 200
        assert (
            cache.client.get(path, headers={"Authorization": f"Bearer {cache.read_token}"}).status_code == 200
        )
        assert cache.client.get(path, auth=("nix", cache.token)).status_code == 200  # push implies read
    # the read token does not allow pushing
    other = make_entry()
    response = cache.client.put(
        f"/nar/{other.nar_file}", content=other.file_bytes, auth=("nix", cache.read_token)
    )
    assert response.status_code == 401
    assert cache.client.get("/healthz").status_code == 200


def test_upload_over_the_limit_is_413_and_leaves_nothing(start_cache: StartCache) -> None:
    cache = start_cache("--max-upload-size", "1K")
    entry = make_entry(bytes(range(256)) * 40, compression="none")
    assert len(entry.file_bytes) > 1024
    response = cache.client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes, auth=cache.auth)
    assert response.status_code == 413
    assert "max_upload_size" in response.text
    assert list((cache.store / "nar").iterdir()) == []
    assert list((cache.store / "tmp").iterdir()) == []


def test_chunked_upload_over_the_limit_is_413(start_cache: StartCache) -> None:
    cache = start_cache("--max-upload-size", "64K")

    def body():  # no Content-Length: the server counts while it reads
        for _ in range(64):
            yield b"\0" * 4096

    name = base32.encode(bytes(32)) + ".nar"
    response = cache.client.put(f"/nar/{name}", content=body(), auth=cache.auth)
    assert response.status_code == 413
    assert list((cache.store / "tmp").iterdir()) == []


def test_range_requests(cache: Cache) -> None:
    entry = make_entry(bytes(range(256)) * 64, compression="none")
    push(cache.client, entry, cache.token)
    url = f"/nar/{entry.nar_file}"
    data, size = entry.file_bytes, len(entry.file_bytes)

    part = cache.client.get(url, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206
    assert part.content == data[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{size}"
    assert part.headers["content-length"] == "90"

    tail = cache.client.get(url, headers={"Range": "bytes=100-"})
    assert (tail.status_code, tail.content) == (206, data[100:])
    suffix = cache.client.get(url, headers={"Range": "bytes=-16"})
    assert (suffix.status_code, suffix.content) == (206, data[-16:])
    clipped = cache.client.get(url, headers={"Range": f"bytes=5-{size * 2}"})
    assert (clipped.status_code, clipped.content) == (206, data[5:])

    bad = cache.client.get(url, headers={"Range": f"bytes={size}-"})
    assert bad.status_code == 416
    assert bad.headers["content-range"] == f"bytes */{size}"
    whole = cache.client.get(url, headers={"Range": "bytes=0-1,5-6"})  # several ranges: whole file
    assert (whole.status_code, whole.content) == (200, data)


def test_keep_alive_serves_many_requests_on_one_connection(cache: Cache) -> None:
    entry = make_entry()
    push(cache.client, entry, cache.token)
    host, port = cache.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        reader = sock.makefile("rb")
        for _ in range(20):
            sock.sendall(f"GET /{entry.hash_part}.narinfo HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, _, body = _read_response(reader)
            assert status.startswith(b"HTTP/1.1 200")
            assert body.startswith(b"StorePath: ")


def test_one_structured_log_line_per_request(cache: Cache) -> None:
    import json

    missing = base32.encode(bytes(20))
    cache.client.get(f"/{missing}.narinfo")
    cache.client.get("/nix-cache-info")
    # The line is written just after the response is sent: wait for it (bounded).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in cache.server.log_lines() if line.startswith("{")]
        if lines and lines[-1]["path"] == "/nix-cache-info":
            break
        time.sleep(0.05)
    assert [(line["path"], line["status"]) for line in lines[-2:]] == [
        (f"/{missing}.narinfo", 404),
        ("/nix-cache-info", 200),
    ]
    assert "not in this cache" in lines[-2]["reason"]
    assert {"client", "method", "ms", "bytes", "route"} <= set(lines[-1])


def test_log_lines_of_later_batches_are_written_too(cache: Cache) -> None:
    """Each batch of request lines is written by a timer armed by its first line: after one
    batch went out, the next request's line still arrives without more traffic."""
    import json

    def paths() -> list[str]:
        return [json.loads(line)["path"] for line in cache.server.log_lines() if line.startswith("{")]

    for round_ in range(3):
        path = f"/{base32.encode(bytes([round_]) * 20)}.narinfo"
        cache.client.get(path)
        deadline = time.monotonic() + 5
        while path not in paths() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path in paths()


def test_metrics(cache: Cache) -> None:
    entry = make_entry()
    push(cache.client, entry, cache.token)
    cache.client.get(f"/{entry.hash_part}.narinfo")
    cache.client.get(f"/{base32.encode(bytes(20))}.narinfo")
    cache.client.get(f"/nar/{entry.nar_file}")
    cache.client.put(f"/nar/{entry.nar_file}", content=b"x", auth=("nix", "bad"))
    text = cache.client.get("/metrics").text
    samples = _samples(text)
    assert samples['nixcache_narinfo_lookups_total{result="hit"}'] == 1
    assert samples['nixcache_narinfo_lookups_total{result="miss"}'] == 1
    assert samples['nixcache_uploads_total{kind="nar",result="accepted"}'] == 1
    assert samples['nixcache_uploads_total{kind="narinfo",result="accepted"}'] == 1
    assert samples['nixcache_uploads_total{kind="nar",result="rejected"}'] == 1
    assert samples['nixcache_served_bytes_total{route="nar"}'] == len(entry.file_bytes)
    assert samples['nixcache_http_requests_total{method="GET",route="narinfo",status="404"}'] == 1
    assert samples["nixcache_store_entries"] == 1
    assert samples["nixcache_store_nar_files"] == 1
    assert samples["nixcache_store_bytes"] > len(entry.file_bytes)
    assert "nixcache_gc_runs_total" in samples
    assert "nixcache_gc_freed_bytes_total" in samples


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_unsupported_method_is_405(cache: Cache) -> None:
    response = cache.client.request("DELETE", f"/{base32.encode(bytes(20))}.narinfo", auth=cache.auth)
    assert response.status_code == 405


def test_accel_redirect_hands_nar_bytes_to_nginx(start_cache: StartCache) -> None:
    cache = start_cache("--accel-redirect-prefix", "/internal-nar")
    entry = make_entry()
    push(cache.client, entry, cache.token)
    response = cache.client.get(f"/nar/{entry.nar_file}")
    assert response.status_code == 200
    assert response.headers["x-accel-redirect"] == f"/internal-nar/{entry.nar_file}"
    assert response.content == b""
    assert cache.client.get(f"/nar/{base32.encode(bytes(32))}.nar").status_code == 404


def test_client_sees_complete_bodies_with_httpx_streaming(cache: Cache) -> None:
    entry = make_entry(bytes(3_000_000), compression="zstd")
    push(cache.client, entry, cache.token)
    with httpx.stream("GET", f"{cache.url}/nar/{entry.nar_file}") as response:
        body = b"".join(response.iter_bytes())
    assert body == entry.file_bytes


def _read_response(reader, head: bool = False) -> tuple[bytes, dict[bytes, bytes], bytes]:
    status = reader.readline()
    headers = {}
    while (line := reader.readline()) != b"\r\n":
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    body = b"" if head else reader.read(int(headers.get(b"content-length", b"0")))
    return status, headers, body


def test_expect_100_continue_upload(cache: Cache) -> None:
    """curl (and so nix) sends Expect: 100-continue before large bodies."""
    import base64

    entry = make_entry(os.urandom(200_000), compression="none")
    host, port = cache.url.removeprefix("http://").split(":")
    basic = base64.b64encode(f"nix:{cache.token}".encode()).decode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        reader = sock.makefile("rb")
        sock.sendall(
            f"PUT /nar/{entry.nar_file} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {basic}\r\n"
            f"Expect: 100-continue\r\nContent-Length: {len(entry.file_bytes)}\r\n\r\n".encode()
        )
        assert reader.readline().startswith(b"HTTP/1.1 100")
        assert reader.readline() == b"\r\n"
        sock.sendall(entry.file_bytes)
        status, _, _ = _read_response(reader)
        assert status.startswith(b"HTTP/1.1 201")
        # the same connection serves the next request
        sock.sendall(f"HEAD /nar/{entry.nar_file} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, _ = _read_response(reader, head=True)
        assert (
            status.startswith(b"HTTP/1.1 200")
            and headers[b"content-length"] == str(len(entry.file_bytes)).encode()
        )


def test_refused_expect_100_continue_closes_instead_of_waiting(cache: Cache) -> None:
    entry = make_entry()
    host, port = cache.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        reader = sock.makefile("rb")
        sock.sendall(
            f"PUT /nar/{entry.nar_file} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            f"Content-Length: {len(entry.file_bytes)}\r\n\r\n".encode()
        )
        status, headers, _ = _read_response(reader)
        assert status.startswith(b"HTTP/1.1 401")
        assert headers[b"connection"] == b"close"
        assert reader.read() == b""  # closed, not waiting for a body that will not come


def test_memory_stays_flat_for_a_large_nar(cache: Cache) -> None:
    """Upload and download 256 MiB: the server's peak RSS stays far below that."""
    block = os.urandom(1 << 20)
    blocks = 256
    contents_len = blocks * len(block)

    def nar_stream():  # make_nar's bytes, streamed (contents_len is a multiple of 8: no padding)
        yield b"".join(nar_string(p) for p in (b"nix-archive-1", b"(", b"type", b"regular", b"contents"))
        yield contents_len.to_bytes(8, "little")
        for _ in range(blocks):
            yield block
        yield nar_string(b")")

    sha = hashlib.sha256()
    size = 0
    for chunk in nar_stream():
        sha.update(chunk)
        size += len(chunk)
    name = base32.encode(sha.digest()) + ".nar"
    response = cache.client.put(
        f"/nar/{name}", content=nar_stream(), auth=cache.auth, headers={"Content-Length": str(size)}
    )
    assert response.status_code == 201, response.text
    received = 0
    with cache.client.stream("GET", f"/nar/{name}") as download:
        for chunk in download.iter_bytes():
            received += len(chunk)
    assert received == size
    status = Path(f"/proc/{cache.server.proc.pid}/status").read_text()
    peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib} KiB for a {size >> 20} MiB NAR"


def test_non_ascii_digits_are_400_not_a_dropped_connection(cache: Cache) -> None:
    """str.isdigit() accepts '²', which int() refuses: such numbers must be a 400 with a reason."""
    name = base32.encode(bytes(32)) + ".nar"
    head = f"PUT /nar/{name} HTTP/1.1\r\nHost: x\r\nContent-Length: \u00b2\r\n\r\n"
    response = _raw(cache, head.encode("latin-1"))
    assert response.startswith(b"HTTP/1.1 400"), response
    assert b"Content-Length" in response
    entry = make_entry()
    cache.client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes, auth=cache.auth)
    text = entry.narinfo(NarSize="\u00b2")
    response = cache.client.put(f"/{entry.hash_part}.narinfo", content=text.encode(), auth=cache.auth)
    assert response.status_code == 400, response.text
    assert "NarSize" in response.text


def test_nar_name_that_is_no_sha256_is_400(cache: Cache) -> None:
    """52 base32 characters hold 260 bits: a first character above '1' names no sha256."""
    name = "z" * 52 + ".nar"
    response = cache.client.put(f"/nar/{name}", content=b"x", auth=cache.auth)
    assert response.status_code == 400, response.text
    assert name in response.text


def test_unknown_transfer_coding_is_400_and_both_framings_close(cache: Cache) -> None:
    """RFC 9112: a body whose end cannot be found is a 400; Content-Length beside chunked may be
    request smuggling, so the connection closes after the answer."""
    name = base32.encode(bytes(32)) + ".nar"
    response = _raw(cache, f"PUT /nar/{name} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400"), response
    assert b"Transfer-Encoding" in response
    host, port = cache.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        reader = sock.makefile("rb")
        sock.sendall(
            b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        status, headers, _ = _read_response(reader)
        assert status.startswith(b"HTTP/1.1 200")
        assert headers[b"connection"] == b"close"
        assert reader.read() == b""


def test_refused_large_body_of_any_method_closes_instead_of_draining(cache: Cache) -> None:
    host, port = cache.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        reader = sock.makefile("rb")
        sock.sendall(b"POST /nix-cache-info HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        status, headers, _ = _read_response(reader)
        assert status.startswith(b"HTTP/1.1 405")
        assert headers[b"connection"] == b"close"
        assert reader.read() == b""  # closed, not waiting for 10 MB nobody will read


def test_idle_and_slow_connections_are_closed_after_the_keepalive_timeout(
    start_cache, tmp_path: Path
) -> None:
    config = tmp_path / "idle.toml"
    config.write_text('keepalive_timeout = "1s"\n')
    cache = start_cache("--config", str(config))
    entry = make_entry()
    push(cache.client, entry, cache.token)
    host, port = cache.url.removeprefix("http://").split(":")

    def closed_after(first_bytes: bytes) -> float:
        """Seconds until the server closes a connection that sent `first_bytes` then nothing."""
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            start = time.monotonic()
            sock.sendall(first_bytes)
            reader = sock.makefile("rb")
            if first_bytes.endswith(b"\r\n\r\n"):
                status, _, _ = _read_response(reader)  # a full request is answered first
                assert status.startswith(b"HTTP/1.1 200")
            assert reader.read() == b""  # EOF: the server hung up (a timeout here raises)
            return time.monotonic() - start

    request = f"GET /{entry.hash_part}.narinfo HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    # A keep-alive connection left idle after a narinfo, and a request head that never ends.
    for first in (request, b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n"):
        assert 0.9 <= closed_after(first) < 5
    # Meanwhile a busy connection is never cut: requests keep being answered past the timeout.
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        reader = sock.makefile("rb")
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            sock.sendall(request)
            assert _read_response(reader)[0].startswith(b"HTTP/1.1 200")
            time.sleep(0.3)


def test_a_pushed_narinfo_is_served_as_a_cold_server_would_serve_it(cache: Cache, tmp_path: Path) -> None:
    # The server signs a narinfo when it is pushed (warm for the first fetch); what it serves
    # must be byte for byte what it serves after a restart, when it reads the stored file.
    entry = make_entry()
    push(cache.client, entry, cache.token)
    warm = cache.client.get(f"/{entry.hash_part}.narinfo")
    assert warm.status_code == 200 and f"Sig: {cache.key.name}:" in warm.text
    cache.server.stop()
    args = ["--listen", "127.0.0.1:0", "--store", str(cache.store), "--signing-key", str(cache.key_file)]
    restarted = start_server(args, home=tmp_path, log=tmp_path / "restarted.log")
    try:
        cold = httpx.get(f"{restarted.url}/{entry.hash_part}.narinfo", timeout=30)
    finally:
        restarted.stop()
    assert cold.status_code == 200
    assert cold.text == warm.text


def test_a_narinfo_larger_than_one_read_is_served_whole(cache: Cache) -> None:
    # A hit reads its signed file without asking its size first (app._READ_SIZE at a time):
    # a path with hundreds of references must still arrive complete, for GET and HEAD alike.
    references = [f"{random_hash()}-a-dependency-with-a-long-name-{i}" for i in range(800)]
    entry = make_entry(references=references)
    push(cache.client, entry, cache.token)
    for _ in range(2):  # signed on push, then read from signed/
        response = cache.client.get(f"/{entry.hash_part}.narinfo")
        assert response.status_code == 200
        assert len(response.content) > 3 * 16 * 1024
        served = narinfo.parse(response.text)
        assert set(served.references) == set(references)
        assert response.text.endswith("\n") and response.text.count("Sig: ") == 1
    head = cache.client.head(f"/{entry.hash_part}.narinfo")
    assert head.headers["content-length"] == str(len(response.content))

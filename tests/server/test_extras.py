"""The files besides narinfos and NARs, replayed as current Nix sends them (HTTP level).

Each test names the Nix version and source it follows. What Debian's Nix 2.8 can drive itself
(listings, logs, br NARs) is in test_nix_protocol.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import socket
import zlib

import brotli
import httpx
import lz4.frame
import pytest
import zstandard

from nixcache.server import base32
from server.conftest import Cache
from server.helpers import make_entry, make_nar, push, random_hash

DRV = f"{random_hash()}-hello.drv"
LISTING = {"version": 1, "root": {"type": "regular", "size": 64, "narOffset": 96}}


def _dump(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _files(cache: Cache, directory: str) -> list[str]:
    root = cache.store / directory
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# -- listings, logs, debuginfo (Nix 2.35 src/libstore/binary-cache-store.cc uploadData, addBuildLog) --


def test_listing_is_stored_and_served_as_json(cache: Cache) -> None:
    entry = make_entry()
    body = _dump(LISTING)
    put = cache.client.put(
        f"/{entry.hash_part}.ls", content=body, auth=cache.auth, headers={"Content-Type": "application/json"}
    )
    assert put.status_code == 201, put.text
    got = cache.client.get(f"/{entry.hash_part}.ls")
    assert (got.status_code, got.headers["content-type"], got.content) == (200, "application/json", body)
    head = cache.client.head(f"/{entry.hash_part}.ls")
    assert head.status_code == 200 and head.headers["content-length"] == str(len(body))
    assert cache.client.get(f"/{random_hash()}.ls").status_code == 404


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b'{"version":2,"root":{}}', '{"version":1'),
        (b'{"version":1,"root":{"type":"regular","size":-1}}', "size is not a non-negative integer"),
        (
            b'{"version":1,"root":{"type":"directory","entries":{"..":{"type":"symlink","target":"x"}}}}',
            "file name",
        ),
        (b'{"version":1,"root":{"type":"fifo"}}', "type must be"),
    ],
)
def test_bad_listing_is_400_and_not_stored(cache: Cache, body: bytes, reason: str) -> None:
    response = cache.client.put(f"/{random_hash()}.ls", content=body, auth=cache.auth)
    assert response.status_code == 400 and reason in response.text, response.text
    assert _files(cache, "ls") == [] and list((cache.store / "tmp").iterdir()) == []


def test_extra_files_need_the_push_token(cache: Cache) -> None:
    assert cache.client.put(f"/{random_hash()}.ls", content=_dump(LISTING)).status_code == 401
    assert cache.client.put(f"/log/{DRV}", content=b"log").status_code == 401
    assert _files(cache, "ls") == [] and _files(cache, "log") == []


def test_build_log_round_trip(cache: Cache) -> None:
    text = "building '/nix/store/…-hello.drv'\nhello\n".encode()
    put = cache.client.put(
        f"/log/{DRV}", content=text, auth=cache.auth, headers={"Content-Type": "text/plain; charset=utf-8"}
    )
    assert put.status_code == 201, put.text
    got = cache.client.get(f"/log/{DRV}")
    assert (got.status_code, got.headers["content-type"], got.content) == (
        200,
        "text/plain; charset=utf-8",
        text,
    )
    refused = cache.client.put("/log/not-a-derivation", content=b"x", auth=cache.auth)
    assert refused.status_code == 400 and "log/<hash>-<name>.drv" in refused.text
    assert _files(cache, "log") == [DRV]


def test_debuginfo_head_then_put_as_nix_does(cache: Cache) -> None:
    """uploadData: `fileExists(key)` (HEAD) first, then PUT {"archive","member"}."""
    entry = make_entry()
    build_id = "ab" + "c" * 38 + ".debug"
    assert cache.client.head(f"/debuginfo/{build_id}").status_code == 404
    index = {"archive": f"../nar/{entry.nar_file}", "member": f"lib/debug/.build-id/ab/{'c' * 38}.debug"}
    put = cache.client.put(f"/debuginfo/{build_id}", content=_dump(index), auth=cache.auth)
    assert put.status_code == 201, put.text
    assert cache.client.head(f"/debuginfo/{build_id}").status_code == 200
    assert json.loads(cache.client.get(f"/debuginfo/{build_id}").content) == index
    wrong = {**index, "member": "lib/debug/elsewhere.debug"}
    bad = cache.client.put(f"/debuginfo/{'d' * 40}.debug", content=_dump(wrong), auth=cache.auth)
    assert bad.status_code == 400 and "member must be" in bad.text


# -- build traces (Nix 2.35 registerDrvOutputUnchecked; Nix 2.28 realisation.cc; Lix) ----------


def _fingerprint_v2(drv: str, output: str, out_path: str) -> bytes:
    """UnkeyedRealisation::fingerprint (Nix 2.35 src/libstore/realisation.cc), as in Nix's own
    test data src/libstore-tests/data/realisation/simple-fingerprint.txt."""
    return (
        f'{{"key":{{"drvPath":"{drv}","outputName":"{output}"}},"value":{{"outPath":"{out_path}"}}}}'.encode()
    )


def test_build_trace_v2_is_served_signed_by_the_cache(cache: Cache) -> None:
    out_path = f"{random_hash()}-hello"
    pusher = {"keyName": "ci-1", "sig": "A" * 86 + "=="}
    value = {"outPath": out_path, "signatures": [pusher]}  # what Nix 2.35 PUTs: the entry's value
    put = cache.client.put(f"/build-trace-v2/{DRV}/out.doi", content=_dump(value), auth=cache.auth)
    assert put.status_code == 201, put.text
    got = cache.client.get(f"/build-trace-v2/{DRV}/out.doi")
    assert got.headers["content-type"] == "application/json"
    served = got.json()
    assert served["outPath"] == out_path and served["signatures"][0] == pusher
    ours = served["signatures"][1]
    assert ours["keyName"] == cache.key.name
    assert cache.key.public().verify(
        f"{ours['keyName']}:{ours['sig']}", _fingerprint_v2(DRV, "out", out_path)
    )
    assert cache.client.get(f"/build-trace-v2/{DRV}/dev.doi").status_code == 404


def test_realisation_of_older_nix_and_lix_is_served_signed(cache: Cache) -> None:
    drv_hash = "sha256:" + hashlib.sha256(b"drv").hexdigest()
    out_path = f"{random_hash()}-hello"
    entry = {"dependentRealisations": {}, "id": f"{drv_hash}!out", "outPath": out_path, "signatures": []}
    path = f"/realisations/{drv_hash}!out.doi"
    assert cache.client.put(path, content=_dump(entry), auth=cache.auth).status_code == 201
    served = cache.client.get(path).json()
    # Realisation::fingerprint of Nix 2.28: the object without signatures, keys sorted.
    fingerprint = f'{{"dependentRealisations":{{}},"id":"{drv_hash}!out","outPath":"{out_path}"}}'.encode()
    assert cache.key.public().verify(served["signatures"][0], fingerprint)
    mismatch = {**entry, "id": f"{drv_hash}!dev"}
    bad = cache.client.put(path, content=_dump(mismatch), auth=cache.auth)
    assert bad.status_code == 400 and "does not match the file name" in bad.text


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"signatures":[]}', "outPath"),
        (b'{"outPath":"/nix/store/abc","signatures":[]}', "outPath"),
        (b'{"outPath":"' + f"{'0' * 32}-x".encode() + b'","signatures":[42]}', "signature"),
    ],
)
def test_bad_build_trace_is_400(cache: Cache, body: bytes, reason: str) -> None:
    response = cache.client.put(f"/build-trace-v2/{DRV}/out.doi", content=body, auth=cache.auth)
    assert response.status_code == 400 and reason in response.text, response.text
    assert _files(cache, "build-trace-v2") == []


# -- encoded uploads (Nix 2.32: narinfo-compression, ls-compression, log-compression;
#    HttpBinaryCacheStore::upsertFile sends Content-Encoding: showCompressionAlgo(method)) ------

ENCODERS = {
    "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
    "br": brotli.compress,
    "xz": lzma.compress,
    "gzip": gzip.compress,
    "lzma": lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE),
    "bzip2": __import__("bz2").compress,
    "lz4": lz4.frame.compress,
    "deflate": zlib.compress,
}


@pytest.mark.parametrize("encoding", sorted(ENCODERS))
def test_encoded_uploads_are_stored_decoded(cache: Cache, encoding: str) -> None:
    encode = ENCODERS[encoding]
    entry = make_entry()
    assert (
        cache.client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes, auth=cache.auth).status_code
        == 201
    )
    headers = {"Content-Encoding": encoding}
    narinfo = cache.client.put(
        f"/{entry.hash_part}.narinfo",
        content=encode(entry.narinfo().encode()),
        auth=cache.auth,
        headers=headers,
    )
    assert narinfo.status_code == 201, narinfo.text
    listing = _dump(LISTING)
    ls = cache.client.put(f"/{entry.hash_part}.ls", content=encode(listing), auth=cache.auth, headers=headers)
    assert ls.status_code == 201, ls.text
    log = b"build output\n" * 1000
    assert (
        cache.client.put(f"/log/{DRV}", content=encode(log), auth=cache.auth, headers=headers).status_code
        == 201
    )
    assert cache.client.get(f"/{entry.hash_part}.narinfo").text.startswith(f"StorePath: {entry.store_path}\n")
    assert (cache.store / "ls" / f"{entry.hash_part}.ls").read_bytes() == listing
    assert cache.client.get(f"/log/{DRV}").content == log


def test_unknown_encoding_is_415_naming_the_supported(cache: Cache) -> None:
    entry = make_entry()
    response = cache.client.put(
        f"/{entry.hash_part}.ls", content=b"LZIP....", auth=cache.auth, headers={"Content-Encoding": "lzip"}
    )
    assert response.status_code == 415
    assert "'lzip' is not decoded here" in response.text and "zstd" in response.text
    assert "br" in response.headers["accept-encoding"].split(", ")
    assert _files(cache, "ls") == []


def test_encoded_upload_that_is_not_valid_is_400(cache: Cache) -> None:
    response = cache.client.put(
        f"/log/{DRV}", content=b"not zstd at all", auth=cache.auth, headers={"Content-Encoding": "zstd"}
    )
    assert response.status_code == 400 and "not valid zstd data" in response.text
    assert _files(cache, "log") == [] and list((cache.store / "tmp").iterdir()) == []


def test_encoded_upload_is_limited_by_its_decoded_size(cache: Cache) -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (40 * 1024 * 1024))  # 40 MiB in about 1 KiB
    response = cache.client.put(
        f"/{random_hash()}.ls", content=bomb, auth=cache.auth, headers={"Content-Encoding": "zstd"}
    )
    assert response.status_code == 413 and "larger than a listing may be" in response.text
    assert _files(cache, "ls") == []


def test_nar_with_content_encoding_is_415(cache: Cache) -> None:
    entry = make_entry(compression="none")
    response = cache.client.put(
        f"/nar/{entry.nar_file}", content=gzip.compress(entry.file_bytes), auth=cache.auth,
        headers={"Content-Encoding": "gzip"},
    )  # fmt: skip
    assert response.status_code == 415 and "without Content-Encoding" in response.text
    assert list((cache.store / "nar").iterdir()) == []


# -- every NAR compression (Nix 2.35 uploadData: .nar .xz .bz2 .zst .lzip .lz4 .br) -------------


@pytest.mark.parametrize(("compression", "ext"), [("br", ".nar.br"), ("lz4", ".nar.lz4")])
def test_br_and_lz4_nars_are_verified(cache: Cache, compression: str, ext: str) -> None:
    nar = make_nar(b"contents " * 5000)
    file_bytes = ENCODERS[compression](nar)
    name = base32.encode(hashlib.sha256(file_bytes).digest()) + ext
    entry = make_entry()
    entry.nar, entry.file_bytes, entry.nar_file, entry.compression = nar, file_bytes, name, compression
    push(cache.client, entry, cache.token)
    assert cache.client.get(f"/nar/{name}").content == file_bytes
    # The same name, bytes that do not decode: refused before anything is kept.
    broken = file_bytes[:20] + bytes(len(file_bytes) - 20)
    name = base32.encode(hashlib.sha256(broken).digest()) + ext
    response = cache.client.put(f"/nar/{name}", content=broken, auth=cache.auth)
    assert response.status_code == 400 and f"not valid {compression} data" in response.text
    assert not (cache.store / "nar" / name).exists()


def test_lzip_nar_is_400_naming_the_supported(cache: Cache) -> None:
    name = base32.encode(hashlib.sha256(b"LZIP").digest()) + ".nar.lzip"
    assert cache.client.head(f"/nar/{name}").status_code == 404  # Nix asks first: absent
    assert cache.client.put(f"/nar/{name}", content=b"LZIP").status_code == 401
    response = cache.client.put(f"/nar/{name}", content=b"LZIP", auth=cache.auth)
    assert response.status_code == 400
    assert "lzip NARs are not taken" in response.text and "br, lz4" in response.text


def test_gzip_nar_named_plain_nar_is_400_naming_the_supported(cache: Cache) -> None:
    """Nix names NARs it compresses with gzip (lzma, lzop, …) `.nar` (uploadData's URL)."""
    data = gzip.compress(make_nar(b"x"))
    name = base32.encode(hashlib.sha256(data).digest()) + ".nar"
    response = cache.client.put(f"/nar/{name}", content=data, auth=cache.auth)
    assert response.status_code == 400
    assert "holds gzip data" in response.text and "one of none, xz, zstd, bzip2, br, lz4" in response.text


# -- what a current client checks first ---------------------------------------------------------


def _raw_requests(cache: Cache, data: bytes, answers: int) -> list[bytes]:
    host, port = cache.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while received.count(b"HTTP/1.1 ") < answers or not received.endswith((b"\r\n\r\n", b"\n")):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return [b"HTTP/1.1 " + part for part in received.split(b"HTTP/1.1 ")[1:]]


def test_head_narinfo_answers_presence_without_a_body(cache: Cache) -> None:
    """HttpBinaryCacheStore::fileExists (Nix 2.35): HEAD <hash>.narinfo, 200 or 404; three on
    one keep-alive connection, as curl sends them."""
    entry = make_entry()
    push(cache.client, entry, cache.token)
    missing = random_hash()
    requests = (
        f"HEAD /{entry.hash_part}.narinfo HTTP/1.1\r\nHost: x\r\n\r\n"
        f"HEAD /{missing}.narinfo HTTP/1.1\r\nHost: x\r\n\r\n"
        f"GET /{entry.hash_part}.narinfo HTTP/1.1\r\nHost: x\r\n\r\n"
    ).encode()
    present, absent, got = _raw_requests(cache, requests, 3)
    assert present.startswith(b"HTTP/1.1 200") and present.endswith(b"\r\n\r\n")
    length = int(
        next(line for line in present.split(b"\r\n") if line.lower().startswith(b"content-length")).split(
            b":"
        )[1]
    )
    assert absent.startswith(b"HTTP/1.1 404") and absent.endswith(b"\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200") and len(got.split(b"\r\n\r\n", 1)[1]) == length


def test_parallel_nar_uploads_largest_first(cache: Cache) -> None:
    """BinaryCacheStore::addMultipleToStore (Nix 2.35): every NAR uploads at once, largest first
    (HEAD nar/… then PUT), each narinfo once its NAR and its references' narinfos are in."""
    import concurrent.futures

    leaves = [make_entry(bytes([i]) * (i + 1) * 200_000, compression="zstd") for i in range(6)]
    top = make_entry(b"top", references=[e.store_path.rsplit("/", 1)[1] for e in leaves])
    entries = sorted([*leaves, top], key=lambda e: -len(e.nar))

    def upload_nar(entry):  # type: ignore[no-untyped-def]
        with httpx.Client(base_url=cache.url, timeout=60) as client:
            assert client.head(f"/nar/{entry.nar_file}").status_code == 404
            return client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes, auth=cache.auth).status_code

    with concurrent.futures.ThreadPoolExecutor(len(entries)) as pool:
        assert list(pool.map(upload_nar, entries)) == [201] * len(entries)
        infos = [
            pool.submit(cache.client.put, f"/{e.hash_part}.narinfo", content=e.narinfo(), auth=cache.auth)
            for e in leaves
        ]
        assert [f.result().status_code for f in infos] == [201] * len(leaves)
    assert (
        cache.client.put(f"/{top.hash_part}.narinfo", content=top.narinfo(), auth=cache.auth).status_code
        == 201
    )
    for entry in entries:
        assert cache.client.head(f"/nar/{entry.nar_file}").status_code == 200
        assert cache.client.get(f"/{entry.hash_part}.narinfo").status_code == 200


# -- gc: an extra file goes with the path it describes (nixcache/server/extras/gc.py) -------------


def test_gc_takes_extra_files_with_their_path(cache: Cache) -> None:
    import os
    import time

    from server.test_gc import DAY, age, gc

    def put(path: str, body: bytes) -> None:
        assert cache.client.put(path, content=body, auth=cache.auth).status_code == 201, path

    def extras_of(entry, drv: str) -> list[str]:  # type: ignore[no-untyped-def]
        out_path = entry.store_path.rsplit("/", 1)[1]
        drv_hash = "sha256:" + hashlib.sha256(drv.encode()).hexdigest()
        build_id = hashlib.sha256(drv.encode()).hexdigest()[:40] + ".debug"
        files = {
            f"/{entry.hash_part}.ls": _dump(LISTING),
            f"/log/{drv}": b"log\n",
            f"/build-trace-v2/{drv}/out.doi": _dump({"outPath": out_path, "signatures": []}),
            f"/realisations/{drv_hash}!out.doi": _dump({"id": f"{drv_hash}!out", "outPath": out_path}),
            f"/debuginfo/{build_id}": _dump(
                {
                    "archive": f"../nar/{entry.nar_file}",
                    "member": f"lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}",
                }
            ),
        }
        for path, body in files.items():
            put(path, body)
        return list(files)

    old, new = make_entry(), make_entry()
    old_drv, new_drv = f"{random_hash()}-old.drv", f"{random_hash()}-new.drv"
    for entry, drv in ((old, old_drv), (new, new_drv)):
        assert (
            cache.client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes, auth=cache.auth).status_code
            == 201
        )
        put(f"/{entry.hash_part}.narinfo", entry.narinfo(Deriver=drv).encode())
    old_files, new_files = extras_of(old, old_drv), extras_of(new, new_drv)
    young_orphan, old_orphan = f"/{random_hash()}.ls", f"/{random_hash()}.ls"
    put(young_orphan, _dump(LISTING))
    put(old_orphan, _dump(LISTING))
    two_hours_ago = time.time() - 7200
    for path in [*old_files, *new_files, old_orphan]:
        local = cache.store / ("ls" + path if path.endswith(".ls") else path[1:])
        os.utime(local, (two_hours_ago, two_hours_ago))
    age(cache, old, 10 * DAY)

    dry = gc("--store", str(cache.store), "--older-than", "5d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would delete 6 listings, logs, debuginfo and build traces" in dry.stdout
    assert all(cache.client.get(path).status_code == 200 for path in old_files)

    out = gc("--store", str(cache.store), "--older-than", "5d")
    assert out.returncode == 0, out.stderr
    assert "deleted 6 listings, logs, debuginfo and build traces" in out.stdout
    assert [cache.client.get(path).status_code for path in old_files] == [404] * 5
    assert [cache.client.get(path).status_code for path in new_files] == [200] * 5
    assert cache.client.get(young_orphan).status_code == 200  # maybe a push in flight
    assert cache.client.get(old_orphan).status_code == 404


def test_verify_compares_listings_with_their_nar(cache: Cache) -> None:
    from server.test_verify import quarantined, verify

    good, wrong, compressed = make_entry(compression="none"), make_entry(compression="none"), make_entry()
    for entry in (good, wrong, compressed):
        push(cache.client, entry, cache.token)
    listings = [
        (good, LISTING),  # make_entry's NAR: one regular file of 64 bytes at offset 96
        (wrong, {"version": 1, "root": {"type": "regular", "size": 65, "narOffset": 96}}),
        (compressed, {"version": 1, "root": {"type": "regular", "size": 10**6}}),
    ]
    for entry, listing in listings:
        assert (
            cache.client.put(f"/{entry.hash_part}.ls", content=_dump(listing), auth=cache.auth).status_code
            == 201
        )
    (cache.store / "ls" / f"{random_hash()}.ls").write_bytes(b"{broken")  # damage on disk

    out = verify(cache.store)
    assert out.returncode == 1, out.stdout + out.stderr  # damage found
    assert "; 3 damaged, 3 files quarantined" in out.stdout and good.hash_part not in out.stdout
    assert f"ls/{wrong.hash_part}.ls does not describe nar/{wrong.nar_file}" in out.stdout
    assert f"ls/{compressed.hash_part}.ls lists more file bytes than the NarSize" in out.stdout
    assert "not JSON" in out.stdout
    assert len([p for p in quarantined(cache.store) if p.startswith("ls/")]) == 3
    assert cache.client.get(f"/{good.hash_part}.ls").status_code == 200
    assert cache.client.get(f"/{wrong.hash_part}.ls").status_code == 404
    assert cache.client.get(f"/{wrong.hash_part}.narinfo").status_code == 200  # the path stays

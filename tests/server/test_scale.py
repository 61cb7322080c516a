"""The hot path at scale (issue 15): misses on the fast path, uploads' fsync off the event loop,
serving before the usage scan ends, usage kept by uploads and gc, gc on a generated store."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from nixcache.server import gc as gcmod
from nixcache.server.usage import scan
from server.conftest import Cache, StartCache
from server.helpers import Entry, make_entry, nixcache_cmd, push

DAY = 86400

# In the server process, before it starts: the route table's handler refuses narinfo requests,
# so a narinfo answered as usual was answered by the fast path.
NO_SLOW_NARINFO = """
from gevent import monkey
monkey.patch_all()
import nixcache.server.app as app
_handle = app.App.handle
def handle(self, request):
    if request.path.endswith(".narinfo") and request.method in ("GET", "HEAD"):
        raise RuntimeError("narinfo read took the slow path")
    return _handle(self, request)
app.App.handle = handle
"""

# A disk whose fsync takes 2 s (time.sleep taken before gevent patches it: a real, blocking wait).
SLOW_FSYNC = """
import os, time
_fsync, _sleep = os.fsync, time.sleep
def fsync(fd):
    _sleep(2.0)
    _fsync(fd)
os.fsync = fsync
"""

# A filesystem whose renames of uploads wait 2 s (a journal busy committing other writes:
# creating, renaming and re-timing files all wait for it), and whose fsyncs take 0.5 s and
# count how many run at once (in FSYNCS: one line per fsync, the number running when it began).
SLOW_METADATA = """
import os, time
_replace, _fsync, _sleep = os.replace, os.fsync, time.sleep
_running = []
def replace(src, dst, **kwargs):
    if os.path.basename(os.path.dirname(src)) == "tmp":  # an upload's file, from the store's tmp/
        _sleep(2.0)
    return _replace(src, dst, **kwargs)
def fsync(fd):
    # Only an upload's files count: the server's own writes (signing stats, usage) may fsync too.
    if os.path.basename(os.path.dirname(os.readlink(f"/proc/self/fd/{fd}"))) != "tmp":
        return _fsync(fd)
    _running.append(fd)
    with open(FSYNCS, "a") as log:
        log.write(f"{len(_running)}\\n")
    try:
        _sleep(0.5)
        _fsync(fd)
    finally:
        _running.remove(fd)
os.replace, os.fsync = replace, fsync
"""

# A store whose full usage scan takes a minute.
SLOW_SCAN = """
import time
import nixcache.server.usage as usage
_scan, _sleep = usage.scan, time.sleep
def scan(root):
    _sleep(60)
    return _scan(root)
usage.scan = scan
"""


def raw(cache: Cache, request: bytes) -> bytes:
    """One request as Nix's curl sends it (five fields and a Basic password), the whole answer."""
    host, port = cache.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def nix_like(method: str, path: str) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/7.88.1 Nix/2.8.0\r\n"
        "Accept: */*\r\nAccept-Encoding: deflate, gzip, br, zstd\r\n"
        "Authorization: Basic bml4OmFueQ==\r\nConnection: keep-alive\r\n\r\n"
    ).encode()


def test_narinfo_misses_and_hits_take_the_fast_path(start_cache: StartCache) -> None:
    cache = start_cache(preamble=NO_SLOW_NARINFO)
    entry = make_entry()
    push(cache.client, entry, cache.token)
    absent = make_entry().hash_part
    miss = cache.client.get(f"/{absent}.narinfo")
    assert (miss.status_code, miss.text) == (404, f"{absent}.narinfo is not in this cache\n")
    head = cache.client.head(f"/{absent}.narinfo")  # current Nix checks presence with HEAD
    assert (head.status_code, head.content) == (404, b"")
    assert cache.client.get(f"/{entry.hash_part}.narinfo").status_code == 200
    assert cache.client.head(f"/{entry.hash_part}.narinfo").status_code == 200
    # With the fields Nix's curl sends, too.
    answer = raw(cache, nix_like("GET", f"/{absent}.narinfo"))
    assert answer.startswith(b"HTTP/1.1 404 ") and answer.endswith(b"is not in this cache\n"), answer
    answer = raw(cache, nix_like("HEAD", f"/{entry.hash_part}.narinfo"))
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    # The stand-in is in place: a narinfo that cannot take the fast path (a query) gets it.
    assert cache.client.get(f"/{absent}.narinfo?x=1").status_code == 500


def test_reads_are_not_held_up_by_an_uploads_fsync(start_cache: StartCache) -> None:
    cache = start_cache(preamble=SLOW_FSYNC)
    entry = make_entry()
    put = cache.client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes, auth=cache.auth)
    assert put.status_code == 201, put.text
    done: list[int] = []

    def put_narinfo() -> None:
        with httpx.Client(base_url=cache.url, timeout=30) as client:
            done.append(
                client.put(
                    f"/{entry.hash_part}.narinfo", content=entry.narinfo(), auth=cache.auth
                ).status_code
            )

    uploader = threading.Thread(target=put_narinfo)
    uploader.start()
    time.sleep(0.3)  # the upload is in its 2 s fsync now
    begin = time.monotonic()
    miss = cache.client.get(f"/{make_entry().hash_part}.narinfo")
    waited = time.monotonic() - begin
    uploading = uploader.is_alive()
    uploader.join(30)
    assert miss.status_code == 404
    assert uploading, "the upload ended before the read: its fsync was not slow"
    assert waited < 1.0, f"a narinfo read waited {waited:.2f} s behind an upload's 2 s fsync"
    assert done == [201]
    assert cache.client.get(f"/{entry.hash_part}.narinfo").status_code == 200


def test_reads_are_answered_while_an_upload_publishes_and_its_fsyncs_overlap(
    start_cache: StartCache, tmp_path: Path
) -> None:
    fsyncs = tmp_path / "fsyncs"
    cache = start_cache(preamble=f"FSYNCS = {str(fsyncs)!r}\n" + SLOW_METADATA)
    entry = make_entry()
    answers: dict[str, int] = {}
    deadline = time.monotonic() + 60
    while not (cache.store / "signed" / "KEYS").exists():  # the start's own writes are done
        assert time.monotonic() < deadline, "signed/KEYS never written"
        time.sleep(0.1)

    def put(path: str, body: bytes) -> None:
        with httpx.Client(base_url=cache.url, timeout=60) as client:
            answers[path] = client.put(path, content=body, auth=cache.auth).status_code

    for path, body in (
        (f"/nar/{entry.nar_file}", entry.file_bytes),
        (f"/{entry.hash_part}.narinfo", entry.narinfo()),
    ):
        fsyncs.write_text("")
        uploader = threading.Thread(target=put, args=(path, body))
        uploader.start()
        time.sleep(1.0)  # past the fsyncs (0.5 s): the upload renames its files into place now
        begin = time.monotonic()
        miss = cache.client.get(f"/{make_entry().hash_part}.narinfo")
        waited = time.monotonic() - begin
        uploading = uploader.is_alive()
        uploader.join(60)
        assert miss.status_code == 404
        assert uploading, f"PUT {path} ended before the read: its renames were not slow"
        assert waited < 1.0, f"a narinfo read waited {waited:.2f} s behind PUT {path}'s 2 s rename"
        assert answers[path] == 201
        # The NAR and its meta, the narinfo and its signed text: each pair fsync'ed at once. Each
        # fsync logs how many were running as it began: 1 then 2, or 2 and 2 when both threads
        # entered before either logged; 1 and 1 would mean one after the other.
        running = fsyncs.read_text().split()
        assert len(running) == 2, f"PUT {path}: {len(running)} fsyncs of upload files, not 2"
        assert "2" in running, f"PUT {path}: fsyncs one after the other"
    assert cache.client.get(f"/{entry.hash_part}.narinfo").status_code == 200


def write_entry(
    store: Path, entry: Entry, last_served: float, uploaded: float, nar_uploaded: float | None = None
) -> None:
    """`entry` written straight into the store's layout, as bench/store_scale.py does."""
    for name in ("narinfo", "nar", "nar-meta"):
        (store / name).mkdir(parents=True, exist_ok=True)
    nar = store / "nar" / entry.nar_file
    nar.write_bytes(entry.file_bytes)
    os.utime(nar, (nar_uploaded or uploaded,) * 2)
    narinfo = entry.narinfo()
    nar_hash = re.search(r"^NarHash: (\S+)$", narinfo, re.M).group(1)  # type: ignore[union-attr]
    (store / "nar-meta" / entry.nar_file).write_text(f"{nar_hash} {len(entry.nar)}\n")
    path = store / "narinfo" / f"{entry.hash_part}.narinfo"
    path.write_text(narinfo)
    os.utime(path, (last_served, uploaded))


def test_the_first_narinfo_is_served_before_the_usage_scan_ends(
    start_cache: StartCache, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    entry = make_entry()
    write_entry(store, entry, time.time() - DAY, time.time() - 2 * DAY)
    cache = start_cache(store=store, preamble=SLOW_SCAN)  # serving within 20 s, or this fails
    assert cache.client.get(f"/{entry.hash_part}.narinfo").status_code == 200
    assert metric(cache, "nixcache_store_scan_timestamp_seconds") == 0  # still scanning


def metric(cache: Cache, name: str) -> float:
    text = cache.client.get("/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def usage_metrics(cache: Cache) -> tuple[float, float, float]:
    return (
        metric(cache, "nixcache_store_entries"),
        metric(cache, "nixcache_store_nar_files"),
        metric(cache, "nixcache_store_bytes"),
    )


def test_usage_after_uploads_and_gc_equals_a_full_scan(start_cache: StartCache, tmp_path: Path) -> None:
    store = tmp_path / "store"
    old = [make_entry(os.urandom(3000 + i), compression="none") for i in range(3)]
    for entry in old:
        write_entry(store, entry, time.time() - 10 * DAY, time.time() - 20 * DAY)
    cache = start_cache(store=store)
    deadline = time.monotonic() + 20
    while metric(cache, "nixcache_store_scan_timestamp_seconds") == 0:  # the start's scan
        assert time.monotonic() < deadline, "the usage scan did not finish"
        time.sleep(0.05)
    fresh = [make_entry(os.urandom(2000 + i)) for i in range(4)]
    for entry in fresh:
        push(cache.client, entry, cache.token)
    # The same narinfo again, then with another size (a Deriver added): replaced, not added.
    push(cache.client, fresh[0], cache.token)
    longer = fresh[1].narinfo(Deriver=f"{fresh[1].hash_part}-pkg.drv")
    assert (
        cache.client.put(f"/{fresh[1].hash_part}.narinfo", content=longer, auth=cache.auth).status_code == 201
    )
    # A second narinfo naming an existing NAR (the NAR is counted once).
    twin = Entry(**{**fresh[2].__dict__, "hash_part": make_entry().hash_part})
    twin.store_path = f"/nix/store/{twin.hash_part}-pkg"
    push(cache.client, twin, cache.token)
    counted = scan(store)
    assert usage_metrics(cache) == (
        counted.entries,
        counted.nar_files,
        counted.narinfo_bytes + counted.nar_bytes,
    )
    result = gcmod.run(gcmod.Limits(store=store, older_than=5 * DAY), echo=lambda _: None)
    assert sorted(result.deleted) == sorted(e.hash_part for e in old)
    counted = scan(store)
    assert counted.entries == len(fresh) + 1
    expected = (counted.entries, counted.nar_files, counted.narinfo_bytes + counted.nar_bytes)
    assert usage_metrics(cache) == expected
    # Another process serving the same store (a worker) shows the same totals.
    other = start_cache(store=store, name="other")
    assert usage_metrics(other) == expected


def test_gc_on_a_generated_store_deletes_the_least_recently_served(tmp_path: Path) -> None:
    """200 entries written in the store's layout, served 0..199 days ago, a few with young
    NARs, two sharing a NAR, orphans old and young: gc --max-size keeps what a plain model of
    the rules keeps (least recently served first, grace period, shared NARs), and no narinfo
    is left without its NAR."""
    import subprocess

    store = tmp_path / "store"
    now = time.time()
    entries = [make_entry(os.urandom(1000 + 10 * i), compression="none") for i in range(200)]
    young = {entries[i].hash_part for i in (150, 170, 199)}  # among the oldest: kept whole
    for i, entry in enumerate(entries):
        nar_uploaded = now - 60 if entry.hash_part in young else None
        write_entry(store, entry, now - (i + 1) * DAY, now - 400 * DAY, nar_uploaded)
    twin = Entry(**{**entries[180].__dict__, "hash_part": make_entry().hash_part})
    write_entry(store, twin, now - 0.5 * DAY, now - 400 * DAY)  # keeps entries[180]'s NAR
    orphan_old, orphan_young = make_entry(os.urandom(5000)), make_entry(os.urandom(5000))
    for orphan, age in ((orphan_old, 2 * DAY), (orphan_young, 60)):
        (store / "nar" / orphan.nar_file).write_bytes(orphan.file_bytes)
        os.utime(store / "nar" / orphan.nar_file, (now - age, now - age))

    def size(path: Path) -> int:
        return path.stat().st_size if path.exists() else 0

    def entry_bytes(entry: Entry) -> tuple[int, int]:
        return size(store / "narinfo" / f"{entry.hash_part}.narinfo"), size(
            store / "nar" / entry.nar_file
        ) + size(store / "nar-meta" / entry.nar_file)

    total = sum(size(p) for d in ("narinfo", "nar", "nar-meta") for p in (store / d).iterdir())
    limit = total // 2
    # The model: orphans past the grace period go; then oldest first until under the limit.
    left = total - size(store / "nar" / orphan_old.nar_file)
    expected_deleted = []
    by_age = sorted([*entries, twin], key=lambda e: -(entries.index(e) + 1) if e is not twin else -0.5)
    for entry in by_age:
        if left <= limit:
            break
        if entry.hash_part in young:
            continue
        narinfo_bytes, nar_bytes = entry_bytes(entry)
        shared = entry.nar_file == twin.nar_file and entry is not twin
        left -= narinfo_bytes + (0 if shared else nar_bytes)
        expected_deleted.append(entry.hash_part)
    out = subprocess.run(
        nixcache_cmd("gc", "--store", str(store), "--max-size", str(limit)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    kept = {p.name.removesuffix(".narinfo") for p in (store / "narinfo").iterdir()}
    deleted = {e.hash_part for e in [*entries, twin]} - kept
    assert deleted == set(expected_deleted)
    assert young <= kept
    assert not (store / "nar" / orphan_old.nar_file).exists()
    assert (store / "nar" / orphan_young.nar_file).exists()
    assert (store / "nar" / entries[180].nar_file).exists()  # the twin still names it
    for hash_part in kept:
        text = (store / "narinfo" / f"{hash_part}.narinfo").read_text()
        name = re.search(r"^URL: nar/(\S+)$", text, re.M).group(1)  # type: ignore[union-attr]
        assert (store / "nar" / name).exists() and (store / "nar-meta" / name).exists()
    assert f"deleted {len(expected_deleted)} narinfos" in out.stdout


@pytest.mark.parametrize("signed", [True, False])
def test_gc_deletes_the_signed_copy_of_a_narinfo(tmp_path: Path, signed: bool) -> None:
    store = tmp_path / "store"
    entry = make_entry()
    write_entry(store, entry, time.time() - 30 * DAY, time.time() - 30 * DAY)
    if signed:
        (store / "signed").mkdir()
        (store / "signed" / f"{entry.hash_part}.narinfo").write_text("signed\n")
    gcmod.run(gcmod.Limits(store=store, older_than=DAY), echo=lambda _: None)
    assert not (store / "narinfo" / f"{entry.hash_part}.narinfo").exists()
    assert not (store / "signed" / f"{entry.hash_part}.narinfo").exists()

"""Signed narinfos on disk (signed/<hash>.narinfo): written with the narinfo, served as they are
after a restart, deleted with the narinfo by gc and verify, re-signed in the background after a
key change while every GET stays valid."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx

from nixcache.keys import SecretKey
from nixcache.server import narinfo
from server.conftest import Cache, StartCache
from server.helpers import ServerProcess, make_entry, nixcache_cmd, push, start_server, write_key
from server.tiers_support import binary_cache_server, metric, publish_upstream, write_config


def signed_file(store: Path, hash_part: str) -> Path:
    return store / "signed" / f"{hash_part}.narinfo"


def signed_by(text: str, key: SecretKey) -> bool:
    info = narinfo.parse(text)
    return any(key.public().verify(sig, info.fingerprint("/nix/store")) for sig in info.sigs)


def serve(store: Path, home: Path, *keys: Path, log: str = "server.log") -> ServerProcess:
    """`nixcache serve` on `store` signing with `keys` (a restart: same store, chosen keys)."""
    home.mkdir(exist_ok=True)
    token = home / "push-token"
    token.write_text("push-secret\n")
    args = ["--listen", "127.0.0.1:0", "--store", str(store), "--push-token-file", str(token)]
    for key in keys:
        args += ["--signing-key", str(key)]
    return start_server(args, home=home, log=home / log)


def write_entries(store: Path, count: int) -> list[str]:
    """`count` narinfos written straight into narinfo/, as a store from before signed/ holds them
    (their NARs are not needed to serve narinfos); their hash parts in name order."""
    (store / "narinfo").mkdir(parents=True)
    hashes = []
    for i in range(count):
        entry = make_entry(f"entry {i}".encode())
        (store / "narinfo" / f"{entry.hash_part}.narinfo").write_text(entry.narinfo())
        hashes.append(entry.hash_part)
    return sorted(hashes)


def wait_for(condition, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def keys_on_disk(store: Path) -> str | None:
    """signed/KEYS, None while there is none."""
    try:
        return (store / "signed" / "KEYS").read_text()
    except FileNotFoundError:
        return None


def test_a_pushed_narinfo_is_on_disk_as_served(cache: Cache) -> None:
    entry = make_entry(os.urandom(1000))
    push(cache.client, entry, cache.token)
    served = cache.client.get(f"/{entry.hash_part}.narinfo")
    assert served.status_code == 200
    assert signed_file(cache.store, entry.hash_part).read_bytes() == served.content
    assert signed_by(served.text, cache.key)
    assert (cache.store / "signed" / "KEYS").read_text() == f"{cache.key.public()}\n"


def test_a_restarted_server_serves_the_file_as_it_is(tmp_path: Path) -> None:
    """After a restart nothing is signed again: the file is read (its inode and mtime stay) and
    its bytes are the answer, whatever they are."""
    store, key_file = tmp_path / "store", write_key(tmp_path)[0]
    server = serve(store, tmp_path / "a", key_file)
    entry = make_entry(os.urandom(1000))
    try:
        push(httpx.Client(base_url=server.url), entry, "push-secret")
    finally:
        server.stop()
    path = signed_file(store, entry.hash_part)
    before = path.stat()
    marked = path.read_text().replace("References:", "References: ", 1)  # still a valid narinfo
    path.write_text(marked)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    written = path.stat()

    server = serve(store, tmp_path / "b", key_file)
    try:
        with httpx.Client(base_url=server.url) as client:
            for _ in range(3):
                response = client.get(f"/{entry.hash_part}.narinfo")
                assert response.status_code == 200
                assert response.text == marked  # the file's bytes, not a new rendering
    finally:
        server.stop()
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)


def test_a_missing_signed_file_is_signed_served_and_written(cache: Cache) -> None:
    entry = make_entry(os.urandom(1000))
    push(cache.client, entry, cache.token)
    path = signed_file(cache.store, entry.hash_part)
    path.unlink()
    served = cache.client.get(f"/{entry.hash_part}.narinfo")
    assert served.status_code == 200 and signed_by(served.text, cache.key)
    assert path.read_bytes() == served.content
    narinfo_mtime = (cache.store / "narinfo" / f"{entry.hash_part}.narinfo").stat().st_mtime_ns
    assert path.stat().st_mtime_ns == narinfo_mtime  # the served mark keeps the upload time


def test_a_push_again_replaces_the_signed_file(cache: Cache) -> None:
    entry = make_entry(os.urandom(1000))
    push(cache.client, entry, cache.token)
    deriver = f"{'1' * 32}-pkg.drv"
    response = cache.client.put(
        f"/{entry.hash_part}.narinfo", content=entry.narinfo(Deriver=deriver), auth=cache.auth
    )
    assert response.status_code == 201
    served = cache.client.get(f"/{entry.hash_part}.narinfo")
    assert f"Deriver: {deriver}\n" in served.text and signed_by(served.text, cache.key)
    assert signed_file(cache.store, entry.hash_part).read_bytes() == served.content


def test_gc_deletes_the_signed_file_with_its_narinfo(cache: Cache) -> None:
    old, new = make_entry(os.urandom(1000)), make_entry(os.urandom(1000))
    for entry in (old, new):
        push(cache.client, entry, cache.token)
    t = time.time() - 10 * 86400
    for path in (cache.store / "narinfo" / f"{old.hash_part}.narinfo", cache.store / "nar" / old.nar_file):
        os.utime(path, (t, t))
    out = subprocess.run(
        nixcache_cmd("gc", "--store", str(cache.store), "--older-than", "5d"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert not signed_file(cache.store, old.hash_part).exists()
    assert cache.client.get(f"/{old.hash_part}.narinfo").status_code == 404
    assert signed_file(cache.store, new.hash_part).exists()
    assert cache.client.get(f"/{new.hash_part}.narinfo").status_code == 200


def test_quarantine_deletes_the_signed_file(cache: Cache) -> None:
    entry = make_entry(os.urandom(1000), compression="none")
    push(cache.client, entry, cache.token)
    nar = cache.store / "nar" / entry.nar_file
    nar.write_bytes(nar.read_bytes()[:-1] + b"\1")
    out = subprocess.run(
        nixcache_cmd("verify", "--store", str(cache.store)), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert not signed_file(cache.store, entry.hash_part).exists()
    assert cache.client.get(f"/{entry.hash_part}.narinfo").status_code == 404


def test_a_pulled_through_path_gets_its_signed_file(start_cache: StartCache, tmp_path: Path) -> None:
    root = tmp_path / "upstream"
    _, upstream_key = write_key(tmp_path, "upstream-1")
    entry = make_entry(os.urandom(10_000))
    publish_upstream(root, entry, upstream_key)
    with binary_cache_server(root) as url:
        config = write_config(tmp_path / "up.toml", upstreams=[(url, [str(upstream_key.public())])])
        cache = start_cache("--config", str(config))
        first = cache.client.get(f"/{entry.hash_part}.narinfo")
        assert first.status_code == 200 and signed_by(first.text, cache.key)
        assert cache.client.get(f"/nar/{entry.nar_file}").content == entry.file_bytes
    path = signed_file(cache.store, entry.hash_part)
    wait_for(path.exists)  # published once the NAR is stored
    again = cache.client.get(f"/{entry.hash_part}.narinfo")
    assert again.status_code == 200 and path.read_bytes() == again.content
    assert signed_by(again.text, cache.key) and signed_by(again.text, upstream_key)


def test_a_key_rotation_re_signs_in_the_background_while_serving(tmp_path: Path) -> None:
    """A store of narinfos from before signed/ is signed by A at the first start; restarted with
    A and B (the rotation's overlap phase), it re-signs everything while every GET is 200 and
    signed by A; at the end every file carries both, the metric is 0 and KEYS names both."""
    store = tmp_path / "store"
    hashes = write_entries(store, 1500)
    key_a, a = write_key(tmp_path, "cache-a-1")
    key_b, b = write_key(tmp_path, "cache-b-1")

    server = serve(store, tmp_path / "a", key_a)
    try:
        with httpx.Client(base_url=server.url) as client:
            wait_for(lambda: (store / "signed" / "KEYS").exists())
            assert metric(client, "nixcache_resign_pending") == 0
            assert metric(client, "nixcache_resign_total") == len(hashes)
    finally:
        server.stop()
    assert all(signed_by(signed_file(store, h).read_text(), a) for h in hashes)

    server = serve(store, tmp_path / "b", key_a, key_b)
    seen_a_only = 0
    stop = threading.Event()
    failures: list[str] = []

    def read_all() -> None:  # a client reading every path, newest-signed last, while it re-signs
        nonlocal seen_a_only
        with httpx.Client(base_url=server.url) as client:
            while not stop.is_set():
                for h in reversed(hashes):
                    response = client.get(f"/{h}.narinfo")
                    if response.status_code != 200 or not signed_by(response.text, a):
                        failures.append(f"{h}: {response.status_code} {response.text[:200]}")
                    elif not signed_by(response.text, b):
                        seen_a_only += 1

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        with httpx.Client(base_url=server.url) as client:
            wait_for(lambda: (store / "signed" / "KEYS").read_text().count("\n") == 2, timeout=120)
            assert metric(client, "nixcache_resign_pending") == 0
            assert metric(client, "nixcache_resign_total") == len(hashes)
    finally:
        stop.set()
        reader.join()
        server.stop()
    assert not failures, failures[:3]
    assert seen_a_only > 0  # the old texts were served while the new ones were written
    assert (store / "signed" / "KEYS").read_text() == f"{a.public()}\n{b.public()}\n"
    assert not (store / "signed" / "KEYS.next").exists()
    for h in hashes:
        text = signed_file(store, h).read_text()
        assert signed_by(text, a) and signed_by(text, b)
    log = (tmp_path / "b" / "server.log").read_text()
    assert "the keys changed: re-signing 1500 with cache-a-1, cache-b-1" in log
    assert "all 1500 re-signed" in log


def test_a_restart_during_the_re_signing_resumes_where_it_stopped(tmp_path: Path) -> None:
    """The state a run stopped after its first batch leaves: KEYS of the old keys, KEYS.next
    with the new ones and the last hash done. The next start re-signs only what follows."""
    store = tmp_path / "store"
    hashes = write_entries(store, 700)
    key_a, a = write_key(tmp_path, "cache-a-1")
    key_b, b = write_key(tmp_path, "cache-b-1")
    signed = store / "signed"
    signed.mkdir()
    (signed / "KEYS").write_text(f"{a.public()}\n")
    through = hashes[499]
    new_keys = f"{a.public()}\n{b.public()}\n"
    (signed / "KEYS.next").write_text(json.dumps({"keys": new_keys, "through": through}))

    server = serve(store, tmp_path / "b", key_a, key_b)
    try:
        with httpx.Client(base_url=server.url) as client:
            wait_for(lambda: (signed / "KEYS").read_text() == new_keys)
            assert metric(client, "nixcache_resign_total") == 200
            for h in hashes:  # the first 500 are signed on their first GET (no file): A and B
                response = client.get(f"/{h}.narinfo")
                assert response.status_code == 200
                assert signed_by(response.text, a) and signed_by(response.text, b)
    finally:
        server.stop()
    assert f"resuming after {through}" in (tmp_path / "b" / "server.log").read_text()


def test_verify_deletes_a_signed_file_that_disagrees_and_the_server_signs_again(cache: Cache) -> None:
    wrong, orphan, intact = (make_entry(os.urandom(1000)) for _ in range(3))
    for entry in (wrong, orphan, intact):
        push(cache.client, entry, cache.token)
    path = signed_file(cache.store, wrong.hash_part)
    path.write_text(path.read_text().replace(f"NarSize: {len(wrong.nar)}", f"NarSize: {len(wrong.nar) + 1}"))
    (cache.store / "narinfo" / f"{orphan.hash_part}.narinfo").unlink()  # as a bug could leave it
    out = subprocess.run(
        nixcache_cmd("verify", "--store", str(cache.store)), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"damaged: signed/{wrong.hash_part}.narinfo disagrees with narinfo/" in out.stdout
    assert f"damaged: signed/{orphan.hash_part}.narinfo is served, but narinfo/" in out.stdout
    assert "2 damaged, 0 files quarantined; 2 signed narinfos deleted" in out.stdout
    assert not path.exists() and not signed_file(cache.store, orphan.hash_part).exists()
    assert cache.client.get(f"/{orphan.hash_part}.narinfo").status_code == 404
    served = cache.client.get(f"/{wrong.hash_part}.narinfo")
    assert served.status_code == 200 and f"NarSize: {len(wrong.nar)}\n" in served.text
    assert path.read_bytes() == served.content
    assert (
        subprocess.run(nixcache_cmd("verify", "--store", str(cache.store)), capture_output=True).returncode
        == 0
    )


def test_unrelated_keys_never_serve_a_text_of_the_old_ones(tmp_path: Path) -> None:
    """A key change without an overlap phase (no key in common): clients trusting only the new
    key would refuse the old texts, so none is served, not even before the re-signing ends."""
    store = tmp_path / "store"
    hashes = write_entries(store, 600)
    key_a, a = write_key(tmp_path, "cache-a-1")
    key_c, c = write_key(tmp_path, "cache-c-1")
    server = serve(store, tmp_path / "a", key_a)
    try:
        wait_for(lambda: (store / "signed" / "KEYS").exists())
    finally:
        server.stop()
    server = serve(store, tmp_path / "c", key_c)
    try:
        with httpx.Client(base_url=server.url) as client:
            for h in reversed(hashes):  # the last in name order first: re-signed last
                response = client.get(f"/{h}.narinfo")
                assert response.status_code == 200
                assert signed_by(response.text, c) and not signed_by(response.text, a)
            # Unrelated keys swap in a fresh signed/ (the old one set aside): KEYS is briefly absent.
            wait_for(lambda: keys_on_disk(store) == f"{c.public()}\n")
            wait_for(lambda: not list(tmp_path.glob("store/signed.old.*")))
    finally:
        server.stop()
    assert all(signed_by(signed_file(store, h).read_text(), c) for h in hashes)

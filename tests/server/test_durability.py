"""Crashes and full disks leave no half-written entry visible."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import require

from nixcache.keys import SecretKey
from nixcache.server import narinfo
from nixcache.server.store import Store
from server.conftest import Cache, StartCache
from server.helpers import make_entry, push


def test_kill_9_during_upload_leaves_nothing_visible(start_cache: StartCache, tmp_path: Path) -> None:
    cache = start_cache()
    done = make_entry()
    push(cache.client, done, cache.token)
    entry = make_entry(os.urandom(2_000_000), compression="none")
    host, port = cache.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    basic = base64.b64encode(f"nix:{cache.token}".encode()).decode()
    sock.sendall(
        (
            f"PUT /nar/{entry.nar_file} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {basic}\r\n"
            f"Content-Length: {len(entry.file_bytes)}\r\n\r\n"
        ).encode()
        + entry.file_bytes[:1_000_000]
    )
    # Wait (bounded) until the server has started writing the upload, then kill it hard.
    deadline = time.monotonic() + 10
    while not any((cache.store / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any((cache.store / "tmp").iterdir()), "the upload never reached tmp/"
    cache.server.proc.send_signal(signal.SIGKILL)
    cache.server.proc.wait(10)
    sock.close()
    assert not (cache.store / "nar" / entry.nar_file).exists()
    assert not (cache.store / "nar-meta" / entry.nar_file).exists()

    again = start_cache(store=cache.store, name="restarted")
    assert list((cache.store / "tmp").iterdir()) == []  # leftovers dropped at start
    assert again.client.head(f"/nar/{entry.nar_file}").status_code == 404
    served = again.client.get(f"/{done.hash_part}.narinfo")  # what was complete survived
    assert served.status_code == 200
    sig = served.text.split("Sig: ")[1].strip()
    assert again.key.public().verify(sig, narinfo.parse(served.text).fingerprint("/nix/store"))
    push(again.client, entry, again.token)  # and the interrupted push can be redone
    assert again.client.get(f"/nar/{entry.nar_file}").content == entry.file_bytes


def test_disk_full_is_507_and_leaves_nothing(start_cache: StartCache, tmp_path: Path) -> None:
    require(os.geteuid() == 0, "mounting a small tmpfs needs root")
    mount = tmp_path / "full"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        cache = start_cache(store=mount / "store")
        big = make_entry(os.urandom(2_000_000), compression="none")
        response = cache.client.put(f"/nar/{big.nar_file}", content=big.file_bytes, auth=cache.auth)
        assert response.status_code == 507
        assert "no space left" in response.text
        assert list((cache.store / "nar").iterdir()) == []
        assert list((cache.store / "tmp").iterdir()) == []
        small = make_entry(b"fits")
        push(cache.client, small, cache.token)  # the failed upload freed its space
        assert cache.client.get(f"/{small.hash_part}.narinfo").status_code == 200
        cache.server.stop()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_pushing_a_nar_again_repairs_its_damaged_meta(cache: Cache) -> None:
    """The narinfo refusal says "upload the NAR again": that upload must not be skipped as
    already here while the recorded NarHash is unreadable."""
    entry = make_entry()
    response = cache.client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes, auth=cache.auth)
    assert response.status_code == 201
    (cache.store / "nar-meta" / entry.nar_file).write_text("garbage\n")
    refused = cache.client.put(f"/{entry.hash_part}.narinfo", content=entry.narinfo(), auth=cache.auth)
    assert refused.status_code == 400 and "upload the NAR again" in refused.text
    push(cache.client, entry, cache.token)
    assert cache.client.get(f"/{entry.hash_part}.narinfo").status_code == 200


def test_a_narinfo_is_answered_only_once_it_and_its_nar_are_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order of the syscalls that make an upload durable: each file fsync'ed before it is
    renamed into place, and the narinfo's PUT returning only after the directories that hold
    its NAR and the NAR's meta (renamed by the NAR's PUT) and itself (after its rename) were
    fsync'ed."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        events.append(("fsync", f"{target.name}/" if target.is_dir() else target.name))

    def replace(src: str | Path, dst: str | Path) -> None:
        real_replace(src, dst)
        events.append(("rename", Path(src).name))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store = Store(tmp_path / "store", keys=[SecretKey.generate("test-1")])
    store.create()
    entry = make_entry()
    store.put_nar(entry.nar_file, io.BytesIO(entry.file_bytes), len(entry.file_bytes), 1 << 30)
    nar_events, events[:] = list(events), []
    body = entry.narinfo().encode()
    store.put_narinfo(entry.hash_part, io.BytesIO(body), len(body), 1 << 20)

    def synced_before_renamed(steps: list[tuple[str, str]], prefix: str) -> None:
        name = next(what for step, what in steps if step == "rename" and what.startswith(prefix))
        assert steps.index(("fsync", name)) < steps.index(("rename", name)), steps

    synced_before_renamed(nar_events, entry.nar_file + ".")
    synced_before_renamed(nar_events, f"{entry.nar_file}.meta.")
    synced_before_renamed(events, f"{entry.hash_part}.narinfo.")
    synced_before_renamed(events, f"{entry.hash_part}.signed.")
    assert ("fsync", "nar/") in events and ("fsync", "nar-meta/") in events, events
    renamed = next(
        i for i, (step, what) in enumerate(events) if (step, what[:33]) == ("rename", f"{entry.hash_part}.")
    )
    assert ("fsync", "narinfo/") in events[renamed:], events

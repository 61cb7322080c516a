"""The nginx front serving from disk: Debian's real nginx with the site the deploy renders
(operations/nginx.py), in front of a real `nixcache serve`, on loopback.

nginx answers signed narinfos (`signed/<hash>.narinfo`, written here as the server answers
GET /<hash>.narinfo) and NAR GETs from the store's files; the server answers the rest, records
nginx's hits as served (gc) and counts them (metrics). Seen from outside: status, headers,
bodies, what gc keeps.
"""

from __future__ import annotations

import base64
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import require
from support.front import Front, hits_log_for, start_front

from nixcache.server import narinfo
from operations import nginx
from server.conftest import Cache, StartCache
from server.helpers import Entry, make_entry, nixcache_cmd, push

DAY = 86400
UNAUTHORIZED = 'Basic realm="nixcache"'


@dataclass
class Fronted:
    cache: Cache
    front: Front
    client: httpx.Client  # to the front, over TLS
    hits: Path  # nginx's log of disk hits

    def sign(self, entry: Entry) -> bytes:
        """signed/<hash>.narinfo: exactly what the server answers to GET /<hash>.narinfo (another
        branch makes the server write these), made here without asking it (a GET would count as
        served)."""
        stored = (self.cache.store / "narinfo" / f"{entry.hash_part}.narinfo").read_text()
        body = narinfo.parse(stored, "/nix/store").signed([self.cache.key], "/nix/store").encode()
        signed = self.cache.store / "signed"
        signed.mkdir(exist_ok=True)
        (signed / f"{entry.hash_part}.narinfo").write_bytes(body)
        return body

    def app_requests(self, route: str) -> float:
        """Reads the server itself answered on a route (nixcache_http_requests_total, GET and HEAD)."""
        text = self.cache.client.get("/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("nixcache_http_requests_total{")
            and f'route="{route}"' in line
            and ('method="GET"' in line or 'method="HEAD"' in line)
        )


@pytest.fixture
def start_fronted(start_cache: StartCache, tmp_path: Path) -> Iterator[Callable[..., Fronted]]:
    require(
        shutil.which("nginx") or Path("/usr/sbin/nginx").exists(),
        "nginx missing (apt-get install nginx-light)",
    )
    require(shutil.which("openssl") is not None, "openssl missing")
    fronts: list[Fronted] = []

    def start(read_token: bool = False) -> Fronted:
        hits = hits_log_for(tmp_path)
        config = tmp_path / "front.toml"
        config.write_text(f'front_hits_log = "{hits}"\naccel_redirect_prefix = "/_nixcache_store/"\n')
        cache = start_cache("--config", str(config), read_token=read_token)
        port = int(cache.url.rsplit(":", 1)[1])
        front = start_front(tmp_path / "front", port, cache.store, hits, cache.read_token)
        fronted = Fronted(
            cache,
            front,
            httpx.Client(
                base_url=front.url, verify=ssl.create_default_context(cafile=front.cert), timeout=30
            ),
            hits,
        )
        fronts.append(fronted)
        return fronted

    yield start
    for fronted in fronts:
        fronted.client.close()
        fronted.front.stop()


def from_disk(response: httpx.Response) -> bool:
    """nginx's static file handler answered (ETag, Last-Modified); the server sends neither."""
    return "etag" in response.headers and "last-modified" in response.headers


def test_signed_narinfos_and_nars_are_served_from_disk(start_fronted: Callable[..., Fronted]) -> None:
    f = start_fronted()
    entry = make_entry(os.urandom(100_000), compression="xz")
    push(f.cache.client, entry, f.cache.token)
    body = f.sign(entry)
    before = f.app_requests("narinfo"), f.app_requests("nar")

    answer = f.client.get(f"/{entry.hash_part}.narinfo")
    assert answer.status_code == 200 and from_disk(answer)
    assert answer.content == body and b"Sig: test-cache-1:" in body
    assert answer.headers["content-type"] == "text/x-nix-narinfo"
    assert f.client.head(f"/{entry.hash_part}.narinfo").status_code == 200

    nar = f.client.get(f"/nar/{entry.nar_file}")
    assert nar.status_code == 200 and from_disk(nar) and nar.content == entry.file_bytes
    assert nar.headers["content-type"] == "application/x-nix-nar"
    assert nar.headers["accept-ranges"] == "bytes"
    part = f.client.get(f"/nar/{entry.nar_file}", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == entry.file_bytes[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(entry.file_bytes)}"
    # None of these reached the server, whose own answer is the same bytes.
    assert (f.app_requests("narinfo"), f.app_requests("nar")) == before
    assert f.cache.client.get(f"/{entry.hash_part}.narinfo").content == body


def test_misses_uploads_and_nar_heads_go_to_the_server(start_fronted: Callable[..., Fronted]) -> None:
    f = start_fronted()
    # Pushed through the front: PUTs pass the disk locations to the server, bodies intact.
    entry = make_entry(os.urandom(50_000), compression="zstd")
    push(f.client, entry, f.cache.token)
    # The push wrote its signed text: nginx serves it.
    assert from_disk(f.client.get(f"/{entry.hash_part}.narinfo"))
    # Stored without its signed text (an older store, or verify deleted it): the server signs
    # and answers.
    (f.cache.store / "signed" / f"{entry.hash_part}.narinfo").unlink()
    time.sleep(nginx.OPEN_FILE_CACHE_VALID + 0.2)  # a worker may serve its open descriptor until then
    unsigned = f.client.get(f"/{entry.hash_part}.narinfo")
    assert unsigned.status_code == 200 and not from_disk(unsigned)
    assert f"StorePath: {entry.store_path}" in unsigned.text and "Sig: test-cache-1:" in unsigned.text
    absent = make_entry()
    miss = f.client.get(f"/{absent.hash_part}.narinfo")
    assert miss.status_code == 404 and "is not in this cache" in miss.text
    assert f.client.get(f"/nar/{absent.nar_file}").status_code == 404
    # Pushers HEAD a NAR before uploading: the server answers (and keeps it from gc meanwhile).
    head = f.client.head(f"/nar/{entry.nar_file}")
    assert head.status_code == 200 and not from_disk(head)
    assert f.client.get("/nix-cache-info").text.startswith("StoreDir: /nix/store\n")


def test_read_tokens_checked_by_nginx_without_asking_the_server(
    start_fronted: Callable[..., Fronted],
) -> None:
    f = start_fronted(read_token=True)
    token = f.cache.read_token
    entry = make_entry()
    push(f.cache.client, entry, f.cache.token)
    f.sign(entry)
    path = f"/{entry.hash_part}.narinfo"
    nar = f"/nar/{entry.nar_file}"
    basic = "Basic " + base64.b64encode(f"nixcache:{token}".encode()).decode()

    for p in (path, nar):
        # No credentials: nginx refuses as the server would (same status, challenge and reason).
        refused, direct = f.client.get(p), f.cache.client.get(p)
        assert refused.status_code == direct.status_code == 401
        assert refused.headers["www-authenticate"] == direct.headers["www-authenticate"] == UNAUTHORIZED
        assert refused.text == direct.text
        # The client deploy's netrc login, and Bearer: served from disk.
        for header in (basic, f"Bearer {token}"):
            ok = f.client.get(p, headers={"Authorization": header})
            assert ok.status_code == 200 and from_disk(ok), header
        # Any other login with the token: the server decides (it checks only the password).
        other = f.client.get(p, auth=("someone", token))
        assert other.status_code == 200
        assert not from_disk(other) or p == nar  # a NAR comes back from disk via X-Accel-Redirect
        wrong = f.client.get(p, auth=("nixcache", "not-the-token"))
        assert wrong.status_code == 401 and "wrong read token" in wrong.text
        assert wrong.headers["www-authenticate"] == UNAUTHORIZED


def curl_path_as_is(f: Fronted, path: str) -> tuple[int, bytes]:
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--path-as-is",
            "--cacert",
            str(f.front.cert),
            "-w",
            "\n%{http_code}",
            f.front.url + path,
        ],
        capture_output=True,
        timeout=20,
    )
    body, _, code = out.stdout.rpartition(b"\n")
    return int(code), body


def test_no_other_file_of_the_store_is_reachable(start_fronted: Callable[..., Fronted]) -> None:
    require(shutil.which("curl") is not None, "curl missing")
    f = start_fronted()
    entry = make_entry()
    push(f.cache.client, entry, f.cache.token)
    f.sign(entry)
    store = f.cache.store
    h, nar = entry.hash_part, entry.nar_file
    (store / "tmp" / "upload.1").write_bytes(b"in flight")
    (store / "quarantine" / "20260101").mkdir(parents=True)
    (store / "quarantine" / "20260101" / f"{h}.narinfo").write_bytes(b"damaged")
    secrets = {p.read_bytes() for p in (store / "narinfo" / f"{h}.narinfo", store / "nar-meta" / nar)}
    secrets |= {b"in flight", b"damaged"}
    for path in (
        f"/narinfo/{h}.narinfo",
        f"/nar-meta/{nar}",
        f"/signed/{h}.narinfo",
        "/tmp/upload.1",
        f"/quarantine/20260101/{h}.narinfo",
        "/gc.lock",
        f"/nar/../narinfo/{h}.narinfo",
        f"/nar/..%2Fnarinfo%2F{h}.narinfo",
        f"/nar/%2E%2E/nar-meta/{nar}",
        f"/{h}.narinfo/../narinfo/{h}.narinfo",
        f"/nar/{nar}/../../nar-meta/{nar}",
        f"/_nixcache_store/{nar}",
        f"/_nixcache_store/../narinfo/{h}.narinfo",
    ):
        code, body = curl_path_as_is(f, path)
        assert code in (400, 404), (path, code, body[:200])
        assert body not in secrets and b"StorePath" not in body, path


def metric(f: Fronted, prefix: str) -> float:
    text = f.cache.client.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def gc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nixcache_cmd("gc", *args), capture_output=True, text=True, timeout=120)


def test_hits_served_only_by_nginx_count_and_protect_from_gc(start_fronted: Callable[..., Fronted]) -> None:
    f = start_fronted()
    entries = [make_entry(os.urandom(10_000), compression="none") for _ in range(3)]
    for i, entry in enumerate(entries):
        push(f.cache.client, entry, f.cache.token)
        f.sign(entry)
        t = time.time() - (10 - i) * DAY  # entry 0 the least recently served
        os.utime(f.cache.store / "narinfo" / f"{entry.hash_part}.narinfo", (t, t))
        os.utime(f.cache.store / "nar" / entry.nar_file, (t, t))
    served = entries[0]
    for _ in range(3):
        assert from_disk(f.client.get(f"/{served.hash_part}.narinfo"))
    assert from_disk(f.client.get(f"/nar/{served.nar_file}"))
    # nginx flushes its log every second and the server reads it every second.
    deadline = time.monotonic() + 10
    hits = 'nixcache_front_requests_total{method="GET",route="narinfo",status="200"}'
    while metric(f, hits) < 3:
        assert time.monotonic() < deadline, f.cache.client.get("/metrics").text
        time.sleep(0.3)
    assert metric(f, 'nixcache_front_requests_total{method="GET",route="nar",status="200"}') == 1
    assert metric(f, 'nixcache_narinfo_lookups_total{result="hit"}') >= 3
    assert metric(f, 'nixcache_served_bytes_total{route="nar"}') == len(served.file_bytes)
    assert f.app_requests("narinfo") == 0  # no read reached the server
    f.cache.server.stop()  # records the last-served times it batches, empties the hits log
    assert f.hits.stat().st_size == 0
    out = gc("--store", str(f.cache.store), "--older-than", "1d")
    assert out.returncode == 0, out.stderr
    kept = [(f.cache.store / "narinfo" / f"{e.hash_part}.narinfo").exists() for e in entries]
    assert kept == [True, False, False]


def test_the_hits_log_is_read_whole_lines_at_a_time_and_emptied_on_stop(tmp_path: Path) -> None:
    """In process, without nginx: what nginx's buffered writes can leave in the file."""
    from nixcache.server.front import HitsLog
    from nixcache.server.metrics import Metrics
    from nixcache.server.store import Store

    store = Store(tmp_path / "store")
    store.create()
    h = "7m0vbrwknkhk2jh26010az9m9wqzwqr8"
    (store.narinfo_dir / f"{h}.narinfo").write_text("stored\n")
    os.utime(store.narinfo_dir / f"{h}.narinfo", (1, 1))
    metrics = Metrics(store)
    log = tmp_path / "front-hits.log"
    log.write_bytes(b"")
    hits = HitsLog(log, store, metrics)
    with log.open("ab") as out:
        out.write(
            # (/signed/<hash>.narinfo: what sites rendered before logged; still read)
            f"GET 200 433 /{h}.narinfo\nHEAD 200 0 /signed/{h}.narinfo\nGET 206 10 /nar/".encode()
        )
        out.flush()
        assert hits.ingest() == 2  # the third line is not complete yet
        out.write(
            b"x.nar\nnot a hit line\nGET 404 0 /elsewhere\nGET 200 9 /narinfo/" + h.encode() + b".narinfo\n"
        )
        out.flush()
        assert hits.ingest() == 1
        # The same hit many times in one read (a busy second): each one counts.
        out.write(f"GET 200 433 /{h}.narinfo\n".encode() * 3)
        out.flush()
        assert hits.ingest() == 3
    assert log.stat().st_size > 0
    assert hits.ingest(final=True) == 0 and log.stat().st_size == 0
    family = {tuple(k): c.value for k, c in metrics.front.children.items()}
    assert family == {("narinfo", "GET", "200"): 4, ("narinfo", "HEAD", "200"): 1, ("nar", "GET", "206"): 1}
    assert metrics.narinfo.labels("hit").value == 5
    assert metrics.served_bytes.labels("narinfo").value == 4 * 433
    assert metrics.served_bytes.labels("nar").value == 10
    store.flush_served()
    st = os.stat(store.narinfo_dir / f"{h}.narinfo")
    assert st.st_atime > time.time() - 60 and st.st_mtime == 1  # served now, upload time kept
    hits.close()

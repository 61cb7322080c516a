"""Tiers of a fleet against a real S3 engine (SeaweedFS) and a loopback upstream cache:
write-through push, pull-through miss, origin outage, upstream trust, single-flight, origin gc."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import require
from support import nixbuild
from support.seaweed import Seaweed, seaweed  # noqa: F401 - the session fixture

from nixcache import nixenv
from nixcache.server import narinfo
from server.conftest import Cache, StartCache
from server.helpers import make_entry, nixcache_cmd, push, write_key
from server.test_nix_client import closure_of, copy_from, netrc_for
from server.tiers_support import binary_cache_server, metric, publish_upstream, write_config


@pytest.fixture
def bucket(seaweed: Seaweed) -> str:  # noqa: F811 - the fixture above
    return seaweed.make_bucket()


def fleet(start_cache: StartCache, tmp_path: Path, seaweed: Seaweed, bucket: str, *names: str, **origin):  # noqa: F811
    """Caches sharing one origin bucket, each with its own store and key."""
    config = write_config(tmp_path / "tiers.toml", seaweed=seaweed, bucket=bucket, **origin)
    return [start_cache("--config", str(config), name=name) for name in names]


def verify_sig(cache: Cache, text: str) -> bool:
    info = narinfo.parse(text)
    message = info.fingerprint("/nix/store")
    return any(cache.key.public().verify(sig, message) for sig in info.sigs)


# -- push and pull through the origin ---------------------------------------------------------


def test_push_is_written_through_and_pulled_by_another_region(
    start_cache: StartCache,
    tmp_path: Path,
    seaweed: Seaweed,  # noqa: F811
    bucket: str,
) -> None:
    eu, us = fleet(start_cache, tmp_path, seaweed, bucket, "eu", "us")
    entry = make_entry(os.urandom(300_000), compression="zstd")
    push(eu.client, entry, eu.token)

    objects = {o.object_name for o in seaweed.client().list_objects(bucket, recursive=True)}
    assert {"nix-cache-info", f"{entry.hash_part}.narinfo", f"nar/{entry.nar_file}"} <= objects

    served = us.client.get(f"/{entry.hash_part}.narinfo")
    assert served.status_code == 200, served.text
    assert verify_sig(us, served.text)  # signed by the serving cache's own key
    nar = us.client.get(f"/nar/{entry.nar_file}")
    assert nar.status_code == 200
    assert nar.content == entry.file_bytes
    assert (us.store / "narinfo" / f"{entry.hash_part}.narinfo").exists()
    assert metric(us.client, "nixcache_tier_lookups_total", tier="origin", kind="narinfo", result="hit") == 1
    assert metric(us.client, "nixcache_tier_bytes_total", tier="origin", direction="read") == len(
        entry.file_bytes
    )

    local_hits = metric(us.client, "nixcache_narinfo_lookups_total", result="hit")
    again = us.client.get(f"/{entry.hash_part}.narinfo")
    assert again.status_code == 200 and verify_sig(us, again.text)
    assert metric(us.client, "nixcache_narinfo_lookups_total", result="hit") == local_hits + 1
    assert metric(us.client, "nixcache_tier_lookups_total", tier="local", result="hit") == local_hits + 1
    assert metric(us.client, "nixcache_tier_lookups_total", tier="origin", kind="narinfo", result="hit") == 1


def test_nix_copy_to_one_region_substitutes_from_another(
    start_cache: StartCache,
    tmp_path: Path,
    seaweed: Seaweed,  # noqa: F811
    bucket: str,
) -> None:
    """The real client: nix copy --to eu, then --from us into a fresh store, require-sigs and
    only us's key trusted; bytes identical."""
    require(os.geteuid() == 0, "building into /nix/store needs root")
    eu, us = fleet(start_cache, tmp_path, seaweed, bucket, "eu", "us")
    top = nixbuild.build(
        'derivation { name = "tiers-@S@"; system = builtins.currentSystem; builder = "/bin/sh";'
        ' args = [ "-c" "echo @S@ > $out" ]; }'.replace("@S@", uuid.uuid4().hex[:12]),
        tmp_path / "build",
    )
    pushed = nixenv.run(
        ["nix", "copy", "--to", eu.url, top, "--option", "netrc-file", str(netrc_for(eu, tmp_path / "n"))],
        tmp_path / "home-push",
    )
    assert pushed.returncode == 0, pushed.stderr
    fetched = copy_from(us, top, str(us.key.public()), tmp_path, "fresh")
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "fresh" / "nix" / "store" / Path(top).name).read_bytes() == Path(top).read_bytes()
    assert {f"{name[:32]}.narinfo" for name in closure_of(top)} <= {
        p.name for p in (us.store / "narinfo").iterdir()
    }


# -- origin outage ------------------------------------------------------------------------------


def test_origin_outage_reads_stay_404_and_pushes_are_503(
    start_cache: StartCache,
    tmp_path: Path,
    seaweed: Seaweed,  # noqa: F811
    bucket: str,
) -> None:
    eu, us = fleet(start_cache, tmp_path, seaweed, bucket, "eu", "us", write_timeout=3)
    held = make_entry()
    push(eu.client, held, eu.token)
    assert us.client.get(f"/{held.hash_part}.narinfo").status_code == 200
    assert us.client.get(f"/nar/{held.nar_file}").content == held.file_bytes  # now local on us
    late = make_entry()
    absent = make_entry()
    unfetched = make_entry()  # in the origin, never asked of us before the outage
    push(eu.client, unfetched, eu.token)

    def outage_checks(kind: str) -> None:
        assert us.client.get(f"/{held.hash_part}.narinfo").status_code == 200, kind
        assert us.client.get(f"/nar/{held.nar_file}").content == held.file_bytes, kind
        start = time.monotonic()
        missing = us.client.get(f"/{absent.hash_part}.narinfo")
        assert missing.status_code == 404, kind
        assert time.monotonic() - start < 3, kind
        nar = eu.client.put(f"/nar/{late.nar_file}", content=late.file_bytes, auth=eu.auth)
        assert nar.status_code == 503, (kind, nar.text)
        assert nar.headers["Retry-After"].isdigit()
        assert "origin" in nar.text
        assert eu.client.get(f"/nar/{late.nar_file}").status_code == 404, kind
        info = eu.client.put(f"/{late.hash_part}.narinfo", content=late.narinfo(), auth=eu.auth)
        assert info.status_code == 400, kind  # its NAR was never stored here
        assert eu.client.head(f"/{late.hash_part}.narinfo").status_code == 404, kind
        absent.hash_part = make_entry().hash_part  # a fresh miss each round (no negative entry)

    # A hung origin (the process stopped, connections open but silent): deadlines answer.
    os.killpg(seaweed.process.pid, signal.SIGSTOP)
    try:
        outage_checks("hung")
    finally:
        os.killpg(seaweed.process.pid, signal.SIGCONT)
    # A stopped origin (connections refused).
    seaweed.stop()
    try:
        outage_checks("stopped")
        assert us.client.get(f"/{unfetched.hash_part}.narinfo").status_code == 404  # cannot tell
        assert metric(us.client, "nixcache_tier_errors_total", tier="origin", reason="timeout") >= 1
        assert metric(us.client, "nixcache_tier_errors_total", tier="origin", reason="unavailable") >= 1
    finally:
        seaweed.start()
    push(eu.client, late, eu.token)  # the origin is back: the same push succeeds
    assert us.client.get(f"/{late.hash_part}.narinfo").status_code == 200
    # A lookup the outage failed was not remembered as absent: served as soon as it is back.
    assert us.client.get(f"/{unfetched.hash_part}.narinfo").status_code == 200


def test_an_origin_nar_that_is_corrupted_or_hung_is_never_served_or_stored(
    start_cache: StartCache,
    tmp_path: Path,
    seaweed: Seaweed,  # noqa: F811
    bucket: str,
) -> None:
    """Bytes flipped mid-NAR in the origin cut the client short and store nothing (the upstream
    test's guarantee, for the origin); a hung origin's NAR is a 404 at the NAR deadline, and it
    is fetched once the origin answers again."""
    eu, us = fleet(start_cache, tmp_path, seaweed, bucket, "eu", "us", nar_deadline=2)
    corrupted = make_entry(os.urandom(8 * 1024 * 1024), compression="none")
    push(eu.client, corrupted, eu.token)
    flipped = bytearray(corrupted.file_bytes)
    flipped[len(flipped) // 2] ^= 0xFF  # past the first chunks: the client is already receiving
    key = f"nar/{corrupted.nar_file}"
    seaweed.client().put_object(bucket, key, io.BytesIO(flipped), len(flipped))
    assert us.client.get(f"/{corrupted.hash_part}.narinfo").status_code == 200
    try:
        body = us.client.get(f"/nar/{corrupted.nar_file}")
    except httpx.HTTPError:
        pass  # cut short: the client never takes it for a complete NAR
    else:
        assert body.status_code != 200, "a corrupted origin NAR was served"
    assert not (us.store / "nar" / corrupted.nar_file).exists()
    assert not (us.store / "narinfo" / f"{corrupted.hash_part}.narinfo").exists()
    assert not list((us.store / "tmp").iterdir())  # no partial file left behind
    assert metric(us.client, "nixcache_tier_errors_total", tier="origin", reason="corrupt") == 1

    hung = make_entry(os.urandom(2 * 1024 * 1024), compression="none")
    push(eu.client, hung, eu.token)
    os.killpg(seaweed.process.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        assert us.client.get(f"/nar/{hung.nar_file}").status_code == 404
        assert time.monotonic() - start < 6  # the 2 s nar_deadline, not the default 10 s (slack: load)
    finally:
        os.killpg(seaweed.process.pid, signal.SIGCONT)
    assert metric(us.client, "nixcache_tier_errors_total", tier="origin", reason="timeout") == 1
    assert us.client.get(f"/nar/{hung.nar_file}").content == hung.file_bytes


def test_narinfo_put_with_the_origin_down_publishes_nothing(
    start_cache: StartCache,
    tmp_path: Path,
    seaweed: Seaweed,  # noqa: F811
    bucket: str,
) -> None:
    """The NAR reached the origin, then the origin went away before the narinfo: 503, and the
    narinfo is neither here nor in the origin."""
    (eu,) = fleet(start_cache, tmp_path, seaweed, bucket, "eu", write_timeout=3)
    entry = make_entry()
    assert eu.client.put(f"/nar/{entry.nar_file}", content=entry.file_bytes, auth=eu.auth).status_code == 201
    seaweed.stop()
    try:
        answer = eu.client.put(f"/{entry.hash_part}.narinfo", content=entry.narinfo(), auth=eu.auth)
        assert answer.status_code == 503, answer.text
        assert eu.client.head(f"/{entry.hash_part}.narinfo").status_code == 404
        assert not (eu.store / "narinfo" / f"{entry.hash_part}.narinfo").exists()
    finally:
        seaweed.start()
    names = {o.object_name for o in seaweed.client().list_objects(bucket)}
    assert f"{entry.hash_part}.narinfo" not in names


# -- upstreams ----------------------------------------------------------------------------------


def test_upstream_trusted_untrusted_and_corrupted(start_cache: StartCache, tmp_path: Path) -> None:
    root = tmp_path / "upstream"
    _, upstream_key = write_key(tmp_path, "upstream-1")
    _, stranger = write_key(tmp_path, "stranger-1")
    trusted, untrusted, corrupted = make_entry(), make_entry(), make_entry(os.urandom(100_000), "none")
    publish_upstream(root, trusted, upstream_key)
    publish_upstream(root, untrusted, stranger)
    flipped = bytearray(corrupted.file_bytes)
    flipped[len(flipped) // 2] ^= 0xFF
    publish_upstream(root, corrupted, upstream_key, bytes(flipped))
    with binary_cache_server(root) as url:
        config = write_config(tmp_path / "up.toml", upstreams=[(url, [str(upstream_key.public())])])
        cache = start_cache("--config", str(config))

        served = cache.client.get(f"/{trusted.hash_part}.narinfo")
        assert served.status_code == 200
        assert verify_sig(cache, served.text)
        assert cache.client.get(f"/nar/{trusted.nar_file}").content == trusted.file_bytes
        assert (cache.store / "narinfo" / f"{trusted.hash_part}.narinfo").exists()

        refused = cache.client.get(f"/{untrusted.hash_part}.narinfo")
        assert refused.status_code == 404
        assert metric(cache.client, "nixcache_tier_errors_total", tier="upstream:up", reason="untrusted") == 1
        assert cache.client.get(f"/nar/{untrusted.nar_file}").status_code == 404  # no narinfo, no NAR
        assert not (cache.store / "narinfo" / f"{untrusted.hash_part}.narinfo").exists()
        assert not (cache.store / "nar" / untrusted.nar_file).exists()

        assert cache.client.get(f"/{corrupted.hash_part}.narinfo").status_code == 200
        try:
            body = cache.client.get(f"/nar/{corrupted.nar_file}")
        except httpx.HTTPError:
            pass  # cut short: the client never takes it for a complete NAR
        else:
            assert body.status_code != 200, "a corrupted upstream NAR was served"
        assert not (cache.store / "nar" / corrupted.nar_file).exists()
        assert not (cache.store / "narinfo" / f"{corrupted.hash_part}.narinfo").exists()
        assert cache.client.get(f"/nar/{corrupted.nar_file}").status_code == 404
        assert metric(cache.client, "nixcache_tier_errors_total", tier="upstream:up", reason="corrupt") == 1


def test_a_pulled_nar_reaches_the_client_while_it_is_still_being_fetched(
    start_cache: StartCache, tmp_path: Path
) -> None:
    """The upstream sends half of the NAR and stalls: the client already has bytes, the store
    has nothing yet; once the rest arrives the client has every byte and the store the NAR."""
    root = tmp_path / "upstream"
    _, key = write_key(tmp_path, "upstream-1")
    entry = make_entry(os.urandom(4 * 1024 * 1024), compression="none")
    publish_upstream(root, entry, key)
    gate = threading.Event()
    with binary_cache_server(root, {f"/nar/{entry.nar_file}": gate}) as url:
        config = write_config(tmp_path / "up.toml", upstreams=[(url, [str(key.public())])])
        cache = start_cache("--config", str(config))
        assert cache.client.get(f"/{entry.hash_part}.narinfo").status_code == 200
        try:
            identity = {"Accept-Encoding": "identity"}  # as Nix 2.8 asks: the length comes first
            with cache.client.stream("GET", f"/nar/{entry.nar_file}", headers=identity) as response:
                assert response.status_code == 200
                assert response.headers["Content-Length"] == str(len(entry.file_bytes))
                chunks = response.iter_raw()
                received = next(chunks)
                assert received and not gate.is_set()
                assert not (cache.store / "nar" / entry.nar_file).exists()  # not published yet
                gate.set()
                received += b"".join(chunks)
        finally:
            gate.set()
    assert received == entry.file_bytes
    assert (cache.store / "nar" / entry.nar_file).read_bytes() == entry.file_bytes


# -- single flight -----------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_twenty_clients_one_uncached_large_nar_one_fetch(
    start_cache: StartCache,
    tmp_path: Path,
    seaweed: Seaweed,  # noqa: F811
    bucket: str,
    workers: int,
) -> None:
    """One origin fetch for the host, whichever worker each client's connection lands on (with
    2 workers, 20 connections all on one of them is a chance of 1 in 2^19)."""
    config = write_config(tmp_path / "tiers.toml", seaweed=seaweed, bucket=bucket)
    eu = start_cache("--config", str(config), name="eu")
    us = start_cache("--config", str(config), "--workers", str(workers), name="us")
    entry = make_entry(os.urandom(64 * 1024 * 1024), compression="none")
    push(eu.client, entry, eu.token)
    assert us.client.get(f"/{entry.hash_part}.narinfo").status_code == 200
    barrier = threading.Barrier(20)
    results: list[bytes | str] = [b""] * 20

    def fetch(index: int) -> None:
        with httpx.Client(base_url=us.url, timeout=60) as client:
            barrier.wait()
            try:
                answer = client.get(f"/nar/{entry.nar_file}")
                results[index] = answer.content if answer.status_code == 200 else f"HTTP {answer.status_code}"
            except httpx.HTTPError as error:
                results[index] = repr(error)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(r == entry.file_bytes for r in results), [r if isinstance(r, str) else len(r) for r in results]
    assert metric(us.client, "nixcache_tier_lookups_total", tier="origin", kind="nar", result="hit") == 1
    assert metric(us.client, "nixcache_tier_bytes_total", tier="origin", direction="read") == len(
        entry.file_bytes
    )


# -- origin gc ----------------------------------------------------------------------------------


def _origin(seaweed: Seaweed, bucket: str, tmp_path: Path):  # noqa: F811
    from nixcache.server.config import OriginConfig
    from nixcache.server.tiers.origin import Origin

    access, secret = seaweed.write_credentials(tmp_path / "gc-s3")
    return Origin(OriginConfig(seaweed.endpoint, bucket, access, secret))


def _objects(seaweed: Seaweed, bucket: str) -> set[str]:  # noqa: F811
    return {o.object_name for o in seaweed.client().list_objects(bucket, recursive=True)}


def _no_dangling(seaweed: Seaweed, bucket: str) -> None:  # noqa: F811
    names = _objects(seaweed, bucket)
    for name in names:
        if name.endswith(".narinfo"):
            text = seaweed.client().get_object(bucket, name).read().decode()
            assert f"nar/{narinfo.parse(text).nar_file}" in names, f"{name} lost its NAR"


def test_origin_gc_by_age_and_by_size(
    start_cache: StartCache,
    tmp_path: Path,
    seaweed: Seaweed,  # noqa: F811
    bucket: str,
) -> None:
    from nixcache.server.tiers import origin_gc

    (eu,) = fleet(start_cache, tmp_path, seaweed, bucket, "eu")
    old, middle, new = make_entry(os.urandom(50_000)), make_entry(os.urandom(50_000)), make_entry()
    shared = make_entry()
    shared.nar_file, shared.file_bytes, shared.nar = old.nar_file, old.file_bytes, old.nar  # same NAR
    for entry in (old, shared):
        push(eu.client, entry, eu.token)
    time.sleep(2.1)  # S3 mtimes have one-second resolution
    push(eu.client, middle, eu.token)
    time.sleep(2.1)
    push(eu.client, new, eu.token)
    origin = _origin(seaweed, bucket, tmp_path)
    shift = 7200.0  # as if two hours had passed: past the grace period of every NAR

    def later() -> float:
        return time.time() + shift

    modified = {
        e.hash_part: origin.stat(f"{e.hash_part}.narinfo").modified.timestamp() for e in (old, middle)
    }
    # By age: older than halfway between `old` and `middle`; `shared` goes too, and then their NAR.
    cutoff = later() - (modified[old.hash_part] + modified[middle.hash_part]) / 2
    result = origin_gc.run(origin, older_than=cutoff, clock=later, echo=lambda _: None)
    assert set(result.deleted) == {old.hash_part, shared.hash_part}
    names = _objects(seaweed, bucket)
    assert f"nar/{old.nar_file}" not in names
    assert {f"{middle.hash_part}.narinfo", f"nar/{middle.nar_file}", f"{new.hash_part}.narinfo"} <= names
    _no_dangling(seaweed, bucket)

    # By size: just under what is there now, so only the oldest remaining path goes.
    objects = seaweed.client().list_objects(bucket, recursive=True)
    total = sum(o.size for o in objects if o.object_name != "nix-cache-info")  # what gc counts
    result = origin_gc.run(origin, max_size=total - 1, clock=later, echo=lambda _: None)
    assert result.deleted == [middle.hash_part]
    assert f"nar/{middle.nar_file}" not in _objects(seaweed, bucket)
    assert f"{new.hash_part}.narinfo" in _objects(seaweed, bucket)
    _no_dangling(seaweed, bucket)


def test_origin_gc_spares_young_nars_and_repushed_narinfos(
    start_cache: StartCache,
    tmp_path: Path,
    seaweed: Seaweed,  # noqa: F811
    bucket: str,
) -> None:
    """The race guarantees: a NAR inside the grace period is kept even when no narinfo names it
    (its narinfo may be on the way); a narinfo pushed again between gc's scan and its delete stays."""
    from nixcache.server.tiers import origin_gc

    (eu,) = fleet(start_cache, tmp_path, seaweed, bucket, "eu")
    waiting = make_entry()  # a push whose narinfo is still on the way
    assert (
        eu.client.put(f"/nar/{waiting.nar_file}", content=waiting.file_bytes, auth=eu.auth).status_code == 201
    )
    racing = make_entry()
    push(eu.client, racing, eu.token)
    time.sleep(1.1)
    origin = _origin(seaweed, bucket, tmp_path)

    class RepushDuringGc:
        """The origin as gc sees it, with a push of `racing` landing right after the scan."""

        def __getattr__(self, name: str):
            return getattr(origin, name)

        def stat(self, key: str):
            if key == f"{racing.hash_part}.narinfo" and not pushed:
                pushed.append(True)
                time.sleep(1.1)  # a later mtime than the scan saw
                again = eu.client.put(f"/{racing.hash_part}.narinfo", content=racing.narinfo(), auth=eu.auth)
                assert again.status_code == 201
            return origin.stat(key)

    pushed: list[bool] = []
    result = origin_gc.run(RepushDuringGc(), older_than=0.5, echo=lambda _: None)
    assert pushed and result.deleted == []
    names = _objects(seaweed, bucket)
    assert f"nar/{waiting.nar_file}" in names  # young: spared although unreferenced
    assert {f"{racing.hash_part}.narinfo", f"nar/{racing.nar_file}"} <= names
    _no_dangling(seaweed, bucket)


def test_gc_origin_command(
    start_cache: StartCache,
    tmp_path: Path,
    seaweed: Seaweed,  # noqa: F811
    bucket: str,
) -> None:
    """`nixcache gc --origin` reads the bucket and credentials from the config; within the grace
    period it deletes old narinfos but spares their young NARs."""
    (eu,) = fleet(start_cache, tmp_path, seaweed, bucket, "eu")
    entry = make_entry()
    push(eu.client, entry, eu.token)
    time.sleep(1.1)
    config = tmp_path / "tiers.toml"
    run = subprocess.run(
        nixcache_cmd("gc", "--origin", "--config", str(config), "--older-than", "1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "deleted 1 narinfos and 0 NAR files" in run.stdout
    names = _objects(seaweed, bucket)
    assert f"{entry.hash_part}.narinfo" not in names and f"nar/{entry.nar_file}" in names
    assert seaweed.secret_key not in run.stdout + run.stderr
    bad = subprocess.run(
        nixcache_cmd("gc", "--origin", "--store", str(tmp_path)), capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0 and "[origin]" in bad.stderr


def test_a_miss_in_every_tier_is_remembered(
    start_cache: StartCache,
    tmp_path: Path,
    seaweed: Seaweed,  # noqa: F811
    bucket: str,
) -> None:
    """A client walking a closure asks for absent paths again and again: the origin once."""
    (eu,) = fleet(start_cache, tmp_path, seaweed, bucket, "eu")
    absent = make_entry()
    for _ in range(3):
        assert eu.client.get(f"/{absent.hash_part}.narinfo").status_code == 404
    assert metric(eu.client, "nixcache_tier_lookups_total", tier="origin", kind="narinfo", result="miss") == 1
    assert metric(eu.client, "nixcache_negative_cache_hits_total") == 2


def test_origin_gc_racing_pushes_never_orphans_a_narinfo(
    start_cache: StartCache,
    tmp_path: Path,
    seaweed: Seaweed,  # noqa: F811
    bucket: str,
) -> None:
    """Collect the bucket in a loop while the same paths are pushed again (as nix copy does: the
    NAR is already on the cache, so only the narinfo is PUT): every push succeeds, gc deletes
    NARs, and in the end every narinfo in the bucket has its NAR. The grace period is cut to
    2 s (origin.gc_grace, shared by gc and the pushing cache) so NARs become collectable."""
    from nixcache.server.tiers import origin_gc

    (eu,) = fleet(start_cache, tmp_path, seaweed, bucket, "eu", gc_grace=2)
    entries = [make_entry(os.urandom(2000)) for _ in range(10)]
    for entry in entries:
        push(eu.client, entry, eu.token)
    origin = _origin(seaweed, bucket, tmp_path)
    stop = threading.Event()
    runs = []

    def collect() -> None:
        deadline = time.monotonic() + 40
        while not stop.is_set() and time.monotonic() < deadline:
            runs.append(origin_gc.run(origin, older_than=1, grace=2, echo=lambda _: None))

    time.sleep(2.5)  # past the grace period
    collector = threading.Thread(target=collect)
    collector.start()
    failures = []
    try:
        for _ in range(4):
            for entry in entries:
                assert eu.client.head(f"/nar/{entry.nar_file}").status_code == 200
                put = eu.client.put(f"/{entry.hash_part}.narinfo", content=entry.narinfo(), auth=eu.auth)
                if put.status_code != 201:
                    failures.append(put.text)
            time.sleep(2.5)  # let the NARs age past the grace period again
    finally:
        stop.set()
        collector.join(60)
    assert failures == []
    assert sum(r.deleted_nars for r in runs) > 0, "gc never deleted a NAR: the race was not exercised"
    _no_dangling(seaweed, bucket)

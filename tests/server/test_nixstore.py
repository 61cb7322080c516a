"""Serving this host's own Nix store (nixcache.server.nixstore) against Debian's real Nix: paths
built with nix-build, compared with what `nix-store --dump`, `nix copy --to file://…` and
`nix-store -l` give for the same paths."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
import zstandard
from conftest import require
from support import nixbuild

from nixcache import nixenv
from nixcache.server import base32, narinfo
from nixcache.server.config import NixStoreConfig
from nixcache.server.nixstore import dump
from nixcache.server.nixstore.db import NixDatabase, NixDbError
from nixcache.server.nixstore.store import LocalNar, LocalNixStore
from server.helpers import SERVE, make_entry, push, write_key

STATE_DIR = Path("/nix/var/nix")
BIG = 5 * 1024 * 1024 + 3  # a large file, not a multiple of 8 (its padding is framing)

# A tree with every kind of NAR node, depending on a second path; the build prints a log line.
CLOSURE = r"""
let
  salt = "@SALT@";
  dep = derivation {
    name = "nixstore-dep";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo dep ${salt} > $out" ];
  };
in derivation {
  name = "nixstore-tree";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" ''
    set -e
    echo "building the tree ${salt}"
    /bin/mkdir -p $out/bin $out/share/deep/er/est $out/empty-dir
    echo ${dep} > $out/dep-path
    printf '#!/bin/sh\necho hi\n' > $out/bin/hello
    /bin/chmod 555 $out/bin/hello
    : > $out/empty-file
    /bin/ln -s ../dep-path $out/share/link
    /bin/ln -s /nonexistent/target $out/dangling
    printf 'abc' > $out/share/deep/er/est/seven
    printf 'x' > $out/share/caf\xc3\xa9
    /usr/bin/head -c @BIG@ /dev/urandom > $out/share/big.bin
    /usr/bin/head -c 70000 /dev/urandom > $out/share/medium.bin
  '' ];
}
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> str:
    require(os.geteuid() == 0, "building into /nix/store needs root")
    expression = CLOSURE.replace("@SALT@", uuid.uuid4().hex).replace("@BIG@", str(BIG))
    return nixbuild.build(expression, tmp_path_factory.mktemp("nixstore-tree"))


@pytest.fixture
def local(tmp_path: Path) -> LocalNixStore:
    _, key = write_key(tmp_path)
    store = LocalNixStore(NixStoreConfig(serve_nix_store=True), "/nix/store", [key])
    yield store
    store.close()


def nix_dump(path: str) -> bytes:
    return subprocess.run(["nix-store", "--dump", path], capture_output=True, check=True).stdout


def closure_of(path: str) -> list[str]:
    out = subprocess.run(["nix-store", "-qR", path], capture_output=True, text=True, check=True)
    return out.stdout.split()


def generated(path: str, size: int, offset: int = 0, count: int | None = None) -> bytes:
    return b"".join(dump.iter_bytes(dump.generate(path, size, offset, count)))


def test_nar_is_byte_identical_to_nix_store_dump(tree: str, local: LocalNixStore) -> None:
    for path in closure_of(tree):
        expected = nix_dump(path)
        info = local.db.path_info(Path(path).name[:32])
        assert info is not None and info.nar_size == len(expected)
        assert info.nar_hash == base32.format_sha256(hashlib.sha256(expected).digest())
        assert generated(path, info.nar_size) == expected, path


def test_large_files_go_out_as_file_regions_and_chunks_stay_bounded(tree: str) -> None:
    size = len(nix_dump(tree))
    regions = []
    for item in dump.generate(tree, size):
        if isinstance(item, dump.FileRegion):
            regions.append((os.path.basename(item.handle.name), item.count))
        else:
            assert len(item) <= dump.CHUNK + dump.SMALL_FILE + 4096
    assert regions == [(b"big.bin", BIG), (b"medium.bin", 70000)]


@pytest.mark.parametrize("where", ["start", "inside-big", "after-big", "last-byte", "suffix-to-end"])
def test_range_gives_the_bytes_of_nix_store_dump(tree: str, where: str, monkeypatch) -> None:
    expected = nix_dump(tree)
    big_at = expected.index(b"big.bin")
    offsets = {
        "start": (0, 100),
        "inside-big": (big_at + 4096, 1 << 20),
        "after-big": (big_at + BIG + 400, 5000),
        "last-byte": (len(expected) - 1, 1),
        "suffix-to-end": (len(expected) - 70500, None),
    }
    offset, count = offsets[where]
    opened: list[bytes] = []
    real_open = open
    monkeypatch.setattr(dump, "open", lambda p, *a: opened.append(p) or real_open(p, *a), raising=False)
    got = generated(tree, len(expected), offset, count)
    assert got == expected[offset : offset + count if count else None]
    if where in ("after-big", "last-byte", "suffix-to-end"):
        # A range after a file does not read it: generating from an offset skips, not discards.
        assert not any(p.endswith(b"/big.bin") for p in opened)


def copy_tree(tree: str, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy, symlinks=True)
    return copy


def test_a_file_that_vanishes_mid_dump_raises(tree: str, tmp_path: Path) -> None:
    copy = copy_tree(tree, tmp_path)
    size = len(nix_dump(tree))
    body = dump.generate(str(copy), size)
    sent = 0
    with pytest.raises(dump.PathChanged, match=r"medium\.bin"):
        for item in body:
            if isinstance(item, dump.FileRegion) and item.handle.name.endswith(b"big.bin"):
                os.chmod(copy / "share", 0o700)  # store dirs are read-only
                os.unlink(copy / "share" / "medium.bin")  # later in the walk than big.bin
            sent += item.count if isinstance(item, dump.FileRegion) else len(item)
    assert sent < size


def test_a_file_that_shrinks_mid_send_raises(tree: str, tmp_path: Path) -> None:
    copy = copy_tree(tree, tmp_path)
    size = len(nix_dump(tree))
    with pytest.raises(dump.PathChanged, match="shrank"):
        for item in dump.generate(str(copy), size):
            if isinstance(item, dump.FileRegion):
                os.chmod(copy / "share" / "big.bin", 0o644)
                os.truncate(copy / "share" / "big.bin", 1000)
                b"".join(item)


@pytest.mark.parametrize("delta", [-1, +1, -8])
def test_a_nar_not_of_nar_size_never_completes(tree: str, delta: int) -> None:
    size = len(nix_dump(tree))
    sent = 0
    with pytest.raises(dump.PathChanged, match="NarSize"):
        for chunk in dump.iter_bytes(dump.generate(tree, size + delta)):
            sent += len(chunk)
    assert sent < size + delta  # the client never gets a body as long as Content-Length said


def nix_copy_to_file(path: str, tmp_path: Path) -> Path:
    dest = tmp_path / "file-cache"
    copied = nixenv.run(
        ["nix", "copy", "--to", f"file://{dest}?write-nar-listing=true&compression=none", path],
        home=tmp_path / "home-copy",
    )
    assert copied.returncode == 0, copied.stderr
    return dest


def test_narinfo_and_listing_match_what_nix_writes(tree: str, local: LocalNixStore, tmp_path: Path) -> None:
    dest = nix_copy_to_file(tree, tmp_path)
    for path in closure_of(tree):
        hash_part = Path(path).name[:32]
        body = local.narinfo(hash_part)
        assert body is not None
        ours = narinfo.parse(body.decode())
        nix = narinfo.parse((dest / f"{hash_part}.narinfo").read_text())
        for name in ("store_path", "nar_hash", "nar_size", "references", "deriver", "ca", "compression"):
            assert getattr(ours, name) == getattr(nix, name), name
        assert ours.url == f"nar/{ours.nar_hash[7:]}.nar"
        (sig,) = ours.sigs
        assert local.keys[0].public().verify(sig, ours.fingerprint("/nix/store"))
        assert local.listing(hash_part) == (dest / f"{hash_part}.ls").read_bytes()
    assert b"dep-path" in local.listing(Path(tree).name[:32])


def test_narinfo_is_signed_by_every_key(tree: str, tmp_path: Path) -> None:
    keys = [write_key(tmp_path, name)[1] for name in ("new-key-2", "old-key-1")]
    store = LocalNixStore(NixStoreConfig(serve_nix_store=True), "/nix/store", keys)
    info = narinfo.parse(store.narinfo(Path(tree).name[:32]).decode())
    assert [sig.split(":")[0] for sig in info.sigs] == ["new-key-2", "old-key-1"]
    for key, sig in zip(keys, info.sigs, strict=True):
        assert key.public().verify(sig, info.fingerprint("/nix/store"))


def test_nar_found_by_its_url_with_or_without_the_narinfo_first(tree: str, local: LocalNixStore) -> None:
    expected = nix_dump(tree)
    name = f"{base32.sha256_b32(expected)}.nar"
    cold = local.open_nar(name)  # a client's cached narinfo: found by scanning the database
    assert cold is not None and cold.size == len(expected)
    local.narinfo(Path(tree).name[:32])
    warm = local.open_nar(name)
    assert warm == cold
    assert b"".join(dump.iter_bytes(warm.body(10, 20))) == expected[10:30]
    assert local.open_nar(f"{base32.sha256_b32(b'nothing')}.nar") is None
    assert local.open_nar(f"{base32.sha256_b32(expected)}.nar.xz") is None
    assert local.narinfo("0" * 32) is None
    assert local.narinfo("not a hash") is None


def test_build_log_is_what_nix_store_l_prints(tree: str, local: LocalNixStore, tmp_path: Path) -> None:
    drv = local.db.path_info(Path(tree).name[:32]).deriver
    expected = nixenv.run(["nix-store", "-l", f"/nix/store/{drv}"], home=tmp_path / "home-log")
    assert expected.returncode == 0, expected.stderr
    assert "building the tree" in expected.stdout
    log = local.log(drv)
    assert log is not None
    with log.handle:
        assert log.handle.read().decode() == expected.stdout
        assert log.size == len(expected.stdout.encode())
    assert local.log("0" * 32 + "-missing.drv") is None
    assert local.log("../../etc/passwd") is None


# -- the database --------------------------------------------------------------------------------


def copy_state(tmp_path: Path) -> Path:
    """A copy of Nix's database to break or write to (the machine's is never written)."""
    state = tmp_path / "state"
    (state / "db").mkdir(parents=True)
    state.chmod(0o755)
    source = sqlite3.connect(f"file:{STATE_DIR}/db/db.sqlite?mode=ro", uri=True)
    target = sqlite3.connect(state / "db" / "db.sqlite")
    source.backup(target)
    source.close()
    target.execute("PRAGMA journal_mode = wal")  # as Nix runs it
    target.close()
    shutil.copy(STATE_DIR / "db" / "schema", state / "db" / "schema")
    return state


def test_unknown_schema_version_is_a_one_line_error(tmp_path: Path) -> None:
    require(STATE_DIR.joinpath("db", "db.sqlite").exists(), "no Nix database (apt-get install nix-bin)")
    state = copy_state(tmp_path)
    (state / "db" / "schema").write_text("11")
    fix = "upgrade nixcache, or set serve_nix_store = false"
    with pytest.raises(NixDbError, match=rf"schema version '11'.*{fix}"):
        NixDatabase(state)


def test_missing_column_is_a_one_line_error(tmp_path: Path) -> None:
    require(STATE_DIR.joinpath("db", "db.sqlite").exists(), "no Nix database (apt-get install nix-bin)")
    state = copy_state(tmp_path)
    db = sqlite3.connect(state / "db" / "db.sqlite")
    db.execute("ALTER TABLE ValidPaths RENAME COLUMN narSize TO size")
    db.close()
    with pytest.raises(NixDbError, match="table ValidPaths lacks narSize") as error:
        NixDatabase(state)
    assert "\n" not in str(error.value)


def test_a_store_dir_other_than_the_databases_is_a_one_line_error(tmp_path: Path) -> None:
    require(STATE_DIR.joinpath("db", "db.sqlite").exists(), "no Nix database (apt-get install nix-bin)")
    with pytest.raises(NixDbError, match="holds paths under /nix/store, not under store_dir = '/srv/store'"):
        NixDatabase(STATE_DIR, "/srv/store")
    with pytest.raises(NixDbError, match=f"nix_store.store_dir {tmp_path}/none is not a directory"):
        LocalNixStore(NixStoreConfig(store_dir=str(tmp_path / "none")), "/nix/store", [])


def test_no_database_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(NixDbError, match=f"no Nix database at {tmp_path}/db.*nix_store.state_dir"):
        NixDatabase(tmp_path)


def test_reader_never_blocks_the_daemon_and_sees_its_writes(tree: str, tmp_path: Path) -> None:
    state = copy_state(tmp_path)
    reader = NixDatabase(state)
    hash_part = Path(tree).name[:32]
    assert reader.path_info(hash_part) is not None
    daemon = sqlite3.connect(state / "db" / "db.sqlite", timeout=0)  # fails at once if blocked
    new = "/nix/store/" + "1" * 32 + "-registered-later"
    with daemon:
        daemon.execute(
            "INSERT INTO ValidPaths (path, hash, registrationTime, narSize) VALUES (?, ?, 0, 8)",
            (new, "sha256:" + "ab" * 32),
        )
    info = reader.path_info("1" * 32)
    assert info is not None and info.path == new  # not a stale snapshot (no immutable=1)
    with daemon:
        daemon.execute("DELETE FROM ValidPaths WHERE path = ?", (new,))
    # No read transaction outlives a lookup, so the daemon's checkpoint is never held back.
    assert daemon.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    assert reader.path_info("1" * 32) is None  # a collected path stops being served
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader._db.execute("DELETE FROM ValidPaths")
    daemon.close()
    reader.close()


# Run as `nobody`: look up each hash part read from stdin, print the path or "-".
READER = """
import sys
from nixcache.server.nixstore.db import NixDatabase
db = NixDatabase(sys.argv[1])
for line in sys.stdin:
    if line.strip() == "data_version":
        print(db.data_version(), flush=True)
        continue
    info = db.path_info(line.strip())
    print(info.path if info else "-", flush=True)
"""


def test_reads_as_a_user_without_write_access(tree: str) -> None:
    """The service's sandbox: the database is root's and read-only to it, first closed (no Nix
    process has it open, so SQLite deleted its WAL files), then opened by Nix and written."""
    require(shutil.which("setpriv") is not None, "setpriv missing (util-linux)")
    python = "/usr/bin/python3"  # the test's own interpreter may sit under root's home
    require(Path(python).exists(), f"{python} missing")
    # Under /tmp itself: pytest's own temporary directories are private to root.
    scratch = Path(tempfile.mkdtemp(prefix="nixcache-nixdb-"))
    try:
        scratch.chmod(0o755)
        state = copy_state(scratch)
        assert not Path(f"{state}/db/db.sqlite-wal").exists()  # closed, as when the daemon is idle
        root = Path(__file__).parents[2]
        reader = subprocess.Popen(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", python, "-c", READER, state],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
        )

        def ask(hash_part: str) -> str:
            reader.stdin.write(hash_part + "\n")
            reader.stdin.flush()
            return reader.stdout.readline().strip()

        try:
            assert ask(Path(tree).name[:32]) == tree, reader.stderr.read() if reader.poll() else ""
            daemon = sqlite3.connect(state / "db" / "db.sqlite", timeout=0)
            daemon.execute("PRAGMA journal_mode = wal")
            new = "/nix/store/" + "3" * 32 + "-registered-while-open"
            with daemon:
                daemon.execute(
                    "INSERT INTO ValidPaths (path, hash, registrationTime, narSize) VALUES (?, ?, 0, 8)",
                    (new, "sha256:" + "cd" * 32),
                )
            # The commit is in the WAL only (the daemon still has the database open): seen live.
            assert ask("3" * 32) == new
            # data_version (which narinfo answers are remembered under) follows commits here too.
            version = ask("data_version")
            assert version != "None" and ask("data_version") == version
            with daemon:
                daemon.execute("DELETE FROM ValidPaths WHERE path = ?", (new,))
            assert ask("data_version") != version and ask("3" * 32) == "-"
            daemon.close()
        finally:
            reader.stdin.close()
            reader.wait(10)
        assert reader.returncode == 0, reader.stderr.read()
    finally:
        shutil.rmtree(scratch)


def test_a_remembered_narinfo_answer_follows_the_daemons_commits(tree: str, tmp_path: Path) -> None:
    """Hits and misses are reused while Nix's database is unchanged (its data_version); a path the
    daemon registers after a miss is served, one it deletes after a hit is not. (As a user who
    cannot write the WAL index, data_version follows commits too: the test below.)"""
    state = copy_state(tmp_path)
    _, key = write_key(tmp_path)
    local = LocalNixStore(NixStoreConfig(serve_nix_store=True, state_dir=state), "/nix/store", [key])
    hash_part, new = "4" * 32, "/nix/store/" + "4" * 32 + "-registered-after-a-miss"
    assert local.narinfo(Path(tree).name[:32]) is not None
    assert local.narinfo(hash_part) is None
    version = local.db.data_version()
    assert local.narinfo(hash_part) is None and local.db.data_version() == version  # remembered
    daemon = sqlite3.connect(state / "db" / "db.sqlite", timeout=0)
    with daemon:
        daemon.execute(
            "INSERT INTO ValidPaths (path, hash, registrationTime, narSize) VALUES (?, ?, 0, 8)",
            (new, "sha256:" + "ef" * 32),
        )
    body = local.narinfo(hash_part)
    assert body is not None and body.startswith(f"StorePath: {new}\n".encode())
    assert local.narinfo(hash_part) is body  # remembered
    with daemon:
        daemon.execute("DELETE FROM ValidPaths WHERE path = ?", (new,))
    assert local.narinfo(hash_part) is None
    daemon.close()
    local.close()


def test_a_nar_scanned_absent_is_found_once_its_narinfo_is_served(tmp_path: Path) -> None:
    require(STATE_DIR.joinpath("db", "db.sqlite").exists(), "no Nix database (apt-get install nix-bin)")
    state = copy_state(tmp_path)
    offloaded: list[str] = []

    def offload(fn, args):
        offloaded.append(fn.__name__)
        return fn(*args)

    _, key = write_key(tmp_path)
    local = LocalNixStore(NixStoreConfig(serve_nix_store=True, state_dir=state), "/nix/store", [key], offload)
    nar_hash = base32.sha256_b32(b"registered later")
    assert local.open_nar(f"{nar_hash}.nar") is None
    assert offloaded == ["_scan"]  # the table scan runs off the event loop
    daemon = sqlite3.connect(state / "db" / "db.sqlite", timeout=0)
    with daemon:
        daemon.execute(
            "INSERT INTO ValidPaths (path, hash, registrationTime, narSize) VALUES (?, ?, 0, 112)",
            ("/nix/store/" + "2" * 32 + "-later", "sha256:" + base32.decode(nar_hash, 32).hex()),
        )
    daemon.close()
    assert local.open_nar(f"{nar_hash}.nar") is None  # remembered as absent: no second scan
    assert offloaded == ["_scan"]
    assert b"StorePath: /nix/store/" + b"2" * 32 + b"-later\n" in local.narinfo("2" * 32)
    assert local.open_nar(f"{nar_hash}.nar") == LocalNar("/nix/store/" + "2" * 32 + "-later", 112)
    local.close()


# -- served by `nixcache serve` ------------------------------------------------------------------


@pytest.fixture
def served(start_cache, tmp_path: Path):
    """A running server with [nix_store] serve_nix_store = true beside its (empty) push store."""
    config = tmp_path / "config.toml"
    config.write_text("[nix_store]\nserve_nix_store = true\n")
    return start_cache("--config", str(config))


def nix_as_client(args: list[str], tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    return nixenv.run(["nix", *args], home=tmp_path / f"home-{name}")


def test_nix_copy_from_the_local_store_with_only_the_cache_key_trusted(
    tree: str, served, tmp_path: Path
) -> None:
    def copy_from(trusted: str, name: str) -> subprocess.CompletedProcess[str]:
        return nix_as_client(
            [
                "copy", "--from", served.url, "--to", str(tmp_path / name), tree,
                "--option", "require-sigs", "true",
                "--option", "trusted-public-keys", trusted,
            ],
            tmp_path,
            name,
        )  # fmt: skip

    copied = copy_from(str(served.key.public()), "trusted")
    assert copied.returncode == 0, copied.stderr
    for path in closure_of(tree):
        there = tmp_path / "trusted" / path.lstrip("/")
        dumped = subprocess.run(["nix-store", "--dump", str(there)], capture_output=True, check=True)
        assert dumped.stdout == nix_dump(path)
    _, other = write_key(tmp_path, "someone-else-1")
    refused = copy_from(str(other.public()), "untrusted")
    assert refused.returncode != 0
    assert "lacks a valid signature" in refused.stderr


def test_served_narinfo_nar_range_listing_and_log(tree: str, served, tmp_path: Path) -> None:
    hash_part = Path(tree).name[:32]
    answer = served.client.get(f"/{hash_part}.narinfo")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/x-nix-narinfo"
    info = narinfo.parse(answer.text)
    expected = nix_dump(tree)
    head = served.client.head(f"/{info.url}")
    assert head.status_code == 200 and head.headers["content-length"] == str(len(expected))
    assert head.headers["accept-ranges"] == "bytes"
    whole = served.client.get(f"/{info.url}")
    assert whole.status_code == 200 and whole.content == expected
    start = expected.index(b"big.bin") + 1000
    part = served.client.get(f"/{info.url}", headers={"Range": f"bytes={start}-{start + 99999}"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes {start}-{start + 99999}/{len(expected)}"
    assert part.content == expected[start : start + 100000]
    tail = served.client.get(f"/{info.url}", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == expected[-10:]
    beyond = served.client.get(f"/{info.url}", headers={"Range": f"bytes={len(expected)}-"})
    assert beyond.status_code == 416

    dest = nix_copy_to_file(tree, tmp_path)
    listing = served.client.get(f"/{hash_part}.ls")
    assert listing.status_code == 200 and listing.headers["content-type"] == "application/json"
    assert listing.content == (dest / f"{hash_part}.ls").read_bytes()

    drv = f"/nix/store/{info.deriver}"
    log = nix_as_client(["log", "--store", served.url, drv], tmp_path, "log")
    assert log.returncode == 0, log.stderr
    assert "building the tree" in log.stdout
    assert served.client.get("/log/" + "0" * 32 + "-absent.drv").status_code == 404
    assert served.client.get("/" + "0" * 32 + ".narinfo").status_code == 404


def test_generated_nar_is_zstd_encoded_for_a_client_that_accepts_it(tree: str, served) -> None:
    """What current Nix asks for (Accept-Encoding from libcurl, filetransfer.cc): the NAR generated
    from the tree, files sent as regions, compressed on the way; it decodes to nix-store --dump."""
    info = narinfo.parse(served.client.get(f"/{Path(tree).name[:32]}.narinfo").text)
    with served.client.stream("GET", f"/{info.url}", headers={"Accept-Encoding": "br, zstd"}) as answer:
        assert answer.status_code == 200 and answer.headers["content-encoding"] == "zstd"
        assert "content-length" not in answer.headers and "accept-ranges" not in answer.headers
        sent = b"".join(answer.iter_raw())
    assert zstandard.ZstdDecompressor().decompress(sent) == nix_dump(tree)


def test_a_path_not_as_registered_closes_the_connection(start_cache, tmp_path: Path) -> None:
    """A store path whose files are not what Nix registered (the database says 8 bytes more than
    the tree gives): the server sends its head, then hangs up before the body is complete."""
    state = copy_state(tmp_path)
    store = tmp_path / "fake-store"
    base = "4" * 32 + "-changed"
    (store / base).mkdir(parents=True)
    (store / base / "file").write_bytes(os.urandom(300000))
    items = [i for i in dump.walk(str(store / base)) if not isinstance(i, dump.Entry)]
    size = sum(len(i) if isinstance(i, bytes) else i.size for i in items)
    nar = generated(str(store / base), size)
    daemon = sqlite3.connect(state / "db" / "db.sqlite")
    with daemon:
        daemon.execute(
            "INSERT INTO ValidPaths (path, hash, registrationTime, narSize) VALUES (?, ?, 0, ?)",
            (f"/nix/store/{base}", "sha256:" + hashlib.sha256(nar).hexdigest(), len(nar) + 8),
        )
    daemon.close()
    config = tmp_path / "config.toml"
    config.write_text(f'[nix_store]\nserve_nix_store = true\nstore_dir = "{store}"\nstate_dir = "{state}"\n')
    cache = start_cache("--config", str(config))
    info = narinfo.parse(cache.client.get(f"/{'4' * 32}.narinfo").text)
    # As Nix 2.8 asks (no Accept-Encoding): the announced length, then the connection closes.
    with cache.client.stream("GET", f"/{info.url}", headers={"Accept-Encoding": "identity"}) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-length"] == str(len(nar) + 8)
        with pytest.raises(httpx.RemoteProtocolError):
            b"".join(answer.iter_bytes())
    # Encoded (current Nix accepts zstd): no length to fall short of, so the last chunk never comes.
    with cache.client.stream("GET", f"/{info.url}", headers={"Accept-Encoding": "zstd"}) as answer:
        assert answer.status_code == 200 and answer.headers["content-encoding"] == "zstd"
        with pytest.raises(httpx.RemoteProtocolError):
            b"".join(answer.iter_raw())
    # Its listing walks the same tree before answering: a miss, not a 5xx.
    assert cache.client.get(f"/{'4' * 32}.ls").status_code == 404
    deadline = time.monotonic() + 10  # the server writes its request log in batches
    while "NarSize" not in cache.server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "not its NarSize" in cache.server.log.read_text()  # the reason, for the operator


def test_the_push_store_still_serves_beside_the_local_store(tree: str, served) -> None:
    entry = make_entry(b"pushed, not built here", "xz")
    push(served.client, entry, served.token)
    pushed = served.client.get(f"/{entry.hash_part}.narinfo")
    assert pushed.status_code == 200 and f"StorePath: {entry.store_path}\n" in pushed.text
    assert served.client.get(f"/nar/{entry.nar_file}").content == entry.file_bytes
    local = served.client.get(f"/{Path(tree).name[:32]}.narinfo")
    assert local.status_code == 200 and f"StorePath: {tree}\n" in local.text
    assert served.client.get(f"/{entry.hash_part}.ls").status_code == 404  # not a local path


def test_serve_refuses_to_start_on_a_database_it_does_not_know(tmp_path: Path) -> None:
    require(STATE_DIR.joinpath("db", "db.sqlite").exists(), "no Nix database (apt-get install nix-bin)")
    state = copy_state(tmp_path)
    (state / "db" / "schema").write_text("11")
    config = tmp_path / "config.toml"
    config.write_text(f'[nix_store]\nserve_nix_store = true\nstate_dir = "{state}"\n')
    key_file, _ = write_key(tmp_path)
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}
    args = ["--config", str(config), "--listen", "127.0.0.1:0", "--store", str(tmp_path / "s")]
    out = subprocess.run(
        [*SERVE, *args, "--signing-key", str(key_file)], capture_output=True, text=True, timeout=30, env=env
    )
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1
    assert "schema version '11'" in out.stderr and "serve_nix_store = false" in out.stderr

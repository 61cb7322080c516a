"""What Debian's Nix 2.8 drives itself beyond NARs and narinfos: listings, logs, every compression.

Nix 2.8's src/libstore/binary-cache-store.cc (uploadData: `<hash>.ls` with write-nar-listing,
`nar/….nar.<ext>` for `?compression=`; addBuildLog and getBuildLog: `log/<drv>`). The files
only newer clients send (encoded uploads, build traces, parallel uploads) are replayed at the
HTTP level in test_extras.py.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import require
from support import nixbuild

from server.conftest import Cache, StartCache
from server.helpers import nixcache_cmd
from server.test_nix_client import netrc_for, nix

# Two paths; the top one's builder prints a line, so Nix keeps a non-empty build log for it.
EXPRESSION = """
let
  salt = "@SALT@";
  leaf = derivation {
    name = "leaf"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "/bin/mkdir -p $out/share; echo ${salt} > $out/share/leaf; /bin/ln -s leaf $out/share/l" ];
  };
in derivation {
  name = "top"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "echo building-top-${salt}; /bin/mkdir $out; echo ${leaf} > $out/ref; printf x > $out/bin" ];
}
"""


@pytest.fixture
def built(tmp_path: Path) -> tuple[str, str]:
    """A fresh two-path closure in /nix/store: (top store path, its build log's salt line)."""
    require(os.geteuid() == 0, "building into /nix/store needs root")
    salt = uuid.uuid4().hex
    return nixbuild.build(EXPRESSION.replace("@SALT@", salt), tmp_path / "build"), f"building-top-{salt}"


def _closure(path: str) -> list[str]:
    out = subprocess.run(["nix-store", "-qR", path], capture_output=True, text=True, check=True)
    return out.stdout.split()


def _push(cache: Cache, path: str, tmp: Path, query: str) -> subprocess.CompletedProcess[str]:
    return nix(
        ["copy", "--to", f"{cache.url}?{query}", path],
        home=tmp / f"home-push-{uuid.uuid4().hex[:8]}",
        netrc=netrc_for(cache, tmp / "netrc"),
    )


@pytest.mark.parametrize("compression", ["br", "lz4", "none"])
def test_listings_and_br_lz4_plain_nars_round_trip(
    cache: Cache, built: tuple[str, str], tmp_path: Path, compression: str
) -> None:
    top, _ = built
    pushed = _push(cache, top, tmp_path, f"write-nar-listing=true&compression={compression}")
    assert pushed.returncode == 0, pushed.stderr
    ext = {"br": ".nar.br", "lz4": ".nar.lz4", "none": ".nar"}[compression]
    assert {p.name.endswith(ext) for p in (cache.store / "nar").iterdir()} == {True}
    # The listings Nix 2.8 uploaded are the ones it writes into a local binary cache.
    reference = tmp_path / "reference"
    wrote = nix(
        ["copy", "--to", f"file://{reference}?write-nar-listing=true&compression=none", top],
        home=tmp_path / "home-ref", netrc=netrc_for(cache, tmp_path / "netrc"),
    )  # fmt: skip
    assert wrote.returncode == 0, wrote.stderr
    for path in _closure(top):
        hash_part = Path(path).name[:32]
        served = cache.client.get(f"/{hash_part}.ls")
        assert served.status_code == 200 and served.headers["content-type"] == "application/json"
        assert served.content == (reference / f"{hash_part}.ls").read_bytes()
    listed = nix(
        ["store", "ls", "--store", cache.url, "-R", f"{top}/bin"],
        home=tmp_path / "home-ls", netrc=netrc_for(cache, tmp_path / "netrc"),
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    # `nixcache verify` finds Nix's own listings describe their NARs (computed from the NAR when
    # it is uncompressed).
    verified = subprocess.run(
        nixcache_cmd("verify", "--store", str(cache.store)), capture_output=True, text=True
    )
    assert verified.returncode == 0 and "; 0 damaged" in verified.stdout, verified.stdout
    # And a client substitutes the br / lz4 NARs, checking the cache's signature.
    fetched = nix(
        [
            "copy", "--from", cache.url, "--to", str(tmp_path / "dest"), top,
            "--option", "require-sigs", "true",
            "--option", "trusted-public-keys", str(cache.key.public()),
        ],
        home=tmp_path / "home-pull", netrc=netrc_for(cache, tmp_path / "netrc"),
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "dest" / top.lstrip("/") / "bin").read_text() == "x"


@pytest.mark.parametrize(
    ("compression", "reason"),
    [("lzip", "lzip NARs are not taken"), ("gzip", "holds gzip data")],
)
def test_unsupported_compression_fails_the_push_naming_the_supported(
    start_cache: StartCache, built: tuple[str, str], tmp_path: Path, compression: str, reason: str
) -> None:
    cache = start_cache()
    top, _ = built
    pushed = _push(cache, top, tmp_path, f"compression={compression}")
    assert pushed.returncode != 0
    # Nix prints the answer's body: the reason and what to push with instead.
    assert "HTTP error 400" in pushed.stderr
    assert reason in pushed.stderr and "?compression= one of none, xz, zstd, bzip2, br, lz4" in pushed.stderr
    assert list((cache.store / "narinfo").iterdir()) == []
    assert list((cache.store / "nar").iterdir()) == []


def test_copy_log_then_nix_log(cache: Cache, built: tuple[str, str], tmp_path: Path) -> None:
    top, line = built
    netrc = netrc_for(cache, tmp_path / "netrc")
    assert _push(cache, top, tmp_path, "compression=zstd").returncode == 0
    copied = nix(["store", "copy-log", "--to", cache.url, top], home=tmp_path / "home-log", netrc=netrc)
    assert copied.returncode == 0, copied.stderr
    drv = subprocess.run(["nix-store", "-qd", top], capture_output=True, text=True, check=True).stdout.strip()
    assert [p.name for p in (cache.store / "log").iterdir()] == [Path(drv).name]
    # A fresh client, asking the cache only: `nix log` finds the Deriver in the narinfo first.
    shown = nix(["log", "--store", cache.url, top], home=tmp_path / "home-show", netrc=netrc)
    assert shown.returncode == 0, shown.stderr
    assert line in shown.stdout

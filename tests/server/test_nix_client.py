"""The real Nix client (Debian's nix-bin) pushes to and substitutes from the server."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import require
from support import nixbuild

from nixcache import nixenv
from server.conftest import Cache
from server.helpers import write_key

# A closure with references: top -> mid -> (leaf-a, leaf-b), top -> leaf-a. The salt makes the
# paths new on every run, so the push really uploads.
CLOSURE = """
let
  salt = "@SALT@";
  mk = name: deps:
    let refs = builtins.concatStringsSep ";" (map (d: "echo ${d} >> $out") deps);
    in derivation {
      inherit name;
      system = builtins.currentSystem;
      builder = "/bin/sh";
      args = [ "-c" "echo ${name} ${salt} > $out; ${refs}" ];
    };
  a = mk "leaf-a" [];
  b = mk "leaf-b" [];
  c = mk "mid-c" [ a b ];
in mk "top-d" [ c a ]
"""


@pytest.fixture(scope="module")
def closure(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Build the closure into /nix/store (as root, without a sandbox); return the top path."""
    require(os.geteuid() == 0, "building into /nix/store needs root")
    return nixbuild.build(CLOSURE.replace("@SALT@", uuid.uuid4().hex), tmp_path_factory.mktemp("closure"))


def nix(args: list[str], home: Path, netrc: Path) -> subprocess.CompletedProcess[str]:
    # A fresh HOME per call: Nix caches narinfo lookups (and misses) under ~/.cache.
    return nixenv.run(["nix", *args, "--option", "netrc-file", str(netrc)], home)


def netrc_for(cache: Cache, path: Path) -> Path:
    path.write_text(f"machine 127.0.0.1\nlogin nix\npassword {cache.token}\n")
    path.chmod(0o600)
    return path


def closure_of(path: str) -> set[str]:
    out = subprocess.run(["nix-store", "-qR", path], capture_output=True, text=True, check=True)
    return {Path(p).name for p in out.stdout.split()}


def copy_from(
    cache: Cache, path: str, trusted: str, tmp: Path, name: str
) -> subprocess.CompletedProcess[str]:
    return nix(
        [
            "copy", "--from", cache.url, "--to", str(tmp / name), path,
            "--option", "require-sigs", "true",
            "--option", "trusted-public-keys", trusted,
            "--option", "substituters", "",
        ],
        home=tmp / f"home-{name}",
        netrc=netrc_for(cache, tmp / f"netrc-{name}"),
    )  # fmt: skip


def test_nix_copy_round_trip_with_signatures(cache: Cache, closure: str, tmp_path: Path) -> None:
    netrc = netrc_for(cache, tmp_path / "netrc")
    pushed = nix(["copy", "--to", cache.url, closure], home=tmp_path / "home-push", netrc=netrc)
    assert pushed.returncode == 0, pushed.stderr
    expected = closure_of(closure)
    assert len(expected) == 4
    stored = {p.name.removesuffix(".narinfo") for p in (cache.store / "narinfo").iterdir()}
    assert stored == {name[:32] for name in expected}

    ok = copy_from(cache, closure, str(cache.key.public()), tmp_path, "trusted")
    assert ok.returncode == 0, ok.stderr
    assert {
        p.name for p in (tmp_path / "trusted" / "nix" / "store").iterdir() if not p.name.endswith(".lock")
    } >= expected
    assert (tmp_path / "trusted" / "nix" / "store" / Path(closure).name).read_text() == Path(
        closure
    ).read_text()

    _, other = write_key(tmp_path, "someone-else-1")
    refused = copy_from(cache, closure, str(other.public()), tmp_path, "untrusted")
    assert refused.returncode != 0
    assert "lacks a valid signature" in refused.stderr
    assert not (tmp_path / "untrusted" / "nix" / "store" / Path(closure).name).exists()


def test_nix_copy_without_push_token_fails(cache: Cache, closure: str, tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1\nlogin nix\npassword not-the-token\n")
    pushed = nix(["copy", "--to", cache.url, closure], home=tmp_path / "home", netrc=netrc)
    assert pushed.returncode != 0
    assert "401" in pushed.stderr or "Unauthorized" in pushed.stderr
    assert list((cache.store / "narinfo").iterdir()) == []

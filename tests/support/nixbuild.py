"""Build a throwaway closure with the real `nix-build`, for tests that push and fetch it."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import require

from nixcache import nixenv


def build(expression: str, work: Path) -> str:
    """Build `expression` (a Nix expression; salt it so the paths are new) into /nix/store and
    return the top store path, with the project's Nix settings (nixcache.nixenv), not the machine's."""
    require(shutil.which("nix-build") is not None, "nix-build missing (apt-get install nix-bin)")
    return nixenv.build(expression, work)


def closure(prefix: str, salt: str) -> str:
    """A closure of two paths, `<prefix>-top` referring to `<prefix>-leaf`, whose contents (and so
    store paths) are new for every `salt`: what the push-and-fetch tests move around."""
    return f"""
let
  mk = name: deps:
    let refs = builtins.concatStringsSep ";" (map (d: "echo ${{d}} >> $out") deps);
    in derivation {{
      inherit name;
      system = builtins.currentSystem;
      builder = "/bin/sh";
      args = [ "-c" "echo ${{name}} {salt} > $out; ${{refs}}" ];
    }};
in mk "{prefix}-top" [ (mk "{prefix}-leaf" []) ]
"""

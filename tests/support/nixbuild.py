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

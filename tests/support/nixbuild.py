"""Build a throwaway closure with the real `nix-build`, for tests that push and fetch it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import require


def build(expression: str, work: Path) -> str:
    """Build `expression` (a Nix expression; salt it so the paths are new) into /nix/store and
    return the top store path. Root, no sandbox: the lab controller and CI run as root."""
    require(shutil.which("nix-build") is not None, "nix-build missing (apt-get install nix-bin)")
    work.mkdir(parents=True, exist_ok=True)
    expr = work / "closure.nix"
    expr.write_text(expression)
    built = subprocess.run(
        ["nix-build", "--option", "sandbox", "false", "--no-out-link", str(expr)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HOME": str(work)},
    )
    assert built.returncode == 0, built.stderr
    return built.stdout.strip().splitlines()[-1]

"""Running system tools with errors a person can act on."""

from __future__ import annotations

import subprocess

from nixcache.lab.errors import LabError


def run(argv: list[str], *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `argv` (no shell), capture its output; raise LabError naming the command when it fails."""
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"`{' '.join(argv)}` did not finish within {timeout:.0f} s") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        reason = detail[-1] if detail else f"exit {result.returncode}"
        raise LabError(f"`{' '.join(argv)}` failed: {reason}")
    return result

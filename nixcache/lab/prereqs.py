"""Checks that the controller can run a lab: root and the system tools, each with its Debian package."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable

from nixcache.lab.errors import PrerequisiteError

# tool -> Debian package that provides it
TOOLS: dict[str, str] = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "ip": "iproute2",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "cp": "coreutils",
}


def missing_tools(tools: Iterable[str] = TOOLS) -> list[str]:
    """Names of `tools` that are not on PATH."""
    return [tool for tool in tools if shutil.which(tool) is None]


def check(tools: Iterable[str] = TOOLS, *, euid: int | None = None) -> None:
    """Raise PrerequisiteError with a one-line fix unless we are root and every tool is present."""
    if (os.geteuid() if euid is None else euid) != 0:
        raise PrerequisiteError(
            "nixcache lab must run as root (it creates network namespaces and containers); "
            "rerun it with sudo or as root"
        )
    missing = missing_tools(tools)
    if missing:
        packages = sorted({TOOLS.get(tool, tool) for tool in missing})
        raise PrerequisiteError(
            f"nixcache lab needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed; install {'it' if len(missing) == 1 else 'them'} with: "
            f"apt-get install {' '.join(packages)}"
        )

"""The controller's prerequisites for a lab: root and the system tools, each with its Debian package.

`ensure()` installs missing packages itself when it can (root, on a machine with apt), so the
README's one command line works on a fresh Debian or Ubuntu machine; where it cannot, the error
names the packages and the command that installs them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from nixcache.lab.errors import PrerequisiteError
from nixcache.lab.lock import locked

# tool -> Debian package that provides it
TOOLS: dict[str, str] = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "ip": "iproute2",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "cp": "coreutils",
}

APT_GET = "apt-get"
# Two labs starting at once on a fresh machine (two shells, a test run's workers) would both run
# apt-get, and the second would fail at once on dpkg's lock: one installs, the other waits here.
INSTALL_LOCK = Path("/run/lock/nixcache-lab-packages.lock")


def missing_tools(tools: Iterable[str] = TOOLS) -> list[str]:
    """Names of `tools` that are not on PATH."""
    return [tool for tool in tools if shutil.which(tool) is None]


def packages_for(tools: Iterable[str]) -> list[str]:
    """The Debian packages that provide `tools`, sorted, each once."""
    return sorted({TOOLS.get(tool, tool) for tool in tools})


def _check_root(euid: int | None) -> None:
    if (os.geteuid() if euid is None else euid) != 0:
        raise PrerequisiteError(
            "nixcache lab must run as root (it creates network namespaces and containers); "
            "rerun it with sudo or as root"
        )


def _missing_error(missing: list[str], why: str = "") -> PrerequisiteError:
    """The one-line refusal: which tools are missing and the apt-get line that installs them."""
    one = len(missing) == 1
    return PrerequisiteError(
        f"nixcache lab needs {', '.join(missing)}, which {'is' if one else 'are'} not installed{why}; "
        f"install {'it' if one else 'them'} with: apt-get install {' '.join(packages_for(missing))}"
    )


def check(tools: Iterable[str] = TOOLS, *, euid: int | None = None) -> None:
    """Raise PrerequisiteError with a one-line fix unless we are root and every tool is present."""
    _check_root(euid)
    missing = missing_tools(tools)
    if missing:
        raise _missing_error(missing)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def install(packages: list[str]) -> None:
    """`apt-get update` then `apt-get install` of `packages`, apt's own progress on stderr.

    Updates the package lists first: on a fresh machine they are empty and `install` finds nothing.
    """
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (
        [APT_GET, "update", "-q"],
        [APT_GET, "install", "-y", "-q", "--no-install-recommends", *packages],
    )
    for argv in steps:
        # stdout to stderr: `lab up` prints its host table on stdout, and scripts read it.
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr, check=False)
        if done.returncode != 0:
            raise PrerequisiteError(
                f"nixcache lab could not install {' '.join(packages)}: `{' '.join(argv)}` exited "
                f"{done.returncode} (its output is above); fix apt, then run the same command again"
            )


def ensure(
    tools: Iterable[str] = TOOLS,
    *,
    euid: int | None = None,
    progress: Callable[[str], None] = _stderr,
) -> list[str]:
    """Like check(), but as root on a machine with apt, install what is missing first (one line
    naming the packages, then apt's progress). Returns the packages installed."""
    tools = list(tools)
    _check_root(euid)
    missing = missing_tools(tools)
    if not missing:
        return []
    if shutil.which(APT_GET) is None:  # not Debian or Ubuntu: say what is needed, as check() does
        raise _missing_error(missing)
    waiting = f"lab: waiting for another lab's package install (lock {INSTALL_LOCK})"
    with locked(INSTALL_LOCK, lambda: progress(waiting)):
        missing = missing_tools(tools)  # what the install we waited for left to do
        if not missing:
            return []
        packages = packages_for(missing)
        progress(f"lab: installing Debian packages {', '.join(packages)} (for {', '.join(missing)})")
        install(packages)
    still = missing_tools(tools)
    if still:
        raise _missing_error(still, f" even after installing {' '.join(packages)}")
    return packages

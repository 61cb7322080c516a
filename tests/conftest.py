"""Shared test plumbing.

Tests marked `lab` boot real hosts and need root plus a few Debian tools. On a developer
machine without them they skip with the reason; with LAB_REQUIRED=1 (as CI sets it) a
missing prerequisite fails the test instead, so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
import shutil

import pytest

LAB_TOOLS = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "ip": "iproute2",
    "ssh": "openssh-client",
}


def lab_required() -> bool:
    return os.environ.get("LAB_REQUIRED", "") not in ("", "0")


def missing_lab_prerequisites() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for tool, package in LAB_TOOLS.items():
        if shutil.which(tool) is None:
            missing.append(f"{tool} (apt-get install {package})")
    return missing


def require(condition: bool, reason: str) -> None:
    """Skip when a prerequisite is absent, or fail when LAB_REQUIRED=1."""
    if condition:
        return
    if lab_required():
        pytest.fail(f"LAB_REQUIRED=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("lab"):
        missing = missing_lab_prerequisites()
        require(not missing, "lab prerequisites missing: " + ", ".join(missing))

"""Shared test plumbing.

Tests marked `lab` boot real hosts and need root plus a few Debian tools. On a developer
machine without them they skip with the reason; with LAB_REQUIRED=1 (as CI sets it) a
missing prerequisite fails the test instead, so CI can never pass by skipping them.
"""

from __future__ import annotations

import os

import pytest

from nixcache.lab import prereqs


def lab_required() -> bool:
    return os.environ.get("LAB_REQUIRED", "") not in ("", "0")


def missing_lab_prerequisites() -> list[str]:
    """What keeps lab tests from running. As root with apt, the missing Debian packages are
    installed first, as `nixcache lab up` does for the README's first command."""
    if os.geteuid() != 0:
        return ["root"]
    try:
        prereqs.ensure()
    except prereqs.PrerequisiteError as error:
        return [str(error)]
    return []


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


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory):
    """ONE lab instance for the whole test session, shared by every end-to-end test that asks for it.

    Boots N hosts (lab1..labN; N from $NIXCACHE_TEST_LAB_HOSTS, default 2) in a temporary state
    directory of its own, so it never touches a developer's `./.lab`, and yields the
    `nixcache.lab.Lab` object: `lab.state_dir` (pass it as NIXCACHE_LAB_DIR to `pyinfra
    inventories/lab.py ...`, or use `lab.environ()`), `lab.status()` for the host records (name,
    address, ssh_port, ssh_user, ssh_key, state), `lab.run(name, argv)` to check a host over SSH,
    `lab.reset(name)` for recovery tests. Hosts are shared: do not `down()` it, and reset a host
    only in a test that owns what is on it. Torn down (nothing left behind) at session end.
    Skips, or fails under LAB_REQUIRED=1, when root or a tool `nixcache lab` needs is missing.
    """
    missing = missing_lab_prerequisites()
    require(not missing, "lab prerequisites missing: " + ", ".join(missing))
    from nixcache.lab import Lab

    count = int(os.environ.get("NIXCACHE_TEST_LAB_HOSTS") or 2)
    shared = Lab(tmp_path_factory.mktemp("lab"))
    try:
        shared.up(count)
        yield shared
    finally:
        shared.down()

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


SHARED_LAB_GROUP = "shared-lab"


class _NativeEvent:
    """The part of threading.Event that pytest-xdist's worker uses, on the interpreter's own locks.

    pyinfra_cli (imported by pyinfra-testing and the inventory tests) calls gevent's
    monkey.patch_all() on import, as it does in a serial run. In an xdist worker the main thread
    then waits for its next test in threading.Event.wait, whose lock gevent has replaced: a
    greenlet's wait on a hub that nothing wakes, since execnet's reader thread sets the event
    (LoopExit, an INTERNALERROR of the whole run). Between tests nothing else needs to run."""

    def __init__(self) -> None:
        from gevent.monkey import get_original

        self._allocate = get_original("_thread", "allocate_lock")
        self._mutex = self._allocate()
        self._flag = False
        self._waiters: list = []

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._mutex:
            self._flag = True
            for waiter in self._waiters:
                waiter.release()
            self._waiters.clear()

    def clear(self) -> None:
        with self._mutex:
            self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        with self._mutex:
            if self._flag:
                return True
            waiter = self._allocate()
            waiter.acquire()
            self._waiters.append(waiter)
        return waiter.acquire(timeout=-1 if timeout is None else timeout)


def pytest_collection_finish(session: pytest.Session) -> None:
    for plugin in session.config.pluginmanager.get_plugins():
        queue = getattr(plugin, "torun", None)  # xdist.remote.WorkerInteractor's test queue
        if queue is not None and hasattr(queue, "_has_items_event"):
            with queue.lock():  # the queue sets or clears the new event as it is left
                queue._has_items_event = _NativeEvent()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Work units for `pytest -n … --dist loadgroup` (setup.cfg), longest first.

    Every test that uses the session's shared lab (`lab` below) is one unit, so its hosts boot
    and the cache deploy converges once; every other module is a unit, so its module fixtures (a
    lab of its own, a SeaweedFS, an OpenBao) start once. The shared lab goes first, then the
    modules with lab tests, then the rest in collection order: a worker that finishes its long
    unit takes the short ones left, and lab tests, which spend much of their time waiting on
    hosts, leave the other worker the CPU. Without xdist the same order runs in one process.
    """
    groups = {}
    for item in items:
        definitions = getattr(item, "_fixtureinfo", None)
        chain = definitions.name2fixturedefs.get("lab", ()) if definitions else ()
        shared = bool(chain) and chain[-1].func.__module__ == __name__
        groups[item] = SHARED_LAB_GROUP if shared else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    has_lab_tests = {groups[item] for item in items if item.get_closest_marker("lab")}

    def rank(item: pytest.Item) -> int:
        group = groups[item]
        return 0 if group == SHARED_LAB_GROUP else 1 if group in has_lab_tests else 2

    items.sort(key=rank)  # stable: each group keeps its collection order


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

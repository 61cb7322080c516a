"""Install the controller's checkout of nixcache into /opt/nixcache/venv, with no package index on the host.

The controller builds a wheelhouse per checkout and per host Python: the nixcache wheel built
from a copy of the package sources, plus binary wheels of its pinned runtime requirements for
the host's Python version, machine and glibc. It is cached under
~/.cache/nixcache/wheelhouse/<key> and built at most once per deploy run. The key is a content
hash of the sources, setup.cfg and pyproject.toml, so a changed checkout redeploys and an
unchanged one is neither uploaded nor reinstalled: the host records the key it was built from
in /opt/nixcache/venv/nixcache-build, and a fact reads it back.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import gevent
import gevent.lock
import gevent.subprocess
from pyinfra import host
from pyinfra.api import FileUploadCommand, OperationError, QuoteString, StringCommand, operation
from pyinfra.operations import files

from facts.nixcache import FileLine
from operations.settings import BUILD_STAMP, INSTALL_DIR, VENV_DIR, WHEELHOUSE_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent
# What goes into the wheel, hence into the key.
_PACKAGING_FILES = ("setup.cfg", "pyproject.toml", "README.md")
# Oldest glibc that manylinux wheels target; every newer manylinux tag up to the host's is accepted.
_OLDEST_MANYLINUX = 17


class WheelhouseError(OperationError):
    """The controller could not build the wheelhouse; the message names the step and the fix."""


def _package_files(root: Path) -> list[Path]:
    files = [root / name for name in _PACKAGING_FILES if (root / name).is_file()]
    for path in sorted((root / "nixcache").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith((".pyc", ".pyo")):
            files.append(path)
    return files


def source_digest(root: Path = REPO_ROOT) -> str:
    """A content hash of everything that goes into the nixcache wheel (16 hex digits)."""
    digest = hashlib.sha256()
    for path in _package_files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_key(python: dict[str, str], root: Path = REPO_ROOT) -> str:
    """The wheelhouse key for a host Python (from facts.nixcache.HostPython)."""
    return f"{source_digest(root)}-py{python['version']}-{python['machine']}"


def requirements(root: Path = REPO_ROOT) -> list[str]:
    """The pinned runtime requirements (setup.cfg install_requires)."""
    parser = configparser.ConfigParser()
    parser.read(root / "setup.cfg")
    raw = parser.get("options", "install_requires", fallback="")
    return [line.strip() for line in raw.splitlines() if line.strip() and not line.strip().startswith("#")]


def platform_tags(machine: str, glibc: str) -> list[str]:
    """manylinux tags a host with this machine and glibc accepts, newest first."""
    try:
        major, minor = (int(part) for part in glibc.split(".")[:2])
    except ValueError:
        major, minor = 2, _OLDEST_MANYLINUX  # unknown glibc: the oldest, most portable wheels
    if major != 2:
        minor = _OLDEST_MANYLINUX
    tags = [f"manylinux_2_{m}_{machine}" for m in range(minor, _OLDEST_MANYLINUX - 1, -1)]
    return [*tags, f"manylinux2014_{machine}", f"manylinux2010_{machine}", f"manylinux1_{machine}"]


def cache_root() -> Path:
    """Where built wheelhouses are kept on the controller."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nixcache" / "wheelhouse"


def _run(step: str, argv: list[str], cwd: Path | None = None) -> None:
    result = gevent.subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        errors = [line.strip() for line in lines if "error" in line.lower() and "note:" not in line]
        last = (errors or lines or ["no output"])[-1 if not errors else 0]
        raise WheelhouseError(f"wheelhouse: {step} failed ({last}); run `{' '.join(argv)}` to see why")


# pyinfra prepares hosts in parallel greenlets: a second host asking for the same wheelhouse
# must wait cooperatively (gevent primitives, whether or not the process is monkey-patched),
# never in a blocking lock or flock that would stall the hub, and with it the first host's
# pip subprocess (which then stays an unreaped zombie and the deploy hangs).
_BUILD_LOCKS: dict[str, gevent.lock.Semaphore] = {}
# Wheelhouses kept on the controller: the newest few, enough for hosts on different Pythons.
KEEP_WHEELHOUSES = 6
# Longest wait for another process building the same wheelhouse.
LOCK_TIMEOUT = 600


@contextlib.contextmanager
def _process_lock(path: Path):
    """An exclusive lock on `path` between processes, waited for cooperatively (bounded)."""
    with open(path, "w") as handle:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise WheelhouseError(
                        f"wheelhouse: {path} stayed locked for {LOCK_TIMEOUT} s; "
                        "another deploy is building it, or remove the lock if none runs"
                    ) from None
                gevent.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prune(cache: Path, keep: int = KEEP_WHEELHOUSES) -> None:
    """Remove all but the `keep` most recently built wheelhouses (and their lock files)."""
    built = [d for d in cache.iterdir() if (d / ".complete").exists()]
    built.sort(key=lambda d: d.stat().st_mtime)
    # Never one younger than an hour: a concurrent deploy may still be uploading from it.
    for old in (d for d in built[:-keep] if time.time() - d.stat().st_mtime > 3600):
        shutil.rmtree(old, ignore_errors=True)
        (cache / f".{old.name}.lock").unlink(missing_ok=True)


def build_wheelhouse(python: dict[str, str], root: Path = REPO_ROOT, cache: Path | None = None) -> Path:
    """The wheelhouse directory for `python`, built once per key (parallel builds wait for the first)."""
    cache = cache or cache_root()
    key = build_key(python, root)
    target = cache / key
    if (target / ".complete").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with _BUILD_LOCKS.setdefault(key, gevent.lock.Semaphore()), _process_lock(cache / f".{key}.lock"):
        if (target / ".complete").exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        _build(python, root, key, target)
    _prune(cache)
    return target


def _build(python: dict[str, str], root: Path, key: str, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="nixcache-wheel-") as tmp:
        # Build from a copy: the shared checkout gets no build/ or egg-info litter, and the
        # wheel holds exactly the files the key was computed from.
        source = Path(tmp) / "src"
        for path in _package_files(root):
            dest = source / path.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        staging = Path(tmp) / "wheels"
        pip = [sys.executable, "-m", "pip"]
        _run(
            "building the nixcache wheel",
            [*pip, "wheel", "--no-deps", "-q", "-w", str(staging), str(source)],
        )
        tags = platform_tags(python["machine"], python["glibc"])
        platforms = [arg for tag in tags for arg in ("--platform", tag)]
        _run(
            f"downloading wheels for Python {python['version']} {python['machine']}",
            [
                *pip, "download", "-q", "--only-binary=:all:", "--implementation", "cp",
                "--python-version", python["version"], *platforms, "-d", str(staging),
                *requirements(root),
            ],
        )  # fmt: skip
        (staging / ".complete").write_text(key + "\n")
        shutil.copytree(staging, target)


def wheel_files(wheelhouse: Path) -> list[Path]:
    """The wheels in a wheelhouse, in a stable order."""
    return sorted(wheelhouse.glob("*.whl"))


@operation()
def venv(build: str, wheels: list[str], venv_dir: str = VENV_DIR, wheelhouse_dir: str = WHEELHOUSE_DIR):
    """The venv at `venv_dir` holds `build`, installed from `wheels` (paths on the controller).

    Yields nothing when the host's build stamp already says `build`.
    """
    stamp = f"{venv_dir}/nixcache-build"
    if host.get_fact(FileLine, path=stamp) == build:
        host.noop(f"nixcache {build} is installed")
        return
    nixcache_wheels = [w for w in wheels if Path(w).name.startswith("nixcache-")]
    if len(nixcache_wheels) != 1:
        where = Path(wheels[0]).parent if wheels else cache_root() / build
        raise OperationError(
            f"{host.name}: install: the wheelhouse for {build} holds {len(nixcache_wheels)} nixcache "
            f"wheels, expected 1; remove {where} on the controller and rerun"
        )
    remote = f"{wheelhouse_dir}/{build}"
    yield StringCommand("rm -rf", QuoteString(wheelhouse_dir), "&& install -d -m 0755", QuoteString(remote))
    for wheel in wheels:
        yield FileUploadCommand(wheel, f"{remote}/{Path(wheel).name}")
    pip = f"{venv_dir}/bin/pip"
    nixcache_wheel = QuoteString(f"{remote}/{Path(nixcache_wheels[0]).name}")
    yield StringCommand(f"test -x {venv_dir}/bin/python || python3 -m venv {venv_dir}")
    # Dependencies first (pip keeps those already at the pinned version), then the nixcache
    # wheel itself, forced: its version number does not change with every checkout.
    yield StringCommand(
        pip, "install -q --no-index --no-cache-dir --find-links", QuoteString(remote), nixcache_wheel
    )
    yield StringCommand(
        pip, "install -q --no-index --no-cache-dir --no-deps --force-reinstall", nixcache_wheel
    )
    yield StringCommand(
        "echo", QuoteString(build), ">", QuoteString(stamp), "&& rm -rf", QuoteString(wheelhouse_dir)
    )


@operation()
def nixcache(python: dict[str, str], root: str = str(REPO_ROOT)):
    """The host's /opt/nixcache/venv holds the controller's checkout at `root`, for the host's `python`."""
    build = build_key(python, Path(root))
    if host.get_fact(FileLine, path=BUILD_STAMP) == build:
        host.noop(f"nixcache {build} is installed")
        return
    wheelhouse = build_wheelhouse(python, Path(root))
    yield StringCommand("install -d -m 0755", QuoteString(INSTALL_DIR))
    yield from venv._inner(build, [str(w) for w in wheel_files(wheelhouse)])


COMMAND_LINK = "/usr/local/bin/nixcache"


@operation()
def command_on_path(link: str = COMMAND_LINK, venv_dir: str = VENV_DIR):
    """`nixcache` on PATH for root and admins: the runbook's on-host commands call it by name.

    + link: where the command appears (in /usr/local/bin, on every login shell's PATH)
    + venv_dir: the venv whose `bin/nixcache` it points at

    **Example:**

    .. code:: python

        install.command_on_path(name="nixcache on PATH")
    """
    yield from files.link._inner(path=link, target=f"{venv_dir}/bin/nixcache", symbolic=True)

"""The lab's base image: a Debian bookworm root built once with debootstrap and cached.

The cache lives outside the repository (`/var/cache/nixcache/lab/<key>/builds/<id>/root`,
or below `$NIXCACHE_LAB_IMAGE_CACHE`), keyed by a hash of the recipe and package list, so a change to
`nixcache.packages.ALL_PACKAGES` builds a new image and an unchanged list reuses the old one.
A file lock serialises concurrent builds (several labs and test runs share the cache).

Two steps, because debootstrap's `--include` does not resolve virtual dependencies
(nix-bin -> libdbd-sqlite3-perl -> perl-dbdabi-94 is left unconfigured): debootstrap the
boot and SSH set, then `apt-get install` the deploys' packages inside the new root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nixcache.lab import rootfs
from nixcache.lab.errors import LabError
from nixcache.lab.lock import locked
from nixcache.packages import ALL_PACKAGES, MONITORING_SERVICES, NIX_HOST_SERVICES

SUITE = "bookworm"
RECIPE_VERSION = "3"  # bump when the build steps below change what lands in the image

# What a lab host needs to boot with systemd as PID 1 and be reached by pyinfra over SSH.
BOOT_PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "iproute2",
    "python3",
    "ca-certificates",
    "procps",  # ps, used by pyinfra facts and by people debugging a host
)

DEFAULT_CACHE = Path("/var/cache/nixcache/lab")
CURRENT_FILE = "current"  # names the complete build in <key>/builds/ that new hosts use

Progress = Callable[[str], None]


def cache_dir() -> Path:
    """Where base images are cached: $NIXCACHE_LAB_IMAGE_CACHE or /var/cache/nixcache/lab."""
    return Path(os.environ.get("NIXCACHE_LAB_IMAGE_CACHE") or DEFAULT_CACHE)


def packages() -> tuple[str, ...]:
    """Every package of the image: the boot set, then the deploys' list, without duplicates."""
    return tuple(dict.fromkeys(BOOT_PACKAGES + tuple(ALL_PACKAGES)))


def image_key(package_list: tuple[str, ...] | None = None) -> str:
    """A short hash of the recipe: suite, recipe version and sorted package list."""
    names = sorted(package_list if package_list is not None else packages())
    text = "\n".join([SUITE, RECIPE_VERSION, *names])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


HEARTBEAT = 5.0  # seconds between progress lines while packages go by
PER_PACKAGE = ("I: Retrieving ", "I: Validating ", "I: Extracting ", "I: Unpacking ", "I: Configuring ")


def _is_phase(line: str) -> bool:
    """debootstrap's phase lines and any warning or error (not its per-package lines)."""
    if line.startswith(("W: ", "E: ")):
        return True
    if not line.startswith("I: "):
        return False
    prefix = next((p for p in PER_PACKAGE if line.startswith(p)), None)
    if prefix is None:
        return True
    # "I: Extracting libc6..." / "I: Retrieving bash 5.2" are per package; "I: Unpacking the
    # base system..." / "I: Retrieving Release" are phases.
    words = line[len(prefix) :].rstrip(".").split()
    return len(words) > 2 or not words or words[0] in ("the", "required", "base", "Release", "Packages")


def _run_logged(argv: list[str], log: Path, progress: Progress, label: str) -> None:
    """Run `argv`, append its output to `log`, report each debootstrap/apt step as progress."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    with log.open("a") as log_handle:
        log_handle.write(f"$ {' '.join(argv)}\n")
        log_handle.flush()
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert process.stdout is not None
        started = last_shown = time.monotonic()
        for line in process.stdout:
            log_handle.write(line)
            line = line.rstrip()
            now = time.monotonic()
            # Phases, warnings and errors always; per-package lines (hundreds of them) only as
            # a heartbeat every few seconds, so the terminal shows it moving without flooding.
            if _is_phase(line) or now - last_shown >= HEARTBEAT:
                progress(f"  [{label} {now - started:3.0f} s] {line}")
                last_shown = now
        code = process.wait()
    if code != 0:
        raise LabError(f"building the lab image failed at `{argv[0]}` (exit {code}); see {log} for why")


def build(root: Path, log: Path, progress: Progress, mirror: str | None = None) -> None:
    """Build a fresh image at `root` (which must not exist)."""
    log.write_text("")
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(BOOT_PACKAGES)}", SUITE, str(root)]
    if mirror:
        argv.append(mirror)
    progress(f"lab: debootstrap {SUITE} into {root} (about a minute; log: {log})")
    _run_logged(argv, log, progress, "debootstrap")
    extra = [name for name in packages() if name not in BOOT_PACKAGES]
    progress(f"lab: installing {len(extra)} deploy packages into the image")
    # nspawn (without -b) gives apt /proc, /dev and the controller's network, and no init to start services.
    nspawn = ["systemd-nspawn", "-q", "-D", str(root), "--register=no", "--keep-unit"]
    nspawn += ["--setenv=DEBIAN_FRONTEND=noninteractive"]
    _run_logged(
        [*nspawn, "apt-get", "install", "-y", "--no-install-recommends", *extra], log, progress, "apt"
    )
    _run_logged([*nspawn, "apt-get", "clean"], log, progress, "apt")
    _generalise(root)


def _generalise(root: Path) -> None:
    """Remove what must differ per host, so each copy gets its own."""
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")  # empty, not absent: systemd then treats it as first boot
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    (root / "etc/hostname").write_text("lab\n")
    # Units that only make noise or fail in a container without disks or consoles.
    wants = root / "etc/systemd/system"
    for unit in (
        "getty.target.wants/getty@tty1.service",
        "timers.target.wants/e2scrub_all.timer",
        "timers.target.wants/fstrim.timer",
        "timers.target.wants/apt-daily.timer",
        "timers.target.wants/apt-daily-upgrade.timer",
    ):
        (wants / unit).unlink(missing_ok=True)
    # Every lab host carries the monitoring and Nix host packages, but only their deploys start
    # them: a bare lab host runs no Prometheus and no nix-daemon.
    for unit in ("e2scrub_reap.service", "systemd-pstore.service", *MONITORING_SERVICES, *NIX_HOST_SERVICES):
        for target in ("multi-user", "sysinit", "sockets"):
            (wants / f"{target}.target.wants" / unit).unlink(missing_ok=True)
    (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)


def current(key: str | None = None) -> Path | None:
    """The root of the complete image for `key` (default: today's package list), or None."""
    key_dir = cache_dir() / (key or image_key())
    try:
        build_id = (key_dir / CURRENT_FILE).read_text().strip()
    except FileNotFoundError:
        legacy = key_dir / "root"  # layout before builds/ existed: <key>/root + <key>/complete
        return legacy if (key_dir / "complete").exists() and legacy.is_dir() else None
    root = key_dir / "builds" / build_id / "root"
    return root if build_id and root.is_dir() else None


def ensure(progress: Progress = _stderr_progress, *, rebuild: bool = False) -> Path:
    """Return the cached image root, building it first when absent (or a new one when `rebuild`).

    Every build goes to a new directory and becomes current only once complete, so hosts
    whose overlay roots sit on an older build keep running; builds no mount uses any more
    are removed after a successful build.
    """
    key = image_key()
    key_dir = cache_dir() / key
    lock = cache_dir() / f"{key}.lock"
    waiting = f"lab: waiting for another process building the lab image (lock {lock})"
    with locked(lock, lambda: progress(waiting)):
        existing = current(key)
        if existing is not None and not rebuild:
            return existing
        started = time.monotonic()
        build_dir = key_dir / "builds" / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        build_dir.mkdir(parents=True)
        try:
            # The log sits beside the build, so it outlives a failed build that is removed.
            log = key_dir / "builds" / f"{build_dir.name}.log"
            build(build_dir / "root", log, progress, os.environ.get("NIXCACHE_LAB_MIRROR") or None)
        except BaseException:
            shutil.rmtree(build_dir, ignore_errors=True)
            raise
        pointer = key_dir / f".{CURRENT_FILE}.tmp"
        pointer.write_text(build_dir.name + "\n")
        os.replace(pointer, key_dir / CURRENT_FILE)
        progress(f"lab: image {key} built in {time.monotonic() - started:.0f} s")
        _prune(key_dir, keep=build_dir / "root", progress=progress)
    return build_dir / "root"


def _prune(key_dir: Path, keep: Path, progress: Progress) -> None:
    """Remove this key's older builds (and their logs) that no overlay mount uses any more."""
    candidates = [path / "root" for path in (key_dir / "builds").glob("*") if path.is_dir()]
    candidates.append(key_dir / "root")  # the layout before builds/ existed
    for root in candidates:
        if root == keep or not root.exists():
            continue
        if rootfs.image_users(root):
            progress(f"lab: keeping the previous image {root}: lab hosts still run on it")
            continue
        if root.parent == key_dir:
            shutil.rmtree(root, ignore_errors=True)
        else:
            shutil.rmtree(root.parent, ignore_errors=True)
            root.parent.with_name(root.parent.name + ".log").unlink(missing_ok=True)
    (key_dir / "complete").unlink(missing_ok=True)

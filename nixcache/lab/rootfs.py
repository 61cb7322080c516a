"""Host roots: an overlay of the cached base image, or a full copy where overlays cannot be mounted.

Per host directory `hosts/NAME/`: `upper/` and `work/` (the host's own changes) and `root/`
(the overlay mount nspawn boots). An overlay costs no copy, so `up` and `reset` take the same
time however busy the disk is; the image under it must not change while mounted, which is
why `image.ensure(rebuild=True)` builds into a new directory and removes an old build only
once no overlay uses it. Where the state
directory's filesystem cannot hold an overlay's upper layer (overlayfs, some tmpfs), the
root is a copy instead (`cp --reflink=auto -a`: a snapshot on btrfs/xfs, a real copy on ext4).
$NIXCACHE_LAB_ROOTS=overlay|copy forces one kind (default auto).
"""

from __future__ import annotations

import os
from pathlib import Path

from nixcache.lab.command import run
from nixcache.lab.errors import LabError

PARTS = ("upper", "work", "root")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounts() -> list[tuple[str, str, str]]:
    """(mount point, filesystem type, super options) of every mount in our namespace."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3:
            found.append((_unescape(fields[4]), tail[0], tail[2]))
    return found


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory`, deepest first (the order to unmount them in)."""
    prefix = str(directory).rstrip("/") + "/"
    points = [point for point, _, _ in mounts() if point.startswith(prefix) or point == str(directory)]
    return sorted(set(points), key=lambda point: -point.count("/"))


def image_users(image_root: Path) -> list[str]:
    """Mount points of overlays whose lower layer is `image_root`."""
    needle = f"lowerdir={image_root}"
    return [point for point, kind, options in mounts() if kind == "overlay" and needle in options.split(",")]


def is_mounted(path: Path) -> bool:
    return str(path) in {point for point, _, _ in mounts()}


def create(image_root: Path, host_dir: Path) -> tuple[Path, str]:
    """A fresh root for a host in `host_dir` from `image_root`; returns (root, "overlay" | "copy")."""
    remove(host_dir)
    for part in PARTS:
        (host_dir / part).mkdir(parents=True, exist_ok=True)
    wanted = os.environ.get("NIXCACHE_LAB_ROOTS", "auto")
    if wanted not in ("auto", "overlay", "copy"):
        raise LabError(f"NIXCACHE_LAB_ROOTS={wanted} is not one of auto, overlay, copy; unset it or pick one")
    if wanted != "copy" and mount_overlay(image_root, host_dir, check=wanted == "overlay"):
        return host_dir / "root", "overlay"
    for part in ("upper", "work"):
        (host_dir / part).rmdir()
    (host_dir / "root").rmdir()
    run(["cp", "--reflink=auto", "-a", str(image_root), str(host_dir / "root")], timeout=900)
    return host_dir / "root", "copy"


def mount_overlay(image_root: Path, host_dir: Path, *, check: bool = True) -> bool:
    """Mount the host's overlay at `host_dir/root` (no-op if mounted); False if the kernel refuses."""
    root = host_dir / "root"
    if is_mounted(root):
        return True
    options = f"lowerdir={image_root},upperdir={host_dir / 'upper'},workdir={host_dir / 'work'}"
    result = run(["mount", "-t", "overlay", "overlay", "-o", options, str(root)], check=check)
    return result.returncode == 0


def ensure_mounted(host_dir: Path, storage: str) -> None:
    """After a crash or reboot, mount an overlay root again (its upper layer kept the host's changes).

    On the image build the host was created from, which `--rebuild` never removes while in use.
    """
    if storage != "overlay":
        return
    image_root = base_of(host_dir)
    if image_root is None or not image_root.is_dir():
        raise LabError(
            f"the base image {image_root} under {host_dir} is gone; "
            f"run `nixcache lab down` and `nixcache lab up` to start from a new one"
        )
    mount_overlay(image_root, host_dir)


def remove(host_dir: Path) -> None:
    """Unmount everything below `host_dir` and delete it."""
    for point in mounts_under(host_dir):
        result = run(["umount", point], check=False)
        if result.returncode != 0:
            # Busy (a shell sitting in it): detach it now; the kernel frees it when released.
            run(["umount", "-l", point], check=False)
    leftover = mounts_under(host_dir)
    if leftover:
        raise LabError(f"cannot unmount {', '.join(leftover)}; stop what uses it (fuser -vm {leftover[0]})")
    if host_dir.exists():
        # --one-file-system: never follow into a mount that appeared meanwhile.
        run(["rm", "-rf", "--one-file-system", str(host_dir)], timeout=900)


def is_complete(host_dir: Path) -> bool:
    """True when the host's root was fully created (a crash mid-copy leaves no marker)."""
    return (host_dir / "prepared").exists()


def base_of(host_dir: Path) -> Path | None:
    """The image root a complete host root was created from."""
    try:
        return Path((host_dir / "prepared").read_text().strip())
    except FileNotFoundError:
        return None


def mark_complete(host_dir: Path, image_root: Path) -> None:
    (host_dir / "prepared").write_text(f"{image_root}\n")

"""The service user, the store directories and the optional dedicated store volume."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import OperationError, QuoteString, StringCommand, operation
from pyinfra.facts.files import Directory, FindInFile
from pyinfra.facts.server import Mounts, Users

from facts.storage import BlockDeviceFilesystem
from operations.settings import Settings

FSTAB = "/etc/fstab"


@operation()
def service_user(user: str, home: str):
    """A locked system user `user` (and its group), home `home`, no login shell, no password."""
    if user in host.get_fact(Users):
        host.noop(f"user {user} exists")
        return
    yield StringCommand(
        "useradd --system --user-group --home-dir",
        QuoteString(home),
        "--no-create-home --shell /usr/sbin/nologin",
        QuoteString(user),
    )


def fact_mode(mode: str) -> int:
    """`mode` ("0640") as pyinfra's File and Directory facts report it: octal digits read as decimal."""
    return int(mode.lstrip("0") or "0")


@operation()
def directory(path: str, user: str, group: str, mode: str):
    """`path` is a directory owned `user:group` with `mode` (e.g. "0750")."""
    current = host.get_fact(Directory, path=path)
    wanted = (user, group, fact_mode(mode))
    if current and (current["user"], current["group"], current["mode"]) == wanted:
        host.noop(f"{path} exists")
        return
    yield StringCommand(
        "install -d -m", mode, "-o", QuoteString(user), "-g", QuoteString(group), QuoteString(path)
    )


@operation()
def volume(
    device: str,
    mountpoint: str,
    options: str = Settings.cache_volume_options,
    format_empty: bool = Settings.cache_volume_format,
):
    """`device` holds ext4, is listed in /etc/fstab on `mountpoint` with `options`, and is mounted.

    An empty device is formatted only when `format_empty`; a device holding any other filesystem
    is an error, never reformatted.
    """
    filesystem = host.get_fact(BlockDeviceFilesystem, device=device)
    if filesystem is None:
        raise OperationError(
            f"{host.name}: cache_volume_device {device} is not a block device; "
            "fix cache_volume_device or attach the volume"
        )
    if filesystem == "":
        if not format_empty:
            raise OperationError(
                f"{host.name}: {device} holds no filesystem; format it with ext4 or set cache_volume_format"
            )
        yield StringCommand("mkfs.ext4 -q -L nixcache-store", QuoteString(device))
    elif filesystem != "ext4":
        raise OperationError(
            f"{host.name}: {device} holds {filesystem}, not ext4; "
            "nixcache never reformats a used device: wipe it yourself or pick another"
        )
    entry = f"{device} {mountpoint} ext4 {options} 0 2"
    lines = host.get_fact(FindInFile, path=FSTAB, pattern=f"^{device} ") or []
    if lines != [entry]:
        yield StringCommand("sed -i", QuoteString(f"\\|^{device} |d"), FSTAB)
        yield StringCommand("echo", QuoteString(entry), ">>", FSTAB)
    mounts = host.get_fact(Mounts)
    mounted = mounts.get(mountpoint)
    if not mounted:
        yield StringCommand("install -d -m 0755", QuoteString(mountpoint))
        yield StringCommand("mount", QuoteString(mountpoint))
    elif lines != [entry]:
        yield StringCommand("mount -o", QuoteString(f"remount,{options}"), QuoteString(mountpoint))
    if filesystem != "" and lines == [entry] and mounted:
        host.noop(f"{device} is mounted on {mountpoint}")

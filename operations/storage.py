"""The service user and the optional dedicated store volume.

The service user is pyinfra's `server.user` with this project's policy (a system account with
its own group, no login shell, no password, no home created: the data directory is made by
pyinfra's `files.directory` with its owner and mode, as every directory of the deploys is).
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import OperationError, QuoteString, StringCommand, operation
from pyinfra.facts.files import FindInFile
from pyinfra.facts.server import Mounts
from pyinfra.operations import server

from facts.storage import BlockDeviceFilesystem
from operations.settings import Settings

FSTAB = "/etc/fstab"


@operation()
def service_user(user: str, home: str):
    """A locked system user `user` (and its group), home `home`, no login shell, no password.

    + user: the account (its group has the same name: Debian's USERGROUPS_ENAB)
    + home: its home directory, not created here
    """
    commands = list(
        server.user._inner(  # noqa: S604 - `shell` is the login shell, not a subprocess
            user=user, home=home, shell="/usr/sbin/nologin", system=True, create_home=False, ensure_home=False
        )
    )
    if not commands:
        host.noop(f"user {user} exists")
    yield from commands


def fact_mode(mode: str) -> int:
    """`mode` ("0640") as pyinfra's File and Directory facts report it: octal digits read as decimal."""
    return int(mode.lstrip("0") or "0")


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

"""Build logs from Nix's log directory, for `GET /log/<drv>` (what `nix log --store http://…` asks).

Nix keeps the log of `/nix/store/<hash>-<name>.drv` at `<log dir>/drvs/<2 first chars>/<rest>`,
bzip2-compressed with a `.bz2` suffix unless `compress-build-log = false`. Clients want the text
(Nix sends no Accept-Encoding that covers bzip2), and the response needs its length before the
first byte, so a compressed log is decompressed into an anonymous temporary file first: memory
stays flat, and the body is then sent like any file. The server runs this in its thread pool.
"""

from __future__ import annotations

import bz2
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from nixcache.server.narinfo import is_base_name

_CHUNK = 1 << 20


@dataclass(frozen=True)
class BuildLog:
    """An open log ready to send from offset 0: the caller closes `handle`."""

    handle: BinaryIO
    size: int


def is_drv_name(name: str) -> bool:
    """True when `name` is the base name of a derivation, `<hash>-<name>.drv`."""
    return name.endswith(".drv") and is_base_name(name)


def open_log(log_dir: Path, drv: str) -> BuildLog | None:
    """The build log of the derivation `drv` (a base name), or None when Nix kept none."""
    if not is_drv_name(drv):
        return None
    plain = Path(log_dir) / "drvs" / drv[:2] / drv[2:]
    try:
        handle = open(plain, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        pass
    else:
        return BuildLog(handle, os.fstat(handle.fileno()).st_size)
    try:
        compressed = open(plain.with_name(plain.name + ".bz2"), "rb")  # noqa: SIM115 - with below
    except FileNotFoundError:
        return None
    with compressed:
        return _decompressed(compressed)


def _decompressed(compressed: BinaryIO) -> BuildLog:
    out = tempfile.TemporaryFile()  # noqa: SIM115 - unlinked already; the caller closes it
    try:
        with bz2.open(compressed) as text:
            while chunk := text.read(_CHUNK):
                out.write(chunk)
        size = out.tell()
        out.seek(0)
    except BaseException:
        out.close()
        raise
    return BuildLog(out, size)  # type: ignore[arg-type]

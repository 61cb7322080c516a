"""`log/<drv>`: the build log of a derivation (`nix store copy-log --to`, read by `nix log --store`).

Nix PUTs `log/<hash>-<name>.drv` with the log's text (BinaryCacheStore::addBuildLog) and reads
`log/<drv base name>` (getBuildLogExact; `nix log` on an output path first looks up its Deriver).
Any bytes are a log (builders print what they like); the name must be a derivation's. Kept
while a narinfo names the derivation as its Deriver (extras/gc.py).
"""

from __future__ import annotations

from nixcache.server.extras import SEGMENT, ExtraError, Kind
from nixcache.server.nixstore.logs import is_drv_name

LIMIT = 64 * 1024 * 1024  # Nix holds the whole log in memory to upload it, so logs stay far below


def validate(name: str, data: bytes) -> None:
    drv = name.rsplit("/", 1)[-1]
    if not is_drv_name(drv):
        raise ExtraError(f"log/{drv[:120]}: a build log is log/<hash>-<name>.drv")


KIND = Kind(
    name="log",
    pattern=rf"/log/({SEGMENT})",
    directory="log",
    content_type="text/plain; charset=utf-8",
    limit=LIMIT,
    validate=validate,
    url_prefix="log/",
)

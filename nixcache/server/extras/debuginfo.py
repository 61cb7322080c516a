"""`debuginfo/<build-id>`: where the DWARF debug info of a build ID is (Nix's `index-debug-info`).

For each `lib/debug/.build-id/<xx>/<38 hex>.debug` in a NAR it uploads, Nix PUTs
`debuginfo/<xx><38 hex>.debug` holding `{"archive":"../nar/<NAR file>","member":"lib/debug/…"}`
(BinaryCacheStore::uploadData), after a HEAD to skip those already there; dwarffs reads them.
Verified: that shape, the member matching the build ID. Kept while the NAR it names is
(extras/gc.py).
"""

from __future__ import annotations

from nixcache.server import narinfo
from nixcache.server.extras import ExtraError, Kind, parse_json

LIMIT = 64 * 1024
_BUILD_ID = r"[0-9a-f]{40}\.debug"


def validate(name: str, data: bytes) -> None:
    build_id = name
    index = parse_json(f"debuginfo/{name}", data)
    if not isinstance(index, dict):
        raise ExtraError(f'debuginfo/{name}: expected {{"archive":"../nar/…","member":"…"}}')
    archive = index.get("archive")
    nar_file = archive[len("../nar/") :] if isinstance(archive, str) and archive.startswith("../nar/") else ""
    if not narinfo.NAR_FILE.match(nar_file):
        raise ExtraError(f"debuginfo/{name}: archive {str(archive)[:80]!r} is not ../nar/<NAR file>")
    member = f"lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}"
    if index.get("member") != member:
        raise ExtraError(f"debuginfo/{name}: member must be {member!r}")


def archive_of(data: bytes) -> str | None:
    """The NAR file a stored index names (None when unreadable)."""
    try:
        archive = parse_json("", data).get("archive", "")
    except (ExtraError, AttributeError):
        return None
    return archive[len("../nar/") :] if isinstance(archive, str) and archive.startswith("../nar/") else None


KIND = Kind(
    name="debuginfo",
    pattern=rf"/debuginfo/({_BUILD_ID})",
    directory="debuginfo",
    content_type="application/json",
    limit=LIMIT,
    validate=validate,
    url_prefix="debuginfo/",
)

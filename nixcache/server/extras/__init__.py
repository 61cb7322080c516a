"""The files of the binary cache protocol besides narinfos and NARs: stored, verified, served.

One module per kind, each declaring a `Kind` (its URL pattern, where it lives in the store and
the origin, its Content-Type, its size limit, how an upload is verified, how it is signed):

    listing.py     <hash>.ls                       NAR listing (write-nar-listing; nix store ls)
    buildlog.py    log/<drv>                       build log (nix store copy-log; nix log)
    debuginfo.py   debuginfo/<build-id>            DWARF debug info index (index-debug-info)
    buildtrace.py  build-trace-v2/<drv>/<out>.doi  build trace entry (CA derivations, Nix ≥ 2.35)
                   realisations/<id>.doi           realisation (CA derivations, Nix < 2.35, Lix)

and, shared by all of them:

    serve.py       the GET/HEAD/PUT handlers (App's route table takes `routes()` from here)
    gc.py          what `nixcache gc` removes: a file goes with the path it describes

Every path below is what Nix itself reads and writes (src/libstore/binary-cache-store.cc:
uploadData, addBuildLog, getBuildLogExact, registerDrvOutputUnchecked,
queryRealisationUncached). A kind's files live under the store in the directory of the same
name as in the URL (`<hash>.ls` under `ls/`), and in the origin bucket at the URL path itself,
so the bucket stays a binary cache that plain Nix can read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nixcache.keys import SecretKey


class ExtraError(ValueError):
    """An uploaded file is not what its kind must be; the message names the field and the fix."""


@dataclass(frozen=True)
class Kind:
    name: str  # the route name (log lines, metrics) and the upload kind of the metrics
    pattern: str  # the URL path; one group: the file's name relative to `directory`
    directory: str  # under the store root; the origin key is the URL path without its "/"
    content_type: str
    limit: int  # bytes of the decoded upload
    validate: Callable[[str, bytes], object]  # (name, data) -> raises ExtraError
    sign: Callable[[str, bytes, Iterable[SecretKey]], bytes] | None = None  # served with our signatures
    url_prefix: str = ""  # the URL path is "/" + url_prefix + name

    def url_path(self, name: str) -> str:
        return f"{self.url_prefix}{name}"

    def compiled(self) -> re.Pattern[str]:
        return re.compile(self.pattern)


# One path segment: never "." or "..", never a NUL or a slash (the route table's rule).
SEGMENT = r"(?!\.\.?(?:/|\Z))[^/\x00]+"
# A derivation output name, as Nix allows in store path names (outputs are "out", "dev", …).
OUTPUT_NAME = r"[A-Za-z0-9+\-_?=][A-Za-z0-9+\-._?=]{0,210}"


def parse_json(name: str, data: bytes) -> Any:
    """The JSON value of an upload; ExtraError naming the file otherwise."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ExtraError(f"{name}: not UTF-8 text") from None
    except ValueError as error:
        raise ExtraError(f"{name}: not JSON ({error})") from None


def kinds() -> list[Kind]:
    """Every kind, in route-table order."""
    from nixcache.server.extras import buildlog, buildtrace, debuginfo, listing

    return [listing.KIND, buildlog.KIND, debuginfo.KIND, buildtrace.BUILD_TRACE, buildtrace.REALISATION]

"""What the nginx front served from disk, recorded as if this server had served it.

With the front on (operations/nginx.py), nginx answers signed narinfos and NAR GETs from the
store's files itself, so this server never sees those requests. nginx logs each of them to
`front_hits_log` as ``<method> <status> <body bytes> <uri>`` (its `nixcache_front` log_format,
buffered, flushed every second; `<uri>` is ``/<hash>.narinfo``, whose file is
``signed/<hash>.narinfo``, or ``/nar/<file>``; sites rendered before wrote
``/signed/<hash>.narinfo``, still read). `HitsLog.ingest`, every second, reads what was appended and

- marks each narinfo it served as served (`Store.mark_served`: gc's last-served time, so an entry
  served only by nginx is not collected as least recently used);
- counts every hit in nixcache_front_requests_total, narinfo hits also in
  nixcache_narinfo_lookups_total{result="hit"} and bytes in nixcache_served_bytes_total, so the hit
  rate and traffic cover both halves.

The file grows until EMPTY_AT bytes have been read, then is emptied (ftruncate; nginx appends
with O_APPEND, so its next line lands at the new end), and once more when the server stops. What
nginx appends between the last read and the truncation (microseconds, once per EMPTY_AT) is lost:
a few last-served marks, which the entry's next request sets again. Lines written while the
server is down are applied when it starts.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

from nixcache.server.metrics import Metrics
from nixcache.server.store import Store

log = logging.getLogger("nixcache.server")

EMPTY_AT = 4 * 1024 * 1024  # bytes read before the file is emptied (~40,000 hits)
_READ = 1024 * 1024
# A narinfo hit's URI: /<hash>.narinfo (the file is signed/<hash>.narinfo), or the file itself,
# /signed/<hash>.narinfo, as sites rendered before this one logged it (try_files).
_NARINFO = b".narinfo"
_NARINFO_URIS = {len(b"/") + 32 + len(_NARINFO): b"/", len(b"/signed/") + 32 + len(_NARINFO): b"/signed/"}
# Statuses that answered a narinfo lookup positively (304: the client's copy is current).
_FOUND = (b"200", b"304")


class HitsLog:
    """nginx's log of disk hits at `path`, applied to `store` and `metrics`."""

    def __init__(self, path: Path, store: Store, metrics: Metrics):
        self.path = path
        self.store = store
        self.metrics = metrics
        self._fd = -1
        self._offset = 0
        self._partial = b""
        self._warned = False

    def ingest(self, final: bool = False) -> int:
        """Apply the lines appended since the last call; `final` (on stop): empty the file after.
        Returns the number of lines applied."""
        if self._fd < 0 and not self._open():
            return 0
        if os.fstat(self._fd).st_size < self._offset:  # emptied by someone else: start over
            self._offset, self._partial = 0, b""
        # Counted first, applied once per distinct line: a busy second repeats the same few
        # thousand narinfos many times, and counting bytes lines is C, applying one is Python.
        lines: Counter[bytes] = Counter()
        while True:
            chunk = os.pread(self._fd, _READ, self._offset)
            if not chunk:
                break
            self._offset += len(chunk)
            split = (self._partial + chunk).split(b"\n")
            self._partial = split.pop()  # nginx writes whole lines; a read may still end mid-write
            lines.update(split)
        routes: Counter[tuple[bytes, bytes, bytes]] = Counter()  # (route, method, status): hits
        sent: Counter[bytes] = Counter()  # route: body bytes of GETs answered 200 or 206
        for line, count in lines.items():
            self._apply(line, count, routes, sent)
        for (route, method, status), count in routes.items():
            self.metrics.front.labels(route.decode(), method.decode("ascii"), status.decode("ascii")).inc(
                count
            )
            if route == b"narinfo" and status in _FOUND:
                self.metrics.narinfo.labels("hit").inc(count)
        for route, size in sent.items():
            self.metrics.served_bytes.labels(route.decode()).inc(size)
        if not self._partial and (final or self._offset >= EMPTY_AT):
            os.ftruncate(self._fd, 0)
            self._offset = 0
        return sum(routes.values())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _open(self) -> bool:
        try:
            # Read-write: emptying it needs a descriptor open for writing (nginx may own it).
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            if not self._warned:  # once, not every second
                log.warning(
                    "cannot open front_hits_log %s: %s; hits nginx serves from disk are not recorded "
                    "until it is there, group-writable by the service (the deploy creates it)",
                    self.path,
                    error.strerror,
                )
                self._warned = True
            return False
        self._warned = False
        return True

    def _apply(self, line: bytes, count: int, routes: Counter, sent: Counter) -> None:
        """One distinct line, seen `count` times: marks its narinfo served, adds to the tallies."""
        parts = line.split(b" ", 3)
        if len(parts) != 4 or not parts[2].isdigit():
            log.debug("front_hits_log: skipped a line not in the nixcache_front format: %r", line[:200])
            return
        method, status, size, uri = parts
        if uri.startswith(b"/nar/"):
            route = b"nar"
        elif uri.endswith(_NARINFO) and uri[: -32 - len(_NARINFO)] == _NARINFO_URIS.get(len(uri)):
            route = b"narinfo"
            if status in _FOUND:
                self.store.mark_served(uri[-32 - len(_NARINFO) : -len(_NARINFO)].decode("ascii"), None)
        else:
            return
        routes[route, method, status] += count
        if method == b"GET" and status in (b"200", b"206"):
            sent[route] += int(size) * count

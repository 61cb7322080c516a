"""The WSGI application: routing of the Nix binary cache protocol over a `Store`.

Pure WSGI (no gevent import): `nixcache.server.http` serves it, adds sendfile for `FileBody`
responses, logs one line per request and counts it in the metrics.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

from nixcache.keys import SecretKey
from nixcache.server import narinfo
from nixcache.server.auth import Tokens
from nixcache.server.config import ServerConfig
from nixcache.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from nixcache.server.metrics import Metrics
from nixcache.server.narinfo import NarInfo, NarInfoError
from nixcache.server.store import Store, UploadError

StartResponse = Callable[..., Any]
_NARINFO = re.compile(r"^/([0-9a-df-np-sv-z]{32})\.narinfo$")
_LS = re.compile(r"^/[0-9a-df-np-sv-z]{32}\.ls$")
# Files newer clients upload that this cache accepts and discards.
_EXTRA_PREFIXES = ("/log/", "/debuginfo/", "/build-trace-v2/", "/realisations/")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
# Unread request bodies up to this size are drained to keep the connection; larger ones close it.
_DRAIN_LIMIT = 64 * 1024
_NARINFO_CACHE_ENTRIES = 16384  # signed narinfos kept in memory, ~1 KiB each
NARINFO_LIMIT = 4 * 1024 * 1024  # the largest narinfo accepted (thousands of references fit)
_AUTH_HEADERS = [("WWW-Authenticate", 'Basic realm="nixcache"')]


class FileBody:
    """A (part of a) file as a response body; the HTTP layer sends it with sendfile(2)."""

    def __init__(self, handle: BinaryIO, offset: int, count: int):
        self.handle = handle
        self.offset = offset
        self.count = count

    def __iter__(self) -> Iterator[bytes]:
        # Fallback for WSGI servers without sendfile: bounded chunks.
        self.handle.seek(self.offset)
        remaining = self.count
        while remaining > 0:
            chunk = self.handle.read(min(remaining, 256 * 1024))
            if not chunk:
                raise OSError(f"{self.handle.name} shrank while being sent")
            remaining -= len(chunk)
            yield chunk

    def close(self) -> None:
        self.handle.close()


class StreamBody:
    """A body of known length produced while it is sent (a NAR pulled through from another
    tier): bytes, or FileBody segments of a growing file. The HTTP layer sends each part as it
    comes (segments with sendfile); an OSError from the iterator cuts the connection, so a
    client never takes a short body for a complete one."""

    def __init__(self, chunks: Iterator[bytes | FileBody], count: int):
        self.chunks = chunks
        self.count = count

    def __iter__(self) -> Iterator[bytes | FileBody]:
        return self.chunks

    def close(self) -> None:
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()


class App:
    """The cache's WSGI application. `tiers` (nixcache.server.tiers) is asked on a local miss
    and written through on a push; None: this cache is an island."""

    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        keys: list[SecretKey],
        tokens: Tokens,
        metrics: Metrics,
        tiers: Any = None,
    ):
        self.config = config
        self.tiers = tiers
        self.store = store
        self.keys = keys
        self.tokens = tokens
        self.metrics = metrics
        self.cache_info = (
            f"StoreDir: {config.store_dir}\nWantMassQuery: 1\nPriority: {config.priority}\n"
        ).encode()
        self.pubkeys = "".join(f"{key.public()}\n" for key in keys).encode()
        # hash -> ((inode, mtime_ns, size), signed narinfo bytes): signing costs more than a stat.
        self._narinfo_cache: dict[str, tuple[tuple[int, int, int], bytes]] = {}
        self._hit = metrics.narinfo.labels("hit")
        self._miss = metrics.narinfo.labels("miss")
        self._narinfo_prefix = f"{store.narinfo_dir}/"

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _respond(
        environ: dict[str, Any],
        start_response: StartResponse,
        status: str,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        headers: Iterable[tuple[str, str]] = (),
    ) -> list[bytes]:
        out = [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers]
        start_response(status, out)
        if environ["REQUEST_METHOD"] == "HEAD":
            return []
        if status[0] == "2" and environ["REQUEST_METHOD"] == "GET":
            environ["nixcache.body_bytes"] = len(body)
        return [body]

    def _error(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        status: int,
        reason: str,
        headers: Iterable[tuple[str, str]] = (),
    ) -> list[bytes]:
        environ["nixcache.reason"] = reason
        extra = list(headers)
        if _body_left(environ) > _DRAIN_LIMIT:
            # Do not read gigabytes we refused: close instead of draining.
            abandon = getattr(environ["wsgi.input"], "abandon", None)
            if abandon:
                abandon()
            extra.append(("Connection", "close"))
        return self._respond(environ, start_response, _STATUS[status], f"{reason}\n".encode(), headers=extra)

    # -- dispatch --------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        match = _NARINFO.match(path)
        if match:
            environ["nixcache.route"] = "narinfo"
            if method in ("GET", "HEAD"):
                return self.get_narinfo(environ, start_response, match.group(1))
            if method == "PUT":
                return self.put(environ, start_response, "narinfo", match.group(1))
        elif path.startswith("/nar/"):
            environ["nixcache.route"] = "nar"
            name = path[len("/nar/") :]
            if narinfo.NAR_FILE.match(name) is None:
                return self._bad_path(environ, start_response, path)
            if method in ("GET", "HEAD"):
                return self.get_nar(environ, start_response, name)
            if method == "PUT":
                return self.put(environ, start_response, "nar", name)
        elif path == "/nix-cache-info":
            environ["nixcache.route"] = "nix-cache-info"
            if method in ("GET", "HEAD"):
                if not self.tokens.may_read(environ.get("HTTP_AUTHORIZATION")):
                    return self._unauthorized(environ, start_response, "read")
                return self._respond(
                    environ, start_response, "200 OK", self.cache_info, "text/x-nix-cache-info"
                )
            if method == "PUT":
                return self.put(environ, start_response, "extra", path)
        elif path in ("/healthz", "/metrics", "/pubkey"):
            environ["nixcache.route"] = path[1:]
            if method in ("GET", "HEAD"):
                return getattr(self, "get_" + path[1:])(environ, start_response)
        elif _LS.match(path) or path.startswith(_EXTRA_PREFIXES):
            environ["nixcache.route"] = "extra"
            if ".." in path.split("/") or "\0" in path:
                return self._bad_path(environ, start_response, path)
            if method == "PUT":
                return self.put(environ, start_response, "extra", path)
            if method in ("GET", "HEAD"):
                return self._error(environ, start_response, 404, f"{path} is not kept by this cache")
        else:
            environ["nixcache.route"] = "other"
            return self._bad_path(environ, start_response, path)
        return self._error(
            environ,
            start_response,
            405,
            f"{method} is not supported on {path}",
            [("Allow", "GET, HEAD, PUT")],
        )

    def _bad_path(self, environ: dict[str, Any], start_response: StartResponse, path: str) -> list[bytes]:
        shown = path[:120].encode("unicode_escape").decode()
        if ".." in path or "\0" in path or "//" in path or "\\" in path:
            return self._error(
                environ, start_response, 400, f"{shown}: path tries to leave the cache; refused"
            )
        if path.endswith(".narinfo"):
            return self._error(
                environ, start_response, 400, f"{shown}: a narinfo is /<32-char base32 store hash>.narinfo"
            )
        if path.startswith("/nar/"):
            return self._error(
                environ,
                start_response,
                400,
                f"{shown}: a NAR is /nar/<52-char base32 sha256>.nar[.xz|.zst|.bz2]",
            )
        return self._error(environ, start_response, 404, f"{shown} is not a path this cache serves")

    def _unauthorized(self, environ: dict[str, Any], start_response: StartResponse, what: str) -> list[bytes]:
        if what == "push" and self.tokens.push is None:
            reason = "this cache accepts no pushes: no push_token_file is configured"
        elif environ.get("HTTP_AUTHORIZATION"):
            reason = f"wrong {what} token: check the password in the netrc (or the Bearer token)"
        else:
            reason = f"{what} token required: send it as the HTTP Basic password (netrc) or a Bearer token"
        return self._error(environ, start_response, 401, reason, _AUTH_HEADERS)

    # -- reads -----------------------------------------------------------------------------------

    def narinfo_hit(self, path: str, authorization: str | None) -> bytes | None:
        """The signed narinfo for GET `path` when it is a narinfo that is here and may be read,
        else None (the WSGI path then answers, with the right error). The HTTP layer's fast path."""
        match = _NARINFO.match(path)
        if match is None or not self.tokens.may_read(authorization):
            return None
        try:
            body = self._signed_narinfo(match.group(1))
        except _DamagedEntry:
            return None
        if body is not None:
            self._hit.inc()
        return body

    def get_narinfo(
        self, environ: dict[str, Any], start_response: StartResponse, hash_part: str
    ) -> list[bytes]:
        if not self.tokens.may_read(environ.get("HTTP_AUTHORIZATION")):
            return self._unauthorized(environ, start_response, "read")
        try:
            body = self._signed_narinfo(hash_part)
        except _DamagedEntry as error:
            self._miss.inc()
            return self._error(environ, start_response, 404, str(error))
        if body is None and self.tiers is not None:
            self._miss.inc()  # a local miss, whatever the other tiers say
            info = self.tiers.pull.narinfo(hash_part)
            if info is not None:
                body = info.signed(self.keys, self.config.store_dir).encode()
                return self._respond(environ, start_response, "200 OK", body, "text/x-nix-narinfo")
            reason = f"{hash_part}.narinfo is in no tier of this cache"
            return self._error(environ, start_response, 404, reason)
        if body is None:
            self._miss.inc()
            return self._error(environ, start_response, 404, f"{hash_part}.narinfo is not in this cache")
        self._hit.inc()
        return self._respond(environ, start_response, "200 OK", body, "text/x-nix-narinfo")

    def _signed_narinfo(self, hash_part: str) -> bytes | None:
        path = self._narinfo_prefix + hash_part + ".narinfo"  # str, not Path: this runs per request
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._narinfo_cache.get(hash_part)
        if cached is not None and cached[0] == key:
            body = cached[1]
        else:
            try:
                with open(path, "rb") as handle:
                    text = handle.read().decode()
            except FileNotFoundError:
                return None
            try:
                info = narinfo.parse(text, self.config.store_dir)
            except NarInfoError as error:
                # Only this server writes narinfo/; a bad file is damage, reported as a miss.
                raise _DamagedEntry(
                    f"stored {hash_part}.narinfo is damaged ({error}); delete it and push the path again"
                ) from None
            body = self._cache_signed(hash_part, key, info)
        self.store.mark_served(hash_part, st.st_mtime_ns)
        return body

    def _cache_signed(self, hash_part: str, key: tuple[int, int, int], info: NarInfo) -> bytes:
        """Sign `info` and remember it for the stored file identified by `key` (inode, mtime, size)."""
        body = info.signed(self.keys, self.config.store_dir).encode()
        if len(self._narinfo_cache) >= _NARINFO_CACHE_ENTRIES:
            # Drop the older half (dicts keep insertion order): bounded memory, no per-hit cost.
            for old in list(self._narinfo_cache)[: _NARINFO_CACHE_ENTRIES // 2]:
                del self._narinfo_cache[old]
        self._narinfo_cache[hash_part] = (key, body)
        return body

    def get_nar(self, environ: dict[str, Any], start_response: StartResponse, name: str) -> Iterable[bytes]:
        if not self.tokens.may_read(environ.get("HTTP_AUTHORIZATION")):
            return self._unauthorized(environ, start_response, "read")
        prefix = self.config.accel_redirect_prefix
        here = prefix and self.store.nar_path(name).is_file()
        # A NAR that is not here is pulled through by this process (streamed), not by nginx.
        if prefix and environ["REQUEST_METHOD"] == "GET" and (here or self.tiers is None):
            if not here:
                return self._error(environ, start_response, 404, f"nar/{name} is not in this cache")
            start_response(
                "200 OK",
                [
                    ("Content-Type", "application/x-nix-nar"),
                    ("X-Accel-Redirect", f"{prefix.rstrip('/')}/{name}"),
                    ("Content-Length", "0"),
                ],
            )
            return []
        if environ["REQUEST_METHOD"] == "HEAD":
            # Pushers HEAD a NAR before uploading it: keep it safe from gc until its narinfo lands.
            self.store.touch_nar(name)
        nar = self.store.open_nar(name)
        if nar is None and self.tiers is not None and environ["REQUEST_METHOD"] == "GET":
            # Not on HEAD: pushers HEAD a NAR to learn whether to upload it here.
            stream = self.tiers.pull.nar(name)
            if stream is not None:
                headers = [("Content-Type", "application/x-nix-nar"), ("Content-Length", str(stream.count))]
                start_response("200 OK", headers)
                environ["nixcache.body_bytes"] = stream.count
                return stream
            nar = self.store.open_nar(name)  # fetched and published meanwhile, or absent
        if nar is None:
            return self._error(environ, start_response, 404, f"nar/{name} is not in this cache")
        size = nar.size
        headers = [("Content-Type", "application/x-nix-nar"), ("Accept-Ranges", "bytes")]
        status, offset, count = "200 OK", 0, size
        range_header = environ.get("HTTP_RANGE")
        if range_header:
            parsed = _parse_range(range_header, size)
            if parsed is None:
                nar.handle.close()
                return self._error(
                    environ,
                    start_response,
                    416,
                    f"Range {range_header[:60]!r} is not satisfiable for {size} bytes",
                    [("Content-Range", f"bytes */{size}")],
                )
            if parsed != (0, size):
                offset, count = parsed
                status = "206 Partial Content"
                headers.append(("Content-Range", f"bytes {offset}-{offset + count - 1}/{size}"))
        headers.append(("Content-Length", str(count)))
        start_response(status, headers)
        if environ["REQUEST_METHOD"] == "HEAD" or count == 0:
            nar.handle.close()
            return []
        environ["nixcache.body_bytes"] = count
        return FileBody(nar.handle, offset, count)

    def get_healthz(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        if self.store.writable():
            return self._respond(environ, start_response, "200 OK", b"ok\n")
        return self._error(environ, start_response, 503, f"store {self.store.root} is not writable")

    def get_metrics(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        return self._respond(environ, start_response, "200 OK", self.metrics.render(), METRICS_CONTENT_TYPE)

    def get_pubkey(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        return self._respond(environ, start_response, "200 OK", self.pubkeys)

    # -- uploads ---------------------------------------------------------------------------------

    def put(
        self, environ: dict[str, Any], start_response: StartResponse, kind: str, name: str
    ) -> list[bytes]:
        if not self.tokens.may_push(environ.get("HTTP_AUTHORIZATION")):
            self.metrics.uploads.labels(kind, "rejected").inc()
            return self._unauthorized(environ, start_response, "push")
        body = environ["wsgi.input"]
        length = _content_length(environ)
        if length == -1:
            self.metrics.uploads.labels(kind, "rejected").inc()
            return self._error(environ, start_response, 400, "Content-Length is not a number")
        limit = self.config.max_upload_size
        try:
            push = self.tiers.push if self.tiers is not None else None
            if kind == "nar":
                if self.store.keep_nar(name):
                    self.store.drain(body, length, limit)  # same name, same bytes: already here
                    if push is not None:
                        push.nar_present(name)
                else:
                    self.store.put_nar(
                        name, body, length, limit, before_publish=push.nar_verified if push else None
                    )
                    size = length or 0
                    self.metrics.upload_bytes.inc(size)
                    self.metrics.usage.add_nar(size)
            elif kind == "narinfo":
                existed = os.path.exists(self._narinfo_prefix + name + ".narinfo")
                info, published = self.store.put_narinfo(
                    name, body, length, min(limit, NARINFO_LIMIT), push.narinfo_valid if push else None
                )
                # Signed now, while it is at hand: clients usually fetch what CI just pushed, and
                # their first fetch then costs no parse and no signature.
                self._cache_signed(name, (published.st_ino, published.st_mtime_ns, published.st_size), info)
                if not existed:
                    self.metrics.usage.add_entry(length or 0)
            else:
                self.store.drain(body, length, limit)
                self.metrics.uploads.labels(kind, "accepted").inc()
                start_response("204 No Content", [])
                return []
        except UploadError as error:
            self.metrics.uploads.labels(kind, "rejected").inc()
            retry = [("Retry-After", str(error.retry_after))] if getattr(error, "retry_after", None) else []
            return self._error(environ, start_response, error.status, error.reason, retry)
        self.metrics.uploads.labels(kind, "accepted").inc()
        return self._respond(environ, start_response, "201 Created", b"stored\n")


class _DamagedEntry(Exception):
    """A stored narinfo failed to parse (disk damage or manual edits)."""


def _content_length(environ: dict[str, Any]) -> int | None:
    raw = environ.get("CONTENT_LENGTH")
    if not raw:
        return None
    return int(raw) if raw.isascii() and raw.isdigit() else -1


def _body_left(environ: dict[str, Any]) -> int:
    """Bytes of the request body not read yet (a large number when unknown)."""
    body = environ.get("wsgi.input")
    length = getattr(body, "content_length", None)
    if getattr(body, "chunked_input", False):
        return 1 << 62
    if length is None:
        length = _content_length(environ) or 0
    return max(0, length - getattr(body, "position", 0))


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(offset, count) of a single `bytes=` range, the whole file for forms we do not serve
    (several ranges), or None when unsatisfiable."""
    match = _RANGE.match(header.strip())
    if not match:
        return (0, size)  # RFC 9110: a server may ignore a Range it does not support
    first, last = match.groups()
    if not first and not last:
        return (0, size)
    if not first:  # suffix: the last N bytes
        count = min(int(last), size)
        return (size - count, count) if count > 0 else None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return None
    return (start, end - start + 1)


_STATUS = {
    400: "400 Bad Request",
    401: "401 Unauthorized",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    413: "413 Content Too Large",
    416: "416 Range Not Satisfiable",
    503: "503 Service Unavailable",
    507: "507 Insufficient Storage",
}

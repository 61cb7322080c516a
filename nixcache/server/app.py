"""The Nix binary cache protocol over a `Store`: one route table, one handler per route and method.

No gevent here: `nixcache.server.http` parses each request (llhttp), calls `App.handle` with a
`wire.Request` and sends the `wire.Response` it returns (sendfile for a `FileBody`, chunks and
sendfile for a `StreamBody`), then logs one line and counts it in the metrics from the
request's `wire.Record`.

With `[nix_store] serve_nix_store` the host's own Nix store (`nixcache.server.nixstore`) answers
narinfos, `.ls` listings and build logs before the push store, and NARs after it (see get_nar).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from nixcache.keys import SecretKey
from nixcache.server import narinfo, wire
from nixcache.server.auth import Tokens
from nixcache.server.config import ServerConfig
from nixcache.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from nixcache.server.metrics import Metrics
from nixcache.server.narinfo import NarInfo, NarInfoError
from nixcache.server.nixstore.db import NixDbError
from nixcache.server.nixstore.dump import PathChanged
from nixcache.server.nixstore.store import LocalNixStore
from nixcache.server.routes import Route, Router
from nixcache.server.store import Store, UploadError
from nixcache.server.wire import FileBody, Request, Response, StreamBody

if TYPE_CHECKING:
    from nixcache.server.tiers import Tiers

__all__ = ["App", "FileBody"]

log = logging.getLogger("nixcache.server")

_HASH = "[0-9a-df-np-sv-z]{32}"  # a store path's hash part
# A path segment under the extra prefixes: never "." or "..", never a NUL.
_SEGMENT = r"(?!\.\.?(?:/|\Z))[^/\x00]+"
NARINFO_PATH = rf"/({_HASH})\.narinfo"
NAR_PATH = rf"/nar/({narinfo.NAR_NAME})"
# Files newer clients upload that this cache accepts and discards.
EXTRA_PATH = rf"/{_HASH}\.ls|/(?:log|debuginfo|build-trace-v2|realisations)(?:/{_SEGMENT})+"
_NARINFO_CACHE_ENTRIES = 16384  # signed narinfos kept in memory, ~1 KiB each
NARINFO_LIMIT = 4 * 1024 * 1024  # the largest narinfo accepted (thousands of references fit)
_AUTH_HEADERS = (("WWW-Authenticate", 'Basic realm="nixcache"'),)


def _error(status: int, reason: str, headers: Sequence[tuple[str, str]] = ()) -> Response:
    """An error answer whose body is the reason, one line; the same reason goes to the log."""
    return Response(status, f"{reason}\n".encode(), headers=headers, reason=reason)


class App:
    """The cache's protocol: `handle(request)` answers one request."""

    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        keys: list[SecretKey],
        tokens: Tokens,
        metrics: Metrics,
        nix_store: LocalNixStore | None = None,
    ):
        self.config = config
        self.store = store
        self.nix_store = nix_store  # this host's own Nix store, asked before the push store
        # The fleet's other tiers (nixcache.server.tiers: origin, upstreams), asked on a local miss
        # and written through on a push; None: this cache is an island. Set by the runner.
        self.tiers: Tiers | None = None
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
        read = {"GET": None, "HEAD": None}
        self.router = Router(
            [
                Route("narinfo", NARINFO_PATH, {**_all(read, self.get_narinfo), "PUT": self.put_narinfo}),
                Route("nar", NAR_PATH, {**_all(read, self.get_nar), "PUT": self.put_nar}),
                Route(
                    "nix-cache-info",
                    "/nix-cache-info",
                    {**_all(read, self.get_cache_info), "PUT": self.put_extra},
                ),
                Route("healthz", "/healthz", _all(read, self.get_healthz)),
                Route("metrics", "/metrics", _all(read, self.get_metrics)),
                Route("pubkey", "/pubkey", _all(read, self.get_pubkey)),
                Route("extra", EXTRA_PATH, {**_all(read, self.get_extra), "PUT": self.put_extra}),
            ]
        )

    # -- dispatch --------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        """Answer one request; sets its record's route."""
        found = self.router.resolve(request.method, request.path)
        request.record.route = found.name
        if found.handler is not None:
            return found.handler(request, *found.groups)
        if found.allow:  # RFC 9110 15.5.6: 405 names the methods the path has
            return _error(
                405, f"{request.method} is not supported on {found.name} paths", [("Allow", found.allow)]
            )
        return self._bad_path(request.path)

    @staticmethod
    def _bad_path(path: str) -> Response:
        shown = path[:120].encode("unicode_escape").decode()
        if ".." in path or "\0" in path or "//" in path or "\\" in path:
            return _error(400, f"{shown}: path tries to leave the cache; refused")
        if path.rstrip().endswith(".narinfo"):
            return _error(400, f"{shown}: a narinfo is /<32-char base32 store hash>.narinfo")
        if path.startswith("/nar/"):
            return _error(400, f"{shown}: a NAR is /nar/<52-char base32 sha256>.nar[.xz|.zst|.bz2]")
        return _error(404, f"{shown} is not a path this cache serves")

    def _unauthorized(self, authorization: str | None, what: str) -> Response:
        if what == "push" and self.tokens.push is None:
            reason = "this cache accepts no pushes: no push_token_file is configured"
        elif authorization:
            reason = f"wrong {what} token: check the password in the netrc (or the Bearer token)"
        else:
            reason = f"{what} token required: send it as the HTTP Basic password (netrc) or a Bearer token"
        return _error(401, reason, _AUTH_HEADERS)

    # -- reads -----------------------------------------------------------------------------------

    def get_cache_info(self, request: Request) -> Response:
        if not self.tokens.may_read(request.headers.get("authorization")):
            return self._unauthorized(request.headers.get("authorization"), "read")
        return Response(200, self.cache_info, "text/x-nix-cache-info")

    def get_narinfo(self, request: Request, hash_part: str) -> Response:
        return self.narinfo(hash_part, request.headers.get("authorization"))

    def narinfo(self, hash_part: str, authorization: str | None) -> Response:
        """The answer to GET /<hash_part>.narinfo: also called by the HTTP layer's fast path, so
        hits and misses alike cost a stat and a dict lookup (Nix clients ask for many absent paths)."""
        if not self.tokens.may_read(authorization):
            return self._unauthorized(authorization, "read")
        # This host's own Nix store first (when served), then the push store.
        body = self._local(self.nix_store.narinfo, hash_part) if self.nix_store else None
        try:
            if body is None:
                body = self._signed_narinfo(hash_part)
        except _DamagedEntry as error:
            self._miss.inc()
            return _error(404, str(error))
        if body is None:
            self._miss.inc()  # a local miss, whatever the other tiers say
            if self.tiers is None:
                return _error(404, f"{hash_part}.narinfo is not in this cache")
            info = self.tiers.pull.narinfo(hash_part)
            if info is None:
                return _error(404, f"{hash_part}.narinfo is in no tier of this cache")
            body = info.signed(self.keys, self.config.store_dir).encode()
            return Response(200, body, "text/x-nix-narinfo")
        self._hit.inc()
        return Response(200, body, "text/x-nix-narinfo")

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

    def get_nar(self, request: Request, name: str) -> Response:
        """The push store first: a NAR's name is the sha256 of its bytes, so either store serves the
        same bytes for it, and the push store's answer costs a stat where the local Nix store's may
        cost a scan of Nix's database (nixcache.server.nixstore.store)."""
        if not self.tokens.may_read(request.headers.get("authorization")):
            return self._unauthorized(request.headers.get("authorization"), "read")
        prefix = self.config.accel_redirect_prefix
        # A NAR that is not here is pulled through by this process (streamed), not sent by nginx.
        if prefix and request.method == "GET" and self.store.nar_path(name).is_file():
            accel = [("X-Accel-Redirect", f"{prefix.rstrip('/')}/{name}")]
            return Response(200, b"", "application/x-nix-nar", accel)
        if request.method == "HEAD":
            # Pushers HEAD a NAR before uploading it: keep it safe from gc until its narinfo lands.
            self.store.touch_nar(name)
        nar = self.store.open_nar(name)
        if nar is not None:
            return _ranged(
                request, nar.size, lambda offset, count: FileBody(nar.handle, offset, count), nar.handle
            )
        local = self._local(self.nix_store.open_nar, name) if self.nix_store else None
        if local is None and self.tiers is not None and request.method == "GET":
            # Not on HEAD: pushers HEAD a NAR to learn whether to upload it here.
            pulled = self.tiers.pull.nar(name)
            if pulled is not None:
                return Response(200, pulled, "application/x-nix-nar")
            nar = self.store.open_nar(name)  # fetched and published meanwhile, or absent
            if nar is not None:
                return _ranged(
                    request, nar.size, lambda offset, count: FileBody(nar.handle, offset, count), nar.handle
                )
        if local is None:
            return _error(404, f"nar/{name} is not in this cache")
        # Generated while it is sent (nixcache.server.nixstore.dump); HEAD never starts it.
        return _ranged(
            request, local.size, lambda offset, count: StreamBody(local.body(offset, count), count)
        )

    def get_healthz(self, request: Request) -> Response:
        if self.store.writable():
            # Which process answered: with several workers, each has its own (nixcache.server.prefork).
            return Response(200, b"ok\n", headers=[("X-Nixcache-Pid", str(os.getpid()))])
        return _error(503, f"store {self.store.root} is not writable")

    def get_metrics(self, request: Request) -> Response:
        return Response(200, self.metrics.render(), METRICS_CONTENT_TYPE)

    def get_pubkey(self, request: Request) -> Response:
        return Response(200, self.pubkeys)

    def get_extra(self, request: Request) -> Response:
        """`<hash>.ls` and `log/<drv>` of the local Nix store; what pushers upload there is not kept."""
        path = request.path
        if self.nix_store is not None and (path.endswith(".ls") or path.startswith("/log/")):
            if not self.tokens.may_read(request.headers.get("authorization")):
                return self._unauthorized(request.headers.get("authorization"), "read")
            if path.endswith(".ls"):
                listing = self._local(self.nix_store.listing, path[1:-3])
                if listing is not None:
                    return Response(200, listing, "application/json")
            else:
                build_log = self._local(self.nix_store.log, path[len("/log/") :])
                if build_log is not None:
                    body = FileBody(build_log.handle, 0, build_log.size)
                    return Response(200, body, "text/plain; charset=utf-8")
        return _error(404, f"{path} is not kept by this cache")

    @staticmethod
    def _local(lookup: Callable[[str], Any], name: str) -> Any:
        """`lookup(name)` in the local Nix store; None (a miss, logged) when Nix's database cannot
        answer or the path is damaged: a read never becomes a 5xx."""
        try:
            return lookup(name)
        except (NixDbError, PathChanged) as error:
            log.warning("local Nix store: %s", error)
            return None

    # -- uploads ---------------------------------------------------------------------------------

    def _upload(self, request: Request, kind: str, receive: Callable[[int], Response]) -> Response:
        """Check the push token, then `receive(limit)`; counts the upload as accepted or rejected."""
        if not self.tokens.may_push(request.headers.get("authorization")):
            self.metrics.uploads.labels(kind, "rejected").inc()
            return self._unauthorized(request.headers.get("authorization"), "push")
        try:
            response = receive(self.config.max_upload_size)
        except UploadError as error:
            self.metrics.uploads.labels(kind, "rejected").inc()
            retry = getattr(error, "retry_after", None)  # the origin is down: Nix retries a 503
            return _error(error.status, error.reason, [("Retry-After", str(retry))] if retry else ())
        self.metrics.uploads.labels(kind, "accepted").inc()
        return response

    def put_nar(self, request: Request, name: str) -> Response:
        body = request.body

        def receive(limit: int) -> Response:
            push = self.tiers.push if self.tiers is not None else None
            if self.store.keep_nar(name):
                self.store.drain(body, body.length, limit)  # same name, same bytes: already here
                if push is not None:
                    push.nar_present(name)
            else:
                before_publish = push.nar_verified if push is not None else None
                self.store.put_nar(name, body, body.length, limit, before_publish=before_publish)
                size = request.record.received
                self.metrics.upload_bytes.inc(size)
                self.metrics.usage.add_nar(size)
            return Response(201, b"stored\n")

        return self._upload(request, "nar", receive)

    def put_narinfo(self, request: Request, hash_part: str) -> Response:
        body = request.body

        def receive(limit: int) -> Response:
            existed = os.path.exists(self._narinfo_prefix + hash_part + ".narinfo")
            push = self.tiers.push if self.tiers is not None else None
            valid = push.narinfo_valid if push is not None else None
            info, published = self.store.put_narinfo(
                hash_part, body, body.length, min(limit, NARINFO_LIMIT), valid
            )
            # Signed now, while it is at hand: clients usually fetch what CI just pushed, and
            # their first fetch then costs no parse and no signature.
            self._cache_signed(hash_part, (published.st_ino, published.st_mtime_ns, published.st_size), info)
            if not existed:
                self.metrics.usage.add_entry(request.record.received)
            return Response(201, b"stored\n")

        return self._upload(request, "narinfo", receive)

    def put_extra(self, request: Request, *_: str) -> Response:
        body = request.body

        def receive(limit: int) -> Response:
            self.store.drain(body, body.length, limit)
            return Response(204, b"", None)  # RFC 9110 15.3.5: no content, no Content-Length

        return self._upload(request, "extra", receive)


def _ranged(
    request: Request, size: int, body: Callable[[int, int], FileBody | StreamBody], handle: Any = None
) -> Response:
    """A NAR answer of `size` bytes: 200 whole, 206 for a satisfiable Range, 416 otherwise
    (`handle` is closed then); `body(offset, count)` makes the body."""
    try:
        part = wire.parse_range(request.headers.get("range"), size)
    except wire.Refusal as refusal:
        if handle is not None:
            handle.close()
        return _error(refusal.status, refusal.reason, refusal.headers)
    headers = [("Accept-Ranges", "bytes")]
    if part is None:
        return Response(200, body(0, size), "application/x-nix-nar", headers)
    offset, count = part
    headers.append(("Content-Range", f"bytes {offset}-{offset + count - 1}/{size}"))
    return Response(206, body(offset, count), "application/x-nix-nar", headers)


class _DamagedEntry(Exception):
    """A stored narinfo failed to parse (disk damage or manual edits)."""


def _all(methods: dict[str, None], handler: Callable[..., Response]) -> dict[str, Callable[..., Response]]:
    """`handler` for each of `methods` (GET and HEAD share their handlers: the server drops the body)."""
    return dict.fromkeys(methods, handler)

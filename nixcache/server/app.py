"""The Nix binary cache protocol over a `Store`: one route table, one handler per route and method.

No gevent here: `nixcache.server.http` parses each request (llhttp), calls `App.handle` with a
`wire.Request` and sends the `wire.Response` it returns (sendfile for a `FileBody`, chunks and
sendfile for a `StreamBody`), then logs one line and counts it in the metrics from the
request's `wire.Record`.

With `[nix_store] serve_nix_store` the host's own Nix store (`nixcache.server.nixstore`) answers
narinfos, `.ls` listings and build logs before the push store, and NARs after it (see get_nar).
The files besides narinfos and NARs (listings, logs, debuginfo, build traces) have their routes
in `nixcache.server.extras`; a PUT with a Content-Encoding is decoded first (`upload_encoding`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from posix import close as _close_file  # see below
from typing import TYPE_CHECKING, Any

from nixcache.keys import SecretKey
from nixcache.server import narinfo, upload_encoding, wire
from nixcache.server.auth import Tokens
from nixcache.server.config import ServerConfig
from nixcache.server.encoding import DownloadEncoding
from nixcache.server.extras.serve import ExtraFiles
from nixcache.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from nixcache.server.metrics import Metrics
from nixcache.server.narinfo import NarInfoError
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
NARINFO_PATH = rf"/({_HASH})\.narinfo"
NAR_PATH = rf"/nar/({narinfo.NAR_NAME})"
# NARs Nix writes for ?compression=lzip (no maintained decoder): absent on reads, refused on PUT
# with the reason in the body (Nix 2.8 prints no body for the HEAD it sends first).
LZIP_NAR_PATH = r"/nar/([0-9a-df-np-sv-z]{52}\.nar\.lzip)"
NARINFO_LIMIT = 4 * 1024 * 1024  # the largest narinfo accepted (thousands of references fit)
# A hit's first read(2) asks for this much: every usual narinfo (a few hundred bytes to a few
# KiB) in one read, without an fstat for its size first.
_READ_SIZE = 16 * 1024
HEALTH_RETRY = 30  # seconds: a store that is not writable is a disk or mount problem, not a blip
_AUTH_HEADERS = (("WWW-Authenticate", 'Basic realm="nixcache"'),)
# posix.close is close(2). The server runs monkey-patched, where os.close is gevent's: it first
# checks the descriptor with fcntl and fstat (for descriptors an event loop may watch, never a
# regular file, which it then closes as this does): two syscalls and a Python call per narinfo.


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
        # zstd Content-Encoding of uncompressed NARs for clients that accept it (its offload is
        # set by the runner).
        self.encoding = DownloadEncoding(config.download_compression, config.download_compression_level)
        self.keys = keys
        self.tokens = tokens
        self.metrics = metrics
        self.cache_info = (
            f"StoreDir: {config.store_dir}\nWantMassQuery: 1\nPriority: {config.priority}\n"
        ).encode()
        self.pubkeys = "".join(f"{key.public()}\n" for key in keys).encode()
        self._hit = metrics.narinfo.labels("hit")
        self._miss = metrics.narinfo.labels("miss")
        self._narinfo_prefix = f"{store.narinfo_dir}/"  # str, not Path: joined per request
        self._signed_prefix = f"{store.signed_dir}/"
        read = {"GET": None, "HEAD": None}
        self.router = Router(
            [
                Route("narinfo", NARINFO_PATH, {**_all(read, self.get_narinfo), "PUT": self.put_narinfo}),
                Route("nar", NAR_PATH, {**_all(read, self.encoding.wrap(self.get_nar)), "PUT": self.put_nar}),
                Route("nar", LZIP_NAR_PATH, {**_all(read, self.get_lzip_nar), "PUT": self.put_lzip_nar}),
                Route(
                    "nix-cache-info",
                    "/nix-cache-info",
                    {**_all(read, self.get_cache_info), "PUT": self.put_cache_info},
                ),
                Route("healthz", "/healthz", _all(read, self.get_healthz)),
                Route("metrics", "/metrics", _all(read, self.get_metrics)),
                Route("pubkey", "/pubkey", _all(read, self.get_pubkey)),
                *ExtraFiles(self).routes(),
            ]
        )

    # -- dispatch --------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        """Answer one request; sets its record's route."""
        found = self.router.resolve(request.method, request.path)
        request.record.route = found.name
        if found.handler is not None:
            if request.method == "PUT":
                request = upload_encoding.decoded(request, found.name)
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
            return _error(400, f"{shown}: a NAR is /nar/<52-char base32 sha256>{narinfo.NAR_FORM}")
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
        a hit costs an open, a read and a close of its signed file and a miss a failed open and
        an access(2) (Nix clients ask for many absent paths)."""
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
        """The stored narinfo as served: signed/<hash>.narinfo, read whole (no parse, no
        signature: this runs per request), or signed now when that file is not there yet (an
        older store, a key rotation in progress, a race with a push); None when not stored.

        A hit costs open, read and close (a second read only past _READ_SIZE); its mtime, which
        gc's last-served time keeps, is read when the served marks are flushed, once per entry
        and not per request. A miss raises nothing more than the failed open (see _sign_stored)."""
        try:
            fd = os.open(self._signed_prefix + hash_part + ".narinfo", os.O_RDONLY)
        except FileNotFoundError:
            return self._sign_stored(hash_part)
        try:
            body = os.read(fd, _READ_SIZE)
            if len(body) == _READ_SIZE:  # a narinfo of many references: read on to the end
                chunks = [body]
                while chunk := os.read(fd, NARINFO_LIMIT):
                    chunks.append(chunk)
                body = b"".join(chunks)
        finally:
            _close_file(fd)
        if not body:  # never written so (an empty file is what a crash before fsync leaves)
            return self._sign_stored(hash_part)
        self.store.mark_served(hash_part, None)
        return body

    def _sign_stored(self, hash_part: str) -> bytes | None:
        """Sign narinfo/<hash>.narinfo with the current keys and publish signed/ (in the thread
        pool: a write and an fsync) for the next request."""
        path = self._narinfo_prefix + hash_part + ".narinfo"
        if not os.access(path, os.F_OK):
            return None  # the usual miss: a second FileNotFoundError costs more than the check
        try:
            with open(path, "rb") as handle:
                st = os.fstat(handle.fileno())
                text = handle.read().decode()
        except FileNotFoundError:
            return None
        try:
            info = narinfo.parse(text, self.config.store_dir)
        except (NarInfoError, UnicodeDecodeError) as error:
            # Only this server writes narinfo/; a bad file is damage, reported as a miss.
            raise _DamagedEntry(
                f"stored {hash_part}.narinfo is damaged ({error}); delete it and push the path again"
            ) from None
        body = info.signed(self.keys, self.config.store_dir).encode()
        self.store.offload(self.store.publish_signed, (hash_part, body, st))
        self.store.mark_served(hash_part, st.st_mtime_ns)
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

    def get_lzip_nar(self, request: Request, name: str) -> Response:
        return _error(404, f"nar/{name} is not in this cache (lzip NARs are not taken)")

    def put_lzip_nar(self, request: Request, name: str) -> Response:
        def receive(limit: int) -> Response:
            use = f"push with ?compression= one of {narinfo.SUPPORTED}"
            raise UploadError(400, f"nar/{name}: lzip NARs are not taken; {use}")

        return self._upload(request, "nar", receive)

    def get_healthz(self, request: Request) -> Response:
        if self.store.writable():
            # Which process answered: with several workers, each has its own (nixcache.server.prefork).
            return Response(200, b"ok\n", headers=[("X-Nixcache-Pid", str(os.getpid()))])
        # Every 503 carries Retry-After: Nix ≥ 2.35 waits that long before it asks again.
        return _error(503, f"store {self.store.root} is not writable", [("Retry-After", str(HEALTH_RETRY))])

    def get_metrics(self, request: Request) -> Response:
        return Response(200, self.metrics.render(), METRICS_CONTENT_TYPE)

    def get_pubkey(self, request: Request) -> Response:
        return Response(200, self.pubkeys)

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
            headers = [*getattr(error, "headers", ()), *([("Retry-After", str(retry))] if retry else ())]
            return _error(error.status, error.reason, headers)
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
            return Response(201, b"stored\n")

        return self._upload(request, "nar", receive)

    def put_narinfo(self, request: Request, hash_part: str) -> Response:
        body = request.body

        def receive(limit: int) -> Response:
            push = self.tiers.push if self.tiers is not None else None
            valid = push.narinfo_valid if push is not None else None
            self.store.put_narinfo(hash_part, body, body.length, min(limit, NARINFO_LIMIT), valid)
            return Response(201, b"stored\n")

        return self._upload(request, "narinfo", receive)

    def put_cache_info(self, request: Request) -> Response:
        """Nix PUTs nix-cache-info when its GET found none; this cache's own is kept."""
        body = request.body

        def receive(limit: int) -> Response:
            self.store.drain(body, body.length, limit)
            return Response(204, b"", None)  # RFC 9110 15.3.5: no content, no Content-Length

        return self._upload(request, "nix-cache-info", receive)


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

"""GET, HEAD and PUT of the extra files (the kinds of nixcache.server.extras), for App's route table.

Reads: this host's own Nix store first for listings and logs (with `serve_nix_store`), then the
push store, then the origin (not stored locally: these files are small, and the path they
describe may not be here). Build traces are served with this cache's signatures added.
Pushes: push token, body decoded (upload_encoding) and within the kind's limit, verified, into
the origin (when there is one; 503 with Retry-After when it is down), then renamed into place:
201. Bad input is a 400 naming the file and the field; nothing of it is stored.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from nixcache.server.extras import ExtraError, Kind, kinds
from nixcache.server.routes import Route
from nixcache.server.store import UploadError
from nixcache.server.wire import FileBody, Request, Response

if TYPE_CHECKING:
    from nixcache.server.app import App

log = logging.getLogger("nixcache.server")


class ExtraFiles:
    def __init__(self, app: App):
        self.app = app

    def routes(self) -> list[Route]:
        return [self._route(kind) for kind in kinds()]

    def _route(self, kind: Kind) -> Route:
        def get_extra(request: Request, name: str) -> Response:
            return self.get(kind, request, name)

        def put_extra(request: Request, name: str) -> Response:
            return self.put(kind, request, name)

        return Route(kind.name, kind.pattern, {"GET": get_extra, "HEAD": get_extra, "PUT": put_extra})

    # -- reads -----------------------------------------------------------------------------------

    def get(self, kind: Kind, request: Request, name: str) -> Response:
        app = self.app
        authorization = request.headers.get("authorization")
        if not app.tokens.may_read(authorization):
            return app._unauthorized(authorization, "read")
        if app.nix_store is not None:
            local = self._from_nix_store(kind, name)
            if local is not None:
                return local
        url_path = kind.url_path(name)
        path = app.store.root / kind.directory / name
        if kind.sign is None:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                handle = open(path, "rb")  # noqa: SIM115 - the response closes it
                size = handle.seek(0, 2)
                return Response(200, FileBody(handle, 0, size), kind.content_type)
            data = None
        else:
            try:
                data = path.read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                data = None
        if data is None and app.tiers is not None:
            data = app.tiers.pull.extra_file(url_path)
        if data is None:
            return _not_found(f"{url_path} is not in this cache")
        if kind.sign is not None:
            try:
                data = kind.sign(name, data, app.keys)
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                # Only this server writes these files, verified: damage, reported as a miss.
                log.warning("%s: stored file is damaged (%s)", url_path, error)
                return _not_found(f"stored {url_path} is damaged; push it again")
        return Response(200, data, kind.content_type)

    def _from_nix_store(self, kind: Kind, name: str) -> Response | None:
        nix_store = self.app.nix_store
        assert nix_store is not None
        if kind.name == "listing":
            listing = self.app._local(nix_store.listing, name[: -len(".ls")])
            if listing is not None:
                return Response(200, listing, kind.content_type)
        elif kind.name == "log":
            build_log = self.app._local(nix_store.log, name)
            if build_log is not None:
                return Response(200, FileBody(build_log.handle, 0, build_log.size), kind.content_type)
        return None

    # -- pushes ----------------------------------------------------------------------------------

    def put(self, kind: Kind, request: Request, name: str) -> Response:
        app = self.app
        body = request.body
        url_path = kind.url_path(name)

        def receive(limit: int) -> Response:
            cap = min(limit, kind.limit)
            if body.length is not None and body.length > cap:
                raise UploadError(413, _too_large(url_path, kind, cap))
            try:
                data = app.store.receive_small(body, body.length, cap)
            except UploadError as error:
                if error.status == 413:
                    raise UploadError(413, _too_large(url_path, kind, cap)) from None
                raise
            try:
                kind.validate(name, data)
            except ExtraError as error:
                raise UploadError(400, str(error)) from None
            push = app.tiers.push if app.tiers is not None else None
            if push is not None:
                push.extra_file(url_path, data, kind.content_type)
            app.store.put_file(f"{kind.directory}/{name}", data)
            return Response(201, b"stored\n")

        return app._upload(request, kind.name, receive)


def _too_large(url_path: str, kind: Kind, cap: int) -> str:
    return f"{url_path}: larger than a {kind.name} may be here ({cap} bytes)"


def _not_found(reason: str) -> Response:
    return Response(404, f"{reason}\n".encode(), reason=reason)


__all__: list[str] = ["ExtraFiles"]

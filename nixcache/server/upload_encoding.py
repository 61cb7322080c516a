"""Uploads sent with `Content-Encoding`: decoded before anything verifies or stores them.

Since Nix 2.32 (release notes; `HttpBinaryCacheStore::upsertFile` in
src/libstore/http-binary-cache-store.cc) the store settings `narinfo-compression`,
`ls-compression` and `log-compression` make the client compress `<hash>.narinfo`, `<hash>.ls`
and `log/<drv>` and PUT them with `Content-Encoding: <Nix's name of the compression>`
(`showCompressionAlgo`: br, zstd, xz, bzip2, gzip, lzma, lz4, …). The store keeps every file
decoded: readers get the plain file whatever the pusher chose, verification (narinfo fields,
JSON) sees the real content, and the size limits count decoded bytes, so a small body that
decodes to gigabytes is a 413, not a full disk.

A coding nixcache cannot decode is a 415 whose `Accept-Encoding` names the ones it can
(RFC 9110 15.5.16), before any byte is stored. A NAR is never decoded: its name is the sha256
of the bytes as uploaded, and its compression is in its name (`nar/….nar.xz`).
"""

from __future__ import annotations

from typing import Any

from nixcache.server import codecs
from nixcache.server.store import UploadError
from nixcache.server.wire import Request

# Content-Encoding token -> codecs name. HTTP's own tokens (RFC 9110 8.4.1) and Nix's names.
_TOKENS = {name: name for name in codecs.DECODERS if name != "none"}
_TOKENS.update({"x-gzip": "gzip", "identity": "none", "none": "none"})
ACCEPTED = ", ".join(sorted(t for t in _TOKENS if t not in ("none", "x-gzip")))
_CHUNK = 256 * 1024


class EncodingRefused(UploadError):
    """415 with the codings this server decodes in `Accept-Encoding`."""

    def __init__(self, reason: str):
        super().__init__(415, reason)
        self.headers = (("Accept-Encoding", ACCEPTED),)


class _Decoded:
    """The body of an encoded upload as its decoded bytes: `read(size)`, `length` None (unknown
    until the end). What is wrong with the coding surfaces on the first read, after the push
    token was checked: an unauthorised client learns nothing about what the server decodes."""

    def __init__(self, body: Any, path: str, codings: list[str], refusal: str | None):
        self._body = body
        self._path = path
        self._codings = codings
        self._refusal = refusal
        self._stream: Any = None
        self.length: int | None = None

    def _open(self) -> Any:
        if self._refusal is not None:
            raise EncodingRefused(self._refusal)
        stream = self._body
        for name in reversed(self._codings):  # RFC 9110 8.4: listed in the order applied
            stream = codecs.decoder(stream, name)
        return stream

    def read(self, size: int = -1) -> bytes:
        if self._stream is None:
            self._stream = self._open()
        try:
            return self._stream.read(size if size > 0 else _CHUNK)
        except codecs.DATA_ERRORS as error:
            if not codecs.is_data_error(error):
                raise  # the client went away: the store answers "upload interrupted"
            encoding = ", ".join(self._codings)
            raise UploadError(
                400, f"{self._path}: the body is not valid {encoding} data (Content-Encoding): {error}"
            ) from None


def decoded(request: Request, route: str) -> Request:
    """`request` with its body decoded when it has a Content-Encoding (the request unchanged
    otherwise); refusals are raised by the body's first read."""
    header = request.headers.get("content-encoding")
    if not header or request.method != "PUT":
        return request
    path = request.path[1:]
    tokens = [token.strip().lower() for token in header.split(",") if token.strip()]
    codings = [_TOKENS.get(token, "") for token in tokens]
    refusal = None
    if route == "nar" and any(c != "none" for c in codings):
        refusal = (
            f"{path}: a NAR is uploaded as the bytes its name hashes, its compression in its name; "
            "send it without Content-Encoding"
        )
    elif "" in codings:
        unknown = tokens[codings.index("")]
        refusal = f"{path}: Content-Encoding {unknown[:40]!r} is not decoded here; use one of {ACCEPTED}"
    codings = [c for c in codings if c != "none"]
    if not codings and refusal is None:
        return request
    body = _Decoded(request.body, path, codings, refusal)
    return Request(request.method, request.path, request.query, request.headers, body, request.record)

"""On-the-fly zstd Content-Encoding of uncompressed NAR downloads (`download_compression`).

Current Nix clients (2.2x–2.3x, src/libstore/filetransfer.cc) let libcurl send `Accept-Encoding`
for every coding it decodes (br, zstd, gzip, deflate) on a fresh download, and resume a broken
one with `Range` only when the answer had `Accept-Ranges: bytes` and no `Content-Encoding`; a
resumed request carries no Accept-Encoding. harmonia (3.2.0 and later) encodes uncompressed
NARs with zstd by default. What this module does, and the reasons
(docs/decisions/0009-download-compression.md):

- only a GET for `nar/<hash>.nar` (an uncompressed NAR) answered 200 in whole, whose client
  accepts zstd (RFC 9110 12.5.3): never a Range (206, byte-exact), never HEAD (a pusher's
  presence check keeps its Content-Length), never `.nar.xz` and the other compressed NARs;
- the encoded answer has `Content-Encoding: zstd`, no Content-Length (its length is unknown
  until the last byte: `wire.ChunkedBody`, sent chunked) and no `Accept-Ranges`, so a client
  never tries to resume it; every answer for an encodable NAR carries `Vary: Accept-Encoding`;
- a client that did not ask gets exactly the bytes, Content-Length and Accept-Ranges of before;
- the frame pledges the NAR's size and carries zstd's checksum; memory is one compression
  context (1.3 MiB at level 1, 3.5 MiB at level 3) and one CHUNK of input per response; each
  chunk is read and compressed by `offload`: in the server a thread pool of its own, one thread
  per core (zstandard releases the GIL), whose threads lower their own priority (nice +10, Linux
  sets it per thread) so that on a busy host the event loop thread, which answers every
  narinfo, wins the CPU over compression (measured in docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import zstandard

from nixcache.server.wire import ChunkedBody, FileBody, Request, Response, StreamBody

CODING = "zstd"
CHUNK = 1 << 20  # input bytes per compression step: the thread hop (~50 us) stays ~1 % of it
NICER = 10  # how much lower the compressing threads' priority is than the event loop's
INLINE = 64 * 1024  # pieces below this (a generated NAR's framing strings) are compressed in place
MIN_SIZE = 1024  # smaller NARs go as they are: the frame and chunk framing would eat the gain
VARY = ("Vary", "Accept-Encoding")

Offload = Callable[[Callable[..., Any], tuple[Any, ...]], Any]


def _inline(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return fn(*args)


def accepts(field: str | None, coding: str = CODING) -> bool:
    """Whether an `Accept-Encoding` field value allows `coding` (RFC 9110 12.5.3): named with a
    weight above 0, or `*` above 0 without naming it. No field: the client asked for nothing."""
    if not field:
        return False
    wildcard = None
    for member in field.split(","):
        name, _, params = member.partition(";")
        name = name.strip().lower()
        weight = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value.strip())
                except ValueError:
                    weight = 0.0  # a weight we cannot read is no consent
        if name == coding:
            return weight > 0
        if name == "*":
            wildcard = weight > 0
    return bool(wildcard)


class DownloadEncoding:
    """The configured choice (`download_compression`, `download_compression_level`) applied to
    NAR answers; `offload` is set by the runner to the encoding's own thread pool."""

    def __init__(self, compression: str, level: int, offload: Offload = _inline):
        self.enabled = compression == CODING
        self.level = level
        self.offload = offload

    def wrap(self, handler: Callable[..., Response]) -> Callable[..., Response]:
        """`handler(request, name)` of the NAR route, its answer encoded where `apply` says so."""
        if not self.enabled:
            return handler

        @functools.wraps(handler)  # the route table and its tests still see get_nar
        def encoded(request: Request, name: str) -> Response:
            return self.apply(request, name, handler(request, name))

        return encoded

    def apply(self, request: Request, name: str, response: Response) -> Response:
        """`response` to a request for `nar/<name>`, encoded when the rules above allow it."""
        if not name.endswith(".nar"):
            return response  # already compressed (.xz, .zst, .bz2 …): as stored
        body = response.body
        if response.status not in (200, 206) or not isinstance(body, (FileBody, StreamBody)):
            return response  # a miss, a refusal, or nginx sends the file (X-Accel-Redirect)
        headers = [*response.headers, VARY]
        if (
            response.status != 200
            or request.method != "GET"
            or "range" in request.headers
            or body.count < MIN_SIZE
            or not accepts(request.headers.get("accept-encoding"))
        ):
            response.headers = headers
            return response
        kept = [(k, v) for k, v in headers if k.lower() != "accept-ranges"]
        kept.append(("Content-Encoding", CODING))
        chunks = _compressed(body, self.level, self.offload)
        return Response(200, ChunkedBody(chunks, body.close), response.content_type, kept, response.reason)


def _compressed(body: FileBody | StreamBody, level: int, offload: Offload) -> Iterator[bytes]:
    """The zstd frame of `body`'s bytes, in pieces; raises OSError (the connection then closes
    before the last chunk, so the client sees an incomplete answer) when the source fails."""
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj(size=body.count)
    items = [body] if isinstance(body, FileBody) else body.items
    seen = 0
    try:
        for item in items:
            if isinstance(item, bytes):
                seen += len(item)
                small = len(item) < INLINE
                out = compressor.compress(item) if small else offload(compressor.compress, (item,))
                if out:
                    yield out
                continue
            fd, offset, end = item.handle.fileno(), item.offset, item.offset + item.count
            while offset < end:
                count = min(CHUNK, end - offset)
                out = offload(_read_and_compress, (compressor, fd, offset, count))
                offset += count
                seen += count
                if out:
                    yield out
        if seen != body.count:
            raise OSError(f"the NAR source gave {seen} of {body.count} bytes")
        yield compressor.flush()
    except zstandard.ZstdError as error:
        raise OSError(f"zstd encoding failed: {error}") from None


_niced: set[int] = set()  # native ids of the threads already niced


def _lower_priority() -> None:
    """Nice the calling thread NICER steps below the process, once (Linux: nice is per thread);
    never the main thread (its id is the pid), which runs the event loop (or a test)."""
    tid = threading.get_native_id()  # the kernel's thread id, whatever gevent patched
    if tid != os.getpid() and tid not in _niced:
        _niced.add(tid)
        with contextlib.suppress(OSError):  # elsewhere: compression merely competes as an equal
            os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICER))


def _read_and_compress(compressor: Any, fd: int, offset: int, count: int) -> bytes:
    """Read `count` bytes of `fd` at `offset` (exactly: a file that shrank is an OSError) and
    feed them to `compressor`; runs in a worker thread, file read included."""
    _lower_priority()
    data = os.pread(fd, count, offset)
    while len(data) < count:
        more = os.pread(fd, count - len(data), offset + len(data))
        if not more:
            raise OSError(f"a NAR file ended {count - len(data)} bytes early while being encoded")
        data += more
    return compressor.compress(data)

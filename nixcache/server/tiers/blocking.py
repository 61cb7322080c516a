"""A GET whose socket blocks an OS thread of its own, not the event loop: a NAR's bulk transfer.

A pulled-through NAR is the one long transfer in the server where the event loop is the wrong
place for the reads: on the loop, every chunk of the origin's body is a gevent wait, a hub
switch and a hand-over to the greenlets that send it on, and receiving, hashing and writing
take turns with sending to the clients on one thread. Here the origin's body is read into one
reused buffer on an OS-level blocking socket in a thread of `Fetches` (http.client on the
unpatched socket module; for https see _TLSConnection), hashed (hashlib releases the GIL)
and written to the temp file in that thread, while the event loop sends what is written.

Used for the origin's NAR GETs (a presigned URL: minio signs it, no I/O); everything else,
small and latency-bound, stays on minio and the event loop. No keep-alive pool: one connection
per NAR, whose transfer dwarfs the connect (a TLS handshake for an https origin).
"""

from __future__ import annotations

import http.client
import re
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import gevent.threadpool
from gevent import monkey

from nixcache.server.workers import offload_to

_create_connection = monkey.get_original("socket", "create_connection")
# Reads of 1 MiB: a quarter of the syscalls and wake-ups of the store's 256 KiB, and on a thread
# of its own a larger read costs nothing on the event loop (on it, 1 MiB reads cost more CPU).
CHUNK = 1024 * 1024
_ERROR_LIMIT = 64 * 1024  # an S3 error document is a few hundred bytes
_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")


class _Connection(http.client.HTTPConnection):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = _create_connection  # a real, blocking socket


class _TLSConnection(http.client.HTTPSConnection):
    """https: gevent's socket and ssl (the unpatched ssl module cannot wrap a socket beside
    gevent's patching), made in the fetch thread, so they wait on that thread's own hub: the
    reads still block that thread, not the event loop, at the price of a wait per empty read."""


class Answer:
    """A GET's response: `status`, `code` (the S3 error code of a non-200 answer, or ''), and for a
    200 the body: `size` (None when not announced), `readinto`, `close`, `run`, `chunk`."""

    chunk = CHUNK

    def __init__(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse, run: Any):
        self._connection = connection
        self._response = response
        self.status = response.status
        self.code = ""
        self.size = response.length if self.status == 200 else None
        self.run = run  # run(fn, args): where this body's reads may block (a Fetches thread)
        if self.status != 200:
            found = _CODE.search(response.read(_ERROR_LIMIT))
            self.code = found.group(1).decode("ascii", "replace") if found else ""
            self.close()

    def readinto(self, buffer: memoryview) -> int:
        """Only in `run`: blocks the thread. Stops at Content-Length; a short body raises."""
        try:
            return self._response.readinto(buffer)
        except (OSError, http.client.HTTPException) as error:
            raise OSError(f"reading the NAR failed: {error}") from None

    def close(self) -> None:
        self._response.close()
        self._connection.close()


class Fetches:
    """OS threads for blocking GETs (at most `threads` at once; more wait for one to be free)."""

    def __init__(self, threads: int, connect_timeout: float, read_timeout: float):
        self._pool = gevent.threadpool.ThreadPool(threads)
        self.run: Callable[[Callable[..., Any], tuple[Any, ...]], Any] = offload_to(self._pool)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._context: Any = None

    def get(self, url: str) -> Answer:
        """GET `url` up to its response head (cooperatively: the connect and the wait run in a
        thread). OSError when it cannot be reached. When the caller is interrupted (a deadline),
        the answer that comes later is closed."""
        pending = self._pool.spawn(self._get, url)
        try:
            outcome = pending.get()
        except BaseException:
            pending.rawlink(_close_late)
            raise
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _get(self, url: str) -> Answer | BaseException:
        parts = urlsplit(url)
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            if self._context is None:
                self._context = ssl.create_default_context()  # the certificate and the host name
            connection = _TLSConnection(
                parts.hostname, parts.port, timeout=self._connect_timeout, context=self._context
            )
        else:
            connection = _Connection(parts.hostname, parts.port, timeout=self._connect_timeout)
        try:
            connection.request("GET", f"{parts.path}?{parts.query}" if parts.query else parts.path)
            connection.sock.settimeout(self._read_timeout)
            response = connection.getresponse()
            return Answer(connection, response, self.run)
        except OSError as error:
            connection.close()
            return OSError(f"{type(error).__name__}: {error}")
        except http.client.HTTPException as error:  # its text may quote the (presigned) URL
            connection.close()
            return OSError(f"{type(error).__name__}")


def _close_late(pending: Any) -> None:
    if pending.successful() and isinstance(pending.value, Answer):
        pending.value.close()

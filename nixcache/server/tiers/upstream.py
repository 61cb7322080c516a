"""An upstream: another HTTP binary cache, trusted only through the public keys configured for it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx

from nixcache.keys import PublicKey
from nixcache.server import narinfo
from nixcache.server.config import UpstreamConfig
from nixcache.server.narinfo import NarInfo, NarInfoError
from nixcache.server.tiers.errors import TierRefused, TierUnavailable

NARINFO_LIMIT = 4 * 1024 * 1024
_ABSENT = (404, 403, 410)  # what Nix itself takes for "not there"


class _StreamSource:
    """The raw bytes of a streamed response as `read(n)` (no Content-Encoding decoding: a NAR
    is checked byte for byte against its FileHash)."""

    def __init__(self, response: httpx.Response, size: int | None):
        self._response = response
        self._chunks: Iterator[bytes] = response.iter_raw(256 * 1024)
        self._buffer = b""
        self.size = size

    def read(self, amount: int) -> bytes:
        while len(self._buffer) < amount:
            try:
                chunk = next(self._chunks, b"")
            except httpx.HTTPError as error:
                raise OSError(f"reading from the upstream failed: {error}") from None
            if not chunk:
                break
            self._buffer += chunk
        data, self._buffer = self._buffer[:amount], self._buffer[amount:]
        return data

    def close(self) -> None:
        self._response.close()


class Upstream:
    """One configured upstream; methods raise TierUnavailable or TierRefused."""

    serves_bare_nars = False  # a NAR is fetched only for a narinfo whose signature verified

    def __init__(self, config: UpstreamConfig, store_dir: str = "/nix/store"):
        self.config = config
        self.name = f"upstream:{config.name}"
        self.store_dir = store_dir
        self.keys = [PublicKey.parse(text) for text in config.public_keys]
        self.narinfo_deadline = config.narinfo_deadline
        self.nar_deadline = config.nar_deadline
        self._client = httpx.Client(
            base_url=config.url,
            timeout=httpx.Timeout(config.nar_deadline, connect=min(config.nar_deadline, 5.0)),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            follow_redirects=True,
            headers={"User-Agent": "nixcache pull-through"},
        )

    def get_narinfo(self, hash_part: str) -> NarInfo | None:
        where = f"{self.name} {hash_part}.narinfo"
        try:
            response = self._client.get(f"/{hash_part}.narinfo")
        except httpx.HTTPError as error:
            raise TierUnavailable(f"{where}: {type(error).__name__}") from None
        if response.status_code in _ABSENT:
            return None
        if response.status_code != 200:
            raise TierUnavailable(f"{where}: HTTP {response.status_code}")
        if len(response.content) > NARINFO_LIMIT:
            raise TierRefused(f"{where}: larger than {NARINFO_LIMIT} bytes", "malformed")
        try:
            info = narinfo.parse(response.content.decode("utf-8"), self.store_dir)
        except (UnicodeDecodeError, NarInfoError) as error:
            raise TierRefused(f"{where}: malformed: {error}", "malformed") from None
        if info.hash_part != hash_part:
            raise TierRefused(f"{where}: names {info.store_path}", "malformed")
        message = info.fingerprint(self.store_dir)
        if not any(key.verify(sig, message) for sig in info.sigs for key in self.keys):
            names = ", ".join(sig.split(":", 1)[0] for sig in info.sigs) or "none"
            raise TierRefused(
                f"{where}: no valid signature from a key it is trusted for (signed by: {names})",
                "untrusted",
            )
        return info

    def open_nar(self, name: str) -> _StreamSource | None:
        where = f"{self.name} nar/{name}"
        request = self._client.build_request("GET", f"/nar/{name}", headers={"Accept-Encoding": "identity"})
        try:
            response = self._client.send(request, stream=True)
        except httpx.HTTPError as error:
            raise TierUnavailable(f"{where}: {type(error).__name__}") from None
        if response.status_code != 200:
            response.close()
            if response.status_code in _ABSENT:
                return None
            raise TierUnavailable(f"{where}: HTTP {response.status_code}")
        length = response.headers.get("Content-Length")
        return _StreamSource(response, int(length) if length and length.isdigit() else None)

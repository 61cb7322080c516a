"""An upstream: another HTTP binary cache, trusted only through the public keys configured for it."""

from __future__ import annotations

import urllib3

from nixcache.keys import PublicKey
from nixcache.server import narinfo
from nixcache.server.config import UpstreamConfig
from nixcache.server.narinfo import NarInfo, NarInfoError
from nixcache.server.tiers.errors import TierRefused, TierUnavailable
from nixcache.server.tiers.origin import Source

NARINFO_LIMIT = 4 * 1024 * 1024
_ABSENT = (404, 403, 410)  # what Nix itself takes for "not there"
# Redirects followed; nothing retried: the deadline decides how long a client waits.
_RETRIES = urllib3.Retry(total=None, connect=0, read=0, redirect=5, status=0, other=0)


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
        # urllib3, as the origin's minio client: one HTTP client library in the server process.
        self._pool = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(config.nar_deadline, 5.0), read=config.nar_deadline),
            retries=_RETRIES,
            maxsize=32,
            block=False,
        )

    def _get(self, path: str, where: str, **headers: str) -> urllib3.BaseHTTPResponse:
        try:
            return self._pool.request(
                "GET",
                self.config.url + path,
                headers={"User-Agent": "nixcache pull-through", **headers},
                preload_content=False,
                decode_content=False,
            )
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise TierUnavailable(f"{where}: {type(error).__name__}") from None

    def get_narinfo(self, hash_part: str) -> NarInfo | None:
        where = f"{self.name} {hash_part}.narinfo"
        response = self._get(f"/{hash_part}.narinfo", where)
        try:
            if response.status in _ABSENT:
                return None
            if response.status != 200:
                raise TierUnavailable(f"{where}: HTTP {response.status}")
            data = response.read(NARINFO_LIMIT + 1, decode_content=True)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise TierUnavailable(f"{where}: {type(error).__name__}") from None
        finally:
            response.release_conn()
        if len(data) > NARINFO_LIMIT:
            raise TierRefused(f"{where}: larger than {NARINFO_LIMIT} bytes", "malformed")
        try:
            info = narinfo.parse(data.decode("utf-8"), self.store_dir)
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

    def open_nar(self, name: str) -> Source | None:
        where = f"{self.name} nar/{name}"
        # Raw bytes, no Content-Encoding decoding: the NAR is checked byte for byte (FileHash).
        response = self._get(f"/nar/{name}", where, **{"Accept-Encoding": "identity"})
        if response.status != 200:
            response.release_conn()
            if response.status in _ABSENT:
                return None
            raise TierUnavailable(f"{where}: HTTP {response.status}")
        length = response.headers.get("Content-Length")
        return Source(response, int(length) if length and length.isdigit() else None)

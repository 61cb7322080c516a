"""A push: the NAR and the narinfo go to the origin before they are visible here.

- NAR PUT: verified in tmp/, uploaded to the origin, then renamed into the local store
  (`Store.put_nar(before_publish=…)`). A NAR that was here already is uploaded from the store
  when the origin lacks it.
- narinfo PUT: validated against the local NAR, then the origin gets its NAR (again, if the
  origin's copy is missing or old enough that its gc may be about to take it), then the narinfo;
  only then is the narinfo published locally and the push answered 201. After the narinfo is in
  the origin its NAR is checked once more and uploaded again if an origin gc removed it meanwhile.
- an extra file PUT (listing, log, debuginfo, build trace: nixcache.server.extras): verified,
  stored in the origin at its URL path, then published locally.
- The origin unreachable or refusing: OriginUnavailable, answered 503 with Retry-After; the
  local store publishes nothing (a NAR that was already here stays, as it was).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from nixcache.server.metrics import Metrics
from nixcache.server.narinfo import NarInfo
from nixcache.server.store import Store, UploadError
from nixcache.server.tiers.deadline import within
from nixcache.server.tiers.errors import TierError
from nixcache.server.tiers.origin import Origin

log = logging.getLogger("nixcache.server.tiers")
RETRY_AFTER = 10  # seconds; Nix honours Retry-After on a 503
T = TypeVar("T")


class OriginUnavailable(UploadError):
    """The push cannot be written through: 503, Retry-After."""

    retry_after = RETRY_AFTER

    def __init__(self, reason: str):
        super().__init__(503, reason)


class WriteThrough:
    def __init__(self, origin: Origin, store: Store, metrics: Metrics, cache_info: bytes):
        self.origin = origin
        self.store = store
        self.metrics = metrics
        self.cache_info = cache_info
        self._cache_info_written = False
        self._deadline = origin.config.write_timeout

    def _fail(self, kind: str, error: TierError) -> OriginUnavailable:
        self.metrics.tier_writes.labels(self.origin.name, kind, "failed").inc()
        self.metrics.tier_errors.labels(self.origin.name, error.reason).inc()
        log.warning("write-through failed: %s", error)
        return OriginUnavailable(f"{error}; nothing was stored, push again when the origin answers")

    def _upload_nar(self, name: str, path: Path) -> None:
        start = time.perf_counter()
        size = self.origin.put_file(f"nar/{name}", path, "application/x-nix-nar")
        self.metrics.tier_duration.labels(self.origin.name, "nar_write").observe(time.perf_counter() - start)
        self.metrics.tier_bytes.labels(self.origin.name, "write").inc(size)
        self.metrics.tier_writes.labels(self.origin.name, "nar", "stored").inc()

    def _small(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """A request with a small body (stat, narinfo, nix-cache-info): within write_timeout.
        NAR uploads have no overall deadline (a big NAR takes its time); the socket timeout of
        the origin's write client (also write_timeout) ends one that stalls."""
        with within(self._deadline, f"{self.origin.where} {what}"):
            return fn(*args)

    def nar_verified(self, name: str, tmp: Path) -> None:
        """A pushed NAR verified in tmp/: into the origin before it is renamed into place."""
        try:
            self._upload_nar(name, tmp)
        except TierError as error:
            raise self._fail("nar", error) from None

    def nar_present(self, name: str) -> None:
        """A pushed NAR that was here already: make sure the origin has it too."""
        try:
            if self._small(f"HEAD nar/{name}", self.origin.stat, f"nar/{name}") is None:
                self._upload_nar(name, self.store.nar_path(name))
        except TierError as error:
            raise self._fail("nar", error) from None

    def extra_file(self, key: str, data: bytes, content_type: str) -> None:
        """A pushed extra file that verified: into the origin before it is published here."""
        try:
            self._small(f"PUT {key}", self.origin.put_bytes, key, data, content_type)
        except TierError as error:
            raise self._fail("extra", error) from None
        self.metrics.tier_writes.labels(self.origin.name, "extra", "stored").inc()

    def narinfo_valid(self, info: NarInfo) -> None:
        """A pushed narinfo passed validation: store its NAR's and its own copy in the origin."""
        key = f"{info.hash_part}.narinfo"
        nar_key = f"nar/{info.nar_file}"
        local_nar = self.store.nar_path(info.nar_file)
        try:
            if not self._cache_info_written:
                if self._small("HEAD nix-cache-info", self.origin.stat, "nix-cache-info") is None:
                    self._small(
                        "PUT nix-cache-info",
                        self.origin.put_bytes,
                        "nix-cache-info",
                        self.cache_info,
                        "text/x-nix-cache-info",
                    )
                self._cache_info_written = True
            nar = self._small(f"HEAD {nar_key}", self.origin.stat, nar_key)
            # A NAR old enough that the origin's gc may hold it unreferenced is uploaded again:
            # the fresh copy is inside gc's grace period while this narinfo lands.
            if nar is None or _age(nar.modified) > self.origin.config.gc_grace / 2:
                self._upload_nar(info.nar_file, local_nar)
            start = time.perf_counter()
            self._small(
                f"PUT {key}", self.origin.put_bytes, key, info.render().encode(), "text/x-nix-narinfo"
            )
            self.metrics.tier_duration.labels(self.origin.name, "narinfo_write").observe(
                time.perf_counter() - start
            )
            if self._small(f"HEAD {nar_key}", self.origin.stat, nar_key) is None:
                self._upload_nar(info.nar_file, local_nar)  # an origin gc raced us after all
        except TierError as error:
            raise self._fail("narinfo", error) from None
        except FileNotFoundError:
            # The local NAR went between the validation and now (a local gc): push again.
            reason = f"{key}: URL {info.url} was collected meanwhile; PUT the NAR again"
            raise UploadError(400, reason) from None
        self.metrics.tier_writes.labels(self.origin.name, "narinfo", "stored").inc()


def _age(modified: datetime) -> float:
    if modified.tzinfo is None:
        modified = modified.replace(tzinfo=UTC)
    return (datetime.now(UTC) - modified).total_seconds()

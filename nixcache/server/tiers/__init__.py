"""The tiers behind a cache host: local store → origin (one S3 bucket per environment) → upstreams.

    client ──► local store (hot, LRU gc)          push: NAR + narinfo written through to the
                  │ miss                                origin; 201 only once the origin has it
                  ▼
               origin (S3, Nix binary cache layout; `nixcache gc --origin` keeps it in bounds)
                  │ miss
                  ▼
               upstreams (HTTP binary caches; a narinfo needs a valid Sig from a trusted key)

Modules, one job each:
    errors.py        the exceptions below
    deadline.py      a deadline on a tier call (gevent.Timeout), counted as a timeout
    origin.py        the S3 bucket (minio client): get, put, stat, list, delete
    upstream.py      an HTTP binary cache and the keys it is trusted for
    negative.py      paths recently absent from every tier (TTL)
    pullthrough.py   a local miss: ask the tiers in order within deadlines; fetch a NAR once,
                     stream it to every waiting client while it is verified and stored
    flightlock.py    one fetch per host: the other workers stream the fetching one's temp file
    writethrough.py  a push: NAR and narinfo to the origin before the narinfo is published here
    origin_gc.py     retention by age and size on the bucket, with the local gc's guarantees

Errors (the tree of `TierError`; none of them reaches a reader as a 5xx):

    TierError                a tier could not answer; `reason` is a metrics label
    ├── TierUnavailable      unreachable, timed out, or answered with a server error
    └── TierRefused          answered, but with something this cache will not take
                             (malformed narinfo, untrusted or missing signature)

    FetchAborted (an OSError) a NAR failed while a client was receiving it: its connection is
                             cut short, never completed with wrong bytes

This package imports gevent (deadlines, single-flight): only the server process, after
monkey-patching, builds it (`build`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nixcache.server.tiers.errors import TierError, TierRefused, TierUnavailable

if TYPE_CHECKING:
    from nixcache.server.config import ServerConfig
    from nixcache.server.metrics import Metrics
    from nixcache.server.store import Store
    from nixcache.server.tiers.pullthrough import PullThrough
    from nixcache.server.tiers.writethrough import WriteThrough

__all__ = ["TierError", "TierRefused", "TierUnavailable", "Tiers", "build"]


@dataclass
class Tiers:
    """What the app calls: `pull` on a local miss, `push` (None without an origin) on uploads."""

    pull: PullThrough
    push: WriteThrough | None


def build(config: ServerConfig, store: Store, metrics: Metrics, cache_info: bytes) -> Tiers | None:
    """The tiers of `config`, or None when it names neither an origin nor an upstream."""
    if config.origin is None and not config.upstreams:
        return None
    from nixcache.server.tiers.negative import NegativeCache
    from nixcache.server.tiers.origin import Origin
    from nixcache.server.tiers.pullthrough import PullThrough
    from nixcache.server.tiers.upstream import Upstream
    from nixcache.server.tiers.writethrough import WriteThrough

    origin = Origin(config.origin) if config.origin else None
    upstreams = [Upstream(u, config.store_dir) for u in config.upstreams]
    pull = PullThrough(
        store,
        [*([origin] if origin else []), *upstreams],
        metrics,
        NegativeCache(config.negative_ttl),
        config.max_upload_size,
    )
    push = WriteThrough(origin, store, metrics, cache_info) if origin else None
    return Tiers(pull, push)

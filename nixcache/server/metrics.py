"""Prometheus metrics of the server, all named nixcache_*.

Store size, GC and verify totals come from disk (a periodic scan, and gc-stats.json and
verify-stats.json written by `nixcache gc` and `nixcache verify`, which run in other processes),
so they are read at scrape time.
"""

from __future__ import annotations

import bisect
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from nixcache.server import verify
from nixcache.server.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class StoreUsage:
    entries: int = 0
    narinfo_bytes: int = 0
    nar_files: int = 0
    nar_bytes: int = 0
    scanned_at: float = 0.0

    # Uploads update the totals at once; the periodic scan corrects them (gc runs elsewhere).
    def add_nar(self, size: int) -> None:
        self.nar_files += 1
        self.nar_bytes += size

    def add_entry(self, size: int) -> None:
        self.entries += 1
        self.narinfo_bytes += size


def scan(store: Store) -> StoreUsage:
    """Count narinfos and NAR files and their bytes (one stat per file; run off the event loop)."""
    usage = StoreUsage(scanned_at=time.time())
    for directory, is_nar in ((store.narinfo_dir, False), (store.nar_dir, True)):
        try:
            entries = os.scandir(directory)
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                try:
                    size = entry.stat().st_size
                except FileNotFoundError:
                    continue
                if is_nar:
                    usage.nar_files += 1
                    usage.nar_bytes += size
                else:
                    usage.entries += 1
                    usage.narinfo_bytes += size
    return usage


class _DiskCollector(Collector):
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator[object]:
        usage = self.metrics.usage
        yield GaugeMetricFamily(
            "nixcache_store_entries", "Narinfos (store paths) in the store", value=usage.entries
        )
        yield GaugeMetricFamily("nixcache_store_nar_files", "NAR files in the store", value=usage.nar_files)
        yield GaugeMetricFamily(
            "nixcache_store_bytes",
            "Bytes of narinfos and NARs in the store",
            value=usage.nar_bytes + usage.narinfo_bytes,
        )
        yield GaugeMetricFamily(
            "nixcache_store_scan_timestamp_seconds", "When the store was last scanned", value=usage.scanned_at
        )
        stats = read_gc_stats(self.metrics.store)
        yield CounterMetricFamily(
            "nixcache_gc_runs", "Completed nixcache gc runs", value=stats.get("runs", 0)
        )
        yield CounterMetricFamily(
            "nixcache_gc_freed_bytes", "Bytes freed by nixcache gc", value=stats.get("freed_bytes", 0)
        )
        yield CounterMetricFamily(
            "nixcache_gc_deleted_entries",
            "Narinfos deleted by nixcache gc",
            value=stats.get("deleted_entries", 0),
        )
        yield GaugeMetricFamily(
            "nixcache_gc_last_run_timestamp_seconds",
            "When nixcache gc last finished",
            value=stats.get("last_run", 0),
        )
        # From verify-stats.json, written by `nixcache verify` (another process, weekly timer).
        checked = verify.read_stats(self.metrics.store)
        yield CounterMetricFamily(
            "nixcache_verify_runs",
            "Completed nixcache verify runs (not dry runs)",
            value=checked.get("runs", 0),
        )
        yield CounterMetricFamily(
            "nixcache_verify_damaged_entries",
            "Damaged entries found by nixcache verify, all runs",
            value=checked.get("damaged_total", 0),
        )
        yield CounterMetricFamily(
            "nixcache_verify_quarantined_files",
            "Files nixcache verify moved into quarantine/, all runs",
            value=checked.get("quarantined_total", 0),
        )
        yield GaugeMetricFamily(
            "nixcache_verify_last_damaged_entries",
            "Damaged entries the last nixcache verify run found (and quarantined)",
            value=checked.get("last_damaged", 0),
        )
        yield GaugeMetricFamily(
            "nixcache_verify_last_checked_bytes",
            "Bytes of NAR files the last nixcache verify run hashed",
            value=checked.get("last_bytes", 0),
        )
        yield GaugeMetricFamily(
            "nixcache_verify_last_run_timestamp_seconds",
            "When nixcache verify last finished; 0 = never",
            value=checked.get("last_run", 0),
        )


def read_gc_stats(store: Store) -> dict[str, float]:
    try:
        data = json.loads(store.gc_stats_file.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int | float)}


class _Child:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class LabeledCounter:
    """A counter with labels, without prometheus_client's per-call locks: the server updates
    metrics from one event loop thread, and this sits on the path of every request."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()):
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.children: dict[tuple[str, ...], _Child] = {}
        if not labelnames:
            self.children[()] = _Child()

    def labels(self, *values: str) -> _Child:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = _Child()
        return child

    def inc(self, amount: float = 1) -> None:
        self.children[()].value += amount

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in sorted(self.children.items()):
            family.add_metric(list(values), child.value)
        return family


class _HistogramChild:
    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value


class LabeledHistogram:
    """A histogram with labels, lock-free for the same reason as LabeledCounter."""

    def __init__(
        self, name: str, documentation: str, labelnames: tuple[str, ...], buckets: tuple[float, ...]
    ):
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.bucket_bounds = buckets
        self.children: dict[tuple[str, ...], _HistogramChild] = {}

    def labels(self, *values: str) -> _HistogramChild:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = _HistogramChild(self.bucket_bounds)
        return child

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in sorted(self.children.items()):
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, self.bucket_bounds), "+Inf"], child.counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(values), buckets, child.sum)
        return family


class _TierLookups(LabeledCounter):
    """nixcache_tier_lookups with the local tier's rows derived at scrape time from the narinfo
    hit/miss counter, so the hot path counts once and every tier reads alike in one family."""

    def __init__(self, local: LabeledCounter):
        super().__init__(
            "nixcache_tier_lookups",
            "Lookups per tier (local, origin, upstream:<name>) by kind (narinfo, nar) and result "
            "(hit, miss, error)",
            ("tier", "kind", "result"),
        )
        self.local = local

    def family(self) -> CounterMetricFamily:
        family = super().family()
        for (result,), child in sorted(self.local.children.items()):
            family.add_metric(["local", "narinfo", result], child.value)
        return family


class _CounterCollector(Collector):
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator[object]:
        for metric in self.metrics.all:
            yield metric.family()


class Metrics:
    """The server's metrics in their own registry (no process-global state)."""

    def __init__(self, store: Store):
        self.store = store
        self.usage = StoreUsage()
        self.registry = CollectorRegistry()
        self.requests = LabeledCounter(
            "nixcache_http_requests",
            "HTTP requests by route, method and status",
            ("route", "method", "status"),
        )
        self.duration = LabeledHistogram(
            "nixcache_http_request_duration_seconds",
            "Time to answer a request, by route",
            ("route",),
            (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1, 5, 30),
        )
        self.narinfo = LabeledCounter(
            "nixcache_narinfo_lookups", "Narinfo lookups by result (hit, miss)", ("result",)
        )
        self.served_bytes = LabeledCounter(
            "nixcache_served_bytes", "Body bytes of successful GETs, by route", ("route",)
        )
        self.uploads = LabeledCounter(
            "nixcache_uploads",
            "Uploads by kind (nar, narinfo, extra) and result (accepted, rejected)",
            ("kind", "result"),
        )
        self.upload_bytes = LabeledCounter("nixcache_upload_bytes", "Bytes of accepted NAR uploads")
        # Per tier (local, origin, upstream:<name>); see nixcache.server.tiers and docs/metrics.md.
        self.tier_lookups = _TierLookups(self.narinfo)
        self.tier_bytes = LabeledCounter(
            "nixcache_tier_bytes",
            "NAR bytes read from a tier (pull-through) or written to it (write-through)",
            ("tier", "direction"),
        )
        self.tier_duration = LabeledHistogram(
            "nixcache_tier_request_duration_seconds",
            "Time a tier took to answer a narinfo lookup, to start a NAR, or to take a write",
            ("tier", "kind"),
            (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 30),
        )
        self.tier_errors = LabeledCounter(
            "nixcache_tier_errors",
            "Tier failures by reason (timeout, unavailable, untrusted, corrupt, malformed)",
            ("tier", "reason"),
        )
        self.tier_writes = LabeledCounter(
            "nixcache_tier_writes",
            "Write-throughs by kind and result (stored, failed)",
            ("tier", "kind", "result"),
        )
        # Hits nginx served from disk, read from its log (nixcache.server.front).
        self.front = LabeledCounter(
            "nixcache_front_requests",
            "Requests the nginx front answered from the store's files, by route, method and status",
            ("route", "method", "status"),
        )
        self.negative_hits = LabeledCounter(
            "nixcache_negative_cache_hits", "Narinfo misses answered from the negative cache"
        )
        self.all = (
            self.requests,
            self.duration,
            self.narinfo,
            self.served_bytes,
            self.uploads,
            self.upload_bytes,
            self.tier_lookups,
            self.tier_bytes,
            self.tier_duration,
            self.tier_errors,
            self.tier_writes,
            self.negative_hits,
            self.front,
        )
        self.registry.register(_CounterCollector(self))
        self.registry.register(_DiskCollector(self))

    def refresh_usage(self, usage: StoreUsage) -> None:
        self.usage = usage

    def render(self) -> bytes:
        return generate_latest(self.registry)

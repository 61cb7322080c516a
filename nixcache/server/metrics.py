"""Prometheus metrics of the server, all named nixcache_*.

Store size and GC totals come from disk (a periodic scan and gc-stats.json written by
`nixcache gc`, which runs in another process), so they are read at scrape time from a cache.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nixcache.server.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class StoreUsage:
    entries: int = 0
    narinfo_bytes: int = 0
    nar_files: int = 0
    nar_bytes: int = 0
    scanned_at: float = 0.0


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


def read_gc_stats(store: Store) -> dict[str, float]:
    try:
        data = json.loads(store.gc_stats_file.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int | float)}


class Metrics:
    """The server's metrics in their own registry (no process-global state)."""

    def __init__(self, store: Store):
        self.store = store
        self.usage = StoreUsage()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "nixcache_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "nixcache_http_request_duration_seconds",
            "Time to answer a request, by route",
            ["route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1, 5, 30),
            registry=r,
        )
        self.narinfo = Counter(
            "nixcache_narinfo_lookups", "Narinfo lookups by result (hit, miss)", ["result"], registry=r
        )
        self.served_bytes = Counter(
            "nixcache_served_bytes", "Body bytes of successful GETs, by route", ["route"], registry=r
        )
        self.uploads = Counter(
            "nixcache_uploads",
            "Uploads by kind (nar, narinfo, extra) and result (accepted, rejected)",
            ["kind", "result"],
            registry=r,
        )
        self.upload_bytes = Counter("nixcache_upload_bytes", "Bytes of accepted NAR uploads", registry=r)
        r.register(_DiskCollector(self))

    def refresh_usage(self, usage: StoreUsage) -> None:
        self.usage = usage

    def render(self) -> bytes:
        return generate_latest(self.registry)

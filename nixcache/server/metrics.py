"""Prometheus metrics of the server, all named nixcache_*.

Store size, GC and verify totals come from disk (the store's usage file, which every process
adjusts, nixcache/server/usage.py; gc-stats.json and verify-stats.json written by `nixcache gc`
and `nixcache verify`, which run in other processes), so they are read at scrape time and are
the whole store's whichever worker answers.

With several workers (nixcache.server.prefork) each worker keeps its counter and histogram
values in memory and copies them into its files of a shared directory, in prometheus_client's
multiprocess format (`MmapedDict`: one mmap'ed file per process and type); a scrape, answered
by any worker, merges the files of every worker, dead ones included, so totals never go back
(`MultiProcessCollector.merge`). Why not write on every update: that cost 4 us per narinfo hit
here, the copy costs nothing on the hot path (bench/metrics_cost.py, docs/benchmarks.md).

A scrape is exact: the worker answering it asks the others to copy first (`SharedFiles.
ask_others`: FLUSH_SIGNAL to the parent, which relays it to every serving worker), waits until
each has (its generation, a number in its `flushed_<pid>` file bumped after every copy, has
moved past the one read before asking), copies its own and merges. A request whose response a
client has received is counted by then: a worker counts a request right after sending its last
byte, before it next yields to its event loop, where the signal is handled (except a request
whose unread body it drains after answering: counted once drained). The wait is bounded by
FLUSH_WAIT_SECONDS: a worker stuck in a long computation, stopped or killed (SIGKILL: the
parent has not reaped it yet) does not hang the scrape, which then answers with that worker's
last copy and counts nixcache_scrape_flush_timeouts_total. Workers still copy every
FLUSH_SECONDS on their own, so such a copy is at most that old, and a killed worker loses at
most its last FLUSH_SECONDS.
"""

from __future__ import annotations

import bisect
import glob
import json
import mmap
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from nixcache.server import signed, verify
from nixcache.server.prefork import FLUSH_SIGNAL, read_worker_stats
from nixcache.server.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FLUSH_SECONDS = 1.0  # how often a worker copies its values into the shared directory unasked
FLUSH_WAIT_SECONDS = 0.2  # how long a scrape waits for the other workers' copies
_POLL_SECONDS = 0.001  # how often it looks whether they are done (a copy takes well under 1 ms)
_GENERATION = struct.Struct("=Q")  # an aligned 8-byte store: read whole or not at all on x86-64


class _DiskCollector(Collector):
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator[object]:
        usage = self.metrics.store.usage.read()
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
            "nixcache_store_scan_timestamp_seconds",
            "When the store was last scanned in full (uploads and gc adjust the totals in between)",
            value=usage.scanned_at,
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
        # nixcache.server.signed: a key rotation's re-signing, done by one worker, counted on disk.
        pending, done = signed.read_stats(self.metrics.store)
        yield GaugeMetricFamily(
            "nixcache_resign_pending",
            "Stored narinfos still to be re-signed with the current keys (0: signed/ is current)",
            value=pending,
        )
        yield CounterMetricFamily(
            "nixcache_resign",
            "Stored narinfos re-signed with the current keys in the background since the start",
            value=done,
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


class SharedFiles:
    """This process's files in the shared metrics directory of the workers (one per type, named
    as prometheus_client's multiprocess mode names them, so its collector reads them), and its
    flush generation (`flushed_<pid>`, not a .db file: the merge leaves it alone)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.pid = pid = os.getpid()
        self.counters = MmapedDict(str(directory / f"counter_{pid}.db"))
        self.histograms = MmapedDict(str(directory / f"histogram_{pid}.db"))
        fd = os.open(directory / f"flushed_{pid}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, _GENERATION.size)
            self._generation = mmap.mmap(fd, _GENERATION.size)
        finally:
            os.close(fd)
        self.generation = 0

    def flushed(self) -> None:
        """Say that the values in the files are this process's current ones."""
        self.generation += 1
        _GENERATION.pack_into(self._generation, 0, self.generation)

    def read_generation(self, pid: int) -> int | None:
        """Worker `pid`'s flush generation; None once its file is gone."""
        try:
            fd = os.open(self.directory / f"flushed_{pid}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            data = os.pread(fd, _GENERATION.size, 0)
        finally:
            os.close(fd)
        return _GENERATION.unpack(data)[0] if len(data) == _GENERATION.size else None

    def ask_others(self, wait: float = FLUSH_WAIT_SECONDS) -> bool:
        """Have every other serving worker copy its values into its files now, waiting at most
        `wait` seconds (time.sleep: gevent's in a worker, so this worker serves meanwhile).
        False when one of them did not in time."""
        stats = read_worker_stats(self.directory)
        # Only the parent that forked this process relays (prefork.Supervisor._relay_flush).
        if stats is None or stats.get("parent") != os.getppid():
            return True
        seen = {}
        for pid in stats.get("pids", ()):
            if pid != self.pid and (generation := self.read_generation(pid)) is not None:
                seen[pid] = generation
        if not seen:
            return True
        try:
            os.kill(stats["parent"], FLUSH_SIGNAL)
        except ProcessLookupError:  # the parent is gone, and the workers go with it
            return False
        deadline = time.monotonic() + wait
        while True:
            # A generation past the one seen: a copy made after the asking (it also drops a
            # worker whose file is gone).
            seen = {pid: gen for pid, gen in seen.items() if self.read_generation(pid) == gen}
            if not seen:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_SECONDS)

    def collect(self) -> dict[str, object]:
        """Every worker's values, merged: metric name -> family."""
        files = glob.glob(str(self.directory / "*.db"))
        return {metric.name: metric for metric in MultiProcessCollector.merge(files, accumulate=True)}


class _Child:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class LabeledCounter:
    """A counter with labels, without prometheus_client's per-call locks: the server updates
    metrics from one event loop thread, and this sits on the path of every request. `shared`:
    `flush()` copies the values into this worker's file of the workers' shared directory."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...] = (),
        shared: SharedFiles | None = None,
    ):
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.shared = shared
        self.children: dict[tuple[str, ...], _Child] = {}
        self._keys: dict[tuple[str, ...], str] = {}  # label values -> key in the shared file
        if not labelnames:
            self.children[()] = _Child()

    def labels(self, *values: str) -> _Child:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = _Child()
        return child

    def inc(self, amount: float = 1) -> None:
        self.children[()].value += amount

    def flush(self) -> None:
        """Write every value into the shared file (prometheus_client's mmap'ed format)."""
        file = self.shared.counters  # type: ignore[union-attr]
        for values, child in list(self.children.items()):
            key = self._keys.get(values)
            if key is None:
                key = mmap_key(self.name, f"{self.name}_total", self.labelnames, values, self.documentation)
                self._keys[values] = key
            file.write_value(key, child.value, 0.0)

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
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...],
        shared: SharedFiles | None = None,
    ):
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.bucket_bounds = buckets
        self.shared = shared
        self.children: dict[tuple[str, ...], _HistogramChild] = {}
        self._keys: dict[tuple[str, ...], list[str]] = {}  # per bucket, then _sum

    def labels(self, *values: str) -> _HistogramChild:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = _HistogramChild(self.bucket_bounds)
        return child

    def flush(self) -> None:
        """Write every bucket (not cumulative: the merge accumulates) and sum into the shared file."""
        file = self.shared.histograms  # type: ignore[union-attr]
        for values, child in list(self.children.items()):
            keys = self._keys.get(values)
            if keys is None:
                names, doc = (*self.labelnames, "le"), self.documentation
                keys = [
                    mmap_key(self.name, f"{self.name}_bucket", names, (*values, bound), doc)
                    for bound in [*map(floatToGoString, self.bucket_bounds), "+Inf"]
                ]
                keys.append(mmap_key(self.name, f"{self.name}_sum", self.labelnames, values, doc))
                self._keys[values] = keys
            for key, count in zip(keys, child.counts, strict=False):
                file.write_value(key, count, 0.0)
            file.write_value(keys[-1], child.sum, 0.0)

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

    def __init__(self, local: LabeledCounter, shared: SharedFiles | None):
        super().__init__(
            "nixcache_tier_lookups",
            "Lookups per tier (local, origin, upstream:<name>) by kind (narinfo, nar) and result "
            "(hit, miss, error)",
            ("tier", "kind", "result"),
            shared,
        )  # its own rows only, when shared: the merge derives the local ones from all workers
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


class _SharedCollector(Collector):
    """The counters and histograms of every worker, merged from the shared directory."""

    def __init__(self, metrics: Metrics, shared: SharedFiles):
        self.metrics = metrics
        self.shared = shared

    def collect(self) -> Iterator[object]:
        merged = self.shared.collect()
        lookups = merged.get("nixcache_narinfo_lookups")
        tier_lookups = self.metrics.tier_lookups
        # The other tiers' rows as counted, the local ones from the merged narinfo lookups (as
        # _TierLookups derives them in one process).
        tiers = merged.setdefault(tier_lookups.name, LabeledCounter.family(tier_lookups))
        if lookups is not None:
            for sample in lookups.samples:
                labels = {"tier": "local", "kind": "narinfo", "result": sample.labels["result"]}
                tiers.add_sample("nixcache_tier_lookups_total", labels, sample.value)
        for metric in self.metrics.all:
            yield merged.get(metric.name) or metric.family()
        if (stats := read_worker_stats(self.shared.directory)) is not None:
            yield GaugeMetricFamily("nixcache_workers", "Worker processes serving", value=stats["workers"])
            yield CounterMetricFamily(
                "nixcache_worker_restarts",
                "Workers that died and were replaced since the server started",
                value=stats["restarts"],
            )


class Metrics:
    """The server's metrics in their own registry (no process-global state). `shared_dir`: the
    workers' shared directory (nixcache.server.prefork); None for a single process."""

    def __init__(self, store: Store, shared_dir: Path | None = None):
        self.store = store
        self.registry = CollectorRegistry()
        self.shared = shared = SharedFiles(shared_dir) if shared_dir is not None else None
        self.requests = LabeledCounter(
            "nixcache_http_requests",
            "HTTP requests by route, method and status",
            ("route", "method", "status"),
            shared,
        )
        self.duration = LabeledHistogram(
            "nixcache_http_request_duration_seconds",
            "Time to answer a request, by route",
            ("route",),
            (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1, 5, 30),
            shared,
        )
        self.narinfo = LabeledCounter(
            "nixcache_narinfo_lookups", "Narinfo lookups by result (hit, miss)", ("result",), shared
        )
        self.served_bytes = LabeledCounter(
            "nixcache_served_bytes", "Body bytes of successful GETs, by route", ("route",), shared
        )
        self.uploads = LabeledCounter(
            "nixcache_uploads",
            "Uploads by kind (nar, narinfo, listing, log, …) and result (accepted, rejected)",
            ("kind", "result"),
            shared,
        )
        self.upload_bytes = LabeledCounter(
            "nixcache_upload_bytes", "Bytes of accepted NAR uploads", shared=shared
        )
        # Per tier (local, origin, upstream:<name>); see nixcache.server.tiers and docs/metrics.md.
        self.tier_lookups = _TierLookups(self.narinfo, shared)
        self.tier_bytes = LabeledCounter(
            "nixcache_tier_bytes",
            "NAR bytes read from a tier (pull-through) or written to it (write-through)",
            ("tier", "direction"),
            shared,
        )
        self.tier_duration = LabeledHistogram(
            "nixcache_tier_request_duration_seconds",
            "Time a tier took to answer a narinfo lookup, to start a NAR, or to take a write",
            ("tier", "kind"),
            (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 30),
            shared,
        )
        self.tier_errors = LabeledCounter(
            "nixcache_tier_errors",
            "Tier failures by reason (timeout, unavailable, untrusted, corrupt, malformed)",
            ("tier", "reason"),
            shared,
        )
        self.tier_writes = LabeledCounter(
            "nixcache_tier_writes",
            "Write-throughs by kind and result (stored, failed)",
            ("tier", "kind", "result"),
            shared,
        )
        # Hits nginx served from disk, read from its log (nixcache.server.front).
        self.front = LabeledCounter(
            "nixcache_front_requests",
            "Requests the nginx front answered from the store's files, by route, method and status",
            ("route", "method", "status"),
            shared,
        )
        self.negative_hits = LabeledCounter(
            "nixcache_negative_cache_hits",
            "Narinfo misses answered from the negative cache",
            shared=shared,
        )
        self.flush_timeouts = LabeledCounter(
            "nixcache_scrape_flush_timeouts",
            "Scrapes answered before every other worker had copied its counts (one was busy or "
            "dead): those counts were up to a second old",
            shared=shared,
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
            self.flush_timeouts,
        )
        if shared is None:
            self.registry.register(_CounterCollector(self))
        else:
            self.registry.register(_SharedCollector(self, shared))
        self.registry.register(_DiskCollector(self))

    def flush(self) -> None:
        """Copy this worker's values into the shared directory (nothing for a single process)."""
        if self.shared is not None:
            for metric in self.all:
                metric.flush()
            self.shared.flushed()

    def render(self) -> bytes:
        """The whole server's metrics: with workers, every other worker's counts as of now (at
        most FLUSH_WAIT_SECONDS spent asking for them, see the module's docstring)."""
        if self.shared is not None and not self.shared.ask_others():
            self.flush_timeouts.inc()
        self.flush()  # this worker's own counts are current in its answer
        return generate_latest(self.registry)

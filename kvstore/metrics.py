"""The daemon's Prometheus endpoint: metric names, the scrape-time collector, the HTTP thread.

Costs the ROUTER loop about a microsecond per request: a bisect and two additions into a
Timings table (prometheus_client's own Histogram.observe takes a lock and costs several times
that). Counters and gauges are read at scrape time, on the HTTP thread, from the plain ints the
Store and the server already keep, so /metrics and STATS report the same numbers. Nothing here
changes the store.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from kvstore.protocol import Op
from kvstore.store import Store

NAMESPACE_LABEL_CHARS = 12  # hex chars of the namespace digest: unique enough, short on a graph
OTHER_NAMESPACE = "other"  # label of the counters pooled past MAX_NAMESPACE_STATS (store.py)
# Request handling takes tens of microseconds (lookup, commit) to tens of milliseconds (a large
# TCP GET); transfers of whole prefixes over TCP may take seconds.
_REQUEST_BUCKETS_S = (25e-6, 50e-6, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
                      0.05, 0.1, 0.25, 0.5, 1.0)
_TRANSFER_BUCKETS_S = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                       1.0, 2.5, 5.0, 10.0)


# Kinds of kvstore_errors_total. Error replies by code ("bad_request" counts as "protocol"), and
# "dropped" for replies ZeroMQ could not queue; "full" (a write refused, wholly or partly, for
# lack of evictable room) and "timeout" (a reservation abandoned past its deadline) are not
# error replies and are counted apart (error_kinds()).
REPLY_ERROR_KINDS = ("protocol", "version", "stale_segment", "too_large", "hashes_gone",
                     "internal", "dropped")


@dataclass
class ServerCounters:
    """What the server counts itself (the Store counts the rest). Plain ints and dicts of ints,
    written by the loop thread only, read by the scrape thread."""

    num_requests: dict[str, int] = field(default_factory=dict)  # by op name
    num_errors: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(REPLY_ERROR_KINDS, 0))
    num_full: int = 0  # write requests that could not store every block: the pool was full
    bytes_in: dict[str, int] = field(default_factory=lambda: {"tcp": 0, "shm": 0})
    bytes_out: dict[str, int] = field(default_factory=lambda: {"tcp": 0, "shm": 0})


def error_kinds(store: Store, counters: ServerCounters) -> dict[str, int]:
    """Every error count by kind, as kvstore_errors_total and STATS report them."""
    return {**dict(counters.num_errors), "full": counters.num_full,
            "timeout": store.num_reclaimed}


def namespace_label(name: bytes) -> str:
    """The `namespace` label of a namespace name: the first 12 hex chars of its digest."""
    return name.hex()[:NAMESPACE_LABEL_CHARS] if name else OTHER_NAMESPACE


class Timings:
    """A histogram with one label, observed by the loop thread only and read at scrape time.

    NOTE: a scrape racing an observation may see a bucket one ahead of the count for that one
    scrape; rate() over scrapes is unaffected.
    """

    def __init__(self, name: str, doc: str, label: str, values: Iterable[str],
                 bounds_s: tuple[float, ...]) -> None:
        self.name, self.doc, self.label, self.bounds_s = name, doc, label, bounds_s
        # label value -> [count per bucket (the last is +Inf)..., sum of seconds]
        self.rows: dict[str, list[float]] = {v: [0] * (len(bounds_s) + 1) + [0.0] for v in values}

    def observe(self, value: str, seconds: float) -> None:
        row = self.rows[value]
        row[bisect.bisect_left(self.bounds_s, seconds)] += 1
        row[-1] += seconds

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=[self.label])
        for value, row in list(self.rows.items()):
            row = list(row)
            cumulative, buckets = 0.0, []
            for bound, num in zip([*map(floatToGoString, self.bounds_s), "+Inf"], row[:-1]):
                cumulative += num
                buckets.append((bound, cumulative))
            family.add_metric([value], buckets, row[-1])
        return family


class Metrics:
    """A private registry holding the daemon's metrics; serve() exposes it over HTTP."""

    def __init__(self, store: Store, counters: ServerCounters) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Timings(
            "kvstore_request_seconds", "Server-side handling time of a request, by op",
            "op", [op.name.lower() for op in Op], _REQUEST_BUCKETS_S)
        self.transfer_seconds = Timings(
            "kvstore_transfer_seconds",
            "Time a GET or PUT of KV bytes took, from request to reply sent (shm writes: "
            "from RESERVE to COMMIT)", "path", ("shm", "tcp"), _TRANSFER_BUCKETS_S)
        self.registry.register(
            _StoreCollector(store, counters, (self.request_seconds, self.transfer_seconds)))
        self._http: Any = None
        self._thread: threading.Thread | None = None

    def add_cluster(self, cluster: Any) -> None:
        """The cluster tier's counts (kvstore/cluster.py ClusterTier) and its directory's lookup
        latency, observed on the tier's thread (one writer, like the loop's Timings)."""
        latency = Timings("kvstore_cluster_directory_seconds",
                          "Time a lookup of a chain's holders took on the Valkey directory",
                          "op", ("holders",), _REQUEST_BUCKETS_S)
        cluster.directory.on_latency = lambda seconds: latency.observe("holders", seconds)
        self.registry.register(_ClusterCollector(cluster, latency))

    def serve(self, host: str, port: int) -> None:
        """Serve /metrics on host:port from a daemon thread (never blocks the loop)."""
        self._http, self._thread = start_http_server(port, host, registry=self.registry)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _StoreCollector(Collector):
    """Counters and gauges built at scrape time from the store's and server's own counts."""

    def __init__(self, store: Store, counters: ServerCounters,
                 timings: tuple[Timings, ...]) -> None:
        self.store = store
        self.counters = counters
        self.timings = timings

    def collect(self) -> Iterator[Any]:
        # NOTE: runs on the HTTP thread while the loop mutates the store. Only ints are read and
        # dicts are copied with list()/dict(), which CPython does without releasing the GIL.
        store, counters = self.store, self.counters
        for timings in self.timings:
            yield timings.family()
        per_ns = [(namespace_label(name), s) for name, s in list(store.stats.items())]
        lookups = CounterMetricFamily("kvstore_lookups", "Lookup requests", labels=["namespace"])
        blocks = CounterMetricFamily(
            "kvstore_lookup_blocks", "Blocks asked for by lookups, found (hit) or not (miss)",
            labels=["namespace", "result"])
        evictions = CounterMetricFamily("kvstore_evictions", "Blocks evicted to make room",
                                        labels=["namespace"])
        resident = GaugeMetricFamily("kvstore_blocks", "Committed blocks resident in the pool",
                                     labels=["namespace"])
        for label, s in per_ns:
            lookups.add_metric([label], s.num_lookups)
            blocks.add_metric([label, "hit"], s.num_hits)
            blocks.add_metric([label, "miss"], s.num_misses)
            evictions.add_metric([label], s.num_evictions)
            resident.add_metric([label], s.num_blocks)
        yield from (lookups, blocks, evictions, resident)

        moved = CounterMetricFamily("kvstore_bytes", "KV bytes into and out of the pool",
                                    labels=["direction", "path"])
        for direction, by_path in (("in", counters.bytes_in), ("out", counters.bytes_out)):
            for path, num in dict(by_path).items():
                moved.add_metric([direction, path], num)
        yield moved

        errors = CounterMetricFamily("kvstore_errors", "Errors, by kind", labels=["kind"])
        for kind, num in error_kinds(store, counters).items():
            errors.add_metric([kind], num)
        yield errors

        yield GaugeMetricFamily("kvstore_pool_capacity_bytes", "Bytes of the pool's slot pages",
                                value=store.slabs.num_pages * store.slabs.page_bytes)
        yield GaugeMetricFamily("kvstore_pool_used_bytes", "Bytes of slots taken",
                                value=store.slot_bytes_used)
        yield GaugeMetricFamily("kvstore_leases_active", "Read leases holding blocks pinned",
                                value=len(store.index.leases))
        yield GaugeMetricFamily("kvstore_reservations_active", "Slots reserved, not yet committed",
                                value=store.num_reserved)


class _ClusterCollector(Collector):
    """kvstore_cluster_*: lookups continued on peers, pulls, bytes, failures, directory state."""

    def __init__(self, cluster: Any, latency: Timings) -> None:
        self.cluster, self.latency = cluster, latency

    def collect(self) -> Iterator[Any]:
        s = self.cluster.stats
        d = self.cluster.directory
        yield self.latency.family()
        for name, doc, value in (
                ("kvstore_cluster_lookups", "Lookups continued past the local pool", s.num_asked),
                ("kvstore_cluster_hits", "Of those, lookups that got blocks from a peer",
                 s.num_hits),
                ("kvstore_cluster_pulls", "GETs sent to peer daemons", s.num_pulls),
                ("kvstore_cluster_pulled_blocks", "Blocks pulled from peers", s.num_blocks),
                ("kvstore_cluster_pulled_bytes", "Bytes pulled from peers", s.num_bytes),
                ("kvstore_cluster_pull_failures", "Pulls that failed or ran out of time",
                 s.num_pull_failures),
                ("kvstore_cluster_directory_failures",
                 "Directory lookups Valkey did not fully answer", d.stats.num_lookup_failures),
                ("kvstore_cluster_registered", "Block entries written to the directory",
                 d.stats.num_registered),
                ("kvstore_cluster_stale_dropped", "Stale directory entries removed",
                 d.stats.num_dropped_stale)):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("kvstore_cluster_members", "Live daemons in the directory",
                                value=d.stats.num_members)
        yield GaugeMetricFamily("kvstore_cluster_directory_up",
                                "1 while every Valkey node asked lately answered", value=int(d.is_up))

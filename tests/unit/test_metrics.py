"""The metrics module without a daemon: histogram buckets, labels and the exposition format."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvstore.keys import Namespace
from kvstore.metrics import Metrics, ServerCounters, Timings, namespace_label
from tests.unit.test_store import make_store, put


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_timings_buckets_are_cumulative_and_inclusive_of_their_bound() -> None:
    """A value equal to a bound falls in that bucket (le means <=); +Inf holds the count."""
    timings = Timings("t_seconds", "doc", "op", ["a", "b"], (0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.005, 3.0):
        timings.observe("a", seconds)
    family = timings.family()
    rows = {(s.name, s.labels.get("le")): s.value for s in family.samples if s.labels["op"] == "a"}
    assert rows[("t_seconds_bucket", "0.001")] == 2
    assert rows[("t_seconds_bucket", "0.01")] == 3
    assert rows[("t_seconds_bucket", "+Inf")] == rows[("t_seconds_count", None)] == 4
    assert abs(rows[("t_seconds_sum", None)] - 3.0065) < 1e-9
    assert {s.value for s in family.samples if s.labels["op"] == "b"} == {0.0}


def test_registry_exposes_the_contract_names_from_store_counts() -> None:
    """Every metric of the contract is exposed, read from the store's and server's counts."""
    store, _ = make_store(num_pages=2)
    ns = Namespace(bytes(range(16)))
    put(store, [("a", None), ("b", "a")], ns=ns)
    store.record_lookup(ns, num_asked=3, num_hits=2)
    counters = ServerCounters()
    counters.bytes_in["tcp"] += 2000
    counters.num_errors["protocol"] += 1
    metrics = Metrics(store, counters)
    metrics.request_seconds.observe("lookup", 0.0002)
    got = samples(metrics)
    label = namespace_label(ns.name)
    assert label == "000102030405"
    assert got[("kvstore_lookups_total", frozenset({("namespace", label)}))] == 1
    assert got[("kvstore_lookup_blocks_total",
                frozenset({("namespace", label), ("result", "miss")}))] == 1
    assert got[("kvstore_blocks", frozenset({("namespace", label)}))] == 2
    assert got[("kvstore_bytes_total", frozenset({("direction", "in"), ("path", "tcp")}))] == 2000
    assert got[("kvstore_errors_total", frozenset({("kind", "protocol")}))] == 1
    assert got[("kvstore_errors_total", frozenset({("kind", "timeout")}))] == 0
    assert got[("kvstore_pool_used_bytes", frozenset())] == store.slot_bytes_used > 0
    assert got[("kvstore_pool_capacity_bytes", frozenset())] == 2 * 4096
    assert got[("kvstore_request_seconds_count", frozenset({("op", "lookup")}))] == 1
    names = {name for name, _ in got}
    assert {"kvstore_evictions_total", "kvstore_leases_active", "kvstore_reservations_active",
            "kvstore_transfer_seconds_count"} <= names


def test_pooled_namespace_counters_get_the_other_label() -> None:
    """Counters pooled past the namespace bound (name b'') are labelled 'other'."""
    assert namespace_label(b"") == "other"

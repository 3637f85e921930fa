"""The daemon's Prometheus endpoint, scraped over HTTP and parsed with prometheus_client's parser
while real clients move real blocks over shared memory and TCP."""

from __future__ import annotations

import urllib.request

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvstore.client import Client
from kvstore.errors import ServerError
from kvstore.keys import Namespace, namespace_digest
from bench.daemon import free_port
from tests.integration.helpers import CALL_S, MiB, chain_hashes, raw_dealer, wait_stats
from tests.integration.helpers import stats as daemon_stats

BLOCK = 256 * 1024 - 64  # four 64-byte-aligned slots per 1 MiB page: 32 slots in the pool
NUM_SLOTS = 32
NS_A = Namespace(namespace_digest({"model": "a"}))
NS_B = Namespace(namespace_digest({"model": "b"}))
LABEL_A, LABEL_B = NS_A.name.hex()[:12], NS_B.name.hex()[:12]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of /metrics, keyed by sample name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=CALL_S) as reply:
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def blocks(tag: str, n: int) -> list[tuple[bytes, bytes | None, bytes]]:
    hashes = chain_hashes(tag, n)
    return [(h, hashes[i - 1] if i else None, bytes([i % 251]) * BLOCK)
            for i, h in enumerate(hashes)]


@pytest.fixture
def metered(make_daemon):  # type: ignore[no-untyped-def]
    port = free_port()
    d = make_daemon(pool_size="8MiB", page_size="1MiB",
                    extra_args=["--metrics-port", str(port)]).start()
    assert f"kvstore: metrics on http://127.0.0.1:{port}/metrics" in d.output()
    return d, port


@pytest.mark.timeout(120)
def test_counters_move_by_what_clients_did_over_shm_and_tcp(metered, ctx):
    """Lookups, hits and misses per namespace, bytes per path and op timings add up exactly."""
    d, port = metered
    before = scrape(port)
    chain = blocks("a", 5)
    hashes = [h for h, _, _ in chain]
    with Client(d.address, CALL_S, ctx=ctx) as shm, \
            Client(d.address, CALL_S, ctx=ctx, use_shm=False) as tcp:
        assert shm.put(NS_A, chain[:3]).num_stored == 3
        assert tcp.put(NS_A, chain[3:]).num_stored == 2
        assert shm.lookup(NS_A, [*hashes, b"missing"]).num_hits == 5  # 5 hits, 1 miss
        assert tcp.lookup(NS_A, [hashes[0], b"gap", hashes[1]], lease_ms=500).num_hits == 1
        assert shm.lookup(NS_B, [b"nothing"]).num_hits == 0
        assert len(shm.get(NS_A, hashes[:2])) == 2
        assert len(tcp.get(NS_A, hashes)) == 5
    wait_stats(d.address, lambda s: s["num_leases"] == 0, 20.0, "leases released")
    after = scrape(port)

    assert delta(after, before, "kvstore_lookups_total", namespace=LABEL_A) == 2
    assert delta(after, before, "kvstore_lookups_total", namespace=LABEL_B) == 1
    assert delta(after, before, "kvstore_lookup_blocks_total", namespace=LABEL_A,
                 result="hit") == 6
    assert delta(after, before, "kvstore_lookup_blocks_total", namespace=LABEL_A,
                 result="miss") == 3
    assert delta(after, before, "kvstore_lookup_blocks_total", namespace=LABEL_B,
                 result="miss") == 1
    assert delta(after, before, "kvstore_bytes_total", direction="in", path="shm") == 3 * BLOCK
    assert delta(after, before, "kvstore_bytes_total", direction="in", path="tcp") == 2 * BLOCK
    assert delta(after, before, "kvstore_bytes_total", direction="out", path="shm") == 2 * BLOCK
    assert delta(after, before, "kvstore_bytes_total", direction="out", path="tcp") == 5 * BLOCK
    assert value(after, "kvstore_blocks", namespace=LABEL_A) == 5
    # Histograms: one observation per request of each op; one transfer per move of KV bytes
    # (shm: the write's COMMIT and the read's GET; tcp: the PUT and the GET).
    assert delta(after, before, "kvstore_request_seconds_count", op="lookup") == 3
    assert delta(after, before, "kvstore_request_seconds_count", op="put") == 1
    assert delta(after, before, "kvstore_request_seconds_count", op="commit") == 1
    assert delta(after, before, "kvstore_transfer_seconds_count", path="shm") == 2
    assert delta(after, before, "kvstore_transfer_seconds_count", path="tcp") == 2
    assert delta(after, before, "kvstore_request_seconds_sum", op="lookup") > 0
    assert value(after, "kvstore_request_seconds_bucket", op="lookup", le="+Inf") == \
        value(after, "kvstore_request_seconds_count", op="lookup")


@pytest.mark.timeout(120)
def test_evictions_and_errors_are_counted_by_namespace_and_kind(metered, ctx):
    """Filling the pool past capacity counts evictions; garbage and oversize count errors."""
    d, port = metered
    before = scrape(port)
    with Client(d.address, CALL_S, ctx=ctx) as client:
        for i in range(NUM_SLOTS + 3):  # unrelated roots: each one past capacity evicts one
            assert client.put(NS_B, [(f"b{i}".encode(), None, b"x" * BLOCK)]).num_stored == 1
        with pytest.raises(ServerError, match="too_large"):
            client.put(NS_B, [(b"huge", None, bytes(2 * MiB))])
    with raw_dealer(ctx, d.address) as sock:
        sock.send_multipart([b"\xc1 not msgpack"])
        sock.send_multipart([msgpack.packb({"v": 1, "op": 99, "id": 1})])
        assert [msgpack.unpackb(sock.recv_multipart()[0])["error"] for _ in range(2)] == \
            ["bad_request", "bad_request"]
    after = scrape(port)
    stats = daemon_stats(d.address)
    assert delta(after, before, "kvstore_evictions_total", namespace=LABEL_B) == 3
    assert stats["namespaces"][NS_B.name.hex()]["evictions"] == 3
    assert value(after, "kvstore_blocks", namespace=LABEL_B) == NUM_SLOTS
    assert delta(after, before, "kvstore_errors_total", kind="protocol") == 2
    assert delta(after, before, "kvstore_errors_total", kind="too_large") == 1
    assert delta(after, before, "kvstore_errors_total", kind="internal") == 0
    assert stats["errors_by_kind"]["protocol"] == 2 and stats["errors"] == 3


@pytest.mark.timeout(120)
def test_gauges_match_the_stats_reply(metered, ctx):
    """Capacity, used bytes, blocks, leases and reservations read the same in both places."""
    d, port = metered
    with Client(d.address, CALL_S, ctx=ctx) as client:
        client.put(NS_A, blocks("g", 3))
        client.put(NS_B, blocks("h", 2))
        lease = client.lookup(NS_A, chain_hashes("g", 2), lease_ms=60_000).lease
        refs, _ = client.reserve(NS_B, [(b"pending", None, 1000)])  # never committed
        assert lease is not None and refs[0] is not None
        stats = client.stats()
        samples = scrape(port)
    assert (stats["num_leases"], stats["num_reserved"]) == (1, 1)
    assert value(samples, "kvstore_leases_active") == stats["num_leases"]
    assert value(samples, "kvstore_reservations_active") == stats["num_reserved"]
    assert value(samples, "kvstore_pool_capacity_bytes") == stats["capacity_bytes"] == 8 * MiB
    # The 1000-byte reservation takes the smallest slot, 4 KiB (--min-block-size).
    assert value(samples, "kvstore_pool_used_bytes") == stats["used_bytes"] == 5 * BLOCK + 4096
    for name, ns in stats["namespaces"].items():
        assert value(samples, "kvstore_blocks", namespace=name[:12]) == ns["blocks"]
    assert (stats["namespaces"][NS_A.name.hex()]["blocks"],
            stats["namespaces"][NS_B.name.hex()]["blocks"]) == (3, 2)


@pytest.mark.timeout(90)
def test_metrics_port_zero_serves_nothing_and_a_taken_port_is_an_error(make_daemon):
    """--metrics-port 0 starts no endpoint; a chosen port already in use fails the start."""
    off = make_daemon(extra_args=["--metrics-port", "0"]).start()
    assert "metrics on" not in off.output()
    taken = make_daemon(extra_args=["--metrics-port", str(off.port)]).start(wait=False)
    assert taken.proc is not None and taken.proc.wait(30) == 1
    line = taken.output().strip().splitlines()[-1]
    assert line.startswith("kvstore: error: cannot serve metrics on 127.0.0.1:")
    assert "(set by flag --metrics-port)" in line
    assert not taken.segment_path.exists()

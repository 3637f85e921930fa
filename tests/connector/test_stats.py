"""The connector's stats as vLLM handles them: summed across workers and steps, reduced for the
log line, carried as a plain dict from the engine to the front end, and fed to Prometheus."""

from __future__ import annotations

import pickle
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from connectors.vllm_v1.connector import KVStoreConnector
from connectors.vllm_v1.stats import COUNTERS, KVStorePromMetrics, KVStoreStats


def test_aggregate_sums_counters_and_keeps_the_accumulator() -> None:
    """vLLM keeps what aggregate returns: the sum of both sides' counters."""
    worker = KVStoreStats()
    worker.add(num_loads=1, loaded_tokens_shm=64, load_bytes=4096, load_s=0.5)
    sched = KVStoreStats()
    sched.add(num_requests=2, pool_tokens=64, vram_tokens=32, recomputed_tokens=10)
    other = KVStoreStats()
    other.add(num_loads=2, load_bytes=1024)
    total = worker.aggregate(sched).aggregate(other)
    assert total is worker
    assert total.data == {"num_loads": 3, "loaded_tokens_shm": 64, "load_bytes": 5120,
                          "load_s": 0.5, "num_requests": 2, "pool_tokens": 64,
                          "vram_tokens": 32, "recomputed_tokens": 10}


def test_is_empty_until_something_is_counted() -> None:
    stats = KVStoreStats()
    assert stats.is_empty()
    stats.add(pool_tokens=0)  # nothing happened
    assert stats.is_empty()
    stats.add(num_lookups=1)
    assert not stats.is_empty()
    stats.reset()
    assert stats.is_empty()


def test_reduce_gives_totals_and_the_pool_share_of_prefill() -> None:
    stats = KVStoreStats()
    stats.add(vram_tokens=100, pool_tokens=300, recomputed_tokens=100,
              load_bytes=2_000_000_000, load_s=0.5)
    reduced = stats.reduce()
    assert reduced["pool_tokens"] == 300
    assert reduced["pool_token_share"] == pytest.approx(0.6)
    assert reduced["load_gb_per_s"] == pytest.approx(4.0)
    assert "num_requests" not in reduced  # zero counters stay out of the log line


def test_stats_cross_process_boundaries_as_vllm_sends_them() -> None:
    """Worker -> engine: the object is pickled; engine -> front end: to_dict() goes through
    msgpack and build_kv_connector_stats rebuilds it."""
    stats = KVStoreStats()
    stats.add(num_loads=1, load_s=0.25, loaded_tokens_tcp=96)
    assert pickle.loads(pickle.dumps(stats)).data == stats.data
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(stats.to_dict()))
    rebuilt = KVStoreConnector.build_kv_connector_stats(wire)
    assert isinstance(rebuilt, KVStoreStats) and rebuilt.data == stats.data
    assert KVStoreConnector.build_kv_connector_stats(None).is_empty()


@pytest.mark.parametrize("data", [{"pool_tokenz": 1}, {"pool_tokens": "1"},
                                  {"pool_tokens": -1}, {"pool_tokens": True}])
def test_bad_stats_are_refused_with_a_clear_error(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="kvstore stat"):
        KVStoreStats(data=data)
    with pytest.raises(ValueError, match="unknown kvstore stat"):
        KVStoreStats().add(pool_tokenz=1)


def test_prometheus_counters_are_named_vllm_kvstore_and_labelled_per_tier() -> None:
    registry = CollectorRegistry()

    class LocalCounter(Counter):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("registry", registry)  # labelled children are never registered
            super().__init__(*args, **kwargs)

    types: dict[Any, Any] = {Counter: LocalCounter, Gauge: Gauge, Histogram: Histogram}
    prom = KVStorePromMetrics(SimpleNamespace(kv_transfer_config=None), types,
                              ["model_name", "engine"], {0: ["m", "0"], 1: ["m", "1"]})
    stats = KVStoreStats()
    stats.add(num_requests=1, vram_tokens=32, pool_tokens=64, recomputed_tokens=5,
              loaded_tokens_shm=64, load_bytes=8192, announced_blocks=2)
    prom.observe(stats.to_dict(), engine_idx=1)
    prom.observe(stats.to_dict(), engine_idx=1)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"model_name": "m", "engine": "1", **labels})

    assert value("vllm:kvstore_prompt_tokens_total", tier="pool") == 128
    assert value("vllm:kvstore_prompt_tokens_total", tier="vram") == 64
    assert value("vllm:kvstore_prompt_tokens_total", tier="recomputed") == 10
    assert value("vllm:kvstore_loaded_tokens_total", transport="shm") == 128
    assert value("vllm:kvstore_bytes_total", direction="load") == 16384
    assert value("vllm:kvstore_event_blocks_total", event="stored") == 4
    assert value("vllm:kvstore_requests_total") == 2
    assert registry.get_sample_value("vllm:kvstore_requests_total",
                                     {"model_name": "m", "engine": "0"}) == 0
    names = {m.name for m in registry.collect()}
    assert all(n.startswith("vllm:kvstore_") for n in names) and len(names) > 5
    assert len(COUNTERS) == len(set(COUNTERS))

"""The connector's counters for vLLM's KV connector stats: prompt tokens per tier, loads, saves.

Each half counts what it knows (the scheduler: per-request tokens per tier and lookups; the worker:
bytes, seconds and transports of loads and saves) and hands its counters to vLLM once per step;
vLLM sums them across workers and steps with aggregate() and logs reduce() or feeds Prometheus.
Counters only, so an accumulator vLLM keeps between log lines stays a fixed size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

# counter -> (Prometheus name, label name, label value, help). Several counters share one metric
# and differ by a label, so a dashboard can stack the tiers of a prompt.
_METRICS: dict[str, tuple[str, str | None, str | None, str]] = {
    "num_requests": ("vllm:kvstore_requests", None, None,
                     "Requests the kvstore connector looked at."),
    "vram_tokens": ("vllm:kvstore_prompt_tokens", "tier", "vram",
                    "Prefill tokens by where their KV came from."),
    "pool_tokens": ("vllm:kvstore_prompt_tokens", "tier", "pool", ""),
    "recomputed_tokens": ("vllm:kvstore_prompt_tokens", "tier", "recomputed", ""),
    "num_lookups": ("vllm:kvstore_lookups", None, None, "Lookups sent to the daemon."),
    "num_failed_lookups": ("vllm:kvstore_lookup_failures", None, None,
                           "Lookups that failed or ran out of time (treated as misses)."),
    "num_lookup_waits": ("vllm:kvstore_lookup_waits", None, None,
                         "Scheduling passes a request sat out: its lookup had not answered "
                         "within lookup_wait_ms."),
    "lookup_wait_s": ("vllm:kvstore_lookup_wait_seconds", None, None,
                      "Seconds the scheduler waited for lookups (its step waits with it)."),
    "num_loads": ("vllm:kvstore_loads", None, None, "Loads from the pool started by a worker."),
    "num_failed_loads": ("vllm:kvstore_load_failures", None, None,
                         "Loads that filled fewer blocks than planned (the rest recomputed)."),
    "failed_load_tokens": ("vllm:kvstore_load_failed_tokens", None, None,
                           "Tokens planned from the pool that a failed load left to recompute."),
    "loaded_tokens_shm": ("vllm:kvstore_loaded_tokens", "transport", "shm",
                          "Tokens copied from the pool, by transport."),
    "loaded_tokens_tcp": ("vllm:kvstore_loaded_tokens", "transport", "tcp", ""),
    "load_bytes": ("vllm:kvstore_bytes", "direction", "load", "KV bytes moved, by direction."),
    "save_bytes": ("vllm:kvstore_bytes", "direction", "save", ""),
    "load_s": ("vllm:kvstore_transfer_seconds", "direction", "load",
               "Worker seconds spent moving KV, by direction."),
    "save_s": ("vllm:kvstore_transfer_seconds", "direction", "save", ""),
    "saved_blocks": ("vllm:kvstore_saved_blocks", None, None, "Blocks newly written to the pool."),
    "num_failed_saves": ("vllm:kvstore_save_failures", None, None,
                         "Steps whose saves were skipped or failed (future misses)."),
    "announced_blocks": ("vllm:kvstore_event_blocks", "event", "stored",
                         "Blocks announced to routers as KV events (medium CPU)."),
    "retracted_blocks": ("vllm:kvstore_event_blocks", "event", "removed", ""),
}
COUNTERS = tuple(_METRICS)


@dataclass
class KVStoreStats(KVConnectorStats):
    """Counters (ints, and float seconds) keyed by the names in COUNTERS; absent means zero."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.data) - set(COUNTERS))
        if unknown:
            raise ValueError(f"unknown kvstore stats {unknown}; known: {list(COUNTERS)}")
        for key, value in self.data.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"kvstore stat {key!r} must be a non-negative number, "
                                 f"not {value!r}")

    def add(self, **counts: float) -> None:
        """Add to counters; add(pool_tokens=64, num_requests=1)."""
        for key, value in counts.items():
            if key not in _METRICS:
                raise ValueError(f"unknown kvstore stat {key!r}")
            if value:
                self.data[key] = self.data.get(key, 0) + value

    def reset(self) -> None:
        self.data = {}

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def aggregate(self, other: KVConnectorStats) -> KVStoreStats:
        """Sum other's counters into these (vLLM keeps the object this returns)."""
        assert isinstance(other, KVStoreStats), f"cannot add {type(other).__name__} to kvstore"
        self.add(**other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        """The interval's totals, plus the ratios a log line needs."""
        out: dict[str, int | float] = {k: self.data[k] for k in COUNTERS if self.data.get(k)}
        prefill = sum(self.data.get(k, 0) for k in ("vram_tokens", "pool_tokens",
                                                    "recomputed_tokens"))
        if prefill:
            out["pool_token_share"] = round(self.data.get("pool_tokens", 0) / prefill, 4)
        load_s = self.data.get("load_s", 0)
        if load_s:
            out["load_gb_per_s"] = round(self.data.get("load_bytes", 0) / load_s / 1e9, 3)
        return out


class KVStorePromMetrics(KVConnectorPromMetrics):
    """Prometheus counters named vllm:kvstore_*, fed from the stats dict of each engine step."""

    def __init__(self, vllm_config: Any, metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        metrics: dict[str, Any] = {}
        self._counters: dict[tuple[str, int], Any] = {}  # (counter, engine) -> labelled child
        for key, (name, label, value, doc) in _METRICS.items():
            if name not in metrics:
                extra = [label] if label else []
                metrics[name] = self._counter_cls(name=name, documentation=doc,
                                                  labelnames=labelnames + extra)
            for engine, values in per_engine_labelvalues.items():
                labels = [*values, value] if label else list(values)
                self._counters[key, engine] = metrics[name].labels(*labels)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in (transfer_stats_data or {}).items():
            counter = self._counters.get((key, engine_idx))
            if counter is not None and value:
                counter.inc(value)

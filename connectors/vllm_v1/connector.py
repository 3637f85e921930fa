"""KVStoreConnector: vLLM's KVConnectorBase_V1, a thin facade over the scheduler and worker halves.

    kv_transfer_config = {
        "kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "connectors.vllm_v1.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"epoch": 0},  # address: the default daemon (ipc)
    }

With vLLM's stats on, its KV connector stats carry prompt tokens per tier and load/save counters
(stats.py; Prometheus names vllm:kvstore_*). With its KV cache events on (kv_events_config), the
blocks the pool holds are published as BlockStored/BlockRemoved with medium "CPU" (events.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from connectors.vllm_v1.config import ConnectorConfig, make_namespace, make_namespaces
from connectors.vllm_v1.events import PoolEvents
from connectors.vllm_v1.metadata import KVStoreMetadata, KVStoreWorkerMeta
from connectors.vllm_v1.scheduler_side import SchedulerSide
from connectors.vllm_v1.stats import KVStorePromMetrics, KVStoreStats
from connectors.vllm_v1.worker_side import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.config.kv_transfer import KVTransferConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvstore.connector")


def _log_through_vllm() -> None:
    """vLLM configures only its own "vllm" logger (when it starts an engine): without this, the
    connector's INFO lines (the namespace at startup) were dropped unless the application
    configured logging itself."""
    vllm_log = logging.getLogger("vllm")
    if log.handlers or logging.getLogger().handlers or not vllm_log.handlers:
        return
    for handler in vllm_log.handlers:
        log.addHandler(handler)
    log.setLevel(vllm_log.level)
    log.propagate = False


class KVStoreConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        _log_through_vllm()
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        config = ConnectorConfig.from_extra(dict(extra))
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            log.warning("kvstore: set kv_load_failure_policy=recompute, or a daemon failure "
                        "fails requests instead of recomputing them")
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        block_size = vllm_config.cache_config.block_size
        events_config = vllm_config.kv_events_config
        has_events = bool(events_config and events_config.enable_kv_cache_events)
        if role == KVConnectorRole.SCHEDULER:
            # Every rank stores its own shard: claim only what all of them hold.
            parallel = vllm_config.parallel_config
            num_ranks = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
            namespaces = make_namespaces(vllm_config, config, range(num_ranks), log_factors=True)
            events = PoolEvents(block_size) if has_events else None
            # A CPU engine loads same-host hits inside the step that prefills them (worker_side.py).
            device_type = getattr(vllm_config.device_config, "device_type", "")
            in_step = device_type == "cpu" and not config.background_loads
            self._scheduler = SchedulerSide(config, namespaces[0], block_size, events, namespaces,
                                            load_in_step=in_step)
        else:
            rank = _rank()
            self._worker = WorkerSide(config, make_namespace(vllm_config, config, rank), block_size,
                                      rank=rank, is_first_rank=rank == 0,
                                      report_saves=has_events)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss, never an error

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: KVTransferConfig) -> bool:
        # vLLM 0.33+: the worker half drops its views of the KV cache when sleep unmaps it and
        # retakes them on wake-up (unregister_kv_caches / restore_kv_caches below).
        return True

    # --- scheduler side ------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None, "scheduler hook called on a worker"
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        assert self._scheduler is not None, "scheduler hook called on a worker"
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None, "scheduler hook called on a worker"
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self._scheduler is not None, "scheduler hook called on a worker"
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None, "scheduler hook called on a worker"
        return self._scheduler.request_finished(request)

    def take_events(self) -> Iterable[KVCacheEvent]:
        assert self._scheduler is not None, "scheduler hook called on a worker"
        return self._scheduler.take_events()

    # --- both sides: stats -----------------------------------------------------------------------
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        side = self._scheduler if self._scheduler is not None else self._worker
        assert side is not None
        return side.take_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats:
        return KVStoreStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig,
                           metric_types: dict[type[PromMetric], type[PromMetricT]],
                           labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVStorePromMetrics:
        return KVStorePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # --- worker side ---------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None, "worker hook called on the scheduler"
        self._worker.register_kv_caches(kv_caches)

    # vLLM 0.33+ sleep mode; never called by 0.32. On workers only, but harmless elsewhere.
    def unregister_kv_caches(self) -> None:
        if self._worker is not None:
            self._worker.unregister_kv_caches()

    def restore_kv_caches(self) -> None:
        if self._worker is not None:
            self._worker.restore_kv_caches()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None, "worker hook called on the scheduler"
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreMetadata)
        self._worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: a request runs only after its load has finished

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return  # whole blocks are saved in wait_for_save, once every layer is written

    def wait_for_save(self) -> None:
        assert self._worker is not None, "worker hook called on the scheduler"
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreMetadata)
        self._worker.save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None, "worker hook called on the scheduler"
        return None, self._worker.get_finished() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None, "worker hook called on the scheduler"
        return self._worker.take_failed_block_ids()

    def build_connector_worker_meta(self) -> KVStoreWorkerMeta | None:
        assert self._worker is not None, "worker hook called on the scheduler"
        return self._worker.take_worker_meta()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()


def _rank() -> int:
    """This worker's rank among the ones that hold different shards of a block: the TP rank, and
    with pipeline parallelism pp_rank * tp_size + tp_rank (stages hold different layers, so they
    must not share a namespace). 0 outside a distributed setup."""
    try:
        from vllm.distributed.parallel_state import (
            get_pp_group,
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        tp_rank = int(get_tensor_model_parallel_rank())
    except Exception:  # not initialized (single process, tests)
        return 0
    try:
        pp_rank = int(get_pp_group().rank_in_group)
    except Exception:  # no pipeline group: one stage
        pp_rank = 0
    return pp_rank * int(get_tensor_model_parallel_world_size()) + tp_rank

"""Connector settings (from kv_connector_extra_config) and the namespace of a model's KV bytes.

Two replicas may exchange blocks only when every input below agrees; anything that changes the
bytes of a block without changing vLLM's block hash belongs in the namespace (DESIGN.md, Keys).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from connectors.vllm_v1.identity import describe, model_identity
from connectors.common import checked_setting
from kvstore.client import DEFAULT_ADDRESS
from kvstore.keys import Namespace, namespace_digest, with_tenant

log = logging.getLogger("kvstore.connector")


@dataclass(slots=True, frozen=True)
class ConnectorConfig:
    address: str = DEFAULT_ADDRESS  # the default daemon of this uid on this host (ipc)
    timeout_ms: int = 1000  # one daemon call
    lookup_timeout_ms: int = 200  # scheduler: give up a lookup and report a miss after this
    lookup_wait_ms: int = 5  # scheduler: wait this long for a lookup before asking again later
    load_timeout_ms: int = 5000  # worker: a request's whole load, after which vLLM recomputes
    lease_ms: int = 30_000  # how long the daemon pins hits for a scheduled load
    save_timeout_ms: int = 200  # one save call; saves run inside vLLM's step, keep this short
    retry_interval_ms: int = 1000  # after a failure, skip the daemon this long (doubling to 32x)
    epoch: int = 0  # bump to retire every block of the previous model version
    use_shm: bool = True  # use the shared segment when on the daemon's host
    save: bool = True  # store newly computed full blocks
    curve_keys: str | None = None  # client keys from `kvstore keygen`
    namespace: str = ""  # extra operator-chosen identity (e.g. a weights revision)
    tenant: str = ""  # the daemon's tenant (DIR/tenants.toml) whose namespaces this model uses
    # A CPU engine copies a same-host hit inside the step that prefills it (worker_side.py);
    # True loads it in the background instead, a step or two before its prefill, as under
    # CUDA (where each copy only queues a DMA).
    background_loads: bool = False
    # Fault injection for tests only: wait this long before each load, so a test can kill the
    # daemon between a lookup that hit and the load that follows it.
    fault_load_delay_ms: int = 0

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> ConnectorConfig:
        """Build from kv_connector_extra_config, rejecting unknown keys and bad types."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ValueError(f"unknown kvstore connector settings {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in extra.items():
            values[key] = checked_setting(f"kvstore setting {key!r}", value, getattr(cls(), key))
        with_tenant(values.get("tenant", ""), b"")  # a bad tenant: ValueError naming what is allowed
        return cls(**values)


def make_namespace(vllm_config: Any, config: ConnectorConfig, rank: int = 0) -> Namespace:
    """The namespace of this model's blocks for one tensor/pipeline-parallel rank."""
    return make_namespaces(vllm_config, config, [rank])[0]


def make_namespaces(vllm_config: Any, config: ConnectorConfig, ranks: Iterable[int],
                    log_factors: bool = False) -> list[Namespace]:
    """The namespaces of several ranks, from one reading of the model identity; with
    log_factors, one INFO line names the first and every factor it was made from."""
    identity = model_identity(vllm_config, config.namespace)
    namespaces = []
    for rank in ranks:
        digest = namespace_digest({**identity, "rank": rank})
        namespaces.append(Namespace(with_tenant(config.tenant, digest), config.epoch))
        if log_factors and len(namespaces) == 1:
            shown = f"{config.tenant}/{digest.hex()}" if config.tenant else digest.hex()
            log.info("kvstore: namespace %s epoch %d from %s rank=%d", shown, config.epoch,
                     describe(identity), rank)
    return namespaces

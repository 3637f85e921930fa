"""What the scheduler side tells the worker side each step (pickled by vLLM; plain data only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(slots=True)
class LoadSpec:
    """Copy the pooled blocks of hashes into vLLM blocks block_ids, under the scheduler's lease."""

    req_id: str
    hashes: list[bytes]
    block_ids: list[int]
    lease: int | None


@dataclass(slots=True)
class SaveSpec:
    """Store vLLM blocks block_ids, newly full this step, as hashes (parents[i] is i's parent)."""

    req_id: str
    hashes: list[bytes]
    parents: list[bytes | None]
    block_ids: list[int]


@dataclass
class KVStoreMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)

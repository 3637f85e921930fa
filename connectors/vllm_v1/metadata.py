"""What the scheduler and worker halves tell each other each step (pickled by vLLM; plain data)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass(slots=True)
class LoadSpec:
    """Copy the pooled blocks of hashes into vLLM blocks block_ids, under the scheduler's leases:
    leases[rank] pins them in that tensor-parallel rank's namespace (None: no lease).

    slots[rank], when the lookup asked for them: (offset, nbytes) of each block in the daemon's
    segment of that token, so a worker on its host copies and releases, with no GET.

    in_step: copy in this step, before the forward pass that uses the blocks (vLLM's
    synchronous load), not on the loader thread; only ever with slots."""

    req_id: str
    hashes: list[bytes]
    block_ids: list[int]
    leases: list[int | None]
    slots: list[list[tuple[int, int]] | None] = field(default_factory=list)
    token: bytes | None = None
    in_step: bool = False


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


@dataclass
class KVStoreWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler after a step: which planned blocks the pool now holds (saved), which
    it may not (dropped: failed, skipped or refused for space), and how many leading blocks each
    in-step load filled (loaded: req_id -> blocks; the rest vLLM recomputes)."""

    saved: list[bytes] = field(default_factory=list)
    dropped: list[bytes] = field(default_factory=list)
    loaded: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVStoreWorkerMeta:
        assert isinstance(other, KVStoreWorkerMeta), f"cannot merge {type(other).__name__}"
        self.saved.extend(other.saved)
        self.dropped.extend(other.dropped)
        for req_id, num in other.loaded.items():  # every rank loads its shard: the least counts
            self.loaded[req_id] = min(num, self.loaded.get(req_id, num))
        return self

    def is_empty(self) -> bool:
        return not self.saved and not self.dropped and not self.loaded

"""What the pool holds for this namespace, told to routers as vLLM KV cache events (medium CPU).

Pure bookkeeping: the scheduler half reports what it learns (saves the worker confirmed, lookup
hits and misses) and vLLM takes the events each step and publishes them next to its own GPU-tier
events, with the same hash encoding, so a router merges both tiers under one key. The daemon does
not push evictions: a block is retracted when a lookup finds it gone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_events import MEDIUM_CPU, BlockRemoved, BlockStored, KVCacheEvent
from vllm.v1.core.kv_cache_utils import BlockHash, ExternalBlockHash, maybe_convert_block_hash

# Blocks remembered as announced (~150 bytes each with the dict entry: ~10 MB). Past this the
# oldest is retracted, so a router never holds a block this replica could not later retract.
MAX_TRACKED_BLOCKS = 1 << 16


@dataclass(slots=True, frozen=True)
class BlockInfo:
    """What a BlockStored event says about one block besides its hash."""

    parent: bytes | None
    token_ids: tuple[int, ...]
    lora_id: int | None = None
    lora_name: str | None = None


def block_info(request: Any, index: int, block_size: int) -> BlockInfo:
    """The event payload of request's block index (vllm.v1.request.Request fields)."""
    lora = request.lora_request
    start = index * block_size
    return BlockInfo(
        bytes(request.block_hashes[index - 1]) if index else None,
        tuple(request.all_token_ids[start:start + block_size]),
        lora.adapter_id if lora else None,
        lora.name if lora else None)


class PoolEvents:
    """Announces each pooled block once (until it is retracted) and queues the events."""

    def __init__(self, block_size: int, max_blocks: int = MAX_TRACKED_BLOCKS) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be at least 1")
        self.block_size = block_size
        self.max_blocks = max_blocks
        self._announced: OrderedDict[bytes, None] = OrderedDict()  # oldest first
        self._events: list[KVCacheEvent] = []

    def touch(self, block_hash: bytes) -> bool:
        """Record that the pool still holds block_hash; returns whether routers know it."""
        if block_hash not in self._announced:
            return False
        self._announced.move_to_end(block_hash)
        return True

    def stored(self, blocks: Sequence[tuple[bytes, BlockInfo]]) -> int:
        """The pool holds these blocks; returns how many were new to routers."""
        run: list[tuple[bytes, BlockInfo]] = []
        num_new = 0
        for block_hash, info in blocks:
            if block_hash in self._announced:
                self._announced.move_to_end(block_hash)
                continue
            self._announced[block_hash] = None
            num_new += 1
            # One event per chain run, as vLLM's block pool sends them: a block whose parent is
            # the previous block of the run (and with the same LoRA) joins that run.
            if run and (info.parent != run[-1][0] or info.lora_id != run[-1][1].lora_id):
                self._events.append(self._stored_event(run))
                run = []
            run.append((block_hash, info))
        if run:
            self._events.append(self._stored_event(run))
        self._forget_oldest()
        return num_new

    def removed(self, hashes: Iterable[bytes]) -> int:
        """The pool no longer holds these blocks; returns how many routers were told of."""
        gone = [h for h in hashes if h in self._announced]
        for block_hash in gone:
            del self._announced[block_hash]
        if gone:
            self._events.append(_removed_event(gone))
        return len(gone)

    def take(self) -> list[KVCacheEvent]:
        """The events queued since the last call."""
        events, self._events = self._events, []
        return events

    def _forget_oldest(self) -> None:
        overflow = len(self._announced) - self.max_blocks
        if overflow > 0:
            oldest = [self._announced.popitem(last=False)[0] for _ in range(overflow)]
            self._events.append(_removed_event(oldest))

    def _stored_event(self, run: list[tuple[bytes, BlockInfo]]) -> BlockStored:
        first = run[0][1]
        return BlockStored(
            block_hashes=[_external(h) for h, _ in run],
            parent_block_hash=_external(first.parent) if first.parent is not None else None,
            token_ids=[t for _, info in run for t in info.token_ids],
            block_size=self.block_size,
            lora_id=first.lora_id,
            medium=MEDIUM_CPU,
            lora_name=first.lora_name,
            group_idx=0,  # the connector moves one KV cache group (full attention)
        )


def _removed_event(hashes: list[bytes]) -> BlockRemoved:
    return BlockRemoved(block_hashes=[_external(h) for h in hashes], medium=MEDIUM_CPU,
                        group_idx=0)


def _external(block_hash: bytes) -> ExternalBlockHash:
    """The hash as vLLM's GPU tier publishes it (an int of the low 64 bits unless
    VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0), so routers key both tiers alike."""
    return maybe_convert_block_hash(BlockHash(block_hash))

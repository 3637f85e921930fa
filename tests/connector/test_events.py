"""KV cache events for the pool tier: vLLM's own event classes and hash encoding, one
announcement per block until it is retracted, and a bounded memory of what was announced."""

from __future__ import annotations

import hashlib

import msgspec
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from connectors.vllm_v1.events import BlockInfo, PoolEvents

BLOCK = 4


def chain(n: int, seed: bytes = b"") -> list[tuple[bytes, BlockInfo]]:
    """n chained blocks: block i's parent is block i - 1, its tokens are 4 ids."""
    blocks, parent = [], None
    for i in range(n):
        h = hashlib.sha256((parent or seed) + bytes([i])).digest()
        blocks.append((h, BlockInfo(parent, tuple(range(i * BLOCK, (i + 1) * BLOCK)))))
        parent = h
    return blocks


def test_stored_blocks_become_one_cpu_event_per_chain_run() -> None:
    """A chain is one BlockStored (parent of its first block, all its tokens); hashes use vLLM's
    encoding (by default the low 64 bits of the digest as an int), like the GPU tier's events."""
    events = PoolEvents(BLOCK)
    blocks = chain(4)
    assert events.stored(blocks[1:]) == 3
    [event] = events.take()
    assert isinstance(event, BlockStored)
    assert event.medium == "CPU" and event.block_size == BLOCK
    assert event.block_hashes == [maybe_convert_block_hash(h) for h, _ in blocks[1:]]
    assert event.block_hashes[0] == int.from_bytes(blocks[1][0], "big") & (2**64 - 1)
    assert event.parent_block_hash == maybe_convert_block_hash(blocks[0][0])
    assert event.token_ids == list(range(BLOCK, 4 * BLOCK))
    assert events.take() == []  # taken once


def test_a_block_is_announced_once_until_removed() -> None:
    events = PoolEvents(BLOCK)
    blocks = chain(3)
    events.stored(blocks)
    events.take()
    assert events.stored(blocks) == 0
    assert events.take() == []
    assert events.removed([h for h, _ in blocks[1:]] + [b"never-announced"]) == 2
    [removed] = events.take()
    assert isinstance(removed, BlockRemoved) and removed.medium == "CPU"
    assert removed.block_hashes == [maybe_convert_block_hash(h) for h, _ in blocks[1:]]
    assert events.removed([h for h, _ in blocks[1:]]) == 0  # not announced any more
    assert events.stored(blocks) == 2  # back in the pool: announced again
    [again] = events.take()
    assert again.block_hashes == removed.block_hashes


def test_unrelated_blocks_start_a_new_event() -> None:
    events = PoolEvents(BLOCK)
    a, b = chain(2, b"a"), chain(2, b"b")
    events.stored(a + b)
    runs = events.take()
    assert [len(e.block_hashes) for e in runs] == [2, 2]
    assert [e.parent_block_hash for e in runs] == [None, None]


def test_memory_is_bounded_and_forgotten_blocks_are_retracted() -> None:
    """Past max_blocks the least recently seen blocks are retracted, so a router never keeps a
    block this replica could no longer retract."""
    events = PoolEvents(BLOCK, max_blocks=3)
    blocks = chain(5)
    events.stored(blocks[:3])
    assert events.touch(blocks[0][0])  # seen again: now the most recent
    events.take()
    events.stored(blocks[3:])
    stored, removed = events.take()
    assert isinstance(stored, BlockStored) and isinstance(removed, BlockRemoved)
    assert removed.block_hashes == [maybe_convert_block_hash(h) for h, _ in blocks[1:3]]
    assert [events.touch(h) for h, _ in blocks] == [True, False, False, True, True]


def test_events_decode_as_a_subscriber_decodes_them() -> None:
    """Encoded in a KVEventBatch as vLLM's publisher does, they decode back to the same events."""
    events = PoolEvents(BLOCK)
    blocks = chain(2)
    events.stored(blocks)
    events.removed([blocks[1][0]])
    batch = KVEventBatch(ts=1.0, events=events.take())
    decoded = msgspec.msgpack.Decoder(type=KVEventBatch).decode(msgspec.msgpack.encode(batch))
    assert decoded.events == batch.events

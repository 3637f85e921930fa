"""The daemon prefaults its own mapping of the pool on a thread (kvstore/pool.py): the whole
segment is mapped in the end, the bytes are untouched, and close() mid-way stops it and
unmaps."""

from __future__ import annotations

import time
import uuid

from kvstore.pool import HEADER_BYTES, Pool


def _pool(num_bytes: int) -> Pool:
    return Pool.create(f"kvstore-test-{uuid.uuid4().hex[:12]}", num_bytes)


def test_the_whole_pool_is_prefaulted_and_its_bytes_kept() -> None:
    pool = _pool(HEADER_BYTES + (64 << 20))
    try:
        pool.buffer[HEADER_BYTES:HEADER_BYTES + 5] = b"kept!"
        pool.prefault_in_background()
        deadline = time.monotonic() + 30
        while pool.prefaulted_bytes < pool.size_bytes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.prefaulted_bytes == pool.size_bytes
        assert bytes(pool.buffer[HEADER_BYTES:HEADER_BYTES + 5]) == b"kept!"
    finally:
        pool.close()


def test_close_during_the_prefault_stops_it_and_unmaps() -> None:
    pool = _pool(HEADER_BYTES + (1 << 30))
    pool.prefault_in_background()
    started = time.monotonic()
    pool.close()
    assert time.monotonic() - started < 5.0
    assert pool.prefaulted_bytes < pool.size_bytes  # stopped before the end (1 GiB: ~0.3 s)
    assert pool._map.closed  # the thread's export was let go: the mapping is gone

"""Client.writing(): one write API over both transports (issue 11, item 4). A clean exit stores
the blocks; an error stores nothing and leaves nothing reserved."""

from __future__ import annotations

import pytest

from bench.daemon import Daemon
from kvstore.client import Client
from kvstore.keys import Namespace

NS = Namespace(b"writing-test")
BLOCK_BYTES = 4096


def rows(seed: bytes, n: int) -> list[tuple[bytes, bytes | None, int]]:
    hashes = [seed + bytes([i]) for i in range(n)]
    return [(h, p, BLOCK_BYTES) for h, p in zip(hashes, [None, *hashes[:-1]])]


@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
def test_a_clean_exit_stores_and_an_error_stores_nothing(daemon: Daemon, use_shm: bool) -> None:
    with Client(daemon.address, 2.0, use_shm=use_shm) as client:
        blocks = rows(b"ok", 3)
        with client.writing(NS, blocks) as w:
            assert all(d is not None and len(d) == BLOCK_BYTES for d in w.dests)
            assert bool(w.refs) == use_shm
            for i, dest in enumerate(w.dests):
                assert dest is not None
                dest[:] = bytes([i + 1]) * BLOCK_BYTES
        assert w.result is not None and w.result.num_stored == 3 and w.num_done == 3
        assert client.get(NS, [h for h, _, _ in blocks]) == [bytes([i + 1]) * BLOCK_BYTES
                                                              for i in range(3)]
        with client.writing(NS, blocks) as again:  # present: nothing to write
            assert again.dests == [None] * 3 or not use_shm
        assert again.result is not None and again.result.num_stored == 0

        failed = rows(b"err", 2)
        with pytest.raises(RuntimeError, match="copy failed"):
            with client.writing(NS, failed) as w:
                raise RuntimeError("copy failed")
        assert w.result is None
        assert client.lookup(NS, [h for h, _, _ in failed]).num_hits == 0
        stats = client.stats()
        assert stats["num_reserved"] == 0 and stats["num_fenced"] == 0


@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
def test_reading_gives_the_blocks_and_ends_the_lease_on_both_transports(
        daemon: Daemon, use_shm: bool) -> None:
    """Client.reading(): the stored prefix, one buffer per block; a lookup's lease ends at the
    exit whichever transport read it (a TCP GET used to keep it, a shared-memory one not)."""
    blocks = rows(b"read", 3)
    hashes = [h for h, _, _ in blocks]
    with Client(daemon.address, 2.0, use_shm=use_shm) as client:
        client.put(NS, [(h, p, bytes([i + 7]) * n) for i, (h, p, n) in enumerate(blocks)])
        found = client.lookup(NS, [*hashes, b"absent"], lease_ms=30_000)
        assert found.num_hits == 3 and client.stats()["num_leases"] == 1
        with client.reading(NS, hashes, found.lease) as got:
            assert [bytes(b) for b in got] == [bytes([i + 7]) * BLOCK_BYTES for i in range(3)]
        assert client.stats()["num_leases"] == 0
        with client.reading(NS, [b"absent"]) as none:
            assert none == []


def test_bench_gpu_copys_slot_tensors_are_the_written_slots(daemon: Daemon) -> None:
    """bench.gpu_copy's save path (GPU-only as a whole) writes through Client.writing(): what
    goes into its slot tensors is what a reader gets after the block; an error stores nothing."""
    import torch

    from bench.gpu_copy import slot_tensors

    hashes = [bytes([i]) * 32 for i in range(3)]
    with Client(daemon.address, 2.0) as client:
        with slot_tensors(client, NS, hashes, BLOCK_BYTES) as (pool, slots):
            assert len(slots) == 3 and pool.numel() >= 3 * BLOCK_BYTES
            for i, slot in enumerate(slots):
                slot.fill_(i + 1)
        assert client.get(NS, hashes) == [bytes([i + 1]) * BLOCK_BYTES for i in range(3)]
        failed = [bytes([9, i]) * 16 for i in range(2)]
        with pytest.raises(RuntimeError, match="gather failed"):
            with slot_tensors(client, NS, failed, BLOCK_BYTES):
                raise RuntimeError("gather failed")
        assert client.lookup(NS, failed).num_hits == 0
        assert client.stats()["num_reserved"] == 0
    if not torch.cuda.is_available():
        from bench import gpu_copy
        assert gpu_copy.main() == 0  # says it needs CUDA and writes no result

"""The worker's copy path with CUDA tensors and a page-locked (cudaHostRegister'ed) segment.

Skipped without CUDA; run on a GPU machine with `pytest tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch

from connectors.vllm_v1.blocks import PagedKV
from connectors.vllm_v1.worker_side import _register_host_memory
from kvstore.client import Client
from kvstore.keys import Namespace
from bench.daemon import Daemon

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_blocks_round_trip_between_gpu_kv_cache_and_registered_pool() -> None:
    """Blocks saved from CUDA KV pages into pool slots load back into other pages byte-identical."""
    num_blocks, layers = 8, 4
    kv = {f"layer.{i}": torch.randn(num_blocks, 2, 16, 256, device="cuda") for i in range(layers)}
    paged = PagedKV(kv)
    daemon = Daemon(pool_size="64MiB").start()
    try:
        with Client(daemon.address) as client:
            assert client.has_shm()
            ns = Namespace(b"gpu-test")
            hashes = [bytes([i]) * 32 for i in range(4)]
            refs, _ = client.reserve(ns, [(h, None, paged.block_bytes) for h in hashes])
            assert client.pool is not None
            pool = torch.frombuffer(client.pool.buffer, dtype=torch.int8)
            registered: set[int] = set()
            _register_host_memory(pool, registered)
            assert registered, "cudaHostRegister failed"
            for block_id, ref in enumerate(refs):
                assert ref is not None
                paged.gather(block_id, pool[ref.slot:ref.slot + ref.nbytes])
            torch.cuda.synchronize()
            client.commit(ns, [(h, r) for h, r in zip(hashes, refs) if r is not None])
            with client.pinned(ns, hashes) as pinned:
                for i, ref in enumerate(pinned):
                    paged.scatter(4 + i, pool[ref.slot:ref.slot + ref.nbytes])
                torch.cuda.synchronize()
        for layer in kv.values():
            assert torch.equal(layer[:4], layer[4:])
    finally:
        daemon.stop()

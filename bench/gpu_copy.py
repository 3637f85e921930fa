"""GPU copy path: 256 blocks of 2 MiB between CUDA KV pages and a cudaHostRegister'ed pool
segment, against a plain pinned-tensor copy of the same bytes. Needs CUDA (a lent GPU machine).

    python -m bench.gpu_copy

Writes bench/results/gpu_copy.json. Exits with a message and no result without CUDA.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kvstore.client import Client
from kvstore.keys import Namespace

RESULTS = Path(__file__).parent / "results" / "gpu_copy.json"
NUM_BLOCKS = 256
LAYERS = 32  # Llama-3-8B: 32 layers x 8 KV heads x 128 x K,V x bf16 x 16 tokens = 2 MiB a block
PAGE_SHAPE = (8, 16, 256)  # [KV heads, tokens, K+V head size] in bf16 = 64 KiB per layer


def timed(fn, repeats: int = 5) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextmanager
def slot_tensors(client: Client, ns: Namespace, hashes: list[bytes],
                 block_bytes: int) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """The whole pool segment and one int8 tensor per reserved slot of a write of hashes (same
    host): fill them inside the block; Client.writing() commits them at a clean exit and gives
    them back on an error. Every block must get a slot (a bench pool sized to hold them all)."""
    with client.writing(ns, [(h, None, block_bytes) for h in hashes]) as w:
        assert client.pool is not None, "slot_tensors needs the daemon's shared segment"
        assert all(r is not None for r in w.refs), "the pool refused a block: size it larger"
        pool = torch.frombuffer(client.pool.buffer, dtype=torch.int8)
        yield pool, [pool[r.slot:r.slot + r.nbytes] for r in w.refs if r is not None]


def main() -> int:
    if not torch.cuda.is_available():
        print("bench.gpu_copy: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 0
    from bench.daemon import Daemon
    from bench.machine import describe
    from connectors.vllm_v1.blocks import PagedKV
    from connectors.vllm_v1.worker_side import _register_host_memory

    kv = {f"l{i}": torch.randn(NUM_BLOCKS * 2, *PAGE_SHAPE, device="cuda", dtype=torch.bfloat16)
          for i in range(LAYERS)}
    paged = PagedKV(kv)
    total = NUM_BLOCKS * paged.block_bytes
    daemon = Daemon(pool_size=f"{int(total * 1.3) >> 20}MiB").start()
    try:
        with Client(daemon.address, timeout_s=10) as client:
            hashes = [i.to_bytes(32, "big") for i in range(NUM_BLOCKS)]
            with slot_tensors(client, Namespace(b"gpu-bench"), hashes,
                              paged.block_bytes) as (pool, slots):
                registered: set[int] = set()
                _register_host_memory(pool, registered)
                save_s = timed(lambda: [paged.gather(b, s) for b, s in enumerate(slots)])
                load_s = timed(lambda: [paged.scatter(NUM_BLOCKS + b, s)
                                        for b, s in enumerate(slots)])
            pinned = torch.empty(NUM_BLOCKS, paged.block_bytes, dtype=torch.int8, pin_memory=True)
            flat = torch.cat([layer[:NUM_BLOCKS].view(torch.int8).flatten(1)
                              for layer in paged.layers], 1)
            d2h_s = timed(lambda: pinned.copy_(flat, non_blocking=True))
            h2d_s = timed(lambda: flat.copy_(pinned, non_blocking=True))
    finally:
        daemon.stop()
    result = {
        "save_vs_pinned_d2h": d2h_s / save_s, "load_vs_pinned_h2d": h2d_s / load_s,
        "gbps": {"save": total / save_s / 1e9, "load": total / load_s / 1e9,
                 "pinned_d2h": total / d2h_s / 1e9, "pinned_h2d": total / h2d_s / 1e9},
        "registered": bool(registered), "blocks": NUM_BLOCKS, "block_bytes": paged.block_bytes,
        "machine": describe(["torch"]), "gpu": torch.cuda.get_device_name(),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

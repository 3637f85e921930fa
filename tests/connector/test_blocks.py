"""Whole-block copies between vLLM-shaped KV pages and flat byte buffers."""

from __future__ import annotations

import torch

from connectors.vllm_v1.blocks import PagedKV

B, L, H, N, C = 10, 12, 2, 4, 8  # blocks, layers (>= 10: name order != address order), ...
PAGE = H * N * C * 4


def shared_layers() -> dict[str, torch.Tensor]:
    """Like vLLM 0.32: one int8 allocation, one float32 [B, H, N, C] view per layer."""
    buf = torch.zeros(L * B * PAGE, dtype=torch.int8)
    layers = {f"model.layers.{i}.attn": buf[i * B * PAGE:(i + 1) * B * PAGE]
              .view(torch.float32).view(B, H, N, C) for i in range(L)}
    for t in layers.values():
        t.copy_(torch.randn_like(t))
    return layers


def expected_bytes(layers: dict[str, torch.Tensor], block_id: int) -> torch.Tensor:
    ordered = sorted(layers.values(), key=lambda t: t.data_ptr())
    return torch.cat([t[block_id].reshape(-1).view(torch.int8) for t in ordered])


def test_shared_allocation_moves_a_block_in_one_strided_view() -> None:
    """Layers in one allocation: gather gives every layer's page in address order; scatter
    writes them back into another block."""
    layers = shared_layers()
    kv = PagedKV(layers)
    assert kv.blocks is not None
    out = torch.empty(kv.block_bytes, dtype=torch.int8)
    kv.gather(3, out)
    assert torch.equal(out, expected_bytes(layers, 3))
    kv.scatter(7, out)
    assert all(torch.equal(t[7], t[3]) for t in layers.values())


def test_separate_allocations_fall_back_to_per_layer_copies() -> None:
    """Layers in separate tensors are still copied whole, one page per layer."""
    layers = {f"l{i}": torch.randn(B, H, N, C) for i in range(3)}
    kv = PagedKV(layers)
    assert kv.blocks is None
    out = torch.empty(kv.block_bytes, dtype=torch.int8)
    kv.gather(2, out)
    assert torch.equal(out, expected_bytes(layers, 2))
    kv.scatter(5, out)
    assert all(torch.equal(t[5], t[2]) for t in layers.values())


def test_many_blocks_land_each_in_its_own_block_in_either_layout() -> None:
    """scatter_many (a load's batch) puts each source into the block of the same place, out of
    order and from slices of one pool buffer, and touches no other block."""
    for layers in (shared_layers(), {f"l{i}": torch.randn(B, H, N, C) for i in range(3)}):
        kv = PagedKV(layers)
        sources = [expected_bytes(layers, b) for b in (1, 2, 3)]
        pool = torch.cat([torch.zeros(5, dtype=torch.int8), *sources])  # unaligned offsets
        views = [pool[5 + i * kv.block_bytes:5 + (i + 1) * kv.block_bytes] for i in range(3)]
        untouched = expected_bytes(layers, 0)
        kv.scatter_many([9, 4, 6], views)
        assert [torch.equal(expected_bytes(layers, b), s)
                for b, s in zip((9, 4, 6), sources)] == [True, True, True]
        assert torch.equal(expected_bytes(layers, 0), untouched)

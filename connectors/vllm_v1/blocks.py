"""Whole-block copies between vLLM's paged KV cache and flat byte buffers (pool slots).

A pooled block is the concatenation, layer by layer, of that block's page in every KV-cache
layer, copied as opaque bytes: the page layout differs per attention backend and CPU ISA, and
the namespace guarantees only identical layouts ever exchange bytes.
"""

from __future__ import annotations

import torch

SCATTER_BATCH = 32  # blocks per scatter_many call of a load (64 MiB of 2 MiB blocks)


class PagedKV:
    """Byte views of vLLM's KV-cache pages, one [num_blocks, page_bytes] int8 view per layer."""

    def __init__(self, kv_caches: dict[str, torch.Tensor]) -> None:
        seen: set[tuple[int, tuple[int, ...]]] = set()
        self.layers: list[torch.Tensor] = []
        # In address order: deterministic for replicas with the same config, and the order in
        # which vLLM lays layers out in its one allocation (see _block_view).
        for name, tensor in sorted(kv_caches.items(), key=lambda kv: kv[1].data_ptr()):
            key = (tensor.data_ptr(), tuple(tensor.shape))
            if key in seen:
                continue  # layers sharing one KV cache (cross-layer sharing) are copied once
            seen.add(key)
            self.layers.append(_page_view(name, tensor))
        if not self.layers:
            raise ValueError("vLLM registered no KV-cache layers")
        self.num_blocks = self.layers[0].shape[0]
        self.page_bytes = [layer.shape[1] for layer in self.layers]
        self.block_bytes = sum(self.page_bytes)
        self.device = self.layers[0].device
        # vLLM 0.32 puts every layer in one allocation at a fixed layer stride: then a block's
        # pages across all layers are one strided view, and a block moves in one copy_ call
        # instead of one per layer (each call releases and re-takes the GIL).
        self.blocks = _block_view(self.layers)

    def gather(self, block_id: int, dest: torch.Tensor) -> None:
        """Copy vLLM block block_id into dest (block_bytes int8 bytes)."""
        if self.blocks is not None:
            dest.view(len(self.layers), -1).copy_(self.blocks[block_id], non_blocking=True)
            return
        offset = 0
        for layer, page in zip(self.layers, self.page_bytes):
            dest[offset:offset + page].copy_(layer[block_id], non_blocking=True)
            offset += page

    def scatter(self, block_id: int, src: torch.Tensor) -> None:
        """Copy src (block_bytes bytes) into vLLM block block_id."""
        self.scatter_many([block_id], [src])

    def scatter_many(self, block_ids: list[int], srcs: list[torch.Tensor]) -> None:
        """Copy each of srcs (block_bytes bytes) into the vLLM block of the same place in
        block_ids. On the CPU in one torch call: a loader thread that takes the GIL back after
        each block's copy waits on the engine's busy thread (bench.ttft, 127 blocks of 2 MiB:
        59-76 ms block by block, 49-56 ms in calls of 32). Under CUDA each copy_ only queues a
        DMA, block by block as before."""
        dests: list[torch.Tensor] = []
        views: list[torch.Tensor] = []
        for block_id, src in zip(block_ids, srcs):
            if self.blocks is not None:
                dests.append(self.blocks[block_id])
                views.append(src.view(len(self.layers), -1))
                continue
            offset = 0
            for layer, page in zip(self.layers, self.page_bytes):
                dests.append(layer[block_id])
                views.append(src[offset:offset + page])
                offset += page
        if self.device.type == "cpu":
            torch._foreach_copy_(dests, views, non_blocking=True)
            return
        for dest, view in zip(dests, views):
            dest.copy_(view, non_blocking=True)


def _page_view(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """An int8 [num_blocks, page_bytes] view sharing memory with tensor (never a copy)."""
    num_blocks = tensor.shape[0]
    try:
        raw = tensor.view(torch.int8)  # last dim scales by the element size
        view = raw.view(num_blocks, -1)
    except RuntimeError:
        raise ValueError(
            f"KV-cache layer {name} of shape {tuple(tensor.shape)} and strides {tensor.stride()} "
            f"does not keep each block's page contiguous; kvstore cannot copy it whole") from None
    assert view.data_ptr() == tensor.data_ptr(), "page view must alias the KV cache"
    return view


def _block_view(layers: list[torch.Tensor]) -> torch.Tensor | None:
    """[num_blocks, num_layers, page_bytes] over the layers' shared storage, or None when the
    layers do not sit in one allocation at equal strides with equal pages."""
    first = layers[0]
    if len(layers) < 2 or any(
            layer.shape != first.shape or layer.stride() != first.stride()
            or layer.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            for layer in layers):
        return None
    layer_stride = layers[1].data_ptr() - first.data_ptr()
    if layer_stride <= 0 or any(b.data_ptr() - a.data_ptr() != layer_stride
                                for a, b in zip(layers, layers[1:])):
        return None
    storage = torch.tensor([], dtype=torch.int8, device=first.device).set_(first.untyped_storage())
    view = storage.as_strided((first.shape[0], len(layers), first.shape[1]),
                              (first.stride(0), layer_stride, 1), first.storage_offset())
    assert view[0, 1].data_ptr() == layers[1][0].data_ptr(), "block view must alias the layers"
    return view

"""Whole-block copies between vLLM's paged KV cache and flat byte buffers (pool slots).

A pooled block is the concatenation, layer by layer, of that block's page in every KV-cache
layer, copied as opaque bytes: the page layout differs per attention backend and CPU ISA, and
the namespace guarantees only identical layouts ever exchange bytes.
"""

from __future__ import annotations

import torch


class PagedKV:
    """Byte views of vLLM's KV-cache pages, one [num_blocks, page_bytes] int8 view per layer."""

    def __init__(self, kv_caches: dict[str, torch.Tensor]) -> None:
        seen: set[tuple[int, tuple[int, ...]]] = set()
        self.layers: list[torch.Tensor] = []
        for name in sorted(kv_caches):
            tensor = kv_caches[name]
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

    def gather(self, block_id: int, dest: torch.Tensor) -> None:
        """Copy vLLM block block_id into dest (block_bytes int8 bytes)."""
        offset = 0
        for layer, page in zip(self.layers, self.page_bytes):
            dest[offset:offset + page].copy_(layer[block_id], non_blocking=True)
            offset += page

    def scatter(self, block_id: int, src: torch.Tensor) -> None:
        """Copy src (block_bytes bytes) into vLLM block block_id."""
        offset = 0
        for layer, page in zip(self.layers, self.page_bytes):
            layer[block_id].copy_(src[offset:offset + page], non_blocking=True)
            offset += page


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

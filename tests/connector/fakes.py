"""Stand-ins for what the connector reads from vLLM (requests, blocks, KV tensors), shared by the
connector tests."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvstore.client import Client
from kvstore.keys import Namespace


@dataclass
class Req:
    """The fields of vllm.v1.request.Request the scheduler half reads."""

    request_id: str
    all_token_ids: list[int]
    block_hashes: list[bytes] = field(default_factory=list)
    num_computed_tokens: int = 0
    lora_request: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


class Blocks:
    """vLLM's KVCacheBlocks for one request: block ids 100, 101, ... for the one KV cache group."""

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (list(range(100, 110)),)


def make_request(req_id: str, num_blocks: int, block_size: int, extra_tokens: int = 1) -> Req:
    """num_blocks full blocks plus extra_tokens, hashed through the parent as vLLM chains them."""
    tokens = [hash((req_id, i)) % 1000 for i in range(num_blocks * block_size + extra_tokens)]
    hashes, parent = [], req_id.encode()
    for i in range(num_blocks):
        block_tokens = repr(tokens[i * block_size:(i + 1) * block_size]).encode()
        parent = hashlib.sha256(parent + block_tokens).digest()
        hashes.append(parent)
    return Req(req_id, tokens, hashes)


def store(address: str, ns: Namespace, req: Req, num_blocks: int) -> None:
    """Put req's first num_blocks blocks (small stand-in bytes) into the daemon's pool."""
    with Client(address) as client:
        client.put(ns, [(h, req.block_hashes[i - 1] if i else None, np.full(64, i, np.uint8))
                        for i, h in enumerate(req.block_hashes[:num_blocks])])


def chain(n: int, seed: bytes) -> list[bytes]:
    """n chained block hashes: each one covers its parent's."""
    hashes, parent = [], seed
    for i in range(n):
        parent = hashlib.sha256(parent + bytes([i])).digest()
        hashes.append(parent)
    return hashes


def kv_layers(num_layers: int, num_blocks: int, page_floats: int) -> torch.Tensor:
    """KV pages like vLLM 0.32 on CPU: one float32 allocation, viewed per layer."""
    return torch.randn(num_layers * num_blocks * page_floats).view(num_layers, num_blocks,
                                                                   page_floats)

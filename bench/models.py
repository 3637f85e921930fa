"""Random-weight Llama checkpoints made locally (no hub access), for tests, the demo and benchmarks."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class TinyLlama:
    """A Llama shape; the CPU attention backend needs head size >= 32 (hidden / heads)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 2
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 512
    max_position_embeddings: int = 2048
    seed: int = 0


TEST_MODEL = TinyLlama()
# Where prefill dominates on a CPU (DESIGN.md: 0.9 s / 3.3 s / 7.2 s TTFT at 1k / 4k / 8k tokens).
BENCH_MODEL = TinyLlama(num_layers=8, hidden_size=1024, num_heads=8, num_kv_heads=8,
                        intermediate_size=2816, vocab_size=8192, max_position_embeddings=9216)


def make_model(directory: Path, shape: TinyLlama = TEST_MODEL) -> Path:
    """Write a random-weight Llama to directory once (reused while its shape is unchanged)."""
    marker = directory / "kvstore-shape.json"
    if marker.exists() and json.loads(marker.read_text()) == asdict(shape):
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(shape.seed)
    config = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings, torch_dtype="float32")
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    marker.write_text(json.dumps(asdict(shape)))
    return directory

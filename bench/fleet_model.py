"""The fleet benchmark's model: a random-weight tiny Llama with a word-level tokenizer beside it.

`vllm serve` and vllm-router's cache_aware policy (it asks each worker's /v1/completions/render
for token ids) need a real tokenizer, so one is built locally with the `tokenizers` package: token
id i is the word "w<i>", words are split on whitespace, and no special token is added. A trace's
token-id prompt is sent as the text " ".join(f"w{i}") and tokenizes back to exactly those ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from bench.models import TinyLlama, make_model

# Same shape as bench.replicas: prefill dominates TTFT yet a 2k-token prompt recomputes in well
# under a second on 2 shared cores.
FLEET_MODEL = TinyLlama(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2,
                        intermediate_size=704, vocab_size=512, max_position_embeddings=4096)
TOKENIZER_VERSION = 2  # bump when the tokenizer's files change, so cached copies are rebuilt


def text(prompt: Sequence[int]) -> str:
    """The text that the fleet tokenizer turns into exactly these token ids."""
    return " ".join(f"w{i}" for i in prompt)


def make_fleet_model(directory: Path, shape: TinyLlama = FLEET_MODEL) -> Path:
    """The model of make_model plus tokenizer.json / tokenizer_config.json (written once)."""
    make_model(directory, shape)
    marker = directory / "kvstore-tokenizer.json"
    if marker.exists() and json.loads(marker.read_text()) == {"version": TOKENIZER_VERSION,
                                                             "vocab": shape.vocab_size}:
        return directory
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(shape.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    # No bos/eos token: transformers splits special tokens out of any text, so "w1" would cut
    # "w17" in two. Nothing is prepended; requests set ignore_eos.
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": shape.max_position_embeddings,
        "unk_token": "w0", "add_bos_token": False,
        "add_eos_token": False, "clean_up_tokenization_spaces": False}))
    marker.write_text(json.dumps({"version": TOKENIZER_VERSION, "vocab": shape.vocab_size}))
    return directory

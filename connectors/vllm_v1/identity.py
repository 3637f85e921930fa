"""The model identity behind a namespace: every input that changes the K/V bytes vLLM computes for
the same tokens, read from its VllmConfig and the checkpoint on disk; nothing host-specific.

Read only what both roles see alike: fields vLLM fills in at runtime in one process (the KV cache
layout, hash_block_size) or that model code may mutate (the live hf_config) would split the
scheduler's namespace from its workers'. docs/operating.md (Namespace) lists what is left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

from connectors.vllm_v1.fingerprint import default_cache_dir, fingerprint

log = logging.getLogger("kvstore.connector")

# config.json keys that only generation, training or transformers' bookkeeping read: editing them
# changes no K or V value, so they stay out (everything else in the file is in).
_CONFIG_KEYS_IGNORED = frozenset({
    "_name_or_path", "_commit_hash", "transformers_version", "use_cache", "bos_token_id",
    "eos_token_id", "pad_token_id", "initializer_range", "output_attentions",
    "output_hidden_states", "return_dict",
})
_CONFIG_FILES = ("config.json", "params.json")  # Hugging Face, then Mistral's format


def model_identity(vllm_config: Any, served: str) -> dict[str, Any]:
    """Everything that changes a block's bytes (the same in the scheduler and every worker)."""
    import vllm

    model = vllm_config.model_config
    cache = vllm_config.cache_config
    parallel = vllm_config.parallel_config
    attention = vllm_config.attention_config
    load = vllm_config.load_config
    local = local_model_path(model.model, model.revision, load.download_dir)
    checkpoint = checkpoint_config(local, model.hf_config_path, model.hf_config)
    return {
        **weights_identity(model.model, model.revision, local, load.load_format),
        "model_weights": model.model_weights or None,  # the object-store URI behind a local copy
        "served": served,
        "config": checkpoint,  # rope, sliding window, quantization_config, shapes, ...
        "hf_overrides": plain(model.hf_overrides),
        "quantization": model.quantization,
        "quantization_config": plain(model.quantization_config),
        "long_rope": long_rope(checkpoint, model.max_model_len),
        "disable_sliding_window": model.disable_sliding_window,
        "model_impl": str(model.model_impl),
        "runner": str(model.runner_type),
        "convert": str(model.convert_type),
        "load_format": str(load.load_format),
        "loader_extra": plain(load.model_loader_extra_config),
        "dtype": str(model.dtype),
        "kv_cache_dtype": str(cache.cache_dtype),
        "kv_cache_dtype_skip_layers": list(cache.kv_cache_dtype_skip_layers),
        "mamba_cache_dtype": str(cache.mamba_cache_dtype),
        "mamba_ssm_cache_dtype": str(cache.mamba_ssm_cache_dtype),
        "block_size": cache.block_size,
        "num_layers": model.get_num_layers(parallel),
        "num_kv_heads": model.get_num_kv_heads(parallel),
        "head_size": model.get_head_size(),
        "attention_backend": str(attention.backend),
        "non_causal": attention.use_non_causal,
        "indexer_kv_dtype": str(attention.indexer_kv_dtype),
        "device": device_kind(),
        "tp": parallel.tensor_parallel_size,
        "pp": parallel.pipeline_parallel_size,
        "dcp": parallel.decode_context_parallel_size,  # each rank holds a share of the tokens
        "pcp": parallel.prefill_context_parallel_size,
        "vllm": vllm.__version__,
        "hash_algo": cache.prefix_caching_hash_algo,
        # A pinned PYTHONHASHSEED changes vLLM's NONE_HASH and with it every block hash.
        "hash_seed": os.environ.get("PYTHONHASHSEED"),
    }


def weights_identity(name: str, revision: str | None, local: Path | None,
                     load_format: Any) -> dict[str, Any]:
    """The weights' content fingerprint; the model's name and revision where there is none to
    read (a hub id not in the local cache, an object-store URI, dummy weights)."""
    if local is not None and str(load_format) != "dummy":
        try:
            found = fingerprint(local, default_cache_dir())
        except (OSError, ValueError, KeyError, TypeError) as exc:  # unreadable or malformed
            log.warning("kvstore: cannot fingerprint the weights at %s (%s)", local, exc)
            found = None
        if found is not None:
            log.debug("kvstore: weights fingerprint of %s: %d of %d files read (%d bytes)",
                      local, found.num_files_read, found.num_files, found.num_bytes_read)
            # File count and size are content, like the digest: the same on every host.
            return {"weights": found.digest, "weights_files": found.num_files,
                    "weights_bytes": found.num_bytes}
    log.info("kvstore: no local weight files for %s (load_format %s): the namespace uses its "
             "name and revision; set the connector's `namespace` or `epoch` when its weights "
             "change", name, load_format)
    return {"model": name, "revision": revision}


def local_model_path(name: str, revision: str | None, download_dir: str | None) -> Path | None:
    """The local directory (or file) holding the model: itself, or its Hugging Face snapshot."""
    if os.path.exists(name):
        return Path(name)
    if "://" in name:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, cache_dir=download_dir,
                                      local_files_only=True))
    except Exception:  # not in the local cache: the caller falls back to name and revision
        return None


def checkpoint_config(local: Path | None, hf_config_path: str | None, hf_config: Any) -> Any:
    """The checkpoint's own config file (minus generation-only keys), as written on disk; the
    parsed config only when there is no file to read."""
    directory = Path(hf_config_path) if hf_config_path and os.path.isdir(hf_config_path) else local
    if directory is not None and directory.is_dir():
        for name in _CONFIG_FILES:
            path = directory / name
            if path.is_file():
                return _without_ignored(json.loads(path.read_text()))
    return _without_ignored(plain(hf_config.to_dict()))


def long_rope(config: Any, max_model_len: int) -> bool | None:
    """Phi-3's LongRoPE picks its long factors when max_model_len exceeds the original context
    (vllm rotary_embedding/phi3_long_rope_scaled_rope.py); no other RoPE reads max_model_len."""
    for rope in _rope_settings(config):
        if rope.get("rope_type", rope.get("type")) == "longrope":
            original = rope.get("original_max_position_embeddings") or _find(
                config, "original_max_position_embeddings")
            return bool(original) and max_model_len > int(original)
    return None


def rope_summary(config: Any) -> str:
    """The RoPE settings of a checkpoint config, for the startup log line."""
    ropes = _rope_settings(config)
    theta = config.get("rope_theta") if isinstance(config, dict) else None
    if theta is not None:  # configs before transformers 5 keep it beside rope_scaling
        ropes = [*ropes, {"rope_theta": theta}]
    return json.dumps(ropes, sort_keys=True, separators=(",", ":")) if ropes else "none"


def describe(identity: dict[str, Any]) -> str:
    """One readable line of the factors, with nested settings shortened to a digest."""
    parts = []
    for key, value in identity.items():
        if key in ("weights_files", "weights_bytes"):
            continue
        if key == "weights":
            files, size = identity["weights_files"], identity["weights_bytes"]
            shown = f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
            value = f"{value[:12]} ({files} file{'s' * (files != 1)}, {shown})"
        elif key == "config":
            value = f"{short_digest(value)} rope={rope_summary(value)}"
        elif isinstance(value, (dict, list)) and value:
            value = short_digest(value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


def short_digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def plain(value: Any) -> Any:
    """value as JSON-able data that prints the same in every process (no object addresses)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if hasattr(value, "model_dump"):
        return plain(value.model_dump())
    if callable(value):  # e.g. an hf_overrides function: its name (its code is not compared)
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
    return str(value)


def device_kind() -> str:
    """The device and, on CPUs, the ISA that decides how the attention backend packs pages."""
    from vllm.platforms import current_platform

    kind = str(current_platform.device_type)
    if kind != "cpu":
        try:
            return f"{kind}:{current_platform.get_device_name()}"
        except Exception:  # the name only narrows the namespace further
            return kind
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    isa = [name for name in ("amx_bf16", "avx512f", "avx512_bf16", "avx2") if f" {name}" in flags]
    return f"cpu:{platform.machine()}:{'+'.join(isa)}"


def _without_ignored(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_ignored(v) for k, v in value.items() if k not in _CONFIG_KEYS_IGNORED}
    if isinstance(value, list):
        return [_without_ignored(v) for v in value]
    return value


def _rope_settings(config: Any, key: str = "") -> list[dict[str, Any]]:
    """Every RoPE settings dict in the config (rope_scaling, rope_parameters, per layer type,
    nested text configs included)."""
    found: list[dict[str, Any]] = []
    if isinstance(config, dict):
        if "rope_type" in config or (key == "rope_scaling" and "type" in config):
            found.append(config)
        for name, value in config.items():
            found += _rope_settings(value, name)
    elif isinstance(config, list):
        for value in config:
            found += _rope_settings(value, key)
    return found


def _find(config: Any, key: str) -> Any:
    """The first value of key anywhere in a nested config, or None."""
    if isinstance(config, dict):
        if key in config:
            return config[key]
        for value in config.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None

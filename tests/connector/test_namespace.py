"""Replicas share blocks only when they would store the same bytes: the namespace digests every
setting that changes a block's bytes, from real vLLM engine configs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.models import TEST_MODEL, TinyLlama, make_model
from connectors.vllm_v1.config import ConnectorConfig, make_namespace

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    base = tmp_path_factory.mktemp("models")
    other = TinyLlama(num_layers=3)
    with pytest.MonkeyPatch.context() as mp:  # fingerprints cached here, not in ~/.cache
        mp.setenv("KVSTORE_CACHE_DIR", str(base / "cache"))
        yield str(make_model(base / "a", TEST_MODEL)), str(make_model(base / "b", other))


def engine_config(model: str, **overrides: object):  # type: ignore[no-untyped-def]
    from vllm.engine.arg_utils import EngineArgs

    args = {"model": model, "dtype": "float32", "block_size": 32, "skip_tokenizer_init": True,
            "max_model_len": 512, "enforce_eager": True, **overrides}
    return EngineArgs(**args).create_engine_config()  # type: ignore[arg-type]


def test_same_settings_give_the_same_namespace(models: tuple[str, str]) -> None:
    """Two replicas configured alike agree on the namespace (so they can share)."""
    config = ConnectorConfig()
    a = make_namespace(engine_config(models[0]), config)
    b = make_namespace(engine_config(models[0]), config)
    assert a == b


@pytest.mark.parametrize("change", [
    {"dtype": "bfloat16"}, {"block_size": 64}, {"kv_cache_dtype": "fp8"}, {"model": "other"},
    {"hf_overrides": {"rope_theta": 500000.0}},
    {"hf_overrides": {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                          "rope_theta": 10000.0}}},
    {"disable_sliding_window": True}, {"model_impl": "transformers"}, {"load_format": "dummy"},
    {"kv_cache_dtype": "fp8", "kv_cache_dtype_skip_layers": ["0"]},
])
def test_byte_changing_settings_change_the_namespace(models: tuple[str, str], change: dict) -> None:
    """A different model, dtype, KV-cache dtype, block size, RoPE, quantization, sliding window,
    model implementation or weights source never shares bytes."""
    overrides = {k: (models[1] if v == "other" else v) for k, v in change.items()}
    try:
        changed = engine_config(**{"model": models[0], **overrides})
    except Exception as exc:  # a setting the CPU build cannot run is not a namespace question
        pytest.skip(f"vLLM CPU refuses {change}: {exc}")
    base = make_namespace(engine_config(models[0]), ConnectorConfig())
    assert make_namespace(changed, ConnectorConfig()).name != base.name


def test_quantization_method_changes_the_namespace(models: tuple[str, str]) -> None:
    """The same checkpoint quantized online by two methods (and not at all) never shares
    (vLLM CPU takes fp8 only with 16-bit activations)."""
    names = {make_namespace(engine_config(models[0], dtype="bfloat16", **quant),
                            ConnectorConfig()).name
             for quant in ({}, {"quantization": "fp8"}, {"quantization": "fp8_per_tensor"})}
    assert len(names) == 3


def test_epoch_and_operator_namespace_separate_model_versions(models: tuple[str, str]) -> None:
    """Bumping the epoch keeps the name (so old epochs can be invalidated) but not the key;
    an operator namespace (e.g. a weights revision) changes the name."""
    vllm_config = engine_config(models[0])
    base = make_namespace(vllm_config, ConnectorConfig())
    bumped = make_namespace(vllm_config, ConnectorConfig(epoch=1))
    assert bumped.name == base.name and bumped != base
    assert make_namespace(vllm_config, ConnectorConfig(namespace="rev-2")).name != base.name


def test_ranks_do_not_share_bytes(models: tuple[str, str]) -> None:
    """Each tensor-parallel rank stores its own shard under its own namespace."""
    vllm_config = engine_config(models[0])
    assert make_namespace(vllm_config, ConnectorConfig(), rank=0) != make_namespace(
        vllm_config, ConnectorConfig(), rank=1)


def test_unknown_or_mistyped_settings_are_refused() -> None:
    """A typo in kv_connector_extra_config is an error, not a silently ignored setting."""
    with pytest.raises(ValueError, match="unknown kvstore connector settings"):
        ConnectorConfig.from_extra({"adress": "tcp://127.0.0.1:5555"})
    with pytest.raises(ValueError, match="non-negative integer"):
        ConnectorConfig.from_extra({"timeout_ms": "fast"})
    assert ConnectorConfig.from_extra({"epoch": 3}).epoch == 3


@pytest.mark.parametrize("change", [
    {"max_num_seqs": 3}, {"enforce_eager": False}, {"gpu_memory_utilization": 0.5},
    {"seed": 7}, {"max_model_len": 256}, {"max_logprobs": 5}, {"served_model_name": "other"},
    {"enable_prefix_caching": False}, {"num_gpu_blocks_override": 64},
])
def test_settings_that_keep_the_bytes_keep_the_namespace(models: tuple[str, str],
                                                         change: dict) -> None:
    """Scheduling, memory, sampling and naming settings leave K and V alone: replicas that differ
    only in them still share (max_model_len matters only to Phi-3's LongRoPE)."""
    base = make_namespace(engine_config(models[0]), ConnectorConfig())
    assert make_namespace(engine_config(models[0], **change), ConnectorConfig()) == base


def copy_model(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_weights_replaced_in_place_change_the_namespace(models: tuple[str, str],
                                                        tmp_path: Path) -> None:
    """Same path, config and shapes, other weight values (a fine-tune rolled out over
    /models/current): a new namespace, so no replica loads the old weights' KV."""
    current = copy_model(models[0], tmp_path / "current")
    before = make_namespace(engine_config(str(current)), ConnectorConfig())
    other = make_model(tmp_path / "finetune", TinyLlama(seed=1))
    shutil.copyfile(other / "model.safetensors", current / "model.safetensors")
    assert (other / "config.json").read_text() == (current / "config.json").read_text()
    after = make_namespace(engine_config(str(current)), ConnectorConfig())
    assert after.name != before.name


def test_same_checkpoint_at_another_path_shares(models: tuple[str, str], tmp_path: Path) -> None:
    """Two hosts mounting the same bytes at different paths (other mtimes and inodes) agree."""
    elsewhere = copy_model(models[0], tmp_path / "mnt" / "llama")
    a = make_namespace(engine_config(models[0]), ConnectorConfig())
    assert make_namespace(engine_config(str(elsewhere)), ConnectorConfig()) == a


def test_checkpoint_config_changes_change_the_namespace(models: tuple[str, str],
                                                         tmp_path: Path) -> None:
    """RoPE scaling or theta, sliding window or quantization written into config.json (same
    weights) change the namespace; generation-only keys (eos_token_id) do not."""
    base = make_namespace(engine_config(models[0]), ConnectorConfig()).name
    edits = {"rope_theta": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
             "rope_scaling": {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0,
                                                  "rope_theta": 10000.0}},
             "sliding_window": {"sliding_window": 64},
             "eos": {"eos_token_id": 7}}
    names = {}
    for label, edit in edits.items():
        model = copy_model(models[0], tmp_path / label)
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, **edit}))
        names[label] = make_namespace(engine_config(str(model)), ConnectorConfig()).name
    assert names.pop("eos") == base
    assert base not in names.values() and len(set(names.values())) == len(names)

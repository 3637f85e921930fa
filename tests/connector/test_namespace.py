"""Replicas share blocks only when they would store the same bytes: the namespace digests every
setting that changes a block's bytes, from real vLLM engine configs."""

from __future__ import annotations


import pytest

from bench.models import TEST_MODEL, TinyLlama, make_model
from connectors.vllm_v1.config import ConnectorConfig, make_namespace

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    base = tmp_path_factory.mktemp("models")
    other = TinyLlama(num_layers=3)
    return str(make_model(base / "a", TEST_MODEL)), str(make_model(base / "b", other))


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
])
def test_byte_changing_settings_change_the_namespace(models: tuple[str, str], change: dict) -> None:
    """A different model, dtype, KV-cache dtype or block size never shares bytes."""
    overrides = {k: (models[1] if v == "other" else v) for k, v in change.items()}
    try:
        changed = engine_config(**{"model": models[0], **overrides})
    except Exception as exc:  # a setting the CPU build cannot run is not a namespace question
        pytest.skip(f"vLLM CPU refuses {change}: {exc}")
    base = make_namespace(engine_config(models[0]), ConnectorConfig())
    assert make_namespace(changed, ConnectorConfig()).name != base.name


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

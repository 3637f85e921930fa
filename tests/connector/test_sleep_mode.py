"""vLLM 0.33+ sleep mode unmaps the KV cache's device memory between unregister_kv_caches and
restore_kv_caches (same addresses after wake-up): meanwhile the connector must not copy to or from
it, and afterwards it must load and save as before. Driven through KVStoreConnector's hooks as
vLLM's worker calls them, with a real VllmConfig, real KV tensors and the real daemon (vLLM 0.32
never calls these hooks; the test calls them as 0.33/0.34's gpu_worker does around sleep)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from bench.models import TEST_MODEL, make_model
from connectors.vllm_v1.connector import KVStoreConnector
from connectors.vllm_v1.metadata import KVStoreMetadata, LoadSpec
from tests.connector.test_worker_stats import chain, kv_caches, save_spec
from bench.daemon import Daemon, wait_until

pytestmark = pytest.mark.timeout(120)

MakeConnector = Callable[..., tuple[KVStoreConnector, dict[str, torch.Tensor]]]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "m", TEST_MODEL)


@pytest.fixture
def make_connector(model: Path) -> Iterator[MakeConnector]:
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    made: list[KVStoreConnector] = []

    def make(address: str, **extra: object) -> tuple[KVStoreConnector, dict[str, torch.Tensor]]:
        kv_transfer = KVTransferConfig(
            kv_connector="KVStoreConnector", kv_connector_module_path="connectors.vllm_v1.connector",
            kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_extra_config={"address": address, "timeout_ms": 2000,
                                       "save_timeout_ms": 2000, **extra})
        vllm_config = EngineArgs(model=str(model), dtype="float32", skip_tokenizer_init=True,
                                 max_model_len=512, enforce_eager=True,
                                 kv_transfer_config=kv_transfer).create_engine_config()
        connector = KVStoreConnector(vllm_config, KVConnectorRole.WORKER, None)  # type: ignore[arg-type]
        caches = kv_caches()
        connector.register_kv_caches(caches)
        made.append(connector)
        return connector, caches

    yield make
    for connector in made:
        connector.shutdown()


def step(connector: KVStoreConnector, meta: KVStoreMetadata) -> None:
    """One model step's worker hooks: loads start, then saves once the forward has run."""
    connector.bind_connector_metadata(meta)
    connector.start_load_kv(None)  # type: ignore[arg-type]
    connector.wait_for_save()
    connector.clear_connector_metadata()


def load(connector: KVStoreConnector, req_id: str, hashes: list[bytes],
         block_ids: list[int]) -> set[int]:
    """Load hashes into block_ids; returns the block ids that failed (vLLM recomputes them)."""
    step(connector, KVStoreMetadata(loads=[LoadSpec(req_id, hashes, block_ids, [])]))
    wait_until(lambda: req_id in (connector.get_finished(set())[1] or ()), 20,
               what=f"{req_id} finished")
    return connector.get_block_ids_with_load_errors()


def blocks(caches: dict[str, torch.Tensor], block_ids: list[int]) -> list[torch.Tensor]:
    return [layer[block_ids].clone() for layer in caches.values()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_asleep_nothing_touches_the_kv_cache_and_after_wake_up_it_all_works(
        daemon: Daemon, make_connector: MakeConnector) -> None:
    saver, saved = make_connector(daemon.address)
    hashes = chain(3, b"sleep")
    step(saver, save_spec(hashes, [1, 2, 3]))
    connector, caches = make_connector(daemon.address)
    for layer in caches.values():
        layer.zero_()

    connector.unregister_kv_caches()
    connector.unregister_kv_caches()  # idempotent, as vLLM requires
    assert load(connector, "asleep", hashes, [10, 11, 12]) == {10, 11, 12}
    assert all(not layer.any() for layer in caches.values()), "a load wrote while asleep"
    step(connector, save_spec(chain(2, b"asleep"), [4, 5]))
    stats = connector.get_kv_connector_stats()
    assert stats is not None and stats.data.get("num_failed_saves") == 1
    assert "saved_blocks" not in stats.data

    connector.restore_kv_caches()
    connector.restore_kv_caches()  # idempotent
    assert load(connector, "awake", hashes, [10, 11, 12]) == set()
    assert same(blocks(caches, [10, 11, 12]), blocks(saved, [1, 2, 3]))
    step(connector, save_spec(chain(2, b"awake"), [10, 11]))
    stats = connector.get_kv_connector_stats()
    assert stats is not None and stats.data["saved_blocks"] == 2


def test_sleep_waits_for_a_load_in_flight(daemon: Daemon, make_connector: MakeConnector) -> None:
    """A load still copying when vLLM unregisters ends first: no write after sleep has begun."""
    saver, _saved = make_connector(daemon.address)
    hashes = chain(3, b"inflight")
    step(saver, save_spec(hashes, [1, 2, 3]))
    connector, caches = make_connector(daemon.address, fault_load_delay_ms=300)
    for layer in caches.values():
        layer.zero_()
    step(connector, KVStoreMetadata(loads=[LoadSpec("r", hashes, [10, 11, 12], [])]))
    connector.unregister_kv_caches()
    at_sleep = blocks(caches, [10, 11, 12])
    wait_until(lambda: "r" in (connector.get_finished(set())[1] or ()), 20, what="load finished")
    assert same(blocks(caches, [10, 11, 12]), at_sleep), "the KV cache changed while asleep"

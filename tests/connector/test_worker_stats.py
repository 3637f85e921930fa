"""The worker half's counters and save confirmations, with real KV tensors and the real daemon:
what a save or load moved, over which transport, and which planned blocks the pool now holds."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from connectors.vllm_v1.config import ConnectorConfig
from connectors.vllm_v1.metadata import KVStoreMetadata, LoadSpec, SaveSpec
from connectors.vllm_v1.worker_side import WorkerSide
from kvstore.keys import Namespace
from tests.connector.fakes import chain, kv_layers
from bench.daemon import Daemon, wait_until

pytestmark = pytest.mark.timeout(60)

BLOCK = 16  # tokens per block (only scales the token counters)
NUM_BLOCKS, NUM_LAYERS, PAGE_FLOATS = 32, 4, 256  # 4 KiB per block
NS = Namespace(b"worker-stats-test")
# What these tests count must not hang on how fast the machine is: a daemon just started on a
# loaded CI machine once took more than 2 s to answer a save (two tests failed so). The tests
# of an unreachable or dead daemon pass their own short budgets.
LONG_MS = 10_000

MakeWorker = Callable[..., WorkerSide]


def kv_caches() -> dict[str, torch.Tensor]:
    layers = kv_layers(NUM_LAYERS, NUM_BLOCKS, PAGE_FLOATS)
    return {f"layers.{i}.attn": layers[i] for i in range(NUM_LAYERS)}


def save_spec(hashes: list[bytes], block_ids: list[int]) -> KVStoreMetadata:
    parents = [None, *hashes[:-1]]
    return KVStoreMetadata(saves=[SaveSpec("r", hashes, parents, block_ids)])


@pytest.fixture
def make_worker() -> Iterator[MakeWorker]:
    made: list[WorkerSide] = []

    def make(address: str, **overrides: object) -> WorkerSide:
        settings = {"timeout_ms": LONG_MS, "save_timeout_ms": LONG_MS, "load_timeout_ms": LONG_MS,
                    **overrides}
        config = ConnectorConfig(address=address, **settings)  # type: ignore[arg-type]
        worker = WorkerSide(config, NS, BLOCK, report_saves=True)
        worker.register_kv_caches(kv_caches())
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.shutdown()


def test_a_save_is_counted_and_confirmed(daemon: Daemon, make_worker: MakeWorker) -> None:
    """Written blocks count once; saving them again confirms them (present) but writes nothing."""
    worker = make_worker(daemon.address)
    hashes = chain(5, b"save")
    worker.save(save_spec(hashes, [1, 2, 3, 4, 5]))
    meta = worker.take_worker_meta()
    assert meta is not None and meta.saved == hashes and meta.dropped == []
    stats = worker.take_stats()
    assert stats is not None
    assert stats.data["saved_blocks"] == 5
    assert stats.data["save_bytes"] == 5 * NUM_LAYERS * PAGE_FLOATS * 4
    assert stats.data["save_s"] > 0
    worker.save(save_spec(hashes, [1, 2, 3, 4, 5]))
    again = worker.take_worker_meta()
    assert again is not None and again.saved == hashes
    stats = worker.take_stats()
    assert stats is not None and "saved_blocks" not in stats.data
    assert worker.take_worker_meta() is None and worker.take_stats() is None


@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
def test_a_load_counts_tokens_per_transport(daemon: Daemon, make_worker: MakeWorker,
                                            use_shm: bool) -> None:
    saver = make_worker(daemon.address)
    hashes = chain(3, b"load")
    saver.save(save_spec(hashes, [1, 2, 3]))
    saver.take_stats()
    loader = make_worker(daemon.address, use_shm=use_shm)
    loader.start_load(KVStoreMetadata(loads=[LoadSpec("r", hashes, [10, 11, 12], [])]))
    wait_until(lambda: "r" in loader.get_finished(), 20, what="load finished")
    assert loader.take_failed_block_ids() == set()
    stats = loader.take_stats()
    assert stats is not None
    used, other = ("shm", "tcp") if use_shm else ("tcp", "shm")
    assert stats.data[f"loaded_tokens_{used}"] == 3 * BLOCK
    assert f"loaded_tokens_{other}" not in stats.data
    assert stats.data["num_loads"] == 1 and stats.data["load_bytes"] == 3 * 4096
    assert "num_failed_loads" not in stats.data


def test_a_load_of_missing_blocks_counts_a_failure(daemon: Daemon,
                                                   make_worker: MakeWorker) -> None:
    worker = make_worker(daemon.address)
    worker.start_load(KVStoreMetadata(loads=[LoadSpec("r", chain(2, b"gone"), [3, 4], [])]))
    wait_until(lambda: "r" in worker.get_finished(), 20, what="load finished")
    assert worker.take_failed_block_ids() == {3, 4}
    stats = worker.take_stats()
    assert stats is not None
    assert stats.data["num_failed_loads"] == 1 and stats.data["failed_load_tokens"] == 2 * BLOCK


def test_blocks_refused_for_space_are_dropped_not_confirmed(
        make_daemon: Callable[..., Daemon], make_worker: MakeWorker) -> None:
    """A pool too small for the chain keeps part of it: only what provably landed is confirmed."""
    daemon = make_daemon(pool_size="64KiB", page_size="16KiB").start()
    worker = make_worker(daemon.address)
    hashes = chain(24, b"full")
    worker.save(save_spec(hashes, list(range(24))))
    meta = worker.take_worker_meta()
    assert meta is not None
    assert meta.dropped and set(meta.saved) | set(meta.dropped) == set(hashes)
    assert set(meta.saved).isdisjoint(meta.dropped)
    stats = worker.take_stats()
    assert stats is not None and 0 < stats.data["saved_blocks"] < 24


def test_an_unreachable_daemon_drops_the_saves(make_worker: MakeWorker) -> None:
    worker = make_worker("tcp://127.0.0.1:9", timeout_ms=200, save_timeout_ms=200)
    hashes = chain(2, b"down")
    worker.save(save_spec(hashes, [1, 2]))
    meta = worker.take_worker_meta()
    assert meta is not None and meta.saved == [] and meta.dropped == hashes
    stats = worker.take_stats()
    assert stats is not None and stats.data["num_failed_saves"] == 1


def test_a_load_from_a_dead_daemon_is_still_reported_and_counted(
        make_daemon: Callable[..., Daemon], make_worker: MakeWorker) -> None:
    """Counting a load never calls the daemon: with it gone, the load still finishes (failed)."""
    daemon = make_daemon().start()
    worker = make_worker(daemon.address, timeout_ms=200)
    daemon.stop()
    worker.start_load(KVStoreMetadata(loads=[LoadSpec("r", chain(2, b"dead"), [3, 4], [])]))
    wait_until(lambda: "r" in worker.get_finished(), 20, what="load finished")
    assert worker.take_failed_block_ids() == {3, 4}
    stats = worker.take_stats()
    assert stats is not None and stats.data["num_failed_loads"] == 1

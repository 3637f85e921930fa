"""The scheduler half's KV events and per-tier token counts, against the real daemon: lookups
announce what the pool holds and retract what it lost, saves are announced once the worker
confirms them, and each finished request reports its prefill tokens per tier."""

from __future__ import annotations


import pytest
from vllm.distributed.kv_events import BlockRemoved, BlockStored
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from connectors.vllm_v1.config import ConnectorConfig
from connectors.vllm_v1.events import PoolEvents
from connectors.vllm_v1.metadata import KVStoreWorkerMeta
from connectors.vllm_v1.scheduler_side import SchedulerSide
from kvstore.client import Client
from kvstore.keys import Namespace
from tests.connector import fakes
from tests.connector.fakes import Blocks, Req
from bench.daemon import Daemon

pytestmark = pytest.mark.timeout(60)

BLOCK = 4
NS = Namespace(b"sched-events-test")


def make_request(req_id: str, num_blocks: int, extra_tokens: int = 1) -> Req:
    return fakes.make_request(req_id, num_blocks, BLOCK, extra_tokens)


def store(address: str, req: Req, num_blocks: int) -> None:
    fakes.store(address, NS, req, num_blocks)




def encoded(hashes: list[bytes]) -> list[int | bytes]:
    return [maybe_convert_block_hash(h) for h in hashes]



def side(address: str, budget_ms: int = 5000) -> SchedulerSide:
    # A long budget by default: these tests are about the events, and a daemon just started on a
    # loaded CI machine can take over a second to answer.
    config = ConnectorConfig(address=address, timeout_ms=budget_ms, lookup_timeout_ms=budget_ms,
                             lookup_wait_ms=200)
    return SchedulerSide(config, NS, BLOCK, PoolEvents(BLOCK))


def lookup(sched: SchedulerSide, req: Req, num_computed_tokens: int = 0) -> int:
    """The lookup's answer, asking again while it is pending, as vLLM does in later steps."""
    tokens, _ = sched.get_num_new_matched_tokens(req, num_computed_tokens)
    while tokens is None:
        tokens, _ = sched.get_num_new_matched_tokens(req, num_computed_tokens)
    return tokens


def test_a_lookup_hit_announces_the_pooled_blocks_once(daemon: Daemon) -> None:
    """Hits become one BlockStored (medium CPU) with the request's tokens; a second request that
    hits the same blocks announces nothing new."""
    req = make_request("r", 5)
    store(daemon.address, req, 3)
    sched = side(daemon.address)
    assert lookup(sched, req) == 3 * BLOCK
    [event] = sched.take_events()
    assert isinstance(event, BlockStored) and event.medium == "CPU"
    assert event.block_hashes == encoded(req.block_hashes[:3])
    assert event.parent_block_hash is None
    assert event.token_ids == req.all_token_ids[:3 * BLOCK]
    twin = Req("twin", list(req.all_token_ids), list(req.block_hashes))
    assert lookup(sched, twin) == 3 * BLOCK
    assert sched.take_events() == []
    sched.shutdown()


def test_a_lookup_that_misses_retracts_announced_blocks(daemon: Daemon) -> None:
    """After `kvstore invalidate` the next lookup misses, and the blocks it had announced come
    back as BlockRemoved (medium CPU); the daemon never pushes evictions itself."""
    req = make_request("r", 4)
    store(daemon.address, req, 4)
    sched = side(daemon.address)
    lookup(sched, req)
    sched.take_events()
    with Client(daemon.address) as client:
        assert client.invalidate(NS.name) == 4
    again = Req("again", list(req.all_token_ids), list(req.block_hashes))
    assert lookup(sched, again) == 0
    [event] = sched.take_events()
    assert isinstance(event, BlockRemoved) and event.medium == "CPU"
    assert event.block_hashes == encoded(req.block_hashes[:4])
    sched.shutdown()


def test_only_confirmed_saves_are_announced(daemon: Daemon) -> None:
    """Planned saves wait for the worker: saved blocks are announced (parent linked), dropped
    ones never are."""
    req = make_request("r", 4)
    sched = side(daemon.address)
    assert lookup(sched, req) == 0
    assert sched.take_events() == []  # a miss announces nothing
    meta = sched.build_connector_meta(Step(req, num_scheduled=req.num_tokens))
    [save] = meta.saves
    assert save.hashes == req.block_hashes
    assert sched.take_events() == []  # planned is not stored
    sched.update_connector_output(Output(KVStoreWorkerMeta(saved=save.hashes[:2],
                                                           dropped=save.hashes[2:])))
    [event] = sched.take_events()
    assert event.block_hashes == encoded(req.block_hashes[:2])
    assert event.token_ids == req.all_token_ids[:2 * BLOCK]
    sched.update_connector_output(Output(KVStoreWorkerMeta(saved=save.hashes[2:])))
    assert sched.take_events() == []  # dropped earlier: forgotten, not announced late
    sched.shutdown()


def test_finished_request_reports_tokens_per_tier(daemon: Daemon) -> None:
    """vLLM's own cache held 1 block, the pool 2 more, the rest was computed: the request's
    kv_transfer_params and the stats both say so."""
    req = make_request("r", 5, extra_tokens=3)  # 23 tokens
    store(daemon.address, req, 3)
    sched = side(daemon.address)
    assert lookup(sched, req, num_computed_tokens=BLOCK) == 2 * BLOCK
    sched.update_state_after_alloc(req, Blocks(), 2 * BLOCK)
    sched.build_connector_meta(Step(req, num_scheduled=0))
    _, params = sched.request_finished(req)
    assert params == {"kvstore_pool_tokens": 8, "kvstore_vram_tokens": 4,
                      "kvstore_recomputed_tokens": 11, "kvstore_num_loads": 1}
    stats = sched.take_stats()
    assert stats is not None
    assert {k: stats.data.get(k) for k in ("num_requests", "num_lookups", "vram_tokens",
                                          "pool_tokens", "recomputed_tokens")} == \
        {"num_requests": 1, "num_lookups": 1, "vram_tokens": 4, "pool_tokens": 8,
         "recomputed_tokens": 11}
    assert sched.take_stats() is None  # handed over once
    sched.shutdown()


def test_an_unreachable_daemon_counts_a_failed_lookup() -> None:
    sched = side("tcp://127.0.0.1:9", budget_ms=300)  # nothing listens on the discard port
    req = make_request("r", 4)
    answer = sched.get_num_new_matched_tokens(req, 0)
    while answer[0] is None:
        answer = sched.get_num_new_matched_tokens(req, 0)
    stats = sched.take_stats()
    assert stats is not None and stats.data["num_failed_lookups"] == 1
    assert sched.take_events() == []
    sched.shutdown()


class BlockState:
    def get_block_ids(self, req_id: str) -> tuple[list[int], ...]:
        return Blocks().get_block_ids()


class Step:
    """A scheduler output that schedules num_scheduled tokens of req."""

    def __init__(self, req: Req, num_scheduled: int) -> None:
        self.kv_connector_block_state = BlockState()
        self.num_scheduled_tokens = {req.request_id: num_scheduled}


class Output:
    """A KVConnectorOutput carrying only the worker's save confirmations."""

    def __init__(self, meta: KVStoreWorkerMeta) -> None:
        self.kv_connector_worker_meta = meta
        self.invalid_block_ids: set[int] = set()
        self.finished_recving: set[str] = set()

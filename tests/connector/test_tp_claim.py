"""Tensor parallelism against the real daemon: each rank stores its shard under its own namespace,
and the scheduler claims only the prefix every rank holds, in one pipelined round trip."""

from __future__ import annotations

import time

import pytest

from connectors.vllm_v1.config import ConnectorConfig
from connectors.vllm_v1.scheduler_side import SchedulerSide
from kvstore.client import Client
from kvstore.keys import Namespace
from tests.connector import fakes
from bench.daemon import Daemon, wait_until

pytestmark = pytest.mark.timeout(60)

BLOCK = 4
RANKS = [Namespace(b"tp-test-rank0"), Namespace(b"tp-test-rank1")]


def side(address: str) -> SchedulerSide:
    # Generous budgets: a daemon just started on a loaded CI machine took over 2 s to answer.
    config = ConnectorConfig(address=address, timeout_ms=10_000, lookup_timeout_ms=10_000,
                             lookup_wait_ms=5)
    return SchedulerSide(config, RANKS[0], BLOCK, rank_namespaces=RANKS)


def ask(sched: SchedulerSide, req: fakes.Req) -> int | None:
    deadline = time.monotonic() + 10.0
    while (answer := sched.get_num_new_matched_tokens(req, 0))[0] is None:
        assert time.monotonic() < deadline, "the lookup never settled"
    return answer[0]


def num_leases(address: str) -> int:
    with Client(address, 2.0, use_shm=False) as client:
        return int(client.stats()["num_leases"])


@pytest.mark.parametrize("rank0_blocks, rank1_blocks, claimed_blocks", [
    (4, 0, 0),  # one rank lost its shard: nothing can be loaded
    (0, 4, 0),
    (4, 4, 4),  # both hold the prefix
    (4, 2, 2),  # partial overlap: the shortest
    (1, 3, 1),
])
def test_claims_only_the_prefix_every_rank_holds(daemon: Daemon, rank0_blocks: int,
                                                 rank1_blocks: int, claimed_blocks: int) -> None:
    req = fakes.make_request("r", 4, BLOCK)
    fakes.store(daemon.address, RANKS[0], req, rank0_blocks)
    fakes.store(daemon.address, RANKS[1], req, rank1_blocks)
    sched = side(daemon.address)
    try:
        assert ask(sched, req) == claimed_blocks * BLOCK
    finally:
        sched.shutdown()


def test_each_ranks_lease_goes_to_the_load_and_back_when_unloaded(daemon: Daemon) -> None:
    """The load carries one lease per rank (its worker releases it); a request that finishes
    without loading gives every rank's lease back."""
    req, other = fakes.make_request("r", 4, BLOCK), fakes.make_request("s", 4, BLOCK)
    for ns in RANKS:
        fakes.store(daemon.address, ns, req, 4)
        fakes.store(daemon.address, ns, other, 4)
    sched = side(daemon.address)
    try:
        assert ask(sched, req) == 4 * BLOCK
        sched.update_state_after_alloc(req, fakes.Blocks(), 4 * BLOCK)
        (load,) = sched.build_connector_meta(_NoSteps()).loads
        assert len(load.leases) == 2 and None not in load.leases
        assert ask(sched, other) == 4 * BLOCK
        assert num_leases(daemon.address) == 4
        sched.request_finished(other)
        wait_until(lambda: num_leases(daemon.address) == 2, 5, what="both leases released")
    finally:
        sched.shutdown()


def test_lookup_many_answers_each_namespace(daemon: Daemon) -> None:
    """The client's pipelined LOOKUPs: one answer per namespace, in the order asked."""
    req = fakes.make_request("r", 4, BLOCK)
    fakes.store(daemon.address, RANKS[1], req, 3)
    with Client(daemon.address, 2.0, use_shm=False) as client:
        results = client.lookup_many([(ns, req.block_hashes) for ns in (*RANKS, RANKS[1])])
    assert [r.num_hits for r in results] == [0, 3, 3]


class _NoSteps:
    kv_connector_block_state = None
    num_scheduled_tokens: dict[str, int] = {}

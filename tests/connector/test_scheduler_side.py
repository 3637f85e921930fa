"""The connector's scheduler half against the real daemon: what it claims, when it asks, and that
it never holds the scheduler up. Requests are plain records with the fields vLLM's Request has."""

from __future__ import annotations

import time

import pytest

from connectors.vllm_v1.config import ConnectorConfig
from connectors.vllm_v1.scheduler_side import SchedulerSide
from kvstore.client import Client
from kvstore.keys import Namespace
from tests.connector import fakes
from tests.connector.fakes import Req
from bench.daemon import Daemon, wait_until

pytestmark = pytest.mark.timeout(60)

BLOCK = 4
NS = Namespace(b"sched-test")
# The budgets of tests that assert what a lookup answers, not how fast: on a loaded CI machine a
# first lookup (connecting, mapping the segment) once outran 300 ms, and a daemon just started
# took over 2 s to answer. The test of a missing daemon passes the short ones it is about.
LONG_MS = 5000


def make_request(req_id: str, num_blocks: int, extra_tokens: int = 1) -> Req:
    return fakes.make_request(req_id, num_blocks, BLOCK, extra_tokens)


def store(address: str, req: Req, num_blocks: int) -> None:
    fakes.store(address, NS, req, num_blocks)


def side(address: str, load_in_step: bool = False, **overrides: int) -> SchedulerSide:
    config = ConnectorConfig(**{"address": address, "timeout_ms": LONG_MS,
                                "lookup_timeout_ms": LONG_MS, "lookup_wait_ms": LONG_MS,
                                "retry_interval_ms": 1000, **overrides})
    return SchedulerSide(config, NS, BLOCK, load_in_step=load_in_step)


def stats(address: str) -> dict:
    with Client(address) as client:
        return client.stats()


def test_reports_the_pooled_prefix_after_the_local_hit(daemon: Daemon) -> None:
    """Hits count from the block after vLLM's own prefix-cache hit."""
    req = make_request("r", 6)
    store(daemon.address, req, 4)
    sched = side(daemon.address)
    assert sched.get_num_new_matched_tokens(req, 1 * BLOCK) == (3 * BLOCK, True)
    sched.shutdown()


def test_never_claims_the_whole_prompt(daemon: Daemon) -> None:
    """A prompt made only of pooled full blocks still leaves its last block to vLLM."""
    req = make_request("r", 5, extra_tokens=0)
    store(daemon.address, req, 5)
    sched = side(daemon.address)
    tokens, _ = sched.get_num_new_matched_tokens(req, 0)
    assert tokens == 4 * BLOCK < req.num_tokens
    sched.shutdown()


def test_one_lookup_per_request_across_scheduling_attempts(daemon: Daemon) -> None:
    """Asking again for the same request reuses the first answer (one LOOKUP at the daemon)."""
    req = make_request("r", 4)
    store(daemon.address, req, 4)
    sched = side(daemon.address)
    first = sched.get_num_new_matched_tokens(req, 0)
    again = [sched.get_num_new_matched_tokens(req, 0) for _ in range(5)]
    assert all(a == first for a in again)
    assert stats(daemon.address)["requests"]["lookup"] == 1
    sched.shutdown()


def test_lease_is_released_when_the_request_finishes_unloaded(daemon: Daemon) -> None:
    """The lookup pins its hits; a request that finishes without loading gives the pin back."""
    req = make_request("r", 4)
    store(daemon.address, req, 4)
    sched = side(daemon.address)
    sched.get_num_new_matched_tokens(req, 0)
    assert stats(daemon.address)["num_leases"] == 1
    sched.request_finished(req)
    wait_until(lambda: stats(daemon.address)["num_leases"] == 0, 5, what="lease released")
    sched.shutdown()


def test_no_daemon_is_a_fast_miss_and_later_requests_skip_it() -> None:
    """Without a daemon the answer is a miss within the lookup budget, then immediate misses."""
    sched = side("tcp://127.0.0.1:9",  # nothing listens on the discard port
                 timeout_ms=500, lookup_timeout_ms=300, lookup_wait_ms=200)
    req = make_request("r", 4)
    start = time.monotonic()
    answer = sched.get_num_new_matched_tokens(req, 0)
    while answer[0] is None:  # "ask me again" while the lookup is pending
        answer = sched.get_num_new_matched_tokens(req, 0)
    assert answer == (0, False)
    assert time.monotonic() - start < 1.0
    start = time.monotonic()
    assert sched.get_num_new_matched_tokens(make_request("r2", 4), 0) == (0, False)
    assert time.monotonic() - start < 0.05  # the breaker skips the daemon
    sched.shutdown()


def test_a_failed_load_is_not_offered_again(daemon: Daemon) -> None:
    """After a load was handed to the worker, asking again (the load failed) reports a miss."""
    req = make_request("r", 4)
    store(daemon.address, req, 4)
    sched = side(daemon.address)
    assert _load(sched, req) == [100, 101, 102, 103]
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    sched.shutdown()


def _ask(sched: SchedulerSide, req: Req, num_computed_tokens: int = 0) -> tuple[int | None, bool]:
    """get_num_new_matched_tokens until the lookup settles, as the scheduler does step by step."""
    deadline = time.monotonic() + 5.0
    while (answer := sched.get_num_new_matched_tokens(req, num_computed_tokens))[0] is None:
        assert time.monotonic() < deadline, "the lookup never settled"
    return answer


def _load(sched: SchedulerSide, req: Req) -> list[int]:
    """Offer, allocate and hand over the load; returns the vLLM block ids it fills."""
    tokens, is_async = _ask(sched, req)
    assert tokens and is_async
    sched.update_state_after_alloc(req, fakes.Blocks(), tokens)
    (load,) = sched.build_connector_meta(_NoSteps()).loads
    return list(load.block_ids)


def test_a_preempted_request_is_offered_the_pool_again_after_a_whole_load(daemon: Daemon) -> None:
    """vLLM asks again after preempting a request it loaded: a fresh lookup, a fresh lease."""
    from vllm.v1.outputs import KVConnectorOutput

    req = make_request("r", 4)
    store(daemon.address, req, 4)
    sched = side(daemon.address)
    _load(sched, req)
    sched.update_connector_output(KVConnectorOutput(finished_recving={"r"}))
    before = stats(daemon.address)["num_leases"]
    assert _ask(sched, req) == (4 * BLOCK, True)  # preempted: num_computed_tokens back to 0
    assert stats(daemon.address)["num_leases"] == before + 1
    assert _ask(sched, req, 2 * BLOCK) == (2 * BLOCK, True)  # VRAM kept two: the rest
    sched.shutdown()


@pytest.mark.parametrize("same_step", [True, False], ids=["same-step", "earlier-step"])
def test_a_load_with_failed_blocks_is_not_offered_again(daemon: Daemon, same_step: bool) -> None:
    """Failed blocks end the offers, whether reported with the finish or steps before (TP > 1)."""
    from vllm.v1.outputs import KVConnectorOutput

    req = make_request("r", 4)
    store(daemon.address, req, 4)
    sched = side(daemon.address)
    block_ids = _load(sched, req)
    if same_step:
        sched.update_connector_output(KVConnectorOutput(finished_recving={"r"},
                                                        invalid_block_ids={block_ids[2]}))
    else:
        sched.update_connector_output(KVConnectorOutput(invalid_block_ids={block_ids[2]}))
        sched.update_connector_output(KVConnectorOutput(finished_recving={"r"}))
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    finished = sched.request_finished(req)[1]
    assert finished is not None and finished["kvstore_pool_tokens"] == 2 * BLOCK
    sched.shutdown()


def test_a_request_preempted_again_and_again_stops_being_offered_loads(daemon: Daemon) -> None:
    from vllm.v1.outputs import KVConnectorOutput

    req = make_request("r", 4)
    store(daemon.address, req, 4)
    sched = side(daemon.address)
    for _ in range(4):
        _load(sched, req)
        sched.update_connector_output(KVConnectorOutput(finished_recving={"r"}))
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    sched.shutdown()


class _NoSteps:
    """A scheduler output with nothing scheduled (no saves to plan)."""

    kv_connector_block_state = None
    num_scheduled_tokens: dict[str, int] = {}


def test_a_cpu_engine_loads_a_same_host_hit_in_the_step_that_prefills_it(daemon: Daemon) -> None:
    """With slots for every rank (same host) a CPU engine's hit is a synchronous load: vLLM runs
    the request in this very step, the worker copies before the forward pass, and what it
    filled comes back in the step's worker metadata (nothing is reported as finished)."""
    from vllm.v1.outputs import KVConnectorOutput

    from connectors.vllm_v1.metadata import KVStoreWorkerMeta

    req = make_request("r", 4)
    store(daemon.address, req, 4)
    sched = side(daemon.address, load_in_step=True)
    tokens, is_async = _ask(sched, req)
    assert tokens == 4 * BLOCK and not is_async
    sched.update_state_after_alloc(req, fakes.Blocks(), tokens)
    (load,) = sched.build_connector_meta(_NoSteps()).loads
    assert load.in_step and load.slots and load.slots[0] is not None
    # The worker filled two of the four blocks: vLLM recomputes the others in the next step.
    sched.update_connector_output(KVConnectorOutput(
        invalid_block_ids=set(load.block_ids[2:]),
        kv_connector_worker_meta=KVStoreWorkerMeta(loaded={"r": 2})))
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # never offered again
    finished = sched.request_finished(req)[1]
    assert finished is not None and finished["kvstore_pool_tokens"] == 2 * BLOCK
    sched.shutdown()


def test_a_hit_without_slots_loads_in_the_background_even_on_a_cpu_engine(daemon: Daemon) -> None:
    """No slots (lease_ms = 0 asks for none): the worker would have to GET, a daemon call
    inside the step, so the load stays asynchronous."""
    req = make_request("r", 4)
    store(daemon.address, req, 4)
    sched = side(daemon.address, load_in_step=True, lease_ms=0)
    assert _ask(sched, req) == (4 * BLOCK, True)
    sched.update_state_after_alloc(req, fakes.Blocks(), 4 * BLOCK)
    (load,) = sched.build_connector_meta(_NoSteps()).loads
    assert not load.in_step
    sched.shutdown()


def test_every_rank_reports_its_in_step_loads_and_the_least_counts() -> None:
    """vLLM merges the workers' metadata of a step: a block counts only if every rank filled it."""
    from connectors.vllm_v1.metadata import KVStoreWorkerMeta

    rank0 = KVStoreWorkerMeta(saved=[b"a"], loaded={"r": 3, "s": 1})
    rank1 = KVStoreWorkerMeta(loaded={"r": 2, "s": 1})
    merged = rank0.aggregate(rank1)
    assert merged.loaded == {"r": 2, "s": 1} and merged.saved == [b"a"]
    assert KVStoreWorkerMeta().is_empty() and not merged.is_empty()


def test_slots_of_a_segment_this_host_cannot_map_load_in_the_background(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon on another host answers slots too, but its segment cannot be mapped here (the
    other host is faked by refusing the mapping): the load stays asynchronous, where the worker
    reads the blocks by GET, instead of an in-step load that could only recompute."""
    from kvstore import client as client_module

    req = make_request("r", 4)
    store(daemon.address, req, 4)
    monkeypatch.setattr(client_module.Pool, "attach", classmethod(lambda cls, name, token: None))
    sched = side(daemon.address, load_in_step=True)
    assert _ask(sched, req) == (4 * BLOCK, True)
    sched.shutdown()


def test_a_lookup_the_daemon_has_not_answered_is_counted_as_a_wait(daemon: Daemon) -> None:
    """A stalled daemon (SIGSTOP) leaves the lookup pending: the request sits the pass out, and
    the counters say so (num_lookup_waits) and how long the scheduler waited (lookup_wait_s).
    Once the daemon answers, the hit comes as if nothing happened."""
    import signal

    req = make_request("r", 4)
    store(daemon.address, req, 4)
    sched = side(daemon.address, lookup_wait_ms=50)
    try:
        wait_until(lambda: sched.is_connected, 10, what="connected")
        sched.take_stats()
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            assert sched.get_num_new_matched_tokens(req, 0) == (None, False)
            stats = sched.take_stats()
            assert stats is not None and stats.data["num_lookup_waits"] == 1
            assert stats.data["lookup_wait_s"] >= 0.04
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        assert _ask(sched, req) == (4 * BLOCK, True)
        stats = sched.take_stats()
        assert stats is not None and stats.data["lookup_wait_s"] > 0
    finally:
        sched.shutdown()

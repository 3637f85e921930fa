"""End to end with real vLLM CPU engines at tensor_parallel_size=2: each rank saves and loads its
own shard, and a replica claims from the pool only what both ranks hold.

The two replicas run one after the other (each TP=2 engine is two worker processes on the 2 cores).
A computes every prompt itself, so its generations are what an engine without the pool makes.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.models import TEST_MODEL, make_model
from bench.replica import ReplicaProcess
from kvstore.client import Client
from bench.daemon import Daemon
from tests.e2e.test_cross_replica import FAST, BLOCK, assert_same_generation, logs_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

PREFIX_TOKENS = 8 * BLOCK + 7
TP_ENV = {"OMP_NUM_THREADS": "1"}  # one thread per rank: two ranks share the two cores


def drop_namespace(daemon: Daemon, name: str) -> None:
    with Client(daemon.address, 5.0, use_shm=False) as client:
        assert client.invalidate(bytes.fromhex(name)) > 0


def namespaces(daemon: Daemon) -> list[str]:
    with Client(daemon.address, 5.0, use_shm=False) as client:
        return sorted(client.stats()["namespaces"])


def test_tp2_replicas_share_both_shards_and_claim_only_what_every_rank_holds(
        tmp_path: Path) -> None:
    model = str(make_model(tmp_path / "model", TEST_MODEL))
    rng = random.Random(10)
    prompts = [[rng.randrange(1, TEST_MODEL.vocab_size) for _ in range(PREFIX_TOKENS + 20)]
               for _ in range(2)]
    daemon = Daemon(pool_size="512MiB").start()
    replicas: list[ReplicaProcess] = []

    def replica(name: str) -> ReplicaProcess:
        r = ReplicaProcess(model, daemon.address, FAST, log_path=str(logs_dir() / name),
                           env=TP_ENV, tp=2)
        replicas.append(r)
        r.wait_ready(600)
        return r

    try:
        a = replica("tp-a.log")
        want = a.request_batch(prompts)
        assert [w["pool_tokens"] for w in want] == [0, 0]
        a.stop()
        ranks = namespaces(daemon)
        assert len(ranks) == 2, f"one namespace per rank, got {ranks}"

        b = replica("tp-b.log")
        got = b.request(prompts[0])
        assert got["pool_tokens"] >= (PREFIX_TOKENS // BLOCK - 1) * BLOCK, got
        assert_same_generation(got, want[0])

        # One rank's shard gone: nothing may be claimed, whichever rank it is. B's own saves of
        # prompts[1] then refill that rank, and dropping the other rank leaves the same state.
        for dropped in ranks:
            b.reset_prefix_cache()
            drop_namespace(daemon, dropped)
            got = b.request(prompts[1])
            # No load at all: a claim of rank 0's blocks would load them and fail on the other
            # rank (recomputed, so the tokens would match), which pool_tokens alone cannot tell.
            assert got["pool_loads"] == 0 and got["pool_tokens"] == 0, (dropped, got)
            assert_same_generation(got, want[1])
    finally:
        for r in replicas:
            r.stop()
        daemon.stop()

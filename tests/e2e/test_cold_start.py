"""End to end with real vLLM CPU engines: a replica started on a busy machine gets its pool hits on
its very first request (issue 9: it used to connect and say HELLO inside the 200 ms lookup budget,
missed, and recomputed the whole prefix)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from bench.models import TEST_MODEL, make_model
from bench.replica import ReplicaProcess
from bench.daemon import Daemon
from tests.e2e.test_cross_replica import BLOCK, assert_same_generation, logs_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PREFIX_TOKENS = 16 * BLOCK + 7
# Processes spinning on the CPU while the new replica serves its first request: twice the CI
# machine's cores, so the replica's threads wait for a core as on a busy host.
NUM_BURNERS = 4
BURN_S = 300  # each burner stops on its own after this, should the test's cleanup not run


def burners(n: int) -> list[subprocess.Popen[bytes]]:
    code = ("import time\nend = time.monotonic() + %d\nwhile time.monotonic() < end:\n    pass\n"
            % BURN_S)
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def test_new_replica_on_a_busy_machine_gets_its_first_request_from_the_pool(
        tmp_path: Path) -> None:
    model = str(make_model(tmp_path / "model", TEST_MODEL))
    rng = random.Random(9)
    prompt = [rng.randrange(1, TEST_MODEL.vocab_size) for _ in range(PREFIX_TOKENS + 20)]
    daemon = Daemon().start()
    spinning: list[subprocess.Popen[bytes]] = []
    replicas: list[ReplicaProcess] = []
    try:
        # Default connector settings: the 200 ms lookup budget is what a new replica gets.
        a = ReplicaProcess(model, daemon.address, {}, log_path=str(logs_dir() / "cold-a.log"))
        replicas.append(a)
        a.wait_ready()
        first = a.request(prompt)
        assert first["pool_tokens"] == 0
        a.stop()  # one replica at a time on the 2 cores

        b = ReplicaProcess(model, daemon.address, {}, log_path=str(logs_dir() / "cold-b.log"))
        replicas.append(b)
        b.wait_ready()
        spinning = burners(NUM_BURNERS)
        got = b.request(prompt)  # no warm-up request before this one
        assert got["pool_tokens"] >= (PREFIX_TOKENS // BLOCK - 1) * BLOCK, got
        assert_same_generation(got, first)
    finally:
        for proc in spinning:
            proc.kill()
            proc.wait()
        for replica in replicas:
            replica.stop()
        daemon.stop()

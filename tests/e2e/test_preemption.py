"""End to end with real vLLM CPU engines: a request the engine preempts after loading its prefix
from the pool is offered the pool again when it is rescheduled, and every request still generates
exactly the tokens of an engine without the connector.

The replica under test has 20 KV blocks of 32 tokens and no prefix cache of its own: three
prompts of 8 blocks that each grow to 12 blocks cannot all stay resident, so vLLM preempts one
(freeing its blocks) and later asks the connector again from token 0.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from bench.models import TEST_MODEL, make_model
from bench.replica import ReplicaProcess
from bench.daemon import Daemon
from tests.e2e.test_cross_replica import BLOCK, FAST, assert_same_generation, logs_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

NUM_BLOCKS = 20  # vLLM KV blocks of the replica under test: room for fewer than three requests
PROMPT_TOKENS = 8 * BLOCK + 5
MAX_TOKENS = 96  # 261 + 96 tokens = 12 blocks per request at the end


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, ReplicaProcess,
                                                                          ReplicaProcess]]:
    model = str(make_model(tmp_path_factory.mktemp("preemption") / "model", TEST_MODEL))
    logs = logs_dir()
    daemon = Daemon().start()
    reference = ReplicaProcess(model, no_prefix_caching=True, max_model_len=512,
                               log_path=str(logs / "preemption-reference.log"))
    small = ReplicaProcess(model, daemon.address, FAST, no_prefix_caching=True, max_model_len=512,
                           num_blocks=NUM_BLOCKS, log_path=str(logs / "preemption-small.log"))
    try:
        reference.wait_ready()
        small.wait_ready()
        yield daemon, reference, small
    finally:
        small.stop()
        reference.stop()
        daemon.stop()


def test_preempted_request_reloads_its_prefix_and_generates_the_same_tokens(engines) -> None:
    _, reference, small = engines
    rng = random.Random(7)
    prompts = [[rng.randrange(1, TEST_MODEL.vocab_size) for _ in range(PROMPT_TOKENS)]
               for _ in range(3)]
    for prompt in prompts:  # one at a time: nothing is preempted, every prompt is saved
        assert small.request(prompt, max_tokens=1)["pool_tokens"] == 0
    got = small.request_batch(prompts, max_tokens=MAX_TOKENS)
    want = reference.request_batch(prompts, max_tokens=MAX_TOKENS)
    assert all(g["pool_tokens"] >= 8 * BLOCK for g in got), [g["pool_tokens"] for g in got]
    # pool_loads > 1: the engine preempted that request after its load and the pool served it again
    assert max(g["pool_loads"] for g in got) >= 2, [g["pool_loads"] for g in got]
    for g, w in zip(got, want):
        assert_same_generation(g, w)

"""The replica simulator: vLLM-like VRAM caches, the real Store as the pool, routing, TTFT model."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from bench.sim import (ROUTINGS, PoolSpec, PrefixHash, Served, TtftModel, VramCache, block_hashes,
                       make_router, serve, simulate)
from bench.workload import WorkloadConfig, generate, summarize

B = 32


@pytest.fixture(scope="module")
def trace() -> list[dict]:
    return generate(WorkloadConfig(sessions=12, faq=10, documents=3))


class Tokens:
    """Fresh token ids for crafted traces: no two blocks made here are ever equal."""

    def __init__(self) -> None:
        self._next = itertools.count(1)

    def blocks(self, n: int) -> list[int]:
        return [next(self._next) for _ in range(n * B)]


def test_block_hashes_chain_through_the_parent() -> None:
    """Equal blocks after different prefixes get different hashes; partial blocks get none."""
    a = block_hashes(list(range(1, 65)) + [7], B)
    b = block_hashes([9] * 32 + list(range(33, 65)), B)
    assert len(a) == 2 and len(b) == 2
    assert a[1] != b[1] and a[0] != b[0]
    assert block_hashes(list(range(1, 65)), B) == a


def test_vram_never_serves_the_last_token_and_evicts_least_recent() -> None:
    """A repeated block-aligned prompt hits all but its last block; capacity forces LRU eviction."""
    tok = Tokens()
    vram = VramCache(num_blocks=9)  # 8 usable
    first = tok.blocks(4)
    hashes = block_hashes(first, B)
    assert serve(first, hashes, vram, None, B).vram_tokens == 0
    assert serve(first, hashes, vram, None, B).vram_tokens == 3 * B
    other = tok.blocks(6)
    serve(other, block_hashes(other, B), vram, None, B)  # 6 more blocks: 2 of first's go
    assert serve(first, hashes, vram, None, B).vram_tokens < 3 * B


def test_vram_refuses_a_prompt_larger_than_its_capacity() -> None:
    vram = VramCache(num_blocks=3)
    prompt = Tokens().blocks(3)
    with pytest.raises(ValueError, match="needs 3 blocks"):
        serve(prompt, block_hashes(prompt, B), vram, None, B)


def test_round_robin_without_a_pool_loses_hits_as_replicas_grow(trace: list[dict]) -> None:
    """VRAM only: sessions scatter over replicas, so the hit rate falls with N."""
    rates = [simulate(trace, n, "round-robin", 1024).hit_rate() for n in (1, 2, 4)]
    assert rates[0] > rates[1] > rates[2]
    assert rates[2] < 0.75 * rates[0]


def test_shared_pool_keeps_the_hit_rate_near_one_replica(trace: list[dict]) -> None:
    """With a pool that holds the working set, round-robin over 4 replicas stays near N = 1."""
    pool = PoolSpec(summarize(trace)["num_distinct_blocks"], 4096)
    one = simulate(trace, 1, "round-robin", 192, pool).hit_rate()
    four = simulate(trace, 4, "round-robin", 192, pool)
    assert four.hit_rate() >= 0.97 * one
    assert four.pool_hit_rate() > 0
    assert four.hit_rate() > simulate(trace, 4, "round-robin", 192).hit_rate()


def test_session_affinity_keeps_a_session_on_one_replica(trace: list[dict]) -> None:
    outcome = simulate(trace, 4, "session", 192)
    replicas: dict[str, set[int]] = {}
    for request, served in zip(trace, outcome.served):
        replicas.setdefault(request["session"], set()).add(served.replica)
    assert all(len(r) == 1 for r in replicas.values())
    assert len({served.replica for served in outcome.served}) > 1


def test_bounded_load_routing_never_exceeds_its_bound() -> None:
    """Even when every request has the same prefix, no replica holds more than the bound."""
    router = PrefixHash(4, key_blocks=2, eps=0.25, window=16)
    prompt = Tokens().blocks(3)
    hashes = block_hashes(prompt, B)
    recent: list[int] = []
    for i in range(200):
        bound = router.bound()
        replica = router.route({"session": i, "prompt": prompt}, hashes)
        recent = (recent + [replica])[-16:]
        assert Counter(recent)[replica] <= bound
        assert max(Counter(recent).values()) <= -(-5 * len(recent) // 16)  # ceil(1.25 * w / 4)
    assert len(set(recent)) >= 3, "an overloaded prefix must spill to other replicas"


def test_prefix_hash_sends_a_shared_prefix_to_one_replica_when_load_allows() -> None:
    tok = Tokens()
    head = tok.blocks(8)
    router = make_router("prefix-hash", 4, window=64, eps=10.0)
    chosen = {router.route({"session": i}, block_hashes(head + tok.blocks(2), B)) for i in range(20)}
    assert len(chosen) == 1


def test_unknown_routing_and_policy_are_refused() -> None:
    with pytest.raises(ValueError, match="routing"):
        make_router("random", 2)
    with pytest.raises(ValueError, match="policy"):
        simulate([], 1, ROUTINGS[0], 0, PoolSpec(4, 64, "fifo"))


def _pool_only(trace: list[dict], capacity: int, policy: str) -> float:
    return simulate(trace, 1, "round-robin", 0, PoolSpec(capacity, 64, policy)).hit_rate()


def test_leaf_first_beats_plain_lru_when_a_chain_root_is_oldest() -> None:
    """Plain LRU evicts a chain's root (oldest) and loses the whole chain; leaf-first keeps it."""
    tok = Tokens()
    chain = tok.blocks(6) + [1]
    trace = [{"session": 0, "prompt": chain}, {"session": 1, "prompt": tok.blocks(3) + [1]},
             {"session": 2, "prompt": chain}]
    assert _pool_only(trace, 8, "lru") < _pool_only(trace, 8, "leaf-lru")


def test_frequency_aware_keeps_a_hot_prefix_through_bursts_of_one_off_documents() -> None:
    """A prefix hit by many requests outlives pairs of newer one-off documents only with freq-lru."""
    tok = Tokens()
    hot = tok.blocks(4)
    trace = []
    for i in range(24):
        kind = i % 3 if i >= 3 else 2  # three hot requests first, then doc, doc, hot ...
        prompt = hot + tok.blocks(1) + [1] if kind == 2 else tok.blocks(6) + [1]
        trace.append({"session": i, "prompt": prompt})
    leaf, freq = _pool_only(trace, 10, "leaf-lru"), _pool_only(trace, 10, "freq-lru")
    assert freq > leaf


def test_ttft_model_recovers_known_costs_and_never_goes_negative() -> None:
    """Least squares on samples made from known coefficients gives those coefficients back."""
    truth = TtftModel(0.02, 2e-4, 1e-5, 1e-6)
    samples = [(s, truth.predict(s)) for s in
               (Served(0, n, v, p) for n in (100, 900, 2000) for v in (0, 320, 640)
                for p in (0, 256, 512) if v + p < n)]
    fitted = TtftModel.fit(samples)
    for got, want in zip(fitted.coefficients(), truth.coefficients()):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12)
    noisy = [(s, t - 2e-5 * s.pool_tokens) for s, t in samples]  # a pool hit "saves" time
    refit = TtftModel.fit(noisy)
    assert refit.pool_s_per_token == 0 and min(refit.coefficients()) >= 0
    with pytest.raises(ValueError):
        TtftModel.fit([])

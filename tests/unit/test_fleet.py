"""bench.fleet's pure parts: the fleet tokenizer round trip, per-run figures, the moved sessions
of the failure run and the goals, on hand-written request rows (no engines, no router); and the
simulator's parts (bench/fleet_engine.py, fleet_sim.py): caches, router models, shared-machine time, replay."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from bench.fleet import analyse, moved_sessions, summarize_run
from bench.fleet_model import make_fleet_model, text
from bench.fleet_engine import (CacheAware, EngineCache, EngineModel, Fleet, FewestPrefilling,
                                Job, PrefixTree, RouterView, common_prefix, run_closed_loop,
                                run_replay)
from bench.fleet_sim import against_repeats, connector_costs, repeatability
from bench.models import TinyLlama
from bench.sim import Pool, block_hashes


def row(id: int, session: str, replica: str, start_s: float, prompt: int, cached: int,
        ok: bool = True) -> dict[str, Any]:
    return {"id": id, "session": session, "kind": "chat", "request_id": f"r{id}",
            "prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": 4,
            "ttft_s": 0.1 * (id + 1), "latency_s": 0.5, "start_s": start_s, "ok": ok,
            "error": "", "replica": replica}


def test_tokenizer_round_trips_every_id_without_splitting_words(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    shape = TinyLlama(vocab_size=512)
    tokenizer = AutoTokenizer.from_pretrained(str(make_fleet_model(tmp_path, shape)))
    rng = random.Random(0)
    ids = [rng.randrange(1, 512) for _ in range(500)] + list(range(1, 512))
    assert tokenizer(text(ids))["input_ids"] == ids  # "w1" must not cut "w17" in two


def test_summary_counts_only_completed_requests() -> None:
    rows = [row(0, "s", "a", 0, 100, 50), row(1, "s", "b", 1, 100, 0),
            row(2, "t", "a", 2, 200, 200, ok=False)]
    run = {"requests": rows, "pool_tokens": 20, "wall_s": 2.0}
    s = summarize_run(run)
    assert s["hit_rate"] == 0.25 and s["pool_hit_rate"] == 0.1 and s["vram_hit_rate"] == 0.15
    assert s["per_replica"] == {"a": 1, "b": 1} and s["failed"] == 1 and s["completed"] == 2


def test_moved_sessions_are_the_killed_replicas_sessions_after_the_kill() -> None:
    failure = {"killed": "b", "killed_at_s": 10.0, "requests": [
        row(0, "s1", "b", 1, 100, 0), row(1, "s2", "a", 2, 100, 0),
        row(2, "s1", "a", 11, 200, 100),  # moved: first turn after the kill
        row(3, "s2", "a", 12, 200, 200),  # not moved: was on a
        row(4, "s1", "a", 13, 300, 300)]}
    baseline = {"requests": [dict(r, cached_tokens=c) for r, c in
                             zip(failure["requests"], (0, 0, 200, 200, 300))]}
    moved = moved_sessions(failure, baseline)
    assert moved["sessions"] == 1 and moved["moved_turns"] == 2
    assert moved["first_turn_hit_rate"] == 0.5
    assert moved["all_turns_hit_rate"] == 0.8
    assert moved["baseline_first_turn_hit_rate"] == 1.0


def test_goals_compare_pool_round_robin_with_the_best_policy() -> None:
    def run(cache: str, policy: str, n: int, cached: int) -> dict[str, Any]:
        r = {"cache": cache, "policy": policy, "n": n, "failure": False, "pool_tokens": 0,
             "wall_s": 1.0, "requests": [row(0, "s", "a", 0, 100, cached)]}
        r["summary"] = summarize_run(r)
        return r

    runs = [run("pool", "round_robin", 2, 90), run("pool", "kv_aware", 2, 100),
            run("vram", "round_robin", 2, 40), run("vram", "round_robin", 3, 30)]
    res = analyse(runs, [])
    assert res["hit_rate"]["pool"]["kv_aware"]["2"] == 1.0
    assert res["goals"]["pool_round_robin_vs_best"] == {"2": 0.9}
    assert res["goals"]["vram_round_robin_by_n"] == {"2": 0.4, "3": 0.3}


# --- bench/fleet_sim.py: the simulator's parts, on hand-made requests ---------------------------

BS = 4  # tokens per block in these tests


def test_engine_cache_keeps_the_blocks_of_requests_in_flight() -> None:
    cache = EngineCache(num_blocks=5, block_size=BS)  # 4 usable
    a, b = block_hashes(list(range(8)), BS), block_hashes(list(range(100, 108)), BS)
    held = cache.allocate(a, 0, 8)  # 2 blocks, still running
    cache.release(cache.allocate(b, 0, 8))  # 2 blocks, finished
    c = block_hashes(list(range(200, 208)), BS)
    cache.allocate(c, 0, 8)  # needs 2: only b's can go
    assert cache.match(a, 2) == 2 and cache.match(b, 2) == 0
    cache.release(held)
    assert cache.match(a, 2) == 2  # freed, not evicted yet


def test_common_prefix_counts_characters() -> None:
    assert common_prefix("w1 w2 w3", "w1 w2 w4") == 7
    assert common_prefix("", "abc") == 0 and common_prefix("abc", "abc") == 3


def test_prefix_tree_names_the_first_worker_to_reach_the_matched_node() -> None:
    tree = PrefixTree()
    tree.insert("sys A question 1", 1)
    tree.insert("sys A question 2", 0)  # reaches the same depth later: the node stays worker 1's
    assert tree.match("sys A question 3") == (len("sys A question "), 1)
    tree.insert("sys A question 3 more", 0)
    assert tree.match("sys A question 3 more and more") == (len("sys A question 3 more"), 0)


def test_cache_aware_balances_only_past_both_thresholds() -> None:
    router = CacheAware(2, cache_threshold=0.3, balance_abs=2, balance_rel=1.2)
    shared = list(range(1, 60))
    assert router.route({"prompt": shared}, RouterView([0, 0], [0, 0])) == 0  # empty tree: least
    # a long shared prefix follows the worker that has it, up to 2 more in flight...
    assert router.route({"prompt": shared + [70]}, RouterView([2, 0], [0, 0])) == 0
    # ...and goes to the least loaded past that (3 - 0 > 2 and 3 > 1.2 x 0)
    assert router.route({"prompt": shared + [71]}, RouterView([3, 0], [0, 0])) == 1
    # a prompt sharing too little (<= 30% of its characters) goes to the least loaded
    other = [1, 2] + list(range(300, 360))
    assert router.route({"prompt": other}, RouterView([1, 2], [0, 0])) == 0
    assert router.route({"prompt": other}, RouterView([2, 1], [0, 0])) == 0  # now it matches


def test_kv_aware_model_takes_the_fewest_waiting_for_a_first_token() -> None:
    router = FewestPrefilling(3)
    assert router.route({}, RouterView([3, 1, 1], [0, 1, 1])) == 0
    assert router.route({}, RouterView([3, 2, 1], [1, 1, 1])) == 2


MODEL = EngineModel(step_s=0.01, recompute_s_per_token=0.001, cached_s_per_token=0.0,
                    decode_s_per_request=0.0, http_s=0.0)


def _drain(fleet: Fleet) -> None:
    while (end := fleet.next_step_end()) != float("inf"):
        fleet.advance(end)


def test_busy_replicas_share_the_machine() -> None:
    prompt = list(range(1, 91))  # 90 tokens: 0.1 s of machine time with the step
    alone = Fleet(2, MODEL, 64, None, BS, max_tokens=1)
    job = Job({"prompt": prompt}, 0.0)
    alone.arrive(job, 0)
    alone.advance(0.0)
    _drain(alone)
    both = Fleet(2, MODEL, 64, None, BS, max_tokens=1)
    jobs = [Job({"prompt": prompt}, 0.0), Job({"prompt": [p + 100 for p in prompt]}, 0.0)]
    both.arrive(jobs[0], 0)
    both.arrive(jobs[1], 1)
    both.advance(0.0)
    _drain(both)
    assert abs(job.ttft - 0.1) < 1e-9
    assert all(abs(j.ttft - 0.2) < 1e-9 for j in jobs)  # two engines, one machine


def test_outside_load_slows_every_engine_alike() -> None:
    loaded = EngineModel(**{**MODEL.__dict__, "outside_load": 3.0})
    fleet = Fleet(2, loaded, 64, None, BS, max_tokens=1)
    job = Job({"prompt": list(range(1, 91))}, 0.0)
    fleet.arrive(job, 0)
    fleet.advance(0.0)
    _drain(fleet)
    assert abs(job.ttft - 0.4) < 1e-9  # 0.1 s of work at 1 / (1 + 3) of the machine


def test_engines_of_one_thread_each_share_the_cores_only_past_one_each() -> None:
    """With cores, each engine runs one thread: two busy engines on two cores both run at full
    speed, three share them (2/3 of a core each)."""
    two_cores = EngineModel(**{**MODEL.__dict__, "cores": 2.0})
    for n, want in ((2, 0.1), (3, 0.15)):
        fleet = Fleet(n, two_cores, 64, None, BS, max_tokens=1)
        jobs = [Job({"prompt": [p + 100 * i for p in range(1, 91)]}, 0.0) for i in range(n)]
        for i, job in enumerate(jobs):
            fleet.arrive(job, i)
        fleet.advance(0.0)
        _drain(fleet)
        assert all(abs(j.ttft - want) < 1e-9 for j in jobs), (n, [j.ttft for j in jobs])


def test_repeats_are_predicted_out_of_sample_and_their_median_is_the_real_figure() -> None:
    def run(rr: float, kv: float) -> dict[str, Any]:
        return {"ttft_p50_s": {"pool": {"round_robin": {"2": rr}, "kv_aware": {"2": kv}}},
                "hit_rate": {"pool": {"round_robin": {"2": 0.7}, "kv_aware": {"2": 0.7}}}}

    res = {**run(0.10, 0.21), "sim": {"ttft_p50_s": {"pool": {"round_robin": {"2": 0.11, "4": 1.0},
                                                              "kv_aware": {"2": 0.10, "4": 1.0}}},
                                      "hit_rate": {"pool": {"round_robin": {"2": 0.7},
                                                            "kv_aware": {"2": 0.77}}}}}
    out = against_repeats(res, [run(0.10, 0.25), run(0.14, 0.28)])
    rr, kv = out["by_config"]["pool"]["round_robin"], out["by_config"]["pool"]["kv_aware"]
    assert rr["real_median_ttft_p50_s"] == 0.10 and kv["real_median_ttft_p50_s"] == 0.25
    assert abs(rr["sim_vs_median_rel_error"] - 0.1) < 1e-9 and abs(kv["sim_vs_median_rel_error"] + 0.6) < 1e-9
    assert [round(e, 3) for e in rr["sim_vs_repeat_rel_error"]] == [0.1, -0.214]
    assert out["sim_vs_median_within_20pct"] == 1 and out["configurations"] == 2
    assert out["sim_vs_repeats_within_20pct"] == [1, 4]
    assert out["real_vs_median_within_20pct"] == [5, 6]  # only round-robin's 0.14 is 40% off
    assert abs(out["sim_vs_median_mean_abs_rel_error"] - 0.35) < 1e-9
    assert abs(out["sim_hit_vs_median_max_abs_rel_error"] - 0.1) < 1e-9  # kv_aware: 0.77 / 0.7
    assert against_repeats(res, []) == {}


def test_repeatability_compares_the_failure_run_before_the_kill_with_its_baseline() -> None:
    base = {"cache": "pool", "policy": "consistent_hash", "n": 3, "failure": False,
            "requests": [row(0, "s", "a", 0, 100, 0), row(1, "t", "b", 0, 100, 50)]}
    failure = dict(base, failure=True, killed_at_s=0.25,
                   requests=[dict(r, ttft_s=2 * r["ttft_s"]) for r in base["requests"]])
    rep = repeatability({"runs": [base, failure]})["pool"]
    assert rep["requests"] == 1  # request 1's first token (0.4 s) came after the kill
    assert rep["ttft_p50_s"] == [0.2, 0.1] and rep["rel_difference"] == 1.0
    assert rep["same_replica"] == 1 and rep["same_cached_tokens"] == 1


def test_pool_blocks_are_saved_when_the_prefill_step_ends() -> None:
    prompt = list(range(1, 91))
    for start_b, pool_hit in ((0.05, 0), (0.2, 88)):  # before / after A's prefill ends at 0.1 s
        fleet = Fleet(2, MODEL, 64, Pool(64, 1, "leaf-lru"), BS, max_tokens=1)
        a, b = Job({"prompt": prompt}, 0.0), Job({"prompt": prompt}, start_b)
        fleet.arrive(a, 0)
        fleet.advance(0.0)
        while fleet.next_step_end() <= start_b:
            fleet.advance(fleet.next_step_end())
        fleet.advance(start_b)
        fleet.arrive(b, 1)
        fleet.advance(start_b)
        _drain(fleet)
        assert b.pool_blocks * BS == pool_hit


def test_a_pool_hit_is_copied_in_the_step_that_prefills_it() -> None:
    """As the connector loads on a CPU engine (worker_side.py, in-step loads): the hit's copy is
    work of the very step that computes what the pool lacked, so a request beside it in that
    step waits for the copy too."""
    loading = EngineModel(**{**MODEL.__dict__, "pool_load_s": 0.003, "pool_s_per_token": 0.0005})
    prompt = list(range(1, 91))
    ttfts = []
    for other in (False, True):
        fleet = Fleet(2, loading, 64, Pool(64, 1, "leaf-lru"), BS, max_tokens=1)
        a = Job({"prompt": prompt}, 0.0)
        fleet.arrive(a, 0)
        fleet.advance(0.0)
        _drain(fleet)  # a's prefill ends at 0.1 s and saves its 22 full blocks to the pool
        fleet.advance(0.2)
        b, c = Job({"prompt": prompt}, 0.2), Job({"prompt": [t + 100 for t in prompt]}, 0.2)
        fleet.arrive(b, 1)
        if other:
            fleet.arrive(c, 1)
        fleet.advance(0.2)
        _drain(fleet)
        assert b.pool_blocks * BS == 88
        ttfts.append((b.ttft, c.ttft))
    load = 0.003 + 0.0005 * 88
    # alone: one step of the load and the 2 tokens the pool lacked
    assert abs(ttfts[0][0] - (0.01 + load + 0.002)) < 1e-9
    # beside c's 90-token prefill, in the same step: both end together
    assert abs(ttfts[1][0] - (0.01 + load + 0.002 + 0.09)) < 1e-9
    assert abs(ttfts[1][1] - ttfts[1][0]) < 1e-9


def test_a_pool_run_pays_the_measured_save_and_lookup_costs_in_the_step() -> None:
    """The connector's other costs (fleet_sim.connector_costs): its saves add to every step's
    computed tokens, the scheduler's lookup wait to the step that looks the request up; neither
    is paid without a pool."""
    costly = EngineModel(**{**MODEL.__dict__, "save_s_per_token": 0.0002, "lookup_s": 0.004})
    prompt = list(range(1, 91))
    for pool, expected in ((None, 0.01 + 0.09), (Pool(64, 1, "leaf-lru"),
                                                 0.01 + 0.09 + 0.004 + 0.0002 * 90)):
        fleet = Fleet(1, costly, 64, pool, BS, max_tokens=1)
        job = Job({"prompt": prompt}, 0.0)
        fleet.arrive(job, 0)
        fleet.advance(0.0)
        _drain(fleet)
        assert abs(job.ttft - expected) < 1e-9


def test_connector_costs_are_the_counters_per_computed_token_and_per_lookup() -> None:
    rows = [{"ok": True, "prompt_tokens": 100, "cached_tokens": 40},
            {"ok": True, "prompt_tokens": 50, "cached_tokens": 10},
            {"ok": False, "prompt_tokens": 999, "cached_tokens": 0}]  # never answered: not counted
    runs = [{"requests": rows, "connector": {"save_s": 0.01, "lookups": 2, "lookup_wait_s": 0.006}},
            {"requests": rows, "connector": {"save_s": 0.03, "lookups": 2, "lookup_wait_s": 0.002}},
            {"requests": rows, "connector": None}]  # a VRAM-only run records none
    costs = connector_costs(runs)
    assert abs(costs["save_s_per_token"] - 0.04 / 200) < 1e-12
    assert abs(costs["lookup_s"] - 0.008 / 4) < 1e-12
    assert connector_costs([{"requests": rows}]) == {"save_s_per_token": 0.0, "lookup_s": 0.0}


def test_a_closed_loop_worker_sends_again_only_when_it_has_the_answer() -> None:
    """The client's worker, and a session's next turn, wait for the whole answer: the engine's
    last step plus http_s, the same end its latency counts."""
    slow_http = EngineModel(**{**MODEL.__dict__, "http_s": 0.05})
    trace = [{"id": 0, "session": "s", "prompt": list(range(1, 91))},
             {"id": 1, "session": "t", "prompt": list(range(101, 191))},
             {"id": 2, "session": "s", "prompt": list(range(1, 91)) + [7] * 10}]
    for concurrency in (1, 2):
        jobs = {j.request["id"]: j for j in run_closed_loop(
            trace, 1, "round_robin", slow_http, 64, None, BS, 1, concurrency)}
        first = jobs[0].arrival + jobs[0].latency
        if concurrency == 1:
            assert abs(first - 0.15) < 1e-9  # 0.1 s of engine, then 0.05 s back to the client
        # one worker: the next request waits for the first answer; two: session s's second
        # turn still does (requests 0 and 1 share a step: 0.19 s of engine, then 0.05 s)
        later = jobs[1] if concurrency == 1 else jobs[2]
        assert abs(later.arrival - first) < 1e-9, (concurrency, later.arrival)


def test_replay_puts_real_requests_on_their_real_replicas() -> None:
    prompt = list(range(1, 91))
    trace = {0: {"id": 0, "prompt": prompt}, 1: {"id": 1, "prompt": prompt + [7] * 10}}
    rows = [{"id": 0, "replica": "r-0", "start_s": 0.0, "ok": True},
            {"id": 1, "replica": "r-0", "start_s": 1.0, "ok": True},
            {"id": 2, "replica": "r-1", "start_s": 0.5, "ok": False}]
    replay = run_replay({"requests": rows}, trace, MODEL, vram_blocks=64, pool=None,
                        block_size=BS, max_tokens=1)
    assert [row["id"] for row, _ in replay] == [0, 1]
    assert replay[1][1].vram_blocks == 22  # 88 of A's 90 tokens: full blocks only


def test_free_port_never_hands_out_the_same_port_twice() -> None:
    # Replicas bind their ports late and vLLM binds with SO_REUSEPORT, so a port picked twice
    # put two replicas behind one URL (CI: the router refused a duplicate worker URL).
    from bench.fleet_procs import QUIET_PORTS, free_port

    ports = [free_port() for _ in range(1500)]  # a random pick repeats within ~140 draws
    assert len(set(ports)) == len(ports)
    assert all(QUIET_PORTS[0] <= p < QUIET_PORTS[1] for p in ports)


def test_a_step_computes_at_most_the_token_budget_and_a_cut_prefill_goes_on_first() -> None:
    """vLLM's chunked prefill: with a budget of 100 tokens, two 90-token prompts waiting together
    take a step of 100 (the first whole, 10 of the second) and one of 80: the first token of the
    first comes after 0.11 s, of the second after 0.2 s (not both at 0.19 s in one step)."""
    fleet = Fleet(1, MODEL, 64, None, BS, max_tokens=1, max_batched_tokens=100)
    jobs = [Job({"prompt": [p + 100 * i for p in range(1, 91)]}, 0.0) for i in range(2)]
    for job in jobs:
        fleet.arrive(job, 0)
    fleet.advance(0.0)
    _drain(fleet)
    assert abs(jobs[0].ttft - 0.11) < 1e-9 and abs(jobs[1].ttft - 0.20) < 1e-9, [j.ttft for j in jobs]

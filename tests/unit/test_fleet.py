"""bench.fleet's pure parts: the fleet tokenizer round trip, per-run figures, the moved sessions
of the failure run and the goals, on hand-written request rows (no engines, no router)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from bench.fleet import analyse, moved_sessions, summarize_run
from bench.fleet_model import make_fleet_model, text
from bench.models import TinyLlama


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

"""The workload generator: deterministic from its seed, and the structure its docstring promises."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import pytest

from bench.workload import TASKS, WorkloadConfig, generate, main, read_trace, summarize

BLOCK = 32
SMALL = WorkloadConfig(sessions=10, faq=16, documents=5, turns=(3, 5))


def full_blocks(prompt: list[int]) -> list[tuple[int, ...]]:
    return [tuple(prompt[i:i + BLOCK]) for i in range(0, len(prompt) - BLOCK + 1, BLOCK)]


def test_same_seed_gives_the_same_trace_and_another_seed_does_not() -> None:
    """The trace is a function of the parameters and the seed only."""
    assert generate(SMALL) == generate(SMALL)
    assert generate(SMALL) != generate(dataclasses.replace(SMALL, seed=1))


def test_fields_order_and_token_range() -> None:
    """Every request carries the documented fields, t counts arrivals, tokens fit the vocab."""
    trace = generate(SMALL)
    assert [r["t"] for r in trace] == list(range(len(trace)))
    for r in trace:
        assert {"id", "t", "session", "task", "turn", "kind", "prompt", "max_tokens"} <= set(r)
        assert r["task"] in TASKS and r["kind"] in ("chat", "faq", "document")
        assert all(1 <= tok < SMALL.vocab_size for tok in r["prompt"])
        assert 0 < len(r["prompt"]) <= SMALL.max_prompt_tokens and r["max_tokens"] >= 1
    counts = summarize(trace)["kinds"]
    assert counts["faq"] == SMALL.faq and counts["document"] == SMALL.documents


def test_system_prompts_are_shared_as_full_blocks() -> None:
    """Requests naming the same system prompt start with the same full blocks; others differ."""
    trace = generate(SMALL)
    heads: dict[str, list[list[tuple[int, ...]]]] = defaultdict(list)
    for r in trace:
        heads[r["prefix"]].append(full_blocks(r["prompt"]))
    shared = min(SMALL.system_tokens[0], SMALL.faq_preamble_tokens[0]) // BLOCK
    assert len(heads) > 2
    for blocks in heads.values():
        assert len({tuple(b[:shared]) for b in blocks}) == 1
    firsts = {blocks[0][0] for blocks in heads.values()}
    assert len(firsts) == len(heads), "two different prefixes share their first block"
    used = sum(len(b) > 1 for b in heads.values())
    assert used >= 2, "no system prompt was used by two requests"


def test_sessions_grow_turn_by_turn() -> None:
    """Each turn's prompt extends the previous turn's prompt (plus its reply) and comes later."""
    sessions: dict[str, list[dict]] = defaultdict(list)
    for r in generate(SMALL):
        if r["kind"] == "chat":
            sessions[r["session"]].append(r)
    assert len(sessions) == SMALL.sessions
    for turns in sessions.values():
        assert [r["turn"] for r in turns] == list(range(1, len(turns) + 1))
        for prev, cur in zip(turns, turns[1:]):
            assert cur["t"] > prev["t"]
            assert cur["prompt"][:len(prev["prompt"])] == prev["prompt"]
            assert len(cur["prompt"]) > len(prev["prompt"]) + prev["max_tokens"]
    assert max(len(t) for t in sessions.values()) >= 3


def test_faq_shares_the_preamble_and_repeats_questions_in_several_wordings() -> None:
    """FAQ prompts are a shared preamble + a question; a popular question comes back reworded."""
    config = dataclasses.replace(SMALL, faq=60, faq_preambles=1)
    faqs = [r for r in generate(config) if r["kind"] == "faq"]
    preamble_len = min(len(r["prompt"]) for r in faqs) - config.question_tokens[1]
    assert len({tuple(r["prompt"][:preamble_len]) for r in faqs}) == 1
    wordings: dict[int, set[tuple[int, ...]]] = defaultdict(set)
    for r in faqs:
        wordings[r["question"]].add(tuple(r["prompt"][-config.question_tokens[0]:]))
    assert max(len(w) for w in wordings.values()) > 1
    assert len(wordings) > 1


def test_documents_are_never_repeated() -> None:
    """One-off documents share only the system prompt: their later blocks occur once in the trace."""
    trace = generate(SMALL)
    seen: dict[tuple[int, ...], int] = defaultdict(int)
    for r in trace:
        for i in range(BLOCK, len(r["prompt"]) + 1, BLOCK):
            seen[tuple(r["prompt"][:i])] += 1
    for r in trace:
        if r["kind"] == "document":
            tail_start = (SMALL.system_tokens[1] // BLOCK + 1) * BLOCK
            assert all(seen[tuple(r["prompt"][:i])] == 1
                       for i in range(tail_start, len(r["prompt"]) + 1, BLOCK))


@pytest.mark.parametrize("change, word", [
    ({"vocab_size": 1}, "vocab_size"),
    ({"turns": (3, 2)}, "turns"),
    ({"sessions": -1}, "sessions"),
    ({"max_prompt_tokens": 100}, "max_prompt_tokens"),
])
def test_bad_parameters_are_refused_by_name(change: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        generate(dataclasses.replace(SMALL, **change))


def test_command_line_writes_a_readable_trace(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`python -m bench.workload --out F --seed 3 ...` writes the JSONL that read_trace loads."""
    out = tmp_path / "trace.jsonl"
    assert main(["--out", str(out), "--seed", "3", "--sessions", "4", "--faq", "2",
                 "--documents", "1", "--turns", "2", "3"]) == 0
    trace = read_trace(out)
    config = WorkloadConfig(seed=3, sessions=4, faq=2, documents=1, turns=(2, 3))
    assert trace == generate(config)
    assert json.loads(capsys.readouterr().out)["num_requests"] == len(trace)
    assert main(["--out", str(out), "--turns", "0", "1"]) == 2


def test_malformed_trace_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": [1, 2]}\n{"prompt": "text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_trace(path)

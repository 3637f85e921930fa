"""A seeded mixed workload of token-id prompts, written as a JSONL trace for the routing and
eviction benchmarks (bench/replicas.py, bench/eviction.py). Pure: numpy only, no vLLM.

    python -m bench.workload --out trace.jsonl --seed 0 [--sessions 24 --faq 30 --documents 12 ...]

Four kinds of request, each labelled with its task type (summarization, code, support):

- ``chat``: multi-turn sessions. Turn 1 is a task's system prompt + a user message; every later turn
  appends the previous reply and a new user message, so a session's prompt grows turn by turn and
  each turn's prompt starts with the whole previous prompt. A session ends after its drawn number
  of turns or before its prompt would pass ``max_prompt_tokens``.
- ``faq``: a support FAQ preamble (a long shared knowledge base) + one of ``faq_questions``
  questions, picked Zipf-like (a few are asked often), each asked in one of ``faq_wordings``
  wordings (independent token strings of similar length, so only the preamble is shared).
- ``document``: a one-off long document to summarize after the summarization system prompt; its
  tokens never occur again.

Parameters (WorkloadConfig; every one is a flag of the command line, `--help` lists them):

- seed: numpy Generator seed; the same parameters and seed give the same trace, byte for byte.
- vocab_size: token ids are drawn from [1, vocab_size); 512 fits every model of bench/models.py.
- block_size: vLLM's block (32 in our engines); only used to report block-level sharing.
- system_prompts_per_task: distinct system prompts per task type; sessions and documents of a
  task pick one uniformly. system_tokens: (min, max) length of each system prompt.
- sessions, turns: number of chat sessions and (min, max) turns each; user_tokens and
  reply_tokens: (min, max) tokens of each user message and each assistant reply.
- faq: FAQ requests; faq_preambles: distinct preambles (one per product); faq_preamble_tokens,
  faq_questions, faq_wordings, question_tokens: as above; faq_zipf: skew of question popularity.
- documents: one-off documents; document_tokens: (min, max) length of each.
- max_prompt_tokens: hard cap on any prompt (keep it below the engines' max_model_len).
- mean_turn_gap: mean gap between two turns of a session, in units of the trace's span (1.0);
  sessions, FAQ questions and documents start uniformly over the span and the trace is sorted by
  arrival time, so sessions interleave.

Lengths are not block-aligned on purpose: a system prompt of L tokens is shared as floor(L / 32)
full blocks, its tail block mixes with the user message, as in real traffic.

Trace fields, one JSON object per line: id, t (arrival order, 0..n-1), session (a label; FAQ and
document requests get their own one-off label), task, turn (1-based; 1 for one-shot kinds), kind
(chat | faq | document), prompt (token ids), max_tokens (the reply length; chat's next turn carries
a reply of exactly this many tokens in its history, so a replay that generates fewer recomputes it,
in the real engines and in the simulator alike), prefix (a label of the shared head: system prompt
or FAQ preamble).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("summarization", "code", "support")
# One line per WorkloadConfig field, for --help (the module docstring says more).
HELP = {
    "seed": "seed of numpy's Generator; same parameters + seed = same trace",
    "vocab_size": "token ids are drawn from [1, vocab_size)",
    "block_size": "vLLM block size, used for the working-set summary",
    "system_prompts_per_task": "distinct system prompts per task type",
    "system_tokens": "length range of a system prompt",
    "sessions": "number of multi-turn chat sessions",
    "turns": "turns per session (a session also ends at max_prompt_tokens)",
    "user_tokens": "length range of a user message",
    "reply_tokens": "length range of a reply (max_tokens; carried into the next turn)",
    "faq": "number of FAQ requests",
    "faq_preambles": "distinct FAQ preambles (shared knowledge bases)",
    "faq_preamble_tokens": "length range of a FAQ preamble",
    "faq_questions": "distinct FAQ questions",
    "faq_wordings": "wordings of each question",
    "question_tokens": "length range of a question wording",
    "faq_zipf": "Zipf exponent of question popularity",
    "documents": "number of one-off documents to summarize",
    "document_tokens": "length range of a document",
    "max_prompt_tokens": "cap on any prompt's length",
    "mean_turn_gap": "mean gap between a session's turns, as a share of the trace's span",
}


@dataclass(frozen=True)
class WorkloadConfig:
    seed: int = 0
    vocab_size: int = 512
    block_size: int = 32
    system_prompts_per_task: int = 2
    system_tokens: tuple[int, int] = (400, 1200)
    sessions: int = 24
    turns: tuple[int, int] = (2, 6)
    user_tokens: tuple[int, int] = (40, 200)
    reply_tokens: tuple[int, int] = (60, 240)
    faq: int = 30
    faq_preambles: int = 2
    faq_preamble_tokens: tuple[int, int] = (800, 1400)
    faq_questions: int = 8
    faq_wordings: int = 3
    question_tokens: tuple[int, int] = (16, 60)
    faq_zipf: float = 1.2
    documents: int = 12
    document_tokens: tuple[int, int] = (800, 2400)
    max_prompt_tokens: int = 4000
    mean_turn_gap: float = 0.08

    def validate(self) -> None:
        """Raise ValueError naming the first unusable parameter."""
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        for name in ("system_prompts_per_task", "faq_preambles", "faq_questions", "faq_wordings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("sessions", "faq", "documents"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple) and not 1 <= value[0] <= value[1]:
                raise ValueError(f"{f.name} must be (min, max) with 1 <= min <= max, got {value}")
        longest_one_shot = max(
            self.system_tokens[1] + self.user_tokens[1],  # a session's first turn
            self.faq_preamble_tokens[1] + self.question_tokens[1],
            self.system_tokens[1] + self.document_tokens[1] + self.user_tokens[1])
        if self.max_prompt_tokens < longest_one_shot:
            raise ValueError(f"max_prompt_tokens {self.max_prompt_tokens} is below the longest "
                             f"one-shot prompt the other parameters allow ({longest_one_shot})")
        if self.mean_turn_gap <= 0:
            raise ValueError(f"mean_turn_gap must be positive, got {self.mean_turn_gap}")


@dataclass
class _Draw:
    """The seeded random source and the shared heads drawn from it."""

    config: WorkloadConfig
    rng: np.random.Generator
    systems: dict[str, list[list[int]]] = field(default_factory=dict)
    preambles: list[list[int]] = field(default_factory=list)
    wordings: list[list[list[int]]] = field(default_factory=list)  # [question][wording]

    def tokens(self, length_range: tuple[int, int]) -> list[int]:
        n = int(self.rng.integers(length_range[0], length_range[1] + 1))
        return self.rng.integers(1, self.config.vocab_size, n).tolist()

    def length(self, length_range: tuple[int, int]) -> int:
        return int(self.rng.integers(length_range[0], length_range[1] + 1))


def generate(config: WorkloadConfig) -> list[dict[str, Any]]:
    """The trace for config: requests in arrival order (see the module docstring)."""
    config.validate()
    d = _Draw(config, np.random.default_rng(config.seed))
    c = config
    d.systems = {task: [d.tokens(c.system_tokens) for _ in range(c.system_prompts_per_task)]
                 for task in TASKS}
    d.preambles = [d.tokens(c.faq_preamble_tokens) for _ in range(c.faq_preambles)]
    d.wordings = [[d.tokens(c.question_tokens) for _ in range(c.faq_wordings)]
                  for _ in range(c.faq_questions)]
    # (arrival time, tie-break, request without id/t); each kind draws from the rng in a fixed order
    events: list[tuple[float, int, dict[str, Any]]] = []
    for i in range(c.sessions):
        events += _session(d, i)
    events += [_faq(d, i) for i in range(c.faq)]
    events += [_document(d, i) for i in range(c.documents)]
    events.sort(key=lambda e: (e[0], e[1]))
    return [{"id": t, "t": t, **request} for t, (_, _, request) in enumerate(events)]


def _session(d: _Draw, index: int) -> list[tuple[float, int, dict[str, Any]]]:
    c = d.config
    task = TASKS[int(d.rng.integers(len(TASKS)))]
    system_index = int(d.rng.integers(c.system_prompts_per_task))
    history = list(d.systems[task][system_index])
    num_turns = int(d.rng.integers(c.turns[0], c.turns[1] + 1))
    time_s = float(d.rng.uniform(0.0, 1.0))
    out = []
    for turn in range(1, num_turns + 1):
        user = d.tokens(c.user_tokens)
        reply_len = d.length(c.reply_tokens)
        if len(history) + len(user) > c.max_prompt_tokens:
            break
        prompt = history + user
        out.append((time_s, index * 1000 + turn, {
            "session": f"chat-{index}", "task": task, "turn": turn, "kind": "chat",
            "prefix": f"system-{task}-{system_index}", "prompt": prompt, "max_tokens": reply_len}))
        # The next turn carries this reply in its history (tokens drawn here, not generated).
        history = prompt + d.rng.integers(1, c.vocab_size, reply_len).tolist()
        time_s += float(d.rng.exponential(c.mean_turn_gap))
    return out


def _faq(d: _Draw, index: int) -> tuple[float, int, dict[str, Any]]:
    c = d.config
    preamble = int(d.rng.integers(c.faq_preambles))
    ranks = np.arange(1, c.faq_questions + 1, dtype=float) ** -c.faq_zipf
    question = int(d.rng.choice(c.faq_questions, p=ranks / ranks.sum()))
    wording = int(d.rng.integers(c.faq_wordings))
    prompt = d.preambles[preamble] + d.wordings[question][wording]
    return (float(d.rng.uniform(0.0, 1.0)), 10**9 + index, {
        "session": f"faq-{index}", "task": "support", "turn": 1, "kind": "faq",
        "prefix": f"faq-{preamble}", "question": question, "wording": wording,
        "prompt": prompt, "max_tokens": d.length(c.reply_tokens)})


def _document(d: _Draw, index: int) -> tuple[float, int, dict[str, Any]]:
    c = d.config
    system_index = int(d.rng.integers(c.system_prompts_per_task))
    prompt = (d.systems["summarization"][system_index] + d.tokens(c.document_tokens)
              + d.tokens(c.user_tokens))
    return (float(d.rng.uniform(0.0, 1.0)), 2 * 10**9 + index, {
        "session": f"doc-{index}", "task": "summarization", "turn": 1, "kind": "document",
        "prefix": f"system-summarization-{system_index}", "prompt": prompt,
        "max_tokens": d.length(c.reply_tokens)})


# --- trace files -----------------------------------------------------------------------------
def write_trace(requests: Iterable[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        for request in requests:
            out.write(json.dumps(request, separators=(",", ":")) + "\n")


def read_trace(path: Path) -> list[dict[str, Any]]:
    """Requests of a JSONL trace; raises ValueError naming the line of a malformed one."""
    requests = []
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
            prompt = request.get("prompt") if isinstance(request, dict) else None
            if not isinstance(prompt, list) or not prompt or not all(
                    isinstance(tok, int) for tok in prompt):
                raise ValueError(f"{path}:{number}: 'prompt' must be a non-empty list of token ids")
            requests.append(request)
    return requests


def summarize(requests: Sequence[dict[str, Any]], block_size: int = 32) -> dict[str, Any]:
    """Counts per kind, prompt tokens, and distinct full blocks (the working set, in blocks)."""
    kinds: dict[str, int] = {}
    for r in requests:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    distinct: set[tuple[int, ...]] = set()
    for r in requests:
        prompt = r["prompt"]
        for end in range(block_size, len(prompt) + 1, block_size):
            distinct.add(tuple(prompt[:end]))  # a block is named by its whole prefix, as in vLLM
    return {"num_requests": len(requests), "kinds": kinds,
            "num_prompt_tokens": sum(len(r["prompt"]) for r in requests),
            "num_distinct_blocks": len(distinct),
            "max_prompt_tokens": max((len(r["prompt"]) for r in requests), default=0)}


# --- command line ----------------------------------------------------------------------------
def parse_config(argv: list[str] | None = None,
                 prog: str = "python -m bench.workload") -> tuple[WorkloadConfig, argparse.Namespace]:
    """WorkloadConfig from flags named after its fields (--system-tokens 400 1200, ...)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="where to write the JSONL trace")
    add_config_flags(parser)
    args = parser.parse_args(argv)
    return config_from_args(args), args


def add_config_flags(parser: argparse.ArgumentParser, defaults: WorkloadConfig | None = None) -> None:
    """One flag per WorkloadConfig field, with the field's default."""
    defaults = defaults or WorkloadConfig()
    for f in dataclasses.fields(WorkloadConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, tuple):
            parser.add_argument(flag, type=int, nargs=2, default=value, metavar=("MIN", "MAX"),
                                help=f"{HELP[f.name]} (default {value[0]} {value[1]})")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"{HELP[f.name]} (default {value})")


def config_from_args(args: argparse.Namespace) -> WorkloadConfig:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(WorkloadConfig):
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return WorkloadConfig(**values)


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(argv)
    if args.out is None:
        print("error: --out is required", file=sys.stderr)
        return 2
    try:
        requests = generate(config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_trace(requests, args.out)
    print(json.dumps(summarize(requests, config.block_size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

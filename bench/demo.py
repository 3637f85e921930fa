"""`make demo`: a daemon and two vLLM CPU replicas on a small local random-weight model.

Replica 1 computes a long prompt; replica 2 gets a prompt sharing its prefix and loads that
prefix from the shared pool instead of recomputing it; replica 1 then gets replica 2's prompt and
finds the prefix in its own VRAM prefix cache (tier 0). Prints where each prompt's tokens came
from and the time to first token, then stops everything it started.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.models import TinyLlama, make_model
from bench.replica import ReplicaProcess
from bench.daemon import Daemon

DEMO_MODEL = TinyLlama(num_layers=4, hidden_size=512, num_heads=8, num_kv_heads=8,
                       intermediate_size=1408, vocab_size=4096, max_position_embeddings=4096)
BLOCK = 32


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix-tokens", type=int, default=2048)
    parser.add_argument("--port", type=int, default=5599)
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/demo-model"))
    args = parser.parse_args()

    step("making a random-weight Llama (4 layers, hidden 512) in", args.model_dir)
    model = str(make_model(args.model_dir, DEMO_MODEL))
    logs = Path(tempfile.mkdtemp(prefix="kvstore-demo-"))
    daemon = Daemon(pool_size="1GiB", port=args.port,
                    segment=f"kvstore-demo-{uuid.uuid4().hex[:8]}")
    address = daemon.address
    replicas: list[ReplicaProcess] = []
    try:
        daemon.start()  # waits until it answers; says why if it exits (e.g. the port is taken)
        step(f"daemon up on {address}, segment /dev/shm/{daemon.segment}; starting two vLLM CPU "
             f"replicas (about a minute; logs in {logs})")
        replicas = [ReplicaProcess(model, address, log_path=str(logs / f"replica{i}.log"),
                                   max_model_len=4096) for i in (1, 2)]
        for replica in replicas:
            replica.wait_ready()
        rng = random.Random(0)
        for replica in replicas:  # first requests pay one-time costs; keep them out of the table
            replica.request([rng.randrange(1, DEMO_MODEL.vocab_size) for _ in range(100)], 1)
        prefix = [rng.randrange(1, DEMO_MODEL.vocab_size) for _ in range(args.prefix_tokens)]
        first = prefix + [rng.randrange(1, DEMO_MODEL.vocab_size) for _ in range(40)]
        second = prefix + [rng.randrange(1, DEMO_MODEL.vocab_size) for _ in range(40)]
        rows = []
        for name, replica, prompt, what in (
                ("replica 1", replicas[0], first, "computes a long prompt, saves its blocks"),
                ("replica 2", replicas[1], second, "same prefix: loads it from the shared pool"),
                ("replica 1", replicas[0], second, "same prefix: in its own VRAM cache")):
            step(f"{name}: {what}")
            rows.append((name, what, replica.request(prompt, max_tokens=1)))
        print_table(rows)
        reused = rows[1][2]["pool_tokens"]
        print(f"\nreplica 2 reused {reused} prefix tokens computed by replica 1 "
              f"({reused // BLOCK} blocks) through the kvstore daemon.")
        return 0 if reused > 0 else 1
    finally:
        for replica in replicas:
            replica.stop()
        daemon.stop()
        step("stopped the replicas and the daemon (segment removed)")


def step(*parts: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def print_table(rows: list[tuple[str, str, dict]]) -> None:
    header = f"\n{'replica':<10} {'prompt':>7} {'from VRAM':>10} {'from pool':>10} {'recomputed':>11} {'TTFT':>8}"
    print(header)
    print("-" * (len(header) - 1))
    for name, _, r in rows:
        vram = r["num_cached_tokens"] - r["pool_tokens"]
        recomputed = r["num_prompt_tokens"] - r["num_cached_tokens"]
        print(f"{name:<10} {r['num_prompt_tokens']:>7} {vram:>10} {r['pool_tokens']:>10} "
              f"{recomputed:>11} {r['seconds']:>7.2f}s")


if __name__ == "__main__":
    sys.exit(main())

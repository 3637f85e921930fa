"""Time to first token on vLLM CPU: recompute, a VRAM (tier 0) hit, a pool hit through shared
memory and over TCP, and the connector's overhead when every lookup misses.

    python -m bench.ttft [--quick]

A random-weight Llama where prefill dominates (8 layers, hidden 1024, 8 KV heads, float32) runs
in three replica processes at once: no connector (the baseline), a connector on the shared
segment, and a connector that only uses TCP frames (as a replica on another host would). TTFT is
the wall time of a one-token generation inside the replica. Writes bench/results/ttft.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.models import BENCH_MODEL, make_model
from bench.replica import ReplicaProcess

RESULTS = Path(__file__).parent / "results" / "ttft.json"
# pool_shm_vs_vram_4k: a pool hit over shared memory against the replica's own VRAM hit (issue 11:
# the load path, LOOKUP -> copy -> RELEASE, should add little to what the engine does anyway).
BLOCK_SIZE = 32  # tokens per KV block of the replicas
# Each hit starts after this long with its replica idle: vLLM's shared-memory queues busy-wait
# for 1 s after each message they read (busy_loop_s in shm_broadcast.py), and a hit sent inside
# that window runs beside a spinning engine core. Without the pause the pool hit always came
# 0.1 s after the VRAM hit and reset_prefix_cache, inside it, while the VRAM hit came after a
# long prefill: 3 of 5 pool hits spun against none of the VRAM hits in one run (2.40x).
IDLE_BEFORE_HIT_S = 1.5
GOALS = {"pool_shm_vs_recompute_4k": 0.2, "miss_overhead": 1.05, "pool_shm_vs_vram_4k": 1.3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ttft", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1k and 4k prompts, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/bench-model"))
    args = parser.parse_args(argv)
    command = " ".join(["python", "-m", "bench.ttft", *(argv if argv is not None else sys.argv[1:])])
    sizes = [1024, 4096] if args.quick else [1024, 4096, 8192]
    # Nine in a full run: on 2 cores any one hit's prefill step can run 1.5-2x long (vLLM's
    # engine and worker spin between steps beside its compute threads), VRAM hits as pool
    # hits, in a fifth to a third of them; with five, one run's medians still flipped.
    repeats = args.repeats or (2 if args.quick else 9)

    log("making the benchmark model (8 layers, hidden 1024) in", args.model_dir)
    model = str(make_model(args.model_dir, BENCH_MODEL))
    logs = Path(tempfile.mkdtemp(prefix="kvstore-ttft-"))
    from bench.daemon import Daemon  # the same daemon process the tests and bench.store start

    daemon = Daemon(pool_size="6GiB").start()
    address = daemon.address
    flags = {"max_model_len": 9216, "kv_cache_gib": 2, "block_size": BLOCK_SIZE}
    replicas: dict[str, ReplicaProcess] = {}
    try:
        log(f"starting 3 vLLM CPU replicas (logs in {logs})")
        replicas = {
            "base": ReplicaProcess(model, log_path=str(logs / "base.log"), **flags),
            "shm": ReplicaProcess(model, address, {"load_timeout_ms": 60000},
                                  log_path=str(logs / "shm.log"), **flags),
            "tcp": ReplicaProcess(model, address, {"use_shm": False, "load_timeout_ms": 60000},
                                  log_path=str(logs / "tcp.log"), **flags),
        }
        for replica in replicas.values():
            replica.wait_ready(600)
        warm_up(replicas)
        engine = engine_core_of(replicas["shm"])
        figures = {n: measure(replicas, n, repeats, engine) for n in sizes}
    finally:
        for replica in replicas.values():
            replica.stop()
        daemon.stop()
    report(figures, repeats, command)
    return 0


def page_bytes() -> int:
    """Bytes of one layer's page of a KV block of the benchmark model (K and V, float32)."""
    m = BENCH_MODEL
    return 2 * m.num_kv_heads * (m.hidden_size // m.num_heads) * BLOCK_SIZE * 4


def copy_bytes() -> int:
    """Bytes of one KV block of the benchmark model, all layers."""
    return BENCH_MODEL.num_layers * page_bytes()


def copy_bound(num_blocks: int, repeats: int = 3) -> float:
    """Seconds to copy num_blocks of the benchmark model's KV blocks from a flat buffer (as
    pool slots) into a KV cache of vLLM's layout, the connector's way (PagedKV.scatter_many, in
    its batches), in this process with nothing else running: the least any CPU tier's load of
    those blocks costs the engine. Median of repeats after one untimed run."""
    import torch

    from connectors.vllm_v1.blocks import SCATTER_BATCH, PagedKV

    m, page = BENCH_MODEL, page_bytes()
    num_kv_blocks = num_blocks + 8
    cache = torch.zeros(m.num_layers * num_kv_blocks * page, dtype=torch.int8)  # prefaulted
    layers = {f"model.layers.{i}.attn": cache[i * num_kv_blocks * page:(i + 1) * num_kv_blocks * page]
              .view(num_kv_blocks, page) for i in range(m.num_layers)}
    kv = PagedKV(layers)
    pool = torch.ones(num_blocks * kv.block_bytes, dtype=torch.int8)
    slots = [pool[i * kv.block_bytes:(i + 1) * kv.block_bytes] for i in range(num_blocks)]
    ids = list(range(4, 4 + num_blocks))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for at in range(0, num_blocks, SCATTER_BATCH):
            kv.scatter_many(ids[at:at + SCATTER_BATCH], slots[at:at + SCATTER_BATCH])
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def engine_core_of(replica: ReplicaProcess) -> int | None:
    """The pid of the replica's vLLM engine-core process (its scheduler), if it can be told."""
    from bench.machine import descendants

    return next((pid for pid, name in descendants(replica.pid).items()
                 if name.startswith("VLLM::EngineCor")), None)


def measure(replicas: dict[str, ReplicaProcess], num_tokens: int, repeats: int,
            engine: int | None = None) -> dict[str, Any]:
    """Median TTFT of each tier for prompts of num_tokens, each repeat on a fresh prompt; and
    the CPU time the shm replica's engine-core process (engine) took during its VRAM and pool
    hits: vLLM's shared-memory queue busy-waits for a second after each message it reads, and a
    spinning engine core slows the prefill's compute threads beside it. Every hit starts after
    IDLE_BEFORE_HIT_S of its replica's idle, so VRAM and pool hits meet the engine alike."""
    from bench.machine import CLOCK_TICKS, proc_jiffies

    rng = random.Random(num_tokens)
    samples: dict[str, list[float]] = {k: [] for k in
                                       ("recompute", "vram_hit", "miss", "pool_shm", "pool_tcp")}
    engine_cpu: dict[str, list[float]] = {"vram_hit": [], "pool_shm": []}

    def engine_s(run: Any) -> tuple[Any, float]:
        before = proc_jiffies(engine) if engine else 0
        out = run()
        return out, (proc_jiffies(engine) - before) / CLOCK_TICKS if engine else float("nan")
    pool_tokens: dict[str, list[int]] = {"pool_shm": [], "pool_tcp": []}
    for i in range(repeats):
        log(f"{num_tokens} tokens, repeat {i + 1}/{repeats}")
        fresh = lambda: [rng.randrange(1, BENCH_MODEL.vocab_size) for _ in range(num_tokens)]  # noqa: E731
        # Baseline and all-miss take turns on fresh prompts, so drift hits both alike.
        samples["recompute"].append(ttft(replicas["base"], fresh()))
        prompt = fresh()
        samples["miss"].append(ttft(replicas["shm"], prompt))  # misses, then saves the prompt
        time.sleep(IDLE_BEFORE_HIT_S)
        seconds, cpu = engine_s(lambda: ttft(replicas["shm"], prompt))
        samples["vram_hit"].append(seconds)
        engine_cpu["vram_hit"].append(cpu)
        for tier in ("shm", "tcp"):
            replicas[tier].reset_prefix_cache()  # drop tier 0: the prompt must come from the pool
            time.sleep(IDLE_BEFORE_HIT_S)
            result, cpu = engine_s(lambda: replicas[tier].request(prompt, max_tokens=1,
                                                                  timeout_s=600))
            samples[f"pool_{tier}"].append(result["seconds"])
            pool_tokens[f"pool_{tier}"].append(result["pool_tokens"])
            if tier == "shm":
                engine_cpu["pool_shm"].append(cpu)
    out: dict[str, Any] = {k: statistics.median(v) for k, v in samples.items()}
    out["samples"] = samples
    out["pool_tokens"] = pool_tokens
    out["engine_core_cpu_s"] = {k: statistics.median(v) for k, v in engine_cpu.items()}
    out["engine_core_cpu_s_samples"] = engine_cpu
    return out


def ttft(replica: ReplicaProcess, prompt: list[int]) -> float:
    return float(replica.request(prompt, max_tokens=1, timeout_s=600)["seconds"])


def warm_up(replicas: dict[str, ReplicaProcess]) -> None:
    """One small request each, so first-call costs stay out of the figures."""
    rng = random.Random(1)
    for replica in replicas.values():
        replica.request([rng.randrange(1, 100) for _ in range(300)], max_tokens=1, timeout_s=600)


def report(figures: dict[int, dict[str, Any]], repeats: int, command: str) -> None:
    from bench.machine import describe, summary

    print(f"\n{'tokens':>7} {'recompute':>10} {'VRAM hit':>9} {'pool shm':>9} {'pool tcp':>9} "
          f"{'all-miss':>9}   pool/recompute shm, tcp   miss/recompute")
    for n, f in figures.items():
        print(f"{n:>7} {f['recompute']:>9.3f}s {f['vram_hit']:>8.3f}s {f['pool_shm']:>8.3f}s "
              f"{f['pool_tcp']:>8.3f}s {f['miss']:>8.3f}s   {f['pool_shm'] / f['recompute']:>8.3f}, "
              f"{f['pool_tcp'] / f['recompute']:.3f}   {f['miss'] / f['recompute']:>10.3f}")
    key = 4096 if 4096 in figures else max(figures)
    miss = statistics.median(f["miss"] / f["recompute"] for f in figures.values())
    # What the engine must be given on any CPU tier's hit: the KV bytes copied into its cache.
    num_blocks = int(statistics.median(figures[key]["pool_tokens"]["pool_shm"])) // BLOCK_SIZE
    copy_s = copy_bound(num_blocks)
    result = {
        "pool_shm_vs_recompute_4k": figures[key]["pool_shm"] / figures[key]["recompute"],
        "pool_tcp_vs_recompute_4k": figures[key]["pool_tcp"] / figures[key]["recompute"],
        "pool_shm_vs_vram_4k": figures[key]["pool_shm"] / figures[key]["vram_hit"],
        "miss_overhead": miss,
        # Information: the pool hit against a VRAM hit plus the bare copy of its KV bytes; what is
        # over 1 is the daemon (lookup, release) and the step that carries the load.
        "copy_4k": {"blocks": num_blocks, "bytes": num_blocks * copy_bytes(),
                    "seconds": copy_s, "what": "copy_bound(): the load's KV copy alone"},
        "pool_shm_vs_vram_plus_copy_4k": figures[key]["pool_shm"] / (figures[key]["vram_hit"] + copy_s),
        # Information: vLLM's engine-core CPU during the hits (see measure()), medians; and the
        # hits it did not spin in (at most one clock tick of its CPU), against each other.
        "engine_core_cpu_s_4k": figures[key]["engine_core_cpu_s"],
        "pool_shm_vs_vram_4k_engine_quiet": quiet_ratio(figures[key]),
        "goals": GOALS,
        "seconds": {str(n): f for n, f in figures.items()},
        "parameters": {"model": BENCH_MODEL.__dict__, "dtype": "float32", "block_size": BLOCK_SIZE,
                       "repeats": repeats, "ttft": "wall time of a 1-token generate()",
                       "idle_before_hit_s": IDLE_BEFORE_HIT_S},
        "machine": describe(["vllm", "torch", "pyzmq"]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command,
    }
    result["goals_met"] = {
        "pool_shm_vs_recompute_4k": result["pool_shm_vs_recompute_4k"] <= GOALS["pool_shm_vs_recompute_4k"],
        "miss_overhead": result["miss_overhead"] <= GOALS["miss_overhead"],
        "pool_shm_vs_vram_4k": result["pool_shm_vs_vram_4k"] <= GOALS["pool_shm_vs_vram_4k"]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\npool hit (shm) at {key} tokens: {result['pool_shm_vs_recompute_4k']:.3f} x recompute "
          f"(goal <= 0.2); over TCP {result['pool_tcp_vs_recompute_4k']:.3f}; all-miss "
          f"{result['miss_overhead']:.3f} x no connector (goal <= 1.05); pool hit (shm) "
          f"{result['pool_shm_vs_vram_4k']:.3f} x a VRAM hit (goal <= 1.3)")
    print(f"the load's KV copy alone ({num_blocks} blocks, {num_blocks * copy_bytes() / 2**20:.0f} "
          f"MiB): {copy_s * 1e3:.0f} ms; pool hit (shm) {result['pool_shm_vs_vram_plus_copy_4k']:.3f} "
          f"x (a VRAM hit + that copy)")
    cpu = result["engine_core_cpu_s_4k"]
    quiet = result["pool_shm_vs_vram_4k_engine_quiet"]
    print(f"vLLM's engine-core process during a hit (median CPU): VRAM {cpu['vram_hit'] * 1e3:.0f} "
          f"ms, pool (shm) {cpu['pool_shm'] * 1e3:.0f} ms; the hits it did not spin in: pool "
          + (f"{quiet:.3f} x VRAM" if quiet else "-"))
    print(f"machine: {summary(result['machine'])}\nwrote {RESULTS}")


def spun_and_calm(f: dict[str, Any], kind: str) -> tuple[list[float], list[float]]:
    """kind's hit times: those during which vLLM's engine-core process took more than one clock
    tick of CPU (it spun), and the others."""
    from bench.machine import CLOCK_TICKS

    pairs = list(zip(f["samples"][kind], f["engine_core_cpu_s_samples"][kind]))
    return ([t for t, cpu in pairs if cpu > 1 / CLOCK_TICKS],
            [t for t, cpu in pairs if cpu <= 1 / CLOCK_TICKS])


def quiet_ratio(f: dict[str, Any]) -> float | None:
    """Median pool (shm) hit over median VRAM hit, of the hits during which vLLM's engine-core
    process did not spin; None without such hits."""
    _, pool = spun_and_calm(f, "pool_shm")
    _, vram = spun_and_calm(f, "vram_hit")
    return statistics.median(pool) / statistics.median(vram) if pool and vram else None


def render(res: dict[str, Any]) -> str:
    """The bench/README.md section for a ttft.json result."""
    p = res["parameters"]
    m = p["model"]
    lines = [
        f"vLLM CPU, a random-weight Llama with {m['num_layers']} layers, hidden {m['hidden_size']}, "
        f"{m['num_kv_heads']} KV heads, {p['dtype']}, block {p['block_size']}; three replicas (no "
        "connector, connector over shared memory, connector over TCP only). TTFT is the wall time of "
        f"a one-token generation; medians of {p['repeats']} fresh prompts. The limit is recompute in "
        "the same run.",
        "",
        "| prompt tokens | recompute | VRAM hit | pool, shm | pool, TCP | all-miss | "
        "pool/recompute (shm, TCP) | all-miss/recompute |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, f in res["seconds"].items():
        r = f["recompute"]
        lines.append(f"| {n} | {r:.2f} s | {f['vram_hit']:.2f} s | {f['pool_shm']:.2f} s | "
                     f"{f['pool_tcp']:.2f} s | {f['miss']:.2f} s | {f['pool_shm'] / r:.3f}, "
                     f"{f['pool_tcp'] / r:.3f} | {f['miss'] / r:.3f} |")
    met = res["goals_met"]
    lines += [
        "",
        f"- `pool_shm_vs_recompute_4k` = {res['pool_shm_vs_recompute_4k']:.3f} (goal <= "
        f"{res['goals']['pool_shm_vs_recompute_4k']}, {'met' if met['pool_shm_vs_recompute_4k'] else '**missed**'}), "
        f"`pool_tcp_vs_recompute_4k` = {res['pool_tcp_vs_recompute_4k']:.3f}, `miss_overhead` = "
        f"{res['miss_overhead']:.3f} (goal <= {res['goals']['miss_overhead']}, "
        f"{'met' if met['miss_overhead'] else '**missed**'})"
        + _vs_vram(res) + ".",
        "- An all-miss ratio below 1 means the connector's cost is inside the run-to-run noise of "
        "this machine (the samples of every repeat are in the JSON).",
    ]
    for n, f in res["seconds"].items():  # a load past its budget is recomputed: no pool tokens
        for path, tokens in f.get("pool_tokens", {}).items():
            if 0 in tokens:
                lines.append(f"- {n} tokens, {path}: {tokens.count(0)} of {len(tokens)} repeats got "
                             "no pool tokens (the load ran past its budget and vLLM recomputed); "
                             "the median mixes them.")
    return "\n".join(lines)


def _vs_vram(res: dict[str, Any]) -> str:
    """The pool-vs-VRAM clause, for results that have it (older ones did not)."""
    if "pool_shm_vs_vram_4k" not in res:
        return ""
    met = res["goals_met"]["pool_shm_vs_vram_4k"]
    text = (f", `pool_shm_vs_vram_4k` = {res['pool_shm_vs_vram_4k']:.3f} (goal <= "
            f"{res['goals']['pool_shm_vs_vram_4k']}, {'met' if met else '**missed**'})")
    if "copy_4k" in res:
        c = res["copy_4k"]
        text += (f". The load's KV copy alone ({c['blocks']} blocks, {c['bytes'] / 2**20:.0f} MiB, "
                 f"into a KV cache of vLLM's layout in the benchmark's own process) takes "
                 f"{c['seconds'] * 1e3:.0f} ms: against a VRAM hit plus that copy the pool hit is "
                 f"{res['pool_shm_vs_vram_plus_copy_4k']:.3f}x")
    f = res["seconds"].get("4096", {})
    if "engine_core_cpu_s_samples" in f:
        text += ". " + _spins(f, res.get("pool_shm_vs_vram_4k_engine_quiet"))
    return text


def _spins(f: dict[str, Any], quiet: float | None) -> str:
    """How often vLLM's engine-core process spun during the 4k hits, and what it cost them."""
    parts = []
    for kind, label in (("vram_hit", "VRAM"), ("pool_shm", "pool")):
        spun, calm = spun_and_calm(f, kind)
        parts.append(f"{len(spun)} of {len(spun) + len(calm)} {label} hits"
                     + (f" ({statistics.median(spun):.2f} s against {statistics.median(calm):.2f} s "
                        "for the others)" if spun and calm else ""))
    return ("vLLM's engine-core process took more than one clock tick of CPU (it spun: its "
            "shared-memory queue busy-waits for a second after each message it reads, here "
            "beside the prefill's two threads on two cores) in " + " and ".join(parts)
            + (f". Of the hits it did not spin in, the pool hit is {quiet:.3f}x the VRAM hit"
               if quiet else ""))


def log(*parts: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


if __name__ == "__main__":
    sys.exit(main())

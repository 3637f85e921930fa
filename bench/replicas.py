"""Cross-replica reuse: token hit rate and time to first token for N replicas x routing x cache.

    python -m bench.replicas [--quick]

One seeded trace (bench/workload.py: shared system prompts, growing chat sessions, FAQ questions
after a shared preamble, one-off documents) is replayed in arrival order, one request at a time,
with max_tokens=1 (the wall time of that generation is the TTFT):

- routing: round-robin, session affinity (hash of the session id), prefix-aware consistent hashing
  of the first blocks with bounded load (bench/sim.py, PrefixHash);
- cache: "vram" (each replica's own prefix cache only) or "vram+pool" (the same replicas with the
  kvstore connector in front of one daemon);
- N = 1 and 2: real vLLM CPU replicas (two engines at most at a time on this machine) and the
  real daemon on loopback, each replica with a VRAM cache of --vram-blocks blocks; the daemon is
  restarted (an empty pool) and every VRAM cache reset between runs;
- N = 4 and 8: the simulator (bench/sim.py) with the same VRAM capacity and pool, its TTFT model
  fitted by least squares on the real N = 1 runs. Its N = 2 prediction is checked against the
  real N = 2 runs (relative error in the JSON under "validation_n2").

Token hit rate = prompt tokens served from any cache / prompt tokens. Writes
bench/results/replicas.json (hit_rate[cache][routing][N]), replicas_hit_rate.png and
replicas_ttft.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.models import TinyLlama, make_model
from bench.replica import ReplicaProcess
from bench.sim import ROUTINGS, PoolSpec, Served, TtftModel, block_hashes, make_router, simulate
from bench.workload import WorkloadConfig, generate, summarize

RESULTS = Path(__file__).parent / "results"
CACHES = ("vram", "vram+pool")
REAL_NS = (1, 2)  # two vLLM engines at most run at once on the 2-core machine
SIM_NS = (1, 2, 4, 8)
BLOCK_SIZE = 32
# Prefill dominates TTFT yet a 3.5k-token prompt recomputes in well under a second on 2 cores.
REPLICA_MODEL = TinyLlama(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2,
                          intermediate_size=704, vocab_size=512, max_position_embeddings=4096)
MAX_MODEL_LEN = 4096
# float32 K and V of every layer for one block: what a pool slot holds.
BLOCK_BYTES = (REPLICA_MODEL.num_layers * 2 * REPLICA_MODEL.num_kv_heads * BLOCK_SIZE * 4
               * (REPLICA_MODEL.hidden_size // REPLICA_MODEL.num_heads))
# Generous timeouts: on a loaded 2-core machine a slow daemon reply must not read as a miss.
CONNECTOR = {"timeout_ms": 5000, "lookup_timeout_ms": 5000, "load_timeout_ms": 60000,
             "retry_interval_ms": 50}
# Sized so the full run (4 engine starts, 8 replays) fits in about 12 minutes on 2 shared cores.
FULL_WORKLOAD = WorkloadConfig(sessions=14, faq=16, documents=5)
QUICK_WORKLOAD = WorkloadConfig(sessions=5, faq=6, documents=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 27-request trace instead of 79 (a few minutes, mostly engine starts)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    parser.add_argument("--vram-blocks", type=int, default=160,
                        help="vLLM KV blocks per replica (num_gpu_blocks_override; default 160)")
    parser.add_argument("--pool-blocks", type=int, default=4096,
                        help="pool capacity in blocks of the replica model (default 4096)")
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/replicas-model"))
    args = parser.parse_args(argv)
    if args.vram_blocks * BLOCK_SIZE < MAX_MODEL_LEN + BLOCK_SIZE:
        parser.error(f"--vram-blocks must hold one {MAX_MODEL_LEN}-token prompt "
                     f"(at least {MAX_MODEL_LEN // BLOCK_SIZE + 1})")
    command = " ".join(["python", "-m", "bench.replicas", *(argv if argv is not None else sys.argv[1:])])
    workload = dataclasses.replace(QUICK_WORKLOAD if args.quick else FULL_WORKLOAD, seed=args.seed)
    trace = generate(workload)
    log(f"trace: {summarize(trace)}")
    pool = PoolSpec(args.pool_blocks, BLOCK_BYTES)
    real = run_real(trace, args.model_dir, args.vram_blocks, pool)
    result = analyse(trace, real, args.vram_blocks, pool)
    result["parameters"] = {
        "workload": dataclasses.asdict(workload), "trace": summarize(trace),
        "model": dataclasses.asdict(REPLICA_MODEL), "dtype": "float32", "block_size": BLOCK_SIZE,
        "vram_blocks": args.vram_blocks, "pool_blocks": args.pool_blocks, "block_bytes": BLOCK_BYTES,
        "routing": "prefix-hash: first 8 blocks, eps 0.25, window 32 (bench/sim.py)",
        "ttft": "wall time of a 1-token generate(), requests one at a time"}
    from bench.machine import describe

    result.update(machine=describe(["vllm", "torch"]), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  command=command)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "replicas.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result)
    print(table(result))
    log(f"wrote {RESULTS / 'replicas.json'}")
    return 0


# --- real runs -------------------------------------------------------------------------------
def run_real(trace: list[dict[str, Any]], model_dir: Path, vram_blocks: int,
             pool: PoolSpec) -> dict[str, dict[str, dict[int, list[dict[str, Any]]]]]:
    """Replay trace on real engines: records[cache][routing][N] = one dict per request."""
    from bench.daemon import Daemon

    model = str(make_model(model_dir, REPLICA_MODEL))
    logs = Path(tempfile.mkdtemp(prefix="kvstore-replicas-"))
    records: dict[str, dict[str, dict[int, list[dict[str, Any]]]]] = {}
    for cache in CACHES:
        daemon = Daemon(pool_size=str(pool.capacity_blocks * pool.block_bytes)) if cache != "vram" else None
        replicas: list[ReplicaProcess] = []
        try:
            if daemon:
                daemon.start()
            log(f"{cache}: starting {max(REAL_NS)} vLLM CPU replicas (logs in {logs})")
            address = daemon.address if daemon else None
            replicas = [ReplicaProcess(model, address, CONNECTOR if address else None,
                                       log_path=str(logs / f"{cache}-{i}.log"), num_blocks=vram_blocks,
                                       block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN)
                        for i in range(max(REAL_NS))]
            for r in replicas:
                r.wait_ready(600)
            for num, routing in [(1, "round-robin")] + [(2, r) for r in ROUTINGS]:
                fresh_start(replicas, daemon)
                log(f"{cache}: N={num} {routing}")
                rows = replay(trace, replicas[:num], routing)
                # One replica: every routing sends everything to it, so one run stands for all.
                for name in (ROUTINGS if num == 1 else (routing,)):
                    records.setdefault(cache, {}).setdefault(name, {})[num] = rows
        finally:
            for r in replicas:
                r.stop()
            if daemon:
                daemon.stop()
    return records


def fresh_start(replicas: list[ReplicaProcess], daemon: Any) -> None:
    """Empty every tier: restart the daemon (an empty pool), then reset each VRAM cache.

    A first request per replica lets its connector rejoin the restarted daemon and keeps
    first-call costs out of the figures; a second one after a reset checks the pool answers.
    """
    if daemon:
        daemon.restart()
    for i, r in enumerate(replicas):
        warm = [(7 * i + j) % 500 + 1 for j in range(4 * BLOCK_SIZE + 5)]
        r.request(warm, max_tokens=1, timeout_s=600)
        if daemon:
            r.reset_prefix_cache()
            got = r.request(warm, max_tokens=1, timeout_s=600)
            if got["pool_tokens"] == 0:
                log(f"WARNING: replica {i} found nothing in the pool after a restart")
        r.reset_prefix_cache()


def replay(trace: list[dict[str, Any]], replicas: list[ReplicaProcess],
           routing: str) -> list[dict[str, Any]]:
    router = make_router(routing, len(replicas))
    rows = []
    for request in trace:
        prompt = request["prompt"]
        replica = router.route(request, block_hashes(prompt, BLOCK_SIZE))
        got = replicas[replica].request(prompt, max_tokens=1, timeout_s=600)
        rows.append({"replica": replica, "prompt_tokens": len(prompt),
                     "vram_tokens": got["num_cached_tokens"] - got["pool_tokens"],
                     "pool_tokens": got["pool_tokens"], "seconds": got["seconds"]})
    return rows


# --- analysis --------------------------------------------------------------------------------
def analyse(trace: list[dict[str, Any]], real: dict[str, Any], vram_blocks: int,
            pool: PoolSpec) -> dict[str, Any]:
    """Real figures for N <= 2, simulated ones for every N, the TTFT model, and the N = 2 check."""
    def served(rows: list[dict[str, Any]]) -> list[Served]:
        return [Served(r["replica"], r["prompt_tokens"], r["vram_tokens"], r["pool_tokens"])
                for r in rows]

    # Fitted on N = 1 only, so the N = 2 comparison is out of sample.
    samples = [(s, r["seconds"]) for cache in CACHES
               for s, r in zip(served(real[cache]["round-robin"][1]), real[cache]["round-robin"][1])]
    model = TtftModel.fit(samples)
    out: dict[str, Any] = {"hit_rate": {}, "ttft_mean_s": {}, "pool_hit_rate": {},
                           "source": {str(n): ("real" if n in REAL_NS else "sim") for n in SIM_NS},
                           "sim": {"hit_rate": {}, "ttft_mean_s": {}, "pool_hit_rate": {}},
                           "real": {"hit_rate": {}, "ttft_mean_s": {}, "ttft_median_s": {},
                                    "pool_hit_rate": {}},
                           "validation_n2": {}}
    for cache in CACHES:
        for routing in ROUTINGS:
            for num in SIM_NS:
                outcome = simulate(trace, num, routing, vram_blocks,
                                   pool if cache == "vram+pool" else None, BLOCK_SIZE)
                sim = {"hit_rate": outcome.hit_rate(), "pool_hit_rate": outcome.pool_hit_rate(),
                       "ttft_mean_s": statistics.fmean(model.predict(s) for s in outcome.served)}
                for key, value in sim.items():
                    _put(out["sim"][key], cache, routing, num, value)
                figures = sim
                if num in REAL_NS:
                    rows = real[cache][routing][num]
                    prompt = sum(r["prompt_tokens"] for r in rows)
                    figures = {
                        "hit_rate": sum(r["vram_tokens"] + r["pool_tokens"] for r in rows) / prompt,
                        "pool_hit_rate": sum(r["pool_tokens"] for r in rows) / prompt,
                        "ttft_mean_s": statistics.fmean(r["seconds"] for r in rows)}
                    for key, value in figures.items():
                        _put(out["real"][key], cache, routing, num, value)
                    _put(out["real"]["ttft_median_s"], cache, routing, num,
                         statistics.median(r["seconds"] for r in rows))
                for key in ("hit_rate", "pool_hit_rate", "ttft_mean_s"):
                    _put(out[key], cache, routing, num, figures[key])
                if num == 2:
                    out["validation_n2"].setdefault(cache, {})[routing] = {
                        "real_hit_rate": figures["hit_rate"], "sim_hit_rate": sim["hit_rate"],
                        "hit_rate_rel_error": _rel(sim["hit_rate"], figures["hit_rate"]),
                        "real_ttft_mean_s": figures["ttft_mean_s"],
                        "sim_ttft_mean_s": sim["ttft_mean_s"],
                        "ttft_rel_error": _rel(sim["ttft_mean_s"], figures["ttft_mean_s"])}
    errors = [v for c in out["validation_n2"].values() for v in c.values()]
    out["validation_n2_mean_abs_rel_error"] = {
        "hit_rate": statistics.fmean(abs(v["hit_rate_rel_error"]) for v in errors),
        "ttft": statistics.fmean(abs(v["ttft_rel_error"]) for v in errors)}
    out["ttft_model"] = {**dataclasses.asdict(model), "fitted_on": "real N=1 runs, both caches",
                         "num_samples": len(samples)}
    out["requests"] = real  # every real request's tiers and seconds, for refitting later
    return out


def _put(table: dict[str, Any], cache: str, routing: str, num: int, value: float) -> None:
    table.setdefault(cache, {}).setdefault(routing, {})[str(num)] = value


def _rel(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured if measured else float("nan")


# --- output ----------------------------------------------------------------------------------
def table(res: dict[str, Any]) -> str:
    """Markdown tables of hit rate and mean TTFT, N across (real for N <= 2, simulated above)."""
    ns = sorted(res["source"], key=int)
    head = "| cache | routing | " + " | ".join(f"N={n} ({res['source'][n]})" for n in ns) + " |"
    lines = []
    for key, fmt in (("hit_rate", "{:.3f}"), ("ttft_mean_s", "{:.3f} s")):
        lines += [f"**{'Token hit rate' if key == 'hit_rate' else 'Mean TTFT'}**", "", head,
                  "|---|---|" + "---|" * len(ns)]
        for cache, by_routing in res[key].items():
            for routing, by_n in by_routing.items():
                cells = " | ".join(fmt.format(by_n[n]) for n in ns)
                lines.append(f"| {cache} | {routing} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, label, name in (("hit_rate", "token hit rate", "replicas_hit_rate.png"),
                             ("ttft_mean_s", "mean TTFT (s)", "replicas_ttft.png")):
        fig, axes = plt.subplots(1, len(CACHES), figsize=(10, 4), sharey=True)
        for ax, cache in zip(axes, CACHES):
            for routing, by_n in res["sim"][key][cache].items():
                ns = sorted(by_n, key=int)
                line, = ax.plot([int(n) for n in ns], [by_n[n] for n in ns], "--", alpha=0.6,
                                label=f"{routing} (sim)")
                real = res["real"][key][cache][routing]
                ax.plot([int(n) for n in real], list(real.values()), "o", color=line.get_color(),
                        label=f"{routing} (real)")
            ax.set(title=cache, xlabel="replicas N", xscale="log", xticks=list(SIM_NS))
            ax.set_xticklabels([str(n) for n in SIM_NS])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(label)
        axes[-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / name, dpi=90)
        plt.close(fig)


def render(res: dict[str, Any]) -> str:
    """The bench/README.md section for a replicas.json result."""
    p = res["parameters"]
    t, m = p["trace"], p["model"]
    v = res["validation_n2_mean_abs_rel_error"]
    tm = res["ttft_model"]
    return "\n".join([
        f"One seeded trace ({t['num_requests']} requests, {t['num_prompt_tokens']} prompt tokens, "
        f"{t['num_distinct_blocks']} distinct blocks; {t['kinds']}) replayed in order on N replicas "
        "under three routings, with each replica's own prefix cache only (`vram`) or with the "
        "kvstore pool behind it (`vram+pool`). Token hit rate = prompt tokens served from any "
        f"cache / prompt tokens; TTFT = wall time of a 1-token generation. N = 1, 2: real vLLM CPU "
        f"replicas (Llama {m['num_layers']} layers, hidden {m['hidden_size']}, float32, "
        f"{p['vram_blocks']} KV blocks of {p['block_size']} tokens each) and the real daemon "
        f"({p['pool_blocks']} blocks). N = 4, 8: the simulator (`bench/sim.py`: vLLM's block LRU "
        "per replica, the daemon's own Store as the pool), its TTFT model fitted on the real N = 1 "
        "runs. The reference is N = 1 (one run, shared by the three routings): a shared pool "
        "should keep every N near it. Real TTFTs are single runs on a shared machine: compare "
        "them with the load average in the JSON's machine record; the hit rates do not depend on it.",
        "",
        table(res),
        f"Simulator vs the real N = 2 runs (out of sample): mean absolute relative error "
        f"{v['hit_rate']:.1%} on hit rate, {v['ttft']:.1%} on mean TTFT. TTFT model: "
        f"{tm['overhead_s'] * 1e3:.1f} ms + {tm['recompute_s_per_token'] * 1e6:.1f} us per "
        f"recomputed token + {tm['pool_s_per_token'] * 1e6:.2f} us per pool token + "
        f"{tm['vram_s_per_token'] * 1e6:.2f} us per VRAM token.",
        "",
        "![hit rate](results/replicas_hit_rate.png) ![TTFT](results/replicas_ttft.png)",
    ])


def log(*parts: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


if __name__ == "__main__":
    sys.exit(main())

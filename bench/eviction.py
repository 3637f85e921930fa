"""Eviction policies of the pool on a mixed workload: token hit rate of the pool tier with the pool
sized at 10%, 25% and 50% of the working set, for every policy in kvstore.policy.POLICIES.

    python -m bench.eviction [--quick]

The workload is bench/workload.py's mix (shared system prompts, growing chat sessions, FAQ
questions after shared preambles, one-off documents) at three times the default size, so the pool
has to choose. It runs through the simulator's pool (bench/sim.py), which is the daemon's own
kvstore.store.Store with the policy under test, in two settings:

- "pool only": every request looks up the pool directly (no VRAM tier), which isolates the policy;
- "behind VRAM": 4 replicas routed round-robin, each with a 160-block VRAM prefix cache, as in
  bench/replicas.py; the pool only sees what the VRAM caches miss, as with real vLLM.

The working set is the distinct full blocks of the trace; the bound is a pool that holds all of it
(reported as "unbounded"). Figures are means over --seeds traces. Writes bench/results/eviction.json
and bench/results/eviction.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.sim import PoolSpec, simulate
from bench.workload import WorkloadConfig, generate, summarize
from kvstore.policy import DEFAULT_POLICY, POLICIES

RESULTS = Path(__file__).parent / "results"
FRACTIONS = (0.10, 0.25, 0.50)
BLOCK_SIZE = 32
BLOCK_BYTES = 131072  # the replica model's block (bench/replicas.py); one slot per block either way
SETTINGS = {"pool only": (1, 0), "behind VRAM": (4, 160)}  # name -> (replicas, VRAM blocks each)
WORKLOAD = WorkloadConfig(sessions=72, faq=90, documents=36)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eviction", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed instead of three")
    parser.add_argument("--seeds", type=int, default=None, help="traces to average (default 3)")
    args = parser.parse_args(argv)
    command = " ".join(["python", "-m", "bench.eviction", *(argv if argv is not None else sys.argv[1:])])
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    if not seeds:
        parser.error("--seeds must be at least 1")
    start = time.monotonic()
    runs = [measure(dataclasses.replace(WORKLOAD, seed=seed)) for seed in seeds]
    result = combine(runs)
    from bench.machine import describe

    result.update(
        parameters={"workload": dataclasses.asdict(WORKLOAD), "seeds": seeds,
                    "traces": [r["trace"] for r in runs], "fractions": FRACTIONS,
                    "settings": {k: {"replicas": n, "vram_blocks": v, "routing": "round-robin"}
                                 for k, (n, v) in SETTINGS.items()},
                    "block_size": BLOCK_SIZE, "default_policy": DEFAULT_POLICY,
                    "seconds": round(time.monotonic() - start, 1)},
        machine=describe(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command=command)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eviction.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result)
    print(table(result))
    print(f"wrote {RESULTS / 'eviction.json'}")
    return 0


def measure(workload: WorkloadConfig) -> dict[str, Any]:
    """Pool-tier and total hit rates of one trace: [setting][policy][fraction]."""
    trace = generate(workload)
    summary = summarize(trace, BLOCK_SIZE)
    working_set = summary["num_distinct_blocks"]
    out: dict[str, Any] = {"trace": summary, "pool_hit_rate": {}, "hit_rate": {}}
    for setting, (num_replicas, vram_blocks) in SETTINGS.items():
        sizes = {f"{f:.2f}": max(1, int(f * working_set)) for f in FRACTIONS}
        sizes["unbounded"] = working_set
        for policy in POLICIES:
            for label, capacity in sizes.items():
                outcome = simulate(trace, num_replicas, "round-robin", vram_blocks,
                                   PoolSpec(capacity, BLOCK_BYTES, policy), BLOCK_SIZE)
                for key, value in (("pool_hit_rate", outcome.pool_hit_rate()),
                                   ("hit_rate", outcome.hit_rate())):
                    out[key].setdefault(setting, {}).setdefault(policy, {})[label] = value
    return out


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds, and the best policy per setting (mean pool hit rate over the fractions)."""
    result: dict[str, Any] = {}
    for key in ("pool_hit_rate", "hit_rate"):
        result[key] = {
            setting: {policy: {label: statistics.fmean(r[key][setting][policy][label] for r in runs)
                               for label in by_label}
                      for policy, by_label in by_policy.items()}
            for setting, by_policy in runs[0][key].items()}
    result["per_seed_pool_hit_rate"] = [r["pool_hit_rate"] for r in runs]
    result["best"] = {}
    for setting, by_policy in result["pool_hit_rate"].items():
        scores = {p: statistics.fmean(by_label[f"{f:.2f}"] for f in FRACTIONS)
                  for p, by_label in by_policy.items()}
        result["best"][setting] = {"policy": max(scores, key=scores.__getitem__),
                                   "mean_pool_hit_rate": scores}
    return result


def table(res: dict[str, Any]) -> str:
    """One markdown table per setting: policy x pool size, pool-tier token hit rate."""
    lines = []
    for setting, by_policy in res["pool_hit_rate"].items():
        labels = list(next(iter(by_policy.values())))
        head = [("unbounded" if lb == "unbounded" else f"{float(lb):.0%} of working set")
                for lb in labels]
        lines += [f"**{setting}** (pool-tier token hit rate; total hit rate in brackets)", "",
                  "| policy | " + " | ".join(head) + " |", "|---|" + "---|" * len(labels)]
        for policy, by_label in by_policy.items():
            total = res["hit_rate"][setting][policy]
            mark = " (default)" if policy == res["parameters"]["default_policy"] else ""
            cells = " | ".join(f"{by_label[lb]:.3f} ({total[lb]:.3f})" for lb in labels)
            lines.append(f"| {policy}{mark} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(res["pool_hit_rate"])
    fig, axes = plt.subplots(1, len(settings), figsize=(10, 4))
    for ax, setting in zip(axes, settings):
        by_policy = res["pool_hit_rate"][setting]
        width = 0.8 / len(by_policy)
        for i, (policy, by_label) in enumerate(by_policy.items()):
            labels = [f"{f:.2f}" for f in FRACTIONS]
            ax.bar([j + i * width for j in range(len(labels))], [by_label[lb] for lb in labels],
                   width, label=policy)
        bound = statistics.fmean(b["unbounded"] for b in by_policy.values())
        ax.axhline(bound, color="grey", ls="--", lw=1, label="pool holds everything")
        ax.set(title=setting, xlabel="pool size (share of the working set)",
               ylabel="pool-tier token hit rate")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(FRACTIONS))])
        ax.set_xticklabels([f"{f:.0%}" for f in FRACTIONS])
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "eviction.png", dpi=90)
    plt.close(fig)


def render(res: dict[str, Any]) -> str:
    """The bench/README.md section for an eviction.json result."""
    p = res["parameters"]
    t = p["traces"][0]
    best = ", ".join(f"{s}: `{b['policy']}`" for s, b in res["best"].items())
    behind = p["settings"]["behind VRAM"]
    return "\n".join([
        f"The pool's eviction policies on bench/workload.py's mix ({t['num_requests']} requests, "
        f"{t['num_distinct_blocks']} distinct blocks per trace; means over {len(p['seeds'])} "
        "seeds), with the pool sized at 10%, 25% and 50% of the working set. The pool is the "
        "daemon's own Store, driven in-process by the simulator (`bench/sim.py`). \"pool only\": "
        "every request asks the pool (the policy alone); \"behind VRAM\": "
        f"{behind['replicas']} replicas, round-robin, each with its own {behind['vram_blocks']}-block "
        "prefix cache, so the pool sees only their misses. The bound "
        "is a pool that holds the whole working set (\"unbounded\").",
        "",
        table(res),
        f"Best mean pool hit rate over the three sizes: {best}. The daemon's default is "
        f"`{p['default_policy']}`: a small pool is where the policy matters, and there keeping "
        "blocks hit by several requests (shared system prompts, FAQ preambles, live sessions) "
        "over blocks never hit again (one-off documents, a session's last turn) pays; when the "
        "pool holds half the working set every policy keeps nearly everything.",
        "",
        "![eviction](results/eviction.png)",
    ])


if __name__ == "__main__":
    sys.exit(main())

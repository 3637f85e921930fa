"""The README section, the table and the chart of a bench/results/peers.json result (bench.peers
writes it; bench.report calls render() through bench.peers). Reads the JSON only, never measures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _sizes(result: dict[str, Any]) -> list[str]:
    return list(result["limits"]["memcpy_gbps"])  # "2MiB", "32MiB": the object sizes measured


# --- output ----------------------------------------------------------------------------------------
def table(result: dict[str, Any]) -> list[str]:
    lines = ["| system | transport | get 2 MiB | get 32 MiB | put 2 MiB | put 32 MiB | lookup 64 keys |",
             "|---|---|---|---|---|---|---|"]
    for name, info in result["systems"].items():
        g, p = result["get_gbps"][name], result["put_gbps"][name]
        lines.append(f"| `{name}` | {info['transport']} | {g['2MiB']:.2f} | {g['32MiB']:.2f} | "
                     f"{p['2MiB']:.2f} | {p['32MiB']:.2f} | {result['lookup_ms'][name]:.3f} ms |")
    lim = result["limits"]
    lines.append(f"| limit: memcpy | - | {lim['memcpy_gbps']['2MiB']:.2f} | "
                 f"{lim['memcpy_gbps']['32MiB']:.2f} | | | |")
    lines.append(f"| limit: raw ZeroMQ | tcp | {lim['zmq_gbps']['2MiB']:.2f} | "
                 f"{lim['zmq_gbps']['32MiB']:.2f} | | | {lim['rtt_ms']:.3f} ms (round trip) |")
    return lines


def ratio_lines(result: dict[str, Any]) -> list[str]:
    lines = ["| ratio | op | 2 MiB | 32 MiB | goal |", "|---|---|---|---|---|"]
    for op in ("get", "put"):
        for goal_name, goal in result["goals"].items():
            cells = []
            for size in _sizes(result):
                r = result["ratios"][op][goal_name][size]
                ok = result["goals_met"][op][goal_name][size]
                cells.append(f"{r['ratio']:.2f}x vs `{r['best_peer']}`"
                             + ("" if ok else " (**not met**)"))
            lines.append(f"| `{goal_name}` | {op} | {cells[0]} | {cells[1]} | >= {goal:g}x |")
    return lines


def render(result: dict[str, Any]) -> str:
    """The bench/README.md section for a peers.json result."""
    lines = [
        "kvstore against its peers on the same bytes in the same run: Llama-3-8B KV (bf16), a "
        "prefix of 64 blocks of 2 MiB and 4 objects of 32 MiB (LMCache's 256-token chunk), 128 MiB "
        "each, random, read into distinct destinations and written anew every round. Peers: "
        "LMCache's legacy `lmcache_server` through its lm:// connector, LMCache's redis:// and "
        "resp:// connectors, a real redis-server through redis-py + hiredis (single commands and "
        "pipelined), and vLLM's ExampleConnector storage (safetensors files). Throughput in GB/s "
        f"(10^9 B/s), medians of {result['rounds']['count']} rounds; lookup is the existence check "
        "of the 64-block prefix.",
        "",
        "Systems and the calls measured:",
        "",
        *[f"- `{name}` ({info['transport']}): {info['how']}"
          for name, info in result["systems"].items()],
        "",
        "![get and put throughput](results/peers_get.png)",
        "",
        *table(result),
        "",
        *ratio_lines(result),
        "",
        f"- Goals (kvstore at least 3x the best peer over TCP, 10x through shared memory): "
        f"{result['notes']['goals']}",
        f"- Bounds: kvstore_shm get is {_pair(result['ratios']['vs_limits']['kvstore_shm_get_vs_memcpy'])}"
        " of memcpy over distinct buffers. " + result["notes"]["tcp_bound"],
        f"- Lookup: the best peer takes {result['ratios']['lookup']['best_peer_ms_over_kvstore_ms']:.1f}x"
        f" kvstore's time (`{result['ratios']['lookup']['best_peer']}`).",
        f"- {result['notes']['redis_get']} {result['notes']['disk']}",
    ]
    lines += ["", *ttft_lines(result.get("ttft_s"), result.get("ttft"))]
    return "\n".join(lines)


def _pair(values: dict[str, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values.values()) + " (2 / 32 MiB)"


def ttft_lines(ttft_s: dict[str, Any] | None, ttft: dict[str, Any] | None) -> list[str]:
    if not ttft_s or not ttft:
        return ["Time to first token: not measured in this run (`--skip-ttft`)."]
    m = ttft["model"]
    sizes = list(ttft_s["recompute"])
    lines = [
        f"Time to first token on vLLM's CPU backend (random-weight Llama, {m['num_layers']} layers, "
        f"hidden {m['hidden_size']}, {ttft['dtype']}, block {ttft['block_size']}): one replica "
        "computes and saves a prompt, a second replica that never saw it loads it. Recompute is "
        f"the loader on fresh prompts. Medians of {ttft['repeats']} prompts.",
        "",
        "| prompt tokens | " + " | ".join(TTFT_COLUMNS.values()) + " |",
        "|---|" + "---|" * len(TTFT_COLUMNS),
    ]
    for n in sizes:
        cells = [f"{ttft_s[k][n]:.2f} s" if ttft_s.get(k) and n in ttft_s[k] else "n/a"
                 for k in TTFT_COLUMNS]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    checks = ttft.get("checks") or []
    if checks:
        same = sum(c["same_token"] for c in checks)
        diffs = [c["logprob_diff"] for c in checks if c["logprob_diff"] is not None]
        lines += ["", f"Loads checked: {same} of {len(checks)} loads produced the saver's token; "
                  f"tokens loaded per load {min(c['loaded_tokens'] for c in checks)}-"
                  f"{max(c['loaded_tokens'] for c in checks)}; largest |logprob difference| "
                  f"{max(diffs) if diffs else float('nan'):.2g}."]
    lines += ["", f"LMCache: {ttft['lmcache']}"]
    return lines


TTFT_COLUMNS = {"recompute": "recompute", "kvstore_shm": "kvstore load (shm)",
                "example_disk": "ExampleConnector load (disk)",
                "kvstore_shm_save": "kvstore saver (recompute + save)",
                "example_disk_save": "ExampleConnector saver (recompute + save)"}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["systems"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    width = 0.38
    for ax, op in zip(axes, ("get", "put")):
        data = result[f"{op}_gbps"]
        x = np.arange(len(names))
        for i, size in enumerate(_sizes(result)):
            values = [data[n][size] for n in names]
            bars = ax.bar(x + (i - 0.5) * width, values, width, label=size.replace("MiB", " MiB"))
            ax.bar_label(bars, fmt="%.2g", fontsize=7, padding=1)
        if op == "get":
            for size, style in zip(_sizes(result), ("--", ":")):
                ax.axhline(result["limits"]["memcpy_gbps"][size], color="grey", ls=style, lw=0.8,
                           label=f"memcpy {size.replace('MiB', ' MiB')}")
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{op} throughput (GB/s, log scale)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

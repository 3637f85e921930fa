"""Run every benchmark in bounded time and regenerate bench/README.md from bench/results/*.json.

    python -m bench.report            # run all benchmarks (what `make bench` does), then render
    python -m bench.report --render   # only re-render bench/README.md from the committed results
    python -m bench.report --only peers,eviction   # run some, render all

Each benchmark module owns its measurement and its README section: it writes
bench/results/<name>.json (with the machine, the date and the command that reran it) and exposes
render(result) -> markdown. This module only sequences the runs, bounds their time, and stitches
the sections together, so the page never shows a figure that is not in a committed JSON file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.machine import describe, summary

BENCH = Path(__file__).parent
RESULTS = BENCH / "results"
README = BENCH / "README.md"
RUNS = RESULTS / "runs.json"  # each benchmark's last status under bench.report, for the README


@dataclass(frozen=True)
class Section:
    name: str  # results/<name>.json and the module bench.<module>
    module: str
    title: str
    args: tuple[str, ...]  # what `make bench` runs; the full run unless it cannot fit the budget
    budget_s: int  # a run past this is stopped; the section keeps its last committed result
    needs_cuda: bool = False


# Order: the cheap, self-contained figures first, so a slow vLLM run cannot starve them.
SECTIONS = (
    Section("store", "store", "Store throughput and lookup latency", (), 300),
    Section("lookup_cost", "lookup_cost", "What a lookup costs, by hashes and busy-poll window",
            (), 300),
    Section("eviction", "eviction", "Eviction policies on a mixed workload", (), 300),
    Section("fingerprint", "fingerprint", "Weights fingerprint at replica startup",
            ("--drop-caches",), 600),
    Section("peers", "peers", "Peers side by side: LMCache, Redis, vLLM's ExampleConnector", (), 600),
    Section("replicas", "replicas", "Cross-replica reuse and routing", (), 1200),
    # Two sets of 3 replicas started once, 16 configurations and 2 failure runs (~15 min here).
    Section("fleet", "fleet", "Cross-replica reuse behind a real router (vllm-router)", (), 2400),
    # The full TTFT sweep (8k prompts, 3 repeats) takes ~15 min here; make bench runs 1k and 4k.
    Section("ttft", "ttft", "Time to first token per tier", ("--quick",), 900),
    Section("gpu_copy", "gpu_copy", "GPU copy path", (), 300, needs_cuda=True),
    # Valkey, two daemons, pulls and a replay (~1 min), then two vLLM engines for the 4k TTFT.
    Section("cluster", "cluster", "Beyond one node: cross-node pulls, directory, hit rate", (),
            900),
    # 600 s of soak plus start, restart and the slowest attack's bounded wait.
    Section("soak", "soak", "Soak under attack: honest clients against hostile ones", (), 900),
)


def run(section: Section) -> str:
    """Run one benchmark as its own process (its own memory, its own crash); returns a status."""
    if section.needs_cuda and not _has_cuda():
        return "skipped: needs CUDA"
    cmd = [sys.executable, "-m", f"bench.{section.module}", *section.args]
    print(f"\n=== {' '.join(cmd[1:])} (bounded to {section.budget_s} s)", flush=True)
    start = time.monotonic()
    # Its own session, so a benchmark past its budget can be stopped with everything it started.
    # SIGINT back to its default in the child: under `make bench &` it is ignored, and Python
    # would then never raise KeyboardInterrupt, so _stop's SIGINT could not run its cleanup.
    proc = subprocess.Popen(cmd, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.wait(timeout=section.budget_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        return f"stopped after {section.budget_s} s; the README keeps the previous result"
    took = time.monotonic() - start
    if proc.returncode != 0:
        return f"failed (exit {proc.returncode}) after {took:.0f} s; the README keeps the previous result"
    return f"ok in {took:.0f} s"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT first: the benchmark's finally blocks stop the daemons and vLLM replicas it started
    (those run in process groups of their own); then SIGKILL whatever is left in its group."""
    for sig, grace_s in ((signal.SIGINT, 60.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            if sig == signal.SIGINT:
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers in its group
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def record_runs(statuses: dict[str, str]) -> dict[str, dict[str, str]]:
    """Merge this run's statuses into RUNS, so a partial run (--only) keeps the others' lines."""
    runs = json.loads(RUNS.read_text()) if RUNS.exists() else {}
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs.update({name: {"status": status, "date": date} for name, status in statuses.items()})
    ordered = {s.name: runs[s.name] for s in SECTIONS if s.name in runs}
    if statuses:
        RESULTS.mkdir(parents=True, exist_ok=True)
        RUNS.write_text(json.dumps(ordered, indent=2) + "\n")
    return ordered


def render_readme(statuses: dict[str, dict[str, str]]) -> str:
    sections, machines = [], {}
    for section in SECTIONS:
        path = RESULTS / f"{section.name}.json"
        heading = f"## {section.title}: `python -m bench.{section.module}`"
        if not path.exists():
            why = statuses.get(section.name, {}).get("status") or (
                "needs CUDA; not measured on these machines yet" if section.needs_cuda
                else "not run yet")
            sections.append(f"{heading}\n\nNo result: {why}.")
            continue
        result = json.loads(path.read_text())
        module = importlib.import_module(f"bench.{section.module}")
        body = module.render(result) if hasattr(module, "render") else _generic(result)
        machine = result.get("machine")
        if machine:
            machines[section.name] = summary(machine)
        meta = f"Result: `bench/results/{section.name}.json`, {_date(result, path)}"
        rerun = result.get("command") or result.get("parameters", {}).get("command")
        if rerun:
            meta += f"; rerun with `{rerun}`"
        sections.append(f"{heading}\n\n{body}\n\n{meta}.")
    distinct = sorted(set(machines.values()))
    machine_lines = ([f"- {m}" for m in distinct] if distinct else ["- (no results yet)"])
    head = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench.report` (`make bench` runs every benchmark and then this).",
        "Every figure is a ratio against a limit or a peer measured in the same run, on the machine",
        "described in its JSON file under `bench/results/`. Rerun one benchmark with the command",
        "under its section; re-render this page from the committed results with",
        "`python -m bench.report --render`.",
        "",
        f"Rendered {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from results measured on:",
        "",
        *machine_lines,
    ]
    headline = _headline()
    if headline:
        head += ["", "## Headline", "", *headline]
    if statuses:
        head += ["", "Last run of each benchmark by `make bench` (or `--only`):", ""]
        head += [f"- `{name}`: {run['status']} ({run['date']})" for name, run in statuses.items()]
    return "\n".join(head) + "\n\n" + "\n\n".join(sections) + "\n"


def _headline() -> list[str]:
    """The three figures that decide whether a shared pool pays, each from its own result file;
    a missing file or key just drops its line (the sections below carry everything)."""
    lines = []
    try:
        replicas = json.loads((RESULTS / "replicas.json").read_text())
        hit, source = replicas["hit_rate"], replicas.get("source", {})
        n = max(hit["vram"]["round-robin"], key=int)
        error = replicas.get("validation_n2_mean_abs_rel_error", {}).get("hit_rate")
        check = f"; the simulator is within {error:.1%} of the real 2-replica run" if error else ""
        lines.append(
            f"- Cross-replica reuse: with {n} replicas ({source.get(n, '?')}) and round-robin routing, "
            f"the token hit rate is {hit['vram+pool']['round-robin'][n]:.2f} with the shared pool "
            f"against {hit['vram']['round-robin'][n]:.2f} with each replica's VRAM alone (2 replicas, "
            f"real: {hit['vram+pool']['round-robin']['2']:.2f} / {hit['vram']['round-robin']['2']:.2f}; "
            f"one replica: {hit['vram+pool']['round-robin']['1']:.2f} / "
            f"{hit['vram']['round-robin']['1']:.2f}){check}.")
    except (OSError, KeyError, ValueError):
        pass
    try:
        ttft = json.loads((RESULTS / "ttft.json").read_text())
        lines.append(
            f"- Time to first token of a 4k-token prompt loaded from the pool: "
            f"{ttft['pool_shm_vs_recompute_4k']:.3f}x recompute through shared memory, "
            f"{ttft['pool_tcp_vs_recompute_4k']:.3f}x over TCP; all-miss overhead "
            f"{ttft['miss_overhead']:.3f}x.")
    except (OSError, KeyError, ValueError):
        pass
    try:
        peers = json.loads((RESULTS / "peers.json").read_text())
        shm = peers["ratios"]["get"]["kvstore_shm_vs_best_peer"]["2MiB"]
        tcp = peers["ratios"]["get"]["kvstore_tcp_vs_best_tcp_peer"]["2MiB"]
        lines.append(
            f"- 2 MiB gets: through shared memory {shm['ratio']:.2f}x the best peer "
            f"(`{shm['best_peer']}`); over TCP {tcp['ratio']:.2f}x the best TCP peer "
            f"(`{tcp['best_peer']}`): behind (goals 10x and 3x).")
    except (OSError, KeyError, ValueError):
        pass
    return lines


def _date(result: dict[str, Any], path: Path) -> str:
    date = result.get("date") or result.get("machine", {}).get("date")
    return f"measured {date}" if date else f"file dated {time.ctime(path.stat().st_mtime)}"


def _generic(result: dict[str, Any]) -> str:
    """Fallback for a module without render(): its top-level numbers."""
    rows = [f"| `{k}` | {v:.4g} |" for k, v in result.items() if isinstance(v, (int, float))]
    return "\n".join(["| figure | value |", "|---|---|", *rows])


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", action="store_true", help="only re-render bench/README.md")
    parser.add_argument("--only", default="", help="comma-separated benchmark names to run")
    args = parser.parse_args(argv)
    names = [s.name for s in SECTIONS]
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    statuses: dict[str, str] = {}
    if not args.render:
        start = time.monotonic()
        print(f"machine: {summary(describe())}")
        for section in SECTIONS:
            if not only or section.name in only:
                statuses[section.name] = run(section)
                print(f"--- {section.name}: {statuses[section.name]}", flush=True)
        print(f"\nall benchmarks: {time.monotonic() - start:.0f} s")
    README.write_text(render_readme(record_runs(statuses)))
    print(f"wrote {README}")
    return 1 if any(s.startswith(("failed", "stopped")) for s in statuses.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

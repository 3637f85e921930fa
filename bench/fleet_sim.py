"""The simulator of bench.fleet, calibrated on its real runs, then run at N = 4, 8 and 16.

    python -m bench.fleet_sim [--result bench/results/fleet.json]

What it models, each part checked against the real runs' per-request records:
- Caches (EngineCache, bench/sim.py's Pool): vLLM's block LRU per replica with reference counts
  (a request holds its blocks until it finishes, so requests in flight shrink what can be
  evicted), hits decided when the engine schedules the request; the daemon's own Store as the
  pool, looked up past the VRAM hit at schedule time and saved when the prefill step ends (the
  connector saves after the forward pass). Replayed with the real routing and real start times,
  this reproduces each real request's cached tokens ("cache_replay" in the result).
- Routers (router_for), as vllm-router 0.1.17 behaves here: round_robin; consistent_hash on the
  session id; cache_aware as its source (src/policies/cache_aware.rs, src/tree.rs): in-flight
  counts per worker, load balancing to the least loaded when max - min > abs and max > rel x min,
  else the character-level prefix tree of the prompts it routed (match rate = matched characters /
  prompt characters; above --cache-threshold the worker that first inserted the deepest matched
  node, else the least loaded); kv_aware as measured (the public source read is older than 0.1.17,
  without its tier credits, and 0.1.17 ships a binary): the real choices follow the fewest requests still waiting for their first token, then the fewest
  in flight, not the cached prefix ("router_replay" gives the agreement on the real decisions).
- Time (Fleet): each replica is an engine that runs steps; a step takes every request waiting at
  its start (prefill) and every running one (one decode token), and costs step_s + recompute
  x recomputed tokens + cached x cached tokens + decode x running requests, in machine-seconds.
  The replicas share the machine's cores: the busy ones split it equally with `outside_load`
  engines' worth of other processes (the other jobs on the machine), so a busy engine runs at
  1 / (busy engines + outside_load) of the machine.
  TTFT = the end of the request's prefill step + http_s (router and server, off the engine).
  The costs are fitted per cache (the two caches ran one after the other under different outside
  load) on the real N = 3 runs replayed open loop (real start times and replicas), by least
  absolute log error of each request's TTFT and latency; the real N = 2 runs are then predicted
  closed loop with the simulated routers (out of sample): "validation_n2". Each step's work is
  multiplied by log-normal noise of the spread the replay leaves (robust sigma of the requests'
  log TTFT residuals), and every configuration is simulated SEEDS times: figures are the means,
  with 10th-90th percentiles beside them.
- How far a real TTFT can be trusted: the failure run repeats its baseline run exactly until the
  kill (same requests, replicas and hits), so the two TTFT p50s of those requests measure the
  real runs' own repeatability ("repeat_ttft_p50").
Adds "sim" to the result file, and fleet_sim.png beside it.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import heapq
import json
import statistics
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.fleet_model import text
from bench.sim import Pool, block_hashes
from bench.workload import WorkloadConfig, generate

RESULTS = Path(__file__).parent / "results"
SIM_NS = (2, 3, 4, 8, 16)
FIT_ROUNDS = 250  # simplex rounds: the loss stops moving well before on these runs
SEEDS = 8  # closed-loop runs per configuration, each with its own step noise
FIT_N = "3"  # fitted on N = 3, checked on N = 2 (out of sample)
WORK_EPS_S = 1e-9  # a step this close to done is done: float rounding must not stall the clock
CACHE_AWARE = {"cache_threshold": 0.3, "balance_abs": 2, "balance_rel": 1.2}  # bench.fleet's


# --- caches ------------------------------------------------------------------------------------
class EngineCache:
    """vLLM's prefix cache over num_blocks blocks with reference counts (block 0 is the null block).

    A request's blocks are taken when it is scheduled (its full prompt blocks become cached at
    once) and given back, tail first, when it finishes; only blocks nobody holds can be evicted,
    oldest freed first."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks - 1))
        self._refs: dict[int, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    def match(self, hashes: Sequence[bytes], max_blocks: int) -> int:
        num = 0
        for h in hashes[:max_blocks]:
            if h not in self._block_of:
                break
            num += 1
        return num

    def allocate(self, hashes: Sequence[bytes], num_hit: int, num_tokens: int) -> list[int]:
        """Take the num_hit matched blocks and fresh ones for the rest (as many as are free)."""
        blocks = [self._block_of[h] for h in hashes[:num_hit]]
        for block in blocks:
            self._free.pop(block, None)
            self._refs[block] = self._refs.get(block, 0) + 1
        for _ in range(-(-num_tokens // self.block_size) - num_hit):
            if not self._free:  # vLLM would queue the request; rare at these sizes
                break
            block, _ = self._free.popitem(last=False)
            old = self._hash_of.pop(block, None)
            if old is not None:
                del self._block_of[old]
            self._refs[block] = 1
            blocks.append(block)
        for i in range(num_hit, min(len(hashes), len(blocks))):
            if hashes[i] not in self._block_of:
                self._block_of[hashes[i]] = blocks[i]
                self._hash_of[blocks[i]] = hashes[i]
        return blocks

    def release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            self._refs[block] -= 1
            if not self._refs[block]:
                self._free[block] = None


def hashes_of(request: dict[str, Any], block_size: int) -> list[bytes]:
    """The prompt's block hashes, kept in the request (a fit replays each request hundreds of times)."""
    key = f"_block_hashes_{block_size}"
    if key not in request:
        request[key] = block_hashes(request["prompt"], block_size)
    return request[key]


# --- routers -----------------------------------------------------------------------------------
@dataclass
class RouterView:
    """What a router knows when it routes a request."""

    in_flight: list[int]  # routed and not finished, per replica
    prefilling: list[int]  # routed and still without a first token, per replica


class RoundRobin:
    def __init__(self, n: int) -> None:
        self.n, self._next = n, 0

    def route(self, request: dict[str, Any], view: RouterView) -> int:
        self._next = (self._next + 1) % self.n
        return (self._next - 1) % self.n


class SessionHash:
    """consistent_hash on X-Session-ID: a session always lands on the replica its id hashes to."""

    def __init__(self, n: int) -> None:
        self.n = n
        points = sorted((_hash64(f"replica-{r}-{v}".encode()), r) for r in range(n) for v in range(64))
        self._positions, self._owners = [p for p, _ in points], [r for _, r in points]

    def route(self, request: dict[str, Any], view: RouterView) -> int:
        at = bisect.bisect(self._positions, _hash64(str(request["session"]).encode()))
        return self._owners[at % len(self._owners)]


class PrefixTree:
    """vllm-router's multi-tenant character tree, reduced to what routing reads from it: the
    longest prefix any inserted text shares with a query, and the worker that created the node
    where that match ends (the first worker whose text reached it: the node keeps its creator as
    `last_tenant`, and a split copies it)."""

    def __init__(self) -> None:
        self._texts: list[tuple[str, int]] = []

    def insert(self, text: str, worker: int) -> None:
        self._texts.append((text, worker))

    def match(self, text: str) -> tuple[int, int | None]:
        best, owner = 0, None
        for seen, worker in self._texts:  # in insertion order: the first one reaching best wins
            n = common_prefix(seen, text)
            if n > best:
                best, owner = n, worker
        return best, owner


def common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of a and b (binary search on slice equality)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class CacheAware:
    """cache_aware of vllm-router 0.1.17 with bench.fleet's thresholds (see the module doc)."""

    def __init__(self, n: int, cache_threshold: float, balance_abs: int,
                 balance_rel: float) -> None:
        self.n, self.threshold, self.abs, self.rel = n, cache_threshold, balance_abs, balance_rel
        self.tree = PrefixTree()

    def route(self, request: dict[str, Any], view: RouterView) -> int:
        loads = view.in_flight
        least = min(range(self.n), key=lambda i: loads[i])
        prompt = text(request["prompt"])
        if max(loads) - min(loads) > self.abs and max(loads) > self.rel * min(loads):
            choice = least
        else:
            matched, owner = self.tree.match(prompt)
            choice = owner if owner is not None and matched / len(prompt) > self.threshold else least
        self.tree.insert(prompt, choice)
        return choice


class FewestPrefilling:
    """kv_aware as measured with 0.1.17: the replica with the fewest requests waiting for their
    first token, then the fewest in flight, then the first."""

    def __init__(self, n: int) -> None:
        self.n = n

    def route(self, request: dict[str, Any], view: RouterView) -> int:
        return min(range(self.n), key=lambda i: (view.prefilling[i], view.in_flight[i], i))


def router_for(policy: str, n: int) -> Any:
    if policy == "round_robin":
        return RoundRobin(n)
    if policy == "consistent_hash":
        return SessionHash(n)
    if policy == "cache_aware":
        return CacheAware(n, **CACHE_AWARE)
    if policy == "kv_aware":
        return FewestPrefilling(n)
    raise ValueError(f"unknown policy {policy!r}")


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


# --- time --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineModel:
    """Machine-seconds of one engine step, and the wall seconds outside the engine."""

    step_s: float
    recompute_s_per_token: float
    cached_s_per_token: float
    decode_s_per_request: float
    http_s: float
    outside_load: float = 0.0  # other busy processes, in engines: a busy engine runs at 1 / (k + this)


@dataclass
class Job:
    request: dict[str, Any]
    arrival: float
    replica: int = -1
    hashes: list[bytes] | None = None
    blocks: list[int] | None = None
    vram_blocks: int = 0
    pool_blocks: int = 0
    decode_left: int = 0
    ttft: float = float("nan")
    latency: float = float("nan")


class Replica:
    def __init__(self, cache: EngineCache) -> None:
        self.cache = cache
        self.waiting: list[Job] = []
        self.running: list[Job] = []
        self.step: list[Job] = []
        self.work_left = 0.0


class Fleet:
    """N engines sharing the machine, fed by a router (or, for calibration, by a fixed replay)."""

    def __init__(self, n: int, model: EngineModel, vram_blocks: int, pool: Pool | None,
                 block_size: int, max_tokens: int, noise_sigma: float = 0.0, seed: int = 0) -> None:
        self.model, self.pool, self.block_size, self.max_tokens = model, pool, block_size, max_tokens
        # Each step's work times a log-normal factor: the spread the real runs show around the
        # fitted costs (outside load comes and goes), so a closed loop can go other ways.
        self.noise_sigma, self.rng = noise_sigma, np.random.default_rng(seed)
        self.replicas = [Replica(EngineCache(vram_blocks, block_size)) for _ in range(n)]
        self.now = 0.0
        self.in_flight = [0] * n
        self.prefilling = [0] * n

    def view(self) -> RouterView:
        return RouterView(list(self.in_flight), list(self.prefilling))

    def arrive(self, job: Job, replica: int) -> None:
        job.replica = replica
        self.in_flight[replica] += 1
        self.prefilling[replica] += 1
        self.replicas[replica].waiting.append(job)

    def _schedule(self, r: Replica) -> None:
        """Start r's next step: every waiting request's prefill and one token of every running one."""
        m = self.model
        work = m.step_s + m.decode_s_per_request * len(r.running)
        for job in r.waiting:
            prompt = job.request["prompt"]
            job.hashes = hashes_of(job.request, self.block_size)
            most = min((len(prompt) - 1) // self.block_size, len(job.hashes))
            job.vram_blocks = r.cache.match(job.hashes, most)
            job.pool_blocks = self.pool.load(job.hashes, job.vram_blocks, most) if self.pool else 0
            job.blocks = r.cache.allocate(job.hashes, job.vram_blocks, len(prompt) + self.max_tokens)
            cached = (job.vram_blocks + job.pool_blocks) * self.block_size
            work += m.recompute_s_per_token * (len(prompt) - cached) + m.cached_s_per_token * cached
        if self.noise_sigma:
            work *= float(np.exp(self.rng.normal(0.0, self.noise_sigma)))
        r.step, r.waiting, r.work_left = r.waiting + r.running, [], work

    def next_step_end(self) -> float:
        busy = [r for r in self.replicas if r.step]
        share = len(busy) + self.model.outside_load
        return self.now + min(r.work_left for r in busy) * share if busy else float("inf")

    def advance(self, until: float) -> list[Job]:
        """Run the engines up to until (or the first step end before it); the jobs finished."""
        busy = [r for r in self.replicas if r.step]
        dt = until - self.now
        self.now = until
        finished: list[Job] = []
        for r in busy:
            r.work_left -= dt / (len(busy) + self.model.outside_load)
            if r.work_left <= WORK_EPS_S:
                finished += self._end_step(self.replicas.index(r), r)
        for r in self.replicas:
            if not r.step and (r.waiting or r.running):
                self._schedule(r)
        return finished

    def _end_step(self, index: int, r: Replica) -> list[Job]:
        done, running = [], []
        for job in r.step:
            if job.decode_left == 0 and job.ttft != job.ttft:  # its prefill step: first token
                job.ttft = self.now - job.arrival + self.model.http_s
                job.decode_left = self.max_tokens - 1
                self.prefilling[index] -= 1
                if self.pool and job.hashes:
                    self.pool.save(job.hashes, range(job.vram_blocks,
                                                     job.vram_blocks + job.pool_blocks))
            else:
                job.decode_left -= 1
            if job.decode_left <= 0:
                job.latency = self.now - job.arrival + self.model.http_s
                r.cache.release(job.blocks or [])
                self.in_flight[index] -= 1
                done.append(job)
            else:
                running.append(job)
        r.step, r.running = [], running
        return done


def run_closed_loop(trace: list[dict[str, Any]], n: int, policy: str, model: EngineModel,
                    vram_blocks: int, pool: Pool | None, block_size: int, max_tokens: int,
                    concurrency: int, noise_sigma: float = 0.0, seed: int = 0) -> list[Job]:
    """As bench/fleet_client.py sends: concurrency workers take requests in trace order, and a
    worker holds its slot while the request's previous turn is still running."""
    fleet = Fleet(n, model, vram_blocks, pool, block_size, max_tokens, noise_sigma, seed)
    router = router_for(policy, n)
    previous, last = {}, {}
    for request in trace:
        if request["session"] in last:
            previous[request["id"]] = last[request["session"]]
        last[request["session"]] = request["id"]
    done_at: dict[int, float] = {}
    queue = list(trace)
    held: list[dict[str, Any]] = []  # taken by a worker, waiting for the previous turn
    jobs: list[Job] = []
    free = concurrency
    while True:
        while free and queue:
            held.append(queue.pop(0))
            free -= 1
        for request in list(held):
            if previous.get(request["id"]) is None or previous[request["id"]] in done_at:
                held.remove(request)
                job = Job(request, fleet.now)
                fleet.arrive(job, router.route(request, fleet.view()))
                jobs.append(job)
        for r in fleet.replicas:
            if not r.step and (r.waiting or r.running):
                fleet._schedule(r)
        end = fleet.next_step_end()
        if end == float("inf"):
            break
        for job in fleet.advance(end):
            done_at[job.request["id"]] = fleet.now
            free += 1
    return jobs


def run_replay(run: dict[str, Any], trace_by_id: dict[int, dict[str, Any]], model: EngineModel,
               vram_blocks: int, pool: Pool | None, block_size: int,
               max_tokens: int) -> list[tuple[dict[str, Any], Job]]:
    """A real run's completed requests at their real start times on their real replicas."""
    rows = sorted((r for r in run["requests"] if r["ok"]), key=lambda r: r["start_s"])
    names = sorted({r["replica"] for r in rows})
    fleet = Fleet(len(names), model, vram_blocks, pool, block_size, max_tokens)
    out = []
    for row in rows + [None]:
        at = row["start_s"] if row else float("inf")
        while True:
            end = fleet.next_step_end()
            if end > at or end == float("inf"):
                break
            fleet.advance(end)
        if row is None:
            break
        fleet.advance(at)
        job = Job(trace_by_id[row["id"]], at)
        fleet.arrive(job, names.index(row["replica"]))
        for r in fleet.replicas:
            if not r.step and (r.waiting or r.running):
                fleet._schedule(r)
        out.append((row, job))
    return out


# --- calibration -------------------------------------------------------------------------------
def fit(runs: list[dict[str, Any]], trace_by_id: dict[int, dict[str, Any]],
        setup: dict[str, Any]) -> EngineModel:
    """The costs that best replay the runs: least absolute log error of every request's TTFT and
    latency (Nelder-Mead on log-parameters; absolute, so a few requests stalled by outside load
    do not drag the fit)."""
    def loss(logs: np.ndarray) -> float:
        model = EngineModel(*np.exp(logs))
        total = 0.0
        for run in runs:
            for row, job in run_replay(run, trace_by_id, model, **_replay_setup(run, setup)):
                total += abs(np.log(job.ttft / row["ttft_s"])) + abs(np.log(job.latency / row["latency_s"]))
        return total

    start = np.log([0.02, 3e-4, 3e-5, 0.01, 0.01, 1.0])
    return EngineModel(*map(float, np.exp(nelder_mead(loss, start, FIT_ROUNDS))))


def nelder_mead(f: Any, x0: np.ndarray, rounds: int, step: float = 0.7) -> np.ndarray:
    """Minimise f from x0 by the Nelder-Mead simplex (no scipy in the venv); returns the best x."""
    simplex = [np.array(x0, dtype=float)] + [x0 + step * e for e in np.eye(len(x0))]
    values = [f(x) for x in simplex]
    for _ in range(rounds):
        order = np.argsort(values)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        centre = np.mean(simplex[:-1], axis=0)
        reflected = centre + (centre - simplex[-1])
        fr = f(reflected)
        if fr < values[0]:
            expanded = centre + 2 * (centre - simplex[-1])
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = centre + 0.5 * (simplex[-1] - centre)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:  # shrink towards the best
                simplex = [simplex[0]] + [simplex[0] + 0.5 * (x - simplex[0]) for x in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    return simplex[int(np.argmin(values))]


def _replay_setup(run: dict[str, Any], setup: dict[str, Any]) -> dict[str, Any]:
    return {"vram_blocks": setup["vram_blocks"], "block_size": setup["block_size"],
            "max_tokens": setup["max_tokens"],
            "pool": Pool(setup["pool_blocks"], 1, "leaf-lru") if run["cache"] == "pool" else None}


def router_agreement(run: dict[str, Any], trace_by_id: dict[int, dict[str, Any]]) -> float:
    """Share of a real run's routing decisions the router model makes the same, given the real
    state at each request's start (in-flight and first-token times from the real requests)."""
    rows = sorted((r for r in run["requests"] if r["ok"]), key=lambda r: r["start_s"])
    names = sorted({r["replica"] for r in rows})
    router = router_for(run["policy"], len(names))
    same = 0
    for row in rows:
        t = row["start_s"]
        view = RouterView([0] * len(names), [0] * len(names))
        for other in rows:
            if other["start_s"] < t <= other["start_s"] + other["latency_s"]:
                view.in_flight[names.index(other["replica"])] += 1
                if t < other["start_s"] + other["ttft_s"]:
                    view.prefilling[names.index(other["replica"])] += 1
        choice = router.route(trace_by_id[row["id"]], view)
        real = names.index(row["replica"])
        same += choice == real
        if isinstance(router, CacheAware) and choice != real:  # the tree learns the real choice
            router.tree._texts[-1] = (router.tree._texts[-1][0], real)
    return same / len(rows)


def spread(runs: list[dict[str, Any]], trace_by_id: dict[int, dict[str, Any]], model: EngineModel,
           setup: dict[str, Any]) -> float:
    """Robust standard deviation (1.4826 x median absolute deviation) of log(real / replayed
    TTFT) over the fitted runs' requests: how much the real machine wanders around the model."""
    logs = np.array([np.log(row["ttft_s"] / job.ttft) for run in runs
                     for row, job in run_replay(run, trace_by_id, model, **_replay_setup(run, setup))])
    return float(1.4826 * np.median(np.abs(logs - np.median(logs))))


def repeatability(res: dict[str, Any]) -> dict[str, Any]:
    """Per cache: TTFT p50 of the failure run's requests answered before the kill, and of the same
    requests in the run without a failure (same configuration, so the same routing and hits)."""
    out = {}
    for failure in (r for r in res["runs"] if r["failure"] and r["killed_at_s"]):
        base = next((r for r in res["runs"] if not r["failure"] and r["cache"] == failure["cache"]
                     and r["policy"] == failure["policy"] and r["n"] == failure["n"]), None)
        if base is None:
            continue
        first = {r["id"]: r for r in failure["requests"]
                 if r["ok"] and r["start_s"] + r["ttft_s"] < failure["killed_at_s"]}
        again = [r for r in base["requests"] if r["id"] in first and r["ok"]]
        a = statistics.median(first[r["id"]]["ttft_s"] for r in again)
        b = statistics.median(r["ttft_s"] for r in again)
        out[failure["cache"]] = {
            "requests": len(again), "ttft_p50_s": [a, b], "rel_difference": abs(a - b) / min(a, b),
            "same_replica": sum(first[r["id"]]["replica"] == r["replica"] for r in again),
            "same_cached_tokens": sum(first[r["id"]]["cached_tokens"] == r["cached_tokens"]
                                      for r in again)}
    return out


def calibrate(res: dict[str, Any]) -> dict[str, Any]:
    p = res["parameters"]
    workload = WorkloadConfig(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in p["workload"].items()})
    trace = generate(workload)
    by_id = {r["id"]: r for r in trace}
    plain = [r for r in res["runs"] if not r["failure"]]
    setup = {k: p[k] for k in ("vram_blocks", "pool_blocks", "block_size", "max_tokens")}
    fitted_on = {cache: [r for r in plain if str(r["n"]) == FIT_N and r["cache"] == cache]
                 for cache in res["hit_rate"]}
    models = {cache: fit(runs, by_id, setup) for cache, runs in fitted_on.items()}
    noise = {cache: spread(runs, by_id, models[cache], setup) for cache, runs in fitted_on.items()}
    out: dict[str, Any] = {"hit_rate": {}, "pool_hit_rate": {}, "ttft_p50_s": {},
                           "ttft_p95_s": {}, "validation_n2": {}, "cache_replay": {},
                           "router_replay": {}, "repeat_ttft_p50": repeatability(res),
                           "engine_model": {c: asdict(m) for c, m in models.items()},
                           "step_noise_sigma": noise, "seeds": SEEDS,
                           "hit_rate_p10_p90": {}, "ttft_p50_s_p10_p90": {},
                           "fitted_on": f"the real N={FIT_N} runs of the same cache, replayed"}
    for run in plain:
        key = (run["cache"], run["policy"], str(run["n"]))
        replay = run_replay(run, by_id, models[run["cache"]], **_replay_setup(run, setup))
        prompt = sum(len(job.request["prompt"]) for _, job in replay)
        hit = sum((job.vram_blocks + job.pool_blocks) for _, job in replay) * p["block_size"]
        out["cache_replay"].setdefault(key[0], {}).setdefault(key[1], {})[key[2]] = {
            "real_hit_rate": run["summary"]["hit_rate"], "replayed_hit_rate": hit / prompt,
            "requests_exact": sum((job.vram_blocks + job.pool_blocks) * p["block_size"]
                                  == row["cached_tokens"] for row, job in replay),
            "requests": len(replay)}
        if run["policy"] in ("cache_aware", "kv_aware"):  # the two modelled on the real choices
            out["router_replay"].setdefault(key[0], {}).setdefault(key[1], {})[key[2]] = \
                router_agreement(run, by_id)
    for cache in res["hit_rate"]:
        for policy in res["hit_rate"][cache]:
            for n in SIM_NS:
                seeds = []
                for seed in range(SEEDS):
                    pool = Pool(p["pool_blocks"], 1, "leaf-lru") if cache == "pool" else None
                    seeds.append(summarize(run_closed_loop(
                        trace, n, policy, models[cache], p["vram_blocks"], pool, p["block_size"],
                        p["max_tokens"], p["concurrency"], noise[cache], seed), p["block_size"]))
                for key in seeds[0]:
                    out[key].setdefault(cache, {}).setdefault(policy, {})[str(n)] = \
                        statistics.fmean(s[key] for s in seeds)
                for key in ("hit_rate", "ttft_p50_s"):
                    out[f"{key}_p10_p90"].setdefault(cache, {}).setdefault(policy, {})[str(n)] = \
                        [float(np.quantile([s[key] for s in seeds], q)) for q in (0.1, 0.9)]
            real = res["hit_rate"][cache][policy].get("2")
            if real is not None:
                sim_hit = out["hit_rate"][cache][policy]["2"]
                sim_ttft = out["ttft_p50_s"][cache][policy]["2"]
                real_ttft = res["ttft_p50_s"][cache][policy]["2"]
                out["validation_n2"].setdefault(cache, {})[policy] = {
                    "real_hit_rate": real, "sim_hit_rate": sim_hit,
                    "hit_rate_rel_error": (sim_hit - real) / real,
                    "real_ttft_p50_s": real_ttft, "sim_ttft_p50_s": sim_ttft,
                    "ttft_rel_error": (sim_ttft - real_ttft) / real_ttft,
                    "sim_hit_rate_p10_p90": out["hit_rate_p10_p90"][cache][policy]["2"],
                    "sim_ttft_p50_s_p10_p90": out["ttft_p50_s_p10_p90"][cache][policy]["2"]}
    errors = [v for c in out["validation_n2"].values() for v in c.values()]
    out["validation_n2_mean_abs_rel_error"] = {
        "hit_rate": statistics.fmean(abs(v["hit_rate_rel_error"]) for v in errors),
        "ttft_p50": statistics.fmean(abs(v["ttft_rel_error"]) for v in errors)}
    return out


def summarize(jobs: list[Job], block_size: int) -> dict[str, float]:
    prompt = sum(len(j.request["prompt"]) for j in jobs)
    ttfts = sorted(j.ttft for j in jobs)
    return {"hit_rate": sum(j.vram_blocks + j.pool_blocks for j in jobs) * block_size / prompt,
            "pool_hit_rate": sum(j.pool_blocks for j in jobs) * block_size / prompt,
            "ttft_p50_s": float(np.quantile(ttfts, 0.5)),
            "ttft_p95_s": float(np.quantile(ttfts, 0.95))}


# --- output ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result", type=Path, default=RESULTS / "fleet.json")
    args = parser.parse_args(argv)
    res = json.loads(args.result.read_text())
    res["sim"] = calibrate(res)
    args.result.write_text(json.dumps(res, indent=2) + "\n")
    plot(res["sim"], args.result.parent)
    print(sim_table(res["sim"]))
    return 0


def sim_table(sim: dict[str, Any]) -> str:
    ns = [str(n) for n in SIM_NS]
    lines = ["| cache | policy | " + " | ".join(f"N={n}" for n in ns) + " |",
             "|---|---|" + "---|" * len(ns)]
    for cache, by_policy in sim["hit_rate"].items():
        for policy, by_n in by_policy.items():
            cells = " | ".join(f"{by_n[n]:.3f} / {sim['ttft_p50_s'][cache][policy][n]:.2f} s"
                               for n in ns)
            lines.append(f"| {cache} | {policy} | {cells} |")
    lines += ["", f"Simulated hit rate / TTFT p50 (means of {sim.get('seeds', 1)} closed-loop runs "
              "with step noise). Against the real N = 2 runs (out of sample; in brackets the "
              "simulated runs' 10th-90th percentiles):", "",
              "| cache | policy | hit rate real / sim (error) | TTFT p50 real / sim (error) | "
              "real routing choices reproduced |", "|---|---|---|---|---|"]
    for cache, by_policy in sim["validation_n2"].items():
        for policy, v in by_policy.items():
            agree = sim.get("router_replay", {}).get(cache, {}).get(policy, {}).get("2")
            lines.append(
                f"| {cache} | {policy} | {v['real_hit_rate']:.3f} / {v['sim_hit_rate']:.3f} "
                f"[{_range(v.get('sim_hit_rate_p10_p90'), '.3f')}] ({v['hit_rate_rel_error']:+.1%}) "
                f"| {v['real_ttft_p50_s']:.2f} / {v['sim_ttft_p50_s']:.2f} s "
                f"[{_range(v.get('sim_ttft_p50_s_p10_p90'), '.2f')}] ({v['ttft_rel_error']:+.1%}) | "
                + (f"{agree:.0%} |" if agree is not None else "- |"))
    v = sim["validation_n2_mean_abs_rel_error"]
    lines += ["", f"Mean absolute relative error: {v['hit_rate']:.1%} on hit rate, "
              f"{v['ttft_p50']:.1%} on TTFT p50."]
    for cache, rep in sim.get("repeat_ttft_p50", {}).items():
        lines.append(f"Repeatability of the real TTFT ({cache}): the same {rep['requests']} requests "
                     f"on the same replicas with the same hits had TTFT p50 "
                     f"{rep['ttft_p50_s'][0]:.2f} s and {rep['ttft_p50_s'][1]:.2f} s in two runs "
                     f"({rep['rel_difference']:.0%} apart).")
    return "\n".join(lines)


def _range(pair: list[float] | None, fmt: str) -> str:
    return f"{pair[0]:{fmt}}-{pair[1]:{fmt}}" if pair else "-"


def plot(sim: dict[str, Any], where: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(axes, ("hit_rate", "ttft_p50_s"), ("token hit rate", "TTFT p50 (s)")):
        for cache, by_policy in sim[key].items():
            for policy, by_n in by_policy.items():
                ns = sorted(by_n, key=int)
                ax.plot([int(n) for n in ns], [by_n[n] for n in ns], marker="o",
                        linestyle="-" if cache == "pool" else "--", label=f"{cache} {policy}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("replicas N (simulated)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(where / "fleet_sim.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

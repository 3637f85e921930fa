"""The parts of bench.fleet's simulator: vLLM-like engines with their prefix caches, the pool,
vllm-router's policies as modelled, and the clock of N engines sharing one machine. Pure Python:
no sockets, no vLLM. bench/fleet_sim.py calibrates it on the real runs and reports (see there)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.fleet import CACHE_AWARE_OPTIONS
from bench.fleet_model import text
from bench.router_hash import HashRing, session_key
from bench.sim import Pool, VramCache, block_hashes

WORK_EPS_S = 1e-9  # a step this close to done is done: float rounding must not stall the clock
# Tokens one engine step computes: vLLM's default for `vllm serve` on a CPU (engine/arg_utils.py),
# with chunked prefill on, as bench.fleet's replicas run. Running requests go first (a token
# each); a prefill past the budget is cut and continues first in the next step.
MAX_BATCHED_TOKENS = 2048
_OPTIONS = dict(zip(CACHE_AWARE_OPTIONS[::2], CACHE_AWARE_OPTIONS[1::2]))
CACHE_AWARE = {"cache_threshold": float(_OPTIONS["--cache-threshold"]),  # as bench.fleet runs it
               "balance_abs": int(_OPTIONS["--balance-abs-threshold"]),
               "balance_rel": float(_OPTIONS["--balance-rel-threshold"])}


# --- caches ------------------------------------------------------------------------------------
class EngineCache(VramCache):
    """vLLM's prefix cache of one replica of the fleet: a request's blocks are taken when it is
    scheduled (its full prompt blocks become cached at once) and given back, tail first, when it
    finishes; only blocks nobody holds can be evicted, oldest freed first (bench/sim.py)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks)
        self.block_size = block_size

    def allocate(self, hashes: Sequence[bytes], num_hit: int, num_tokens: int) -> list[int]:
        """Take the num_hit matched blocks and fresh ones for num_tokens (as many as are free)."""
        return self.hold(hashes, num_hit, -(-num_tokens // self.block_size))


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
    """consistent_hash on X-Session-ID: a session always lands where vllm-router's ring of the
    workers' URLs puts its key (bench/router_hash.py)."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.ring = HashRing(urls)

    def route(self, request: dict[str, Any], view: RouterView) -> int:
        return self.ring.owner(session_key(str(request["session"])))


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


def router_for(policy: str, n: int, urls: Sequence[str] | None = None) -> Any:
    """The policy's model for n replicas; consistent_hash needs their URLs (in replica order)."""
    if policy == "round_robin":
        return RoundRobin(n)
    if policy == "consistent_hash":
        if urls is None or len(urls) != n:
            raise ValueError(f"consistent_hash routes by the workers' URLs: give {n} of them")
        return SessionHash(urls)
    if policy == "cache_aware":
        return CacheAware(n, **CACHE_AWARE)
    if policy == "kv_aware":
        return FewestPrefilling(n)
    raise ValueError(f"unknown policy {policy!r}")


# --- time --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineModel:
    """Machine-seconds of one engine step, and the wall seconds outside the engine."""

    step_s: float
    recompute_s_per_token: float
    cached_s_per_token: float
    decode_s_per_request: float
    http_s: float
    outside_load: float = 0.0  # other busy processes, in engines (see rate())
    # The machine's cores, each engine running one thread (bench/fleet_procs.py): k busy engines
    # then run at min(1, cores / (k + outside_load)) of a core each, and costs are core-seconds.
    # 0: an engine uses the whole machine, 1 / (k + outside_load) of it each (costs in
    # machine-seconds), as the runs with one thread per core were modelled.
    cores: float = 0.0
    # A pool hit is loaded as the connector loads one on a CPU engine: in the step that
    # prefills the request (connectors/vllm_v1/worker_side.py, in-step loads), whose work it
    # adds to: pool_load_s per load (the lookup's wait, the release) and pool_s_per_token x
    # loaded tokens (the copy). 0: pool hits cost as VRAM hits do.
    pool_load_s: float = 0.0
    pool_s_per_token: float = 0.0
    # What the connector's other calls cost a pool run's steps, measured by its own counters in
    # the real runs (bench.fleet's "connector"), not fitted: the worker's saves of the blocks a
    # step computed (seconds per computed token), and the scheduler's wait for each request's
    # lookup (its step waits with it).
    save_s_per_token: float = 0.0
    lookup_s: float = 0.0

    def rate(self, num_busy: int) -> float:
        """The speed of each of num_busy busy engines, in units of work per second."""
        share = num_busy + self.outside_load
        return min(1.0, self.cores / share) if self.cores else 1.0 / share


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
    is_looked_up: bool = False  # the scheduler has looked it up (its hits are decided)
    prefill_left: int = -1  # prompt tokens still to compute (-1: prefill not started)
    chunk: int = 0  # of those, the ones its current step computes
    ttft: float = float("nan")
    latency: float = float("nan")


class Replica:
    def __init__(self, cache: EngineCache) -> None:
        self.cache = cache
        self.waiting: list[Job] = []
        self.running: list[Job] = []
        self.partial: list[Job] = []  # prefills cut by the step's token budget
        self.step: list[Job] = []
        self.stepping = False  # a step is running
        self.work_left = 0.0

    def has_work(self) -> bool:
        return bool(self.waiting or self.partial or self.running)


class Fleet:
    """N engines sharing the machine, fed by a router (or, for calibration, by a fixed replay)."""

    def __init__(self, n: int, model: EngineModel, vram_blocks: int, pool: Pool | None,
                 block_size: int, max_tokens: int, noise_sigma: float = 0.0, seed: int = 0,
                 max_batched_tokens: int = MAX_BATCHED_TOKENS) -> None:
        self.model, self.pool, self.block_size, self.max_tokens = model, pool, block_size, max_tokens
        self.max_batched_tokens = max_batched_tokens
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
        """Start r's next step as vLLM's scheduler fills it: one token of every running request,
        then the prefills cut last step, then the waiting ones in order, up to the token budget."""
        m = self.model
        work = m.step_s + m.decode_s_per_request * len(r.running)
        budget = self.max_batched_tokens - len(r.running)
        prefill, left = [], []
        for job in r.partial + r.waiting:
            if budget <= 0:  # vLLM stops at the budget: the rest wait, not even looked up
                left.append(job)
                continue
            if not job.is_looked_up:
                self._look_up(r, job)
                if self.pool:
                    work += m.lookup_s
            if job.prefill_left < 0:
                cached = (job.vram_blocks + job.pool_blocks) * self.block_size
                job.prefill_left = len(job.request["prompt"]) - cached
                work += m.cached_s_per_token * cached
                if job.pool_blocks:  # loaded in this step, before its forward pass
                    work += m.pool_load_s + (m.pool_s_per_token * job.pool_blocks
                                             * self.block_size)
            job.chunk = min(job.prefill_left, budget)
            budget -= job.chunk
            work += m.recompute_s_per_token * job.chunk
            if self.pool:  # the connector saves what the step computed
                work += m.save_s_per_token * job.chunk
            prefill.append(job)
        if self.noise_sigma:
            work *= float(np.exp(self.rng.normal(0.0, self.noise_sigma)))
        r.step, r.partial, r.waiting, r.work_left = prefill + r.running, [], left, work
        r.stepping = True

    def _look_up(self, r: Replica, job: Job) -> None:
        """The scheduler's lookup: the VRAM hit, then the pool past it; the blocks are held now."""
        prompt = job.request["prompt"]
        job.hashes = hashes_of(job.request, self.block_size)
        most = min((len(prompt) - 1) // self.block_size, len(job.hashes))
        job.vram_blocks = r.cache.match(job.hashes, most)
        job.pool_blocks = self.pool.load(job.hashes, job.vram_blocks, most) if self.pool else 0
        job.blocks = r.cache.allocate(job.hashes, job.vram_blocks, len(prompt) + self.max_tokens)
        job.is_looked_up = True

    def next_step_end(self) -> float:
        """When the next step of any engine ends."""
        busy = [r for r in self.replicas if r.stepping]
        return (self.now + min(r.work_left for r in busy) / self.model.rate(len(busy))
                if busy else float("inf"))

    def advance(self, until: float) -> list[Job]:
        """Run the engines up to until (or the first step end before it); the jobs finished."""
        busy = [r for r in self.replicas if r.stepping]
        dt = until - self.now
        self.now = until
        finished: list[Job] = []
        for r in busy:
            r.work_left -= dt * self.model.rate(len(busy))
            if r.work_left <= WORK_EPS_S:
                finished += self._end_step(self.replicas.index(r), r)
        for r in self.replicas:
            if not r.stepping and r.has_work():
                self._schedule(r)
        return finished

    def _end_step(self, index: int, r: Replica) -> list[Job]:
        done, running = [], []
        for job in r.step:
            if job.decode_left == 0 and job.ttft != job.ttft:  # a prefill step
                job.prefill_left -= job.chunk
                if job.prefill_left > 0:  # cut by the budget: more of it next step
                    r.partial.append(job)
                    continue
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
        r.step, r.running, r.stepping = [], running, False
        return done


def run_closed_loop(trace: list[dict[str, Any]], n: int, policy: str, model: EngineModel,
                    vram_blocks: int, pool: Pool | None, block_size: int, max_tokens: int,
                    concurrency: int, noise_sigma: float = 0.0, seed: int = 0,
                    urls: Sequence[str] | None = None) -> list[Job]:
    """As bench/fleet_client.py sends: concurrency workers take requests in trace order, and a
    worker holds its slot while the request's previous turn is still running. A worker is free,
    and a session's next turn may start, only when the client has the whole answer: http_s after
    the engine's last step (the end that TTFT and latency count too)."""
    fleet = Fleet(n, model, vram_blocks, pool, block_size, max_tokens, noise_sigma, seed)
    router = router_for(policy, n, urls)
    previous, last = {}, {}
    for request in trace:
        if request["session"] in last:
            previous[request["id"]] = last[request["session"]]
        last[request["session"]] = request["id"]
    done_at: dict[int, float] = {}
    answering: list[tuple[float, int]] = []  # (when the client has the answer, request id)
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
            if not r.stepping and r.has_work():
                fleet._schedule(r)
        end = min([fleet.next_step_end()] + [at for at, _ in answering])
        if end == float("inf"):
            break
        answering += [(fleet.now + model.http_s, job.request["id"]) for job in fleet.advance(end)]
        for at, request_id in [a for a in answering if a[0] <= fleet.now]:
            answering.remove((at, request_id))
            done_at[request_id] = at
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
            if not r.stepping and r.has_work():
                fleet._schedule(r)
        out.append((row, job))
    return out

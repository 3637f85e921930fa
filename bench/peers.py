"""kvstore beside its peers, on the same blocks and the same workload, in the same run.

    python -m bench.peers [--quick] [--skip-ttft] [--rounds N]

Systems (bench.peers_clients, bench.peers_lmcache):
  kvstore_shm      the daemon through its shared segment (pin -> memcpy; reserve -> copy -> commit)
  kvstore_tcp      the daemon over loopback TCP (zero-copy frames, recv_into the destinations)
  lmcache_lm       LMCache's LMCServerConnector to its legacy `lmcache_server` (lm://)
  lmcache_redis    LMCache's RedisConnector (redis://, redis-py asyncio) to redis-server
  lmcache_resp     LMCache's RESPConnector (resp://, its native C++ client) to redis-server
  redis            redis-py + hiredis to redis-server, one command per block
  redis_pipelined  the same, one pipeline per prefix
  example_disk     vLLM's ExampleConnector storage: safetensors save_file / load_file on disk

Workload: Llama-3-8B KV (128 KiB per token, bf16), random bytes: a prefix of 64 blocks of 2 MiB
(16 tokens each) and 4 objects of 32 MiB (LMCache's default 256-token chunk), 128 MiB each, into
distinct prefaulted destinations. Every round reads each system's stored copy of both sets and
writes them anew (timed from the first call to the store holding every block), interleaved
system by system so a busy moment hits all of them; lookup is the existence check of the
64-block prefix. Limits measured in the same rounds: numpy memcpy over distinct buffers, raw
ZeroMQ of the same bytes (bench.store's peer), a bare ZeroMQ round trip. Time to first token on
vLLM's CPU backend is bench.peers_ttft. Figures are medians over rounds; GB/s is 10^9 bytes/s.
Writes bench/results/peers.json and bench/results/peers_get.png; render() (bench.peers_report)
turns the JSON into the bench/README.md section.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")  # before anything imports lmcache
os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")

import numpy as np  # noqa: E402

from bench.machine import describe, summary  # noqa: E402
from bench.peers_clients import ExampleDisk, KVStore, Redis, System, as_bytes  # noqa: E402
from bench.peers_report import plot, ratio_lines, render, table, ttft_lines  # noqa: E402
from bench.store import RawPeer, chain, prefaulted  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MiB = 1024 * 1024
SIZES = {"2MiB": (2 * MiB, 64), "32MiB": (32 * MiB, 4)}  # label: (object bytes, objects)
LOOKUP_SIZE = "2MiB"  # the prefix whose 64 keys every lookup checks
GOALS = {"kvstore_tcp_vs_best_tcp_peer": 3.0, "kvstore_shm_vs_best_peer": 10.0}
SEED = 20240611
FULL = {"rounds": 5, "lookup_calls": 30, "ttft_sizes": [2048, 4096], "ttft_repeats": 2,
        "budget_s": 480}
QUICK = {"rounds": 2, "lookup_calls": 10, "ttft_sizes": [1024], "ttft_repeats": 1,
         "budget_s": 240}
TTFT_SHARE_S = {"full": 270, "quick": 170}  # of the budget kept for the vLLM engines


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Workload:
    """One object size: the same bytes and keys for every system."""

    label: str
    nbytes: int
    sources: list[np.ndarray]
    chain: list[tuple[bytes, bytes | None]]  # read every round
    put_chain: list[tuple[bytes, bytes | None]]  # written every round
    dests: list[np.ndarray]

    @property
    def total_bytes(self) -> int:
        return self.nbytes * len(self.sources)

    @property
    def hashes(self) -> list[bytes]:
        return [h for h, _ in self.chain]


def make_workload(label: str, nbytes: int, num: int) -> Workload:
    rng = np.random.default_rng([SEED, nbytes])
    # Writable, separate allocations (torch and LMCache want writable buffers).
    sources = [np.frombuffer(bytearray(rng.bytes(nbytes)), dtype=np.uint8) for _ in range(num)]
    return Workload(label, nbytes, sources, chain(f"peers-get-{label}".encode(), num),
                    chain(f"peers-put-{label}".encode(), num), prefaulted(num, nbytes))


@dataclass
class Figures:
    """Per-round values: throughput[op][system][size] in GB/s, lookup[system] in ms."""

    throughput: dict[str, dict[str, dict[str, list[float]]]] = field(
        default_factory=lambda: {"get": {}, "put": {}})
    lookup: dict[str, list[float]] = field(default_factory=dict)
    bounds: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, op: str, system: str, size: str, value: float) -> None:
        self.throughput[op].setdefault(system, {}).setdefault(size, []).append(value)

    def add_bound(self, name: str, size: str, value: float) -> None:
        self.bounds.setdefault(name, {}).setdefault(size, []).append(value)


# --- setup -----------------------------------------------------------------------------------------
class Harness:
    """Every server and client of the run; close() stops them all, whatever happened."""

    def __init__(self, workloads: list[Workload], disk_dir: str | None) -> None:
        self.workloads = workloads
        self.systems: list[System] = []
        self.servers: list[Any] = []
        self.raw: dict[str, RawPeer] = {}
        self._stack = contextlib.ExitStack()
        self.disk_dir = disk_dir

    def start(self) -> None:
        from bench.peers_servers import start_lmcache_server, start_redis
        from bench.daemon import Daemon

        total = sum(w.total_bytes for w in self.workloads)
        # Two clients, each with a read set and a put set, and room for slab rounding.
        pool = 4 * total + 128 * MiB
        log(f"starting kvstore serve (pool {pool // MiB} MiB), redis-server, lmcache_server")
        self.daemon = Daemon(pool_size=str(pool), segment=f"kvstore-peers-{uuid.uuid4().hex[:12]}")
        self._stack.callback(self.daemon.stop)
        self.daemon.start()
        self.redis = start_redis()
        self._stack.callback(self.redis.stop)
        self.lmserver = start_lmcache_server()
        self._stack.callback(self.lmserver.stop)
        self._add(KVStore(self.daemon.address, use_shm=True))
        self._add(KVStore(self.daemon.address, use_shm=False))
        from bench.peers_lmcache import LMCacheBackends, LMCacheConnector

        backends = LMCacheBackends({w.nbytes: len(w.sources) for w in self.workloads})
        self._stack.callback(backends.close)
        self._add(LMCacheConnector("lm", backends, self.lmserver.port))
        self._add(LMCacheConnector("redis", backends, self.redis.port))
        self._add(LMCacheConnector("resp", backends, self.redis.port))
        self._add(Redis(self.redis.port, pipelined=False))
        self._add(Redis(self.redis.port, pipelined=True))
        self._add(ExampleDisk(self.disk_dir))
        for w in self.workloads:
            # Raw ZeroMQ of the same bytes in the frames kvstore sends (blocks of <= 4 MiB).
            frame = min(w.nbytes, 4 * MiB)
            self.raw[w.label] = peer = RawPeer(w.total_bytes // frame, frame)
            self._stack.callback(peer.close)

    def _add(self, system: System) -> None:
        self.systems.append(system)
        self._stack.callback(system.close)

    def load(self) -> dict[str, dict[str, Any]]:
        """Store the read sets through each system's own put, and keep its source objects."""
        adopted: dict[str, dict[str, Any]] = {}
        for system in self.systems:
            adopted[system.name] = {}
            for w in self.workloads:
                adopted[system.name][w.label] = system.adopt(w.sources)
                system.put("get", w.chain, adopted[system.name][w.label])
            log(f"stored the read sets in {system.name}")
        return adopted

    @property
    def pids(self) -> list[int]:
        procs = [self.daemon.proc.pid if self.daemon.proc else 0, self.redis.pid, self.lmserver.pid]
        return procs + [p.proc.pid or 0 for p in self.raw.values()]

    def close(self) -> None:
        self._stack.close()


# --- one round -------------------------------------------------------------------------------------
def check(got: list[Any], sources: list[np.ndarray], what: str) -> None:
    if len(got) != len(sources):
        raise AssertionError(f"{what}: {len(got)} of {len(sources)} blocks")
    for i, (buf, src) in enumerate(zip(got, sources)):
        if not np.array_equal(np.frombuffer(as_bytes(buf), dtype=np.uint8)[:src.nbytes], src):
            raise AssertionError(f"{what}: block {i} differs from the source bytes")


def measure_system(system: System, w: Workload, adopted: Any, figures: Figures,
                   verify: bool) -> str:
    if verify:
        for d in w.dests:
            d.fill(0)
    t0 = time.perf_counter()
    got = system.get("get", w.hashes, w.dests)
    get_s = time.perf_counter() - t0
    if verify:
        check(got, w.sources, f"{system.name} get {w.label}")
    system.release(got)
    system.clear("put")
    t0 = time.perf_counter()
    system.put("put", w.put_chain, adopted)
    put_s = time.perf_counter() - t0
    if verify:
        got = system.get("put", [h for h, _ in w.put_chain], w.dests)
        check(got, w.sources, f"{system.name} put {w.label}")
        system.release(got)
    else:
        figures.add("get", system.name, w.label, w.total_bytes / get_s / 1e9)
        figures.add("put", system.name, w.label, w.total_bytes / put_s / 1e9)
    return f"get {w.total_bytes / get_s / 1e9:6.2f}  put {w.total_bytes / put_s / 1e9:6.2f} GB/s"


def measure_bounds(h: Harness, w: Workload, figures: Figures, verify: bool) -> str:
    sources, dests = w.sources, w.dests
    t0 = time.perf_counter()
    for src, dst in zip(sources, dests):
        np.copyto(dst, src)
    memcpy = w.total_bytes / (time.perf_counter() - t0) / 1e9
    frame = min(w.nbytes, 4 * MiB)
    views = [d.data[i:i + frame] for d in dests for i in range(0, w.nbytes, frame)]
    t0 = time.perf_counter()
    h.raw[w.label].get_into(views)
    zmq = w.total_bytes / (time.perf_counter() - t0) / 1e9
    if not verify:
        figures.add_bound("memcpy_gbps", w.label, memcpy)
        figures.add_bound("zmq_gbps", w.label, zmq)
    return f"memcpy {memcpy:6.2f}  raw zmq {zmq:6.2f} GB/s"


def measure_lookups(h: Harness, figures: Figures, calls: int, verify: bool) -> None:
    w = next(x for x in h.workloads if x.label == LOOKUP_SIZE)
    rtts = [_rtt(h.raw[w.label]) for _ in range(calls)]
    if not verify:
        figures.add_bound("rtt_ms", "-", statistics.median(rtts))
    for system in h.systems:
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            n = system.lookup("get", w.hashes)
            times.append((time.perf_counter() - t0) * 1e3)
            if n != len(w.hashes):
                raise AssertionError(f"{system.name} lookup: {n} of {len(w.hashes)} hits")
        if not verify:
            figures.lookup.setdefault(system.name, []).append(statistics.median(times))


def _rtt(peer: RawPeer) -> float:
    return peer.rtt() * 1e3


def run_rounds(h: Harness, adopted: dict[str, dict[str, Any]], rounds: int, lookup_calls: int,
               deadline: float) -> tuple[Figures, int]:
    figures = Figures()
    done = 0
    for r in range(rounds + 1):
        verify = r == 0
        if r > 1 and time.monotonic() > deadline:
            log(f"time budget for throughput spent after {done} rounds")
            break
        tag = "warm-up+verify" if verify else f"round {r}/{rounds}"
        # Rotate the order each round so that no system always runs first (or last).
        order = h.systems[r % len(h.systems):] + h.systems[:r % len(h.systems)]
        for w in h.workloads:
            log(f"{tag} {w.label:>5} {'limits':<16} {measure_bounds(h, w, figures, verify)}")
            for system in order:
                text = measure_system(system, w, adopted[system.name][w.label], figures, verify)
                log(f"{tag} {w.label:>5} {system.name:<16} {text}")
        measure_lookups(h, figures, lookup_calls, verify)
        done += 0 if verify else 1
    return figures, done


# --- results ---------------------------------------------------------------------------------------
def med(values: list[float]) -> float:
    return float(statistics.median(values))


def summarize(h: Harness, figures: Figures, rounds: int) -> dict[str, Any]:
    transports = {s.name: s.transport for s in h.systems}
    gbps = {op: {name: {size: med(v) for size, v in per.items()} for name, per in systems.items()}
            for op, systems in figures.throughput.items()}
    ratios: dict[str, Any] = {}
    goals_met: dict[str, Any] = {}
    for op in ("get", "put"):
        for ours, peers_of, goal_name in (
                ("kvstore_tcp", lambda t: t == "tcp", "kvstore_tcp_vs_best_tcp_peer"),
                ("kvstore_shm", lambda t: t in ("tcp", "disk"), "kvstore_shm_vs_best_peer")):
            for size in SIZES:
                peers = {n: v[size] for n, v in gbps[op].items()
                         if not n.startswith("kvstore") and peers_of(transports[n])}
                best = max(peers, key=lambda n: peers[n])
                ratio = gbps[op][ours][size] / peers[best]
                ratios.setdefault(op, {}).setdefault(goal_name, {})[size] = {
                    "ratio": ratio, "best_peer": best, "best_peer_gbps": peers[best]}
                goals_met.setdefault(op, {}).setdefault(goal_name, {})[size] = \
                    ratio >= GOALS[goal_name]
    lookup = {name: med(v) for name, v in figures.lookup.items()}
    peer_lookups = {n: v for n, v in lookup.items() if not n.startswith("kvstore")}
    best_lookup = min(peer_lookups, key=lambda n: peer_lookups[n])
    ratios["lookup"] = {"best_peer_ms_over_kvstore_ms": peer_lookups[best_lookup]
                        / lookup["kvstore_shm"], "best_peer": best_lookup}
    bounds = {name: {size: med(v) for size, v in per.items()} for name, per in figures.bounds.items()}
    ratios["vs_limits"] = {
        "kvstore_shm_get_vs_memcpy": {s: gbps["get"]["kvstore_shm"][s] / bounds["memcpy_gbps"][s]
                                      for s in SIZES},
        "kvstore_tcp_get_vs_zmq": {s: gbps["get"]["kvstore_tcp"][s] / bounds["zmq_gbps"][s]
                                   for s in SIZES},
        "kvstore_lookup_vs_rtt": lookup["kvstore_shm"] / bounds["rtt_ms"]["-"],
    }
    return {
        "get_gbps": gbps["get"], "put_gbps": gbps["put"], "lookup_ms": lookup,
        "limits": {"memcpy_gbps": bounds["memcpy_gbps"], "zmq_gbps": bounds["zmq_gbps"],
                   "rtt_ms": bounds["rtt_ms"]["-"]},
        "ratios": ratios, "goals": GOALS, "goals_met": goals_met,
        "systems": {s.name: {"transport": s.transport, "how": s.how} for s in h.systems},
        "rounds": {"get_gbps": figures.throughput["get"], "put_gbps": figures.throughput["put"],
                   "lookup_ms": figures.lookup, "limits": figures.bounds, "count": rounds},
    }


def notes(result: dict[str, Any], disk_fs: str | None) -> dict[str, str]:
    met = result["goals_met"]["get"]
    vs = result["ratios"]["vs_limits"]
    tcp_best = ", ".join(
        f"{r['best_peer']} {r['best_peer_gbps']:.2f} GB/s at {size.replace('MiB', ' MiB')} "
        f"(raw ZeroMQ {result['limits']['zmq_gbps'][size]:.2f})"
        for size, r in result["ratios"]["get"]["kvstore_tcp_vs_best_tcp_peer"].items())

    def where(goal_name: str) -> str:
        sizes = [s.replace("MiB", " MiB") for s, ok in met[goal_name].items() if ok]
        return f"met at {' and '.join(sizes)}" if sizes else "not met at any size"

    return {
        "goals": (f"for gets, the TCP goal (3x the best TCP peer) is "
                  f"{where('kvstore_tcp_vs_best_tcp_peer')}, the shared-memory goal (10x the best "
                  f"peer) {where('kvstore_shm_vs_best_peer')}."),
        "tcp_bound": (
            f"kvstore_tcp gets reach {_fmt(vs['kvstore_tcp_get_vs_zmq'])} of raw ZeroMQ moving the "
            "same frames, measured in the same rounds; a ZeroMQ client cannot beat ZeroMQ's own "
            "loopback rate, so the TCP goal is out of reach wherever a peer's plain-socket path is "
            "within 3x of that rate (DESIGN.md, Measuring: over loopback TCP no store beats the "
            f"best peer by much). Best TCP peers for gets: {tcp_best}."),
        "shm_bound": ("Through shared memory the ceiling is one memcpy into the destination "
                      "(limits.memcpy_gbps, over distinct buffers so the CPU cache does not help)."),
        "redis_get": ("redis and redis_pipelined gets end at the bytes objects redis-py returns, "
                      "with no copy into the destination buffers: one memcpy per block in redis's "
                      "favour."),
        "lmcache": ("LMCache clients are its own RemoteConnector classes on a CPU-only torch; gets "
                    "land in MemoryObjs from its LocalCPUBackend (not pinned without an "
                    "accelerator). lm:// PUT has no reply, so its put time ends at the reply to an "
                    "EXIST sent after the last PUT. RedisConnector.close() and RESPConnector.close()"
                    " hang in LMCache 0.5.6 (a blocking shutdown on their own event loop); the "
                    "harness closes their clients directly."),
        "disk": (f"example_disk files are in a temporary directory on {disk_fs or 'an unknown'} "
                 "file system; safetensors does not fsync and the reads hit the page cache (the "
                 "files were just written), so a cold disk would be slower."),
        "lookup": ("Existence check of the 64-key prefix: kvstore LOOKUP (one message, no lease), "
                   "redis EXISTS per key (redis) or pipelined (redis_pipelined), LMCache's "
                   "batched_contains / batched_async_contains / exists per key, os.path.exists per "
                   "file for example_disk."),
    }


def _fmt(values: dict[str, float]) -> str:
    return " / ".join(f"{v:.2f}x" for v in values.values()) + " (2 / 32 MiB)"


def fs_type(path: str) -> str | None:
    """The file system type of the mount holding path (from /proc/mounts)."""
    best, kind = "", None
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    except OSError:
        return None
    return kind


# --- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, TTFT at 1k tokens only")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--skip-ttft", action="store_true", help="no vLLM engines")
    parser.add_argument("--disk-dir", default=None, help="where example_disk writes (default $TMPDIR)")
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/bench-model"))
    parser.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    args = parser.parse_args(argv)
    # SIGTERM (a bounded runner giving up) unwinds through the finally blocks that stop servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    mode = QUICK if args.quick else FULL
    rounds = args.rounds or int(mode["rounds"])  # type: ignore[call-overload]
    command = " ".join(["python", "-m", "bench.peers", *(argv if argv is not None else sys.argv[1:])])
    start = time.monotonic()
    ttft_share = 0 if args.skip_ttft else TTFT_SHARE_S["quick" if args.quick else "full"]
    deadline = start + float(mode["budget_s"]) - ttft_share  # type: ignore[arg-type]

    log("generating the workload (random bytes, distinct prefaulted destinations)")
    workloads = [make_workload(label, nbytes, num) for label, (nbytes, num) in SIZES.items()]
    harness = Harness(workloads, args.disk_dir)
    try:
        harness.start()
        adopted = harness.load()
        machine_before = describe(["redis", "hiredis", "lmcache", "safetensors", "torch", "vllm"])
        figures, done = run_rounds(harness, adopted, rounds, int(mode["lookup_calls"]), deadline)  # type: ignore[call-overload]
        result = summarize(harness, figures, done)
    finally:
        harness.close()
    disk_root = args.disk_dir or tempfile.gettempdir()
    result["notes"] = notes(result, fs_type(os.path.realpath(disk_root)))
    if not args.skip_ttft:
        from bench.peers_ttft import measure as measure_ttft

        ttft_deadline = start + float(mode["budget_s"]) - 60  # type: ignore[arg-type]
        ttft = measure_ttft(list(mode["ttft_sizes"]), int(mode["ttft_repeats"]),  # type: ignore[call-overload]
                            args.model_dir, log, ttft_deadline)
        result["ttft_s"] = ttft.pop("seconds")
        result["ttft_s"]["lmcache"] = None
        result["ttft"] = ttft
    result.update({"machine": machine_before, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                   "command": command, "wall_s": round(time.monotonic() - start, 1),
                   "workload": {k: {"object_bytes": n, "objects": c} for k, (n, c) in SIZES.items()}})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    png = args.out.parent / "peers_get.png"
    plot(result, png)
    print("\n" + "\n".join(table(result)) + "\n\n" + "\n".join(ratio_lines(result)))
    print("\n" + "\n".join(ttft_lines(result.get("ttft_s"), result.get("ttft"))))
    print(f"\nmachine: {summary(result['machine'])}\nwrote {args.out} and {png} "
          f"in {result['wall_s']:.0f} s")
    return 0


__all__ = ["main", "render"]

if __name__ == "__main__":
    sys.exit(main())

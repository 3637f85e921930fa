"""Benchmark of the kvstore daemon against the limits it must be measured by, all in one run.

    python -m bench.store [--quick] [--rounds N] [--only STEP,...] [--busy-poll-us N] [--out PATH]

Workload: a 4096-token prefix of Llama-3-8B at block size 16, i.e. 256 blocks of 2 MiB
(32 layers x K,V x 8 KV heads x 128 head dim x bf16 x 16 tokens), 512 MiB of random bytes, keyed by
chained hashes (sha256 of parent + index) in one namespace.

Limits (DESIGN.md, Measuring), measured in the same run, interleaved round by round with the
kvstore measurements so that a busy moment on the machine hits both sides of a ratio:
  memcpy  np.copyto from 256 distinct 2 MiB sources into 256 distinct prefaulted destinations
          (one buffer would stay in the CPU cache and read ~3x too fast)
  zmq     a ROUTER in its own process sends the 256 frames of 2 MiB (copy=False) to a DEALER that
          receives them with recv_into prefaulted buffers, timed from request to last frame
  socket  a plain TCP socket from a peer process (sendmsg of the same 256 blocks) received with
          socket.recv_into straight into the prefaulted destinations: the loopback bound of any
          remote get (no message layer, no copy after the kernel's)
  rtt     a tiny DEALER->ROUTER->DEALER echo, median of many
  rtt_busy  the same echo, its ROUTER polling without sleeping for the daemon's --busy-poll-us
          after each message, as the daemon does (information: the like-for-like bound)

kvstore, against a real `kvstore serve` subprocess (own port and segment, pool 1.25x the working
set of one stored prefix plus one put batch):
  shm get   Client.get_into through the shared segment, into the same prefaulted destinations
  tcp get   Client(use_shm=False).get_into: the payload received into the destinations (a side
            stream for 8 MiB and more without CURVE, kvstore/bulk.py; ZeroMQ frames otherwise)
  shm put   Client.put of 256 new blocks (fresh hashes; the put namespace invalidated first)
  tcp put   the same over TCP (information only)
  lookup    Client.lookup of the 256 hashes with a lease, then release (timed separately)
  lookup_slots  the same with_slots=True: also where each hit lies in the segment (information:
            the LOOKUP of a same-host load, as the vLLM connector sends it)
  ping      Client.ping (information: the client/daemon floor under every small call)

The daemon runs with its default --busy-poll-us unless --busy-poll-us is given (0: off); its CPU
time per LOOKUP + RELEASE and per PING (/proc, over all rounds) is reported, as that costs CPU.

Writes bench/results/store.json (ratios at top level, goals, figures, parameters, machine) and
prints a table. Each round's value of a throughput is one 512 MiB transfer; of a latency, the
median of many calls, made after WARM_CALLS untimed ones of the same kind. Figures are the median
(min, max) over rounds; GB/s is 10^9 bytes/s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bench.machine import CLOCK_TICKS, describe, proc_jiffies, summary
from kvstore.client import Client
from kvstore.config import DEFAULT_BUSY_POLL_US
from kvstore.keys import Namespace
from kvstore.protocol import CHUNK_BYTES
from kvstore.server import busy_poll
from bench.daemon import Daemon  # the integration tests' launcher of the real daemon process

MiB = 1024 * 1024
BLOCK_TOKENS = 16
PREFIX_TOKENS = 4096
# Llama-3-8B: 32 layers, K and V, 8 KV heads, head dim 128, bf16, 16 tokens per block = 2 MiB.
BLOCK_BYTES = 32 * 2 * 8 * 128 * 2 * BLOCK_TOKENS
NUM_BLOCKS = PREFIX_TOKENS // BLOCK_TOKENS
POOL_FACTOR = 1.25  # pool size over the working set (one stored prefix + one put batch)
LEASE_MS = 10_000
# Untimed calls at the start of every latency step. Each step follows an idle wait (settle()),
# and after one the first few hundred round trips run slow on a VM (a batch of 300 lookups right
# after 0.2 s idle: median 0.17 ms; after 1,000 pings: 0.14 ms): without these the 200-call
# lookup series paid that more than the 1,000-call round trip it is divided by.
WARM_CALLS = 200
SEED = 20240611

GOALS: dict[str, tuple[str, float, str]] = {
    # ratio: (comparison, goal, what it means)
    "shm_get_vs_memcpy": (">=", 0.8, "shared-memory GET throughput / numpy memcpy throughput"),
    "tcp_get_vs_zmq": (">=", 0.9, "TCP GET throughput / raw ZeroMQ throughput of the same frames"),
    "tcp_get_vs_socket": (">=", 0.8, "TCP GET throughput / a plain TCP socket received into the "
                          "destinations (issue 12)"),
    "shm_put_vs_memcpy": (">=", 0.7, "shared-memory PUT throughput / numpy memcpy throughput"),
    "lookup_vs_rtt": ("<=", 1.5, "LOOKUP of 256 hashes with a lease / bare ZeroMQ round trip"),
}
# Ratios reported without a goal.
INFORMATION: dict[str, str] = {
    "lookup_slots_vs_rtt": "LOOKUP of 256 hashes with a lease and slot references / bare round trip",
    "lookup_vs_rtt_busy": "LOOKUP of 256 hashes with a lease / bare round trip whose echo "
                          "busy-polls as the daemon does",
    "ping_vs_rtt_busy": "kvstore PING / bare round trip whose echo busy-polls as the daemon does",
}
# The series each ratio divides (numerator, denominator).
RATIO_OF: dict[str, tuple[str, str]] = {
    "shm_get_vs_memcpy": ("shm_get", "memcpy"), "tcp_get_vs_zmq": ("tcp_get", "zmq"),
    "tcp_get_vs_socket": ("tcp_get", "socket"),
    "shm_put_vs_memcpy": ("shm_put", "memcpy"), "lookup_vs_rtt": ("lookup", "rtt"),
    "lookup_slots_vs_rtt": ("lookup_slots", "rtt"), "lookup_vs_rtt_busy": ("lookup", "rtt_busy"),
    "ping_vs_rtt_busy": ("ping", "rtt_busy"),
}


@dataclass(frozen=True)
class Params:
    rounds: int
    rtt_samples: int  # per round
    lookup_samples: int  # per round
    quick: bool
    only: tuple[str, ...] = ()  # the steps to run (all when empty)
    busy_poll_us: int | None = None  # the daemon's --busy-poll-us (None: its default)
    num_blocks: int = NUM_BLOCKS
    block_bytes: int = BLOCK_BYTES

    @property
    def prefix_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def pool_bytes(self) -> int:
        working_set = 2 * self.prefix_bytes  # the stored prefix + one put batch
        return int(working_set * POOL_FACTOR) // 4096 * 4096


FULL = dict(rounds=15, rtt_samples=1000, lookup_samples=200)
QUICK = dict(rounds=4, rtt_samples=300, lookup_samples=60)


# --- progress and statistics -------------------------------------------------------------------
_T0 = time.perf_counter()


def progress(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


@dataclass
class Series:
    """One measurement's per-round values."""

    name: str
    unit: str  # "GB/s" or "ms"
    label: str
    bound: str  # what it is, or which limit it is measured against
    values: list[float] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)  # latency: every call, all rounds

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "unit": self.unit, "what": self.label, "bound": self.bound,
            "median": self.median, "min": min(self.values), "max": max(self.values),
            "rounds": self.values,
        }
        if self.samples:
            s = sorted(self.samples)
            out["all_calls"] = {"count": len(s), "median": statistics.median(s),
                                "p10": s[len(s) // 10], "p90": s[len(s) * 9 // 10],
                                "min": s[0], "max": s[-1]}
        return out


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


# --- data --------------------------------------------------------------------------------------
def random_blocks(num: int, nbytes: int, seed: int) -> list[np.ndarray]:
    """num distinct buffers of random bytes (separate allocations, read-only)."""
    rng = np.random.default_rng(seed)
    return [np.frombuffer(rng.bytes(nbytes), dtype=np.uint8) for _ in range(num)]


def prefaulted(num: int, nbytes: int) -> list[np.ndarray]:
    """num distinct writable buffers, every page touched."""
    bufs = [np.empty(nbytes, dtype=np.uint8) for _ in range(num)]
    for b in bufs:
        b.fill(0)
    return bufs


def chain(salt: bytes, num: int) -> list[tuple[bytes, bytes | None]]:
    """(hash, parent) pairs of a chained prefix: hash_i = sha256(parent + i), root parent = salt."""
    out: list[tuple[bytes, bytes | None]] = []
    parent: bytes | None = None
    for i in range(num):
        h = hashlib.sha256((parent or salt) + i.to_bytes(4, "little")).digest()
        out.append((h, parent))
        parent = h
    return out


def check_equal(dests: list[np.ndarray], sources: list[np.ndarray], what: str) -> None:
    bad = [i for i, (d, s) in enumerate(zip(dests, sources)) if not np.array_equal(d, s)]
    if bad:
        raise AssertionError(f"{what}: {len(bad)} blocks differ from the source (first {bad[0]})")


def zero(bufs: list[np.ndarray]) -> None:
    for b in bufs:
        b.fill(0)


# --- the raw ZeroMQ peer (own process, like the daemon) ----------------------------------------
def _zmq_peer(conn: Any, num: int, nbytes: int, seed: int) -> None:
    """ROUTER: b"get" -> header + num frames of nbytes (copy=False); b"busy N" (echoed) polls
    for the next message without sleeping for N us after each, as the daemon's loop does
    (kvstore/server.py busy_poll; 0: off); anything else is answered with its first two bytes
    (a round trip of a request of any size and a tiny reply)."""
    frames = [b.data for b in random_blocks(num, nbytes, seed)]  # memoryviews, sent zero-copy
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    conn.send(port)
    conn.close()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    busy_s = 0.0
    try:
        while True:
            if busy_s:
                busy_poll(poller, busy_s)  # then the blocking receive below, as the daemon does
            ident, msg = sock.recv_multipart()
            if msg.startswith(b"busy "):
                busy_s = int(msg[5:]) / 1e6
                sock.send_multipart([ident, msg])
            elif msg == b"get":
                sock.send_multipart([ident, b"hdr", *frames], copy=False)
            elif msg == b"stop":
                sock.send_multipart([ident, b"bye"])
                break
            else:
                sock.send_multipart([ident, msg[:2]])
    finally:
        sock.close(0)
        ctx.term()


# --- the plain-socket peer (own process): the loopback bound of a remote get -------------------
def _socket_peer(conn: Any, host: str, num: int, nbytes: int, seed: int) -> None:
    """A plain TCP listener on host (kernel-tuned buffers): each 1-byte request b"g" is answered
    with num blocks, no framing (the receiver knows the sizes); anything else ends it."""
    import socket

    blocks = [b.data for b in random_blocks(num, nbytes, seed)]
    lsock = socket.create_server((host, 0))
    conn.send(lsock.getsockname()[1])
    conn.close()
    sock, _ = lsock.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while sock.recv(1) == b"g":
            for block in blocks:
                sock.sendall(block)
    finally:
        sock.close()
        lsock.close()


def _start_peer(target: Any, what: str, *args: Any) -> tuple[Any, int]:
    """A peer process (spawned: it shares nothing with this one) and the port it listens on."""
    mp = multiprocessing.get_context("spawn")
    parent, child = mp.Pipe()
    proc = mp.Process(target=target, daemon=True, args=(child, *args))
    proc.start()
    if not parent.poll(120):
        raise RuntimeError(f"{what} did not start")
    return proc, parent.recv()


def _stop_peer(proc: Any) -> None:
    proc.join(10)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)


class SocketPeer:
    """num blocks of nbytes sent by a plain TCP socket on host, received with recv_into straight
    into the destinations: the bound bench.store and bench.cluster hold remote reads to."""

    def __init__(self, num: int, nbytes: int, host: str = "127.0.0.1") -> None:
        import socket

        self.proc, port = _start_peer(_socket_peer, "plain-socket peer", host, num, nbytes, SEED)
        self.sock = socket.create_connection((host, port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_into(self, dests: list[memoryview]) -> None:
        self.sock.sendall(b"g")
        for d in dests:
            offset, n = 0, len(d)
            while offset < n:
                got = self.sock.recv_into(d[offset:], n - offset)
                if not got:
                    raise AssertionError("plain-socket peer closed mid-block")
                offset += got

    def close(self) -> None:
        try:
            self.sock.sendall(b"q")
        except OSError:
            pass
        self.sock.close()
        _stop_peer(self.proc)


class RawPeer:
    """A DEALER talking to a _zmq_peer process that holds num_blocks blocks of block_bytes."""

    def __init__(self, num_blocks: int = 0, block_bytes: int = 0) -> None:
        self.proc, self.port = _start_peer(_zmq_peer, "raw ZeroMQ peer", num_blocks, block_bytes,
                                           SEED)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 60_000)
        self.sock.connect(f"tcp://127.0.0.1:{self.port}")

    def get_into(self, dests: list[memoryview]) -> None:
        sock = self.sock
        sock.send(b"get")
        sock.recv()
        for d in dests:
            got = sock.recv_into(d)
            if got != len(d):
                raise AssertionError(f"raw frame of {got} bytes, expected {len(d)}")
        if sock.getsockopt(zmq.RCVMORE):
            raise AssertionError("raw reply has more frames than expected")

    def rtt(self) -> float:
        t0 = time.perf_counter()
        self.call(b"p")
        return time.perf_counter() - t0

    def call(self, request: bytes) -> None:
        """One round trip of request and a reply of at most two bytes."""
        self.sock.send(request)
        self.sock.recv()

    def busy_poll(self, micros: int) -> None:
        """From now on the peer polls without sleeping for micros after each message."""
        self.sock.send(b"busy %d" % micros)
        self.sock.recv()

    def close(self) -> None:
        try:
            self.sock.send(b"stop")
            self.sock.recv()
        except zmq.ZMQError:
            pass
        self.sock.close(0)
        self.ctx.term()
        _stop_peer(self.proc)


# --- busy-ness of the machine ------------------------------------------------------------------
_HZ = CLOCK_TICKS


def _system_jiffies() -> tuple[int, int]:
    """(busy, steal) jiffies of all CPUs."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return user + nice + system + irq + softirq, steal


class BusyMeter:
    """CPU used by processes other than the benchmark's own, over the measured rounds."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start()

    def start(self) -> None:
        self._t = time.monotonic()
        self._sys = _system_jiffies()
        self._ours = sum(proc_jiffies(p) for p in self.pids)

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t
        busy, steal = _system_jiffies()
        ours = sum(proc_jiffies(p) for p in self.pids) - self._ours
        total = busy - self._sys[0]
        return {
            "wall_s": round(wall, 2),
            "cores_used_by_benchmark": round(ours / _HZ / wall, 3),
            "cores_used_by_others": round(max(0, total - ours) / _HZ / wall, 3),
            "cores_stolen_by_hypervisor": round((steal - self._sys[1]) / _HZ / wall, 3),
        }


# --- the benchmark -----------------------------------------------------------------------------
class Bench:
    def __init__(self, params: Params) -> None:
        self.p = params
        self.series: dict[str, Series] = {}
        self._put_round = 0

    def add(self, name: str, unit: str, label: str, bound: str) -> Series:
        self.series[name] = s = Series(name, unit, label, bound)
        return s

    def setup(self) -> None:
        p = self.p
        progress(f"generating {p.num_blocks} random blocks of {p.block_bytes // MiB} MiB "
                 f"({p.prefix_bytes // MiB} MiB) and {p.num_blocks} prefaulted destinations")
        self.sources = random_blocks(p.num_blocks, p.block_bytes, SEED)
        self.dests = prefaulted(p.num_blocks, p.block_bytes)
        self.dest_views = [d.data for d in self.dests]

        progress("starting the raw ZeroMQ ROUTER peer process (it builds the same 512 MiB)")
        self.peer = RawPeer(p.num_blocks, p.block_bytes)
        progress("starting the plain-socket peer process (the same 512 MiB again)")
        self.socket_peer = SocketPeer(p.num_blocks, p.block_bytes)

        self.segment = f"kvstore-bench-{uuid.uuid4().hex[:12]}"
        progress(f"starting `kvstore serve` (pool {p.pool_bytes / MiB:.0f} MiB = "
                 f"{POOL_FACTOR}x working set, segment {self.segment})")
        self.busy_poll_us = DEFAULT_BUSY_POLL_US if p.busy_poll_us is None else p.busy_poll_us
        # The daemon's CPU time (jiffies) and calls, per kind of call, over the measured rounds.
        self.daemon_cpu: dict[str, list[int]] = {}
        extra = [] if p.busy_poll_us is None else ["--busy-poll-us", str(p.busy_poll_us)]
        self.daemon = Daemon(pool_size=str(p.pool_bytes), segment=self.segment, extra_args=extra)
        self.daemon.start().wait_prefaulted()
        self.kctx = zmq.Context()
        self.shm = Client(self.daemon.address, timeout_s=60.0, ctx=self.kctx)
        self.tcp = Client(self.daemon.address, timeout_s=60.0, ctx=self.kctx, use_shm=False)
        self.shm.connect()
        self.tcp.connect()
        if not self.shm.is_local:
            raise RuntimeError("the same-host client could not attach the daemon's segment")

        self.ns = Namespace(b"bench-store-get", 0)
        self.put_ns = Namespace(b"bench-store-put", 0)
        self.keys = chain(b"bench-store-get", p.num_blocks)
        self.hashes = [h for h, _ in self.keys]
        progress(f"storing the {p.num_blocks}-block prefix through shared memory")
        result = self.shm.put(self.ns, [(h, par, s) for (h, par), s in zip(self.keys, self.sources)])
        if result.num_stored != p.num_blocks:
            raise RuntimeError(f"storing the prefix: {result}")

        self.busy = BusyMeter([os.getpid(), self.peer.proc.pid or 0, self.socket_peer.proc.pid or 0,
                               self.daemon.proc.pid if self.daemon.proc else 0])
        nb = p.prefix_bytes
        self.steps: list[tuple[Series, Callable[[Series, bool], str]]] = [
            (self.add("memcpy", "GB/s", "numpy memcpy, 256 distinct 2 MiB buffers",
                      "limit for shm get/put"), self.step_memcpy),
            (self.add("shm_get", "GB/s", f"kvstore get_into, shm, {nb // MiB} MiB",
                      "vs memcpy"), self.step_shm_get),
            (self.add("shm_put", "GB/s", f"kvstore put, shm, {p.num_blocks} new blocks",
                      "vs memcpy"), self.step_shm_put),
            (self.add("zmq", "GB/s", "raw ZeroMQ TCP loopback, 256 frames of 2 MiB",
                      "limit for tcp get"), self.step_zmq),
            (self.add("socket", "GB/s", "plain TCP socket, recv_into the destinations",
                      "limit for tcp get"), self.step_socket),
            (self.add("tcp_get", "GB/s", f"kvstore get_into, tcp, {nb // MiB} MiB",
                      "vs zmq, vs socket"), self.step_tcp_get),
            (self.add("rtt", "ms", "bare ZeroMQ round trip, tiny message",
                      "limit for lookup"), self.step_rtt),
            (self.add("rtt_busy", "ms", "bare round trip, its echo busy-polling",
                      "information"), self.step_rtt_busy),
            (self.add("lookup", "ms", f"kvstore lookup {p.num_blocks} hashes + lease",
                      "vs rtt"), self.step_lookup),
            (self.add("lookup_slots", "ms", f"kvstore lookup {p.num_blocks} hashes + lease + "
                      "slots", "vs rtt (information)"), self.step_lookup_slots),
            (self.add("ping", "ms", "kvstore ping", "information"), self.step_ping),
            (self.add("tcp_put", "GB/s", f"kvstore put, tcp, {p.num_blocks} new blocks",
                      "information"), self.step_tcp_put),
        ]
        self.lookup_release = self.add("lookup_release", "ms", "kvstore lookup + release",
                                       "information")
        if p.only:
            unknown = set(p.only) - {s.name for s, _ in self.steps}
            if unknown:
                raise ValueError(f"--only: no step {', '.join(sorted(unknown))}")
            self.steps = [(s, step) for s, step in self.steps if s.name in p.only]
            if "lookup" not in p.only:
                del self.series["lookup_release"]
            for name in [k for k in self.series if k not in p.only and k != "lookup_release"]:
                del self.series[name]

    def close(self) -> None:
        for name in ("shm", "tcp"):
            client = getattr(self, name, None)
            if client is not None:
                client.close()
        if getattr(self, "kctx", None) is not None:
            self.kctx.term()
        if getattr(self, "daemon", None) is not None:
            self.daemon.stop()
        if getattr(self, "peer", None) is not None:
            self.peer.close()
        if getattr(self, "socket_peer", None) is not None:
            self.socket_peer.close()

    # --- steps: each measures once; warm=True is the untimed warm-up round that verifies bytes
    def step_memcpy(self, s: Series, warm: bool) -> str:
        t0 = time.perf_counter()
        for src, dst in zip(self.sources, self.dests):
            np.copyto(dst, src)
        dt = time.perf_counter() - t0
        if warm:
            check_equal(self.dests, self.sources, "memcpy")
        return self._record(s, gbps(self.p.prefix_bytes, dt), warm, f"{dt * 1e3:.1f} ms")

    def step_zmq(self, s: Series, warm: bool) -> str:
        if warm:
            zero(self.dests)
        t0 = time.perf_counter()
        self.peer.get_into(self.dest_views)
        dt = time.perf_counter() - t0
        if warm:
            check_equal(self.dests, self.sources, "raw zmq")
        return self._record(s, gbps(self.p.prefix_bytes, dt), warm, f"{dt * 1e3:.1f} ms")

    def step_socket(self, s: Series, warm: bool) -> str:
        if warm:
            zero(self.dests)
        t0 = time.perf_counter()
        self.socket_peer.get_into(self.dest_views)
        dt = time.perf_counter() - t0
        if warm:
            check_equal(self.dests, self.sources, "plain socket")
        return self._record(s, gbps(self.p.prefix_bytes, dt), warm, f"{dt * 1e3:.1f} ms")

    def step_rtt(self, s: Series, warm: bool) -> str:
        for _ in range(WARM_CALLS):
            self.peer.rtt()
        samples = [self.peer.rtt() * 1e3 for _ in range(self.p.rtt_samples)]
        return self._record_latency(s, samples, warm)

    def step_rtt_busy(self, s: Series, warm: bool) -> str:
        self.peer.busy_poll(self.busy_poll_us)
        try:
            return self.step_rtt(s, warm)
        finally:
            self.peer.busy_poll(0)  # the throughput steps' peer as it was

    def step_shm_get(self, s: Series, warm: bool) -> str:
        if warm:
            zero(self.dests)
        t0 = time.perf_counter()
        n = self.shm.get_into(self.ns, self.hashes, self.dests)
        dt = time.perf_counter() - t0
        self._expect(n, "shm get")
        if warm:
            check_equal(self.dests, self.sources, "shm get")
        return self._record(s, gbps(self.p.prefix_bytes, dt), warm, f"{dt * 1e3:.1f} ms")

    def step_tcp_get(self, s: Series, warm: bool) -> str:
        if warm:
            zero(self.dests)
        t0 = time.perf_counter()
        n = self.tcp.get_into(self.ns, self.hashes, self.dests)
        dt = time.perf_counter() - t0
        self._expect(n, "tcp get")
        if warm:
            check_equal(self.dests, self.sources, "tcp get")
        return self._record(s, gbps(self.p.prefix_bytes, dt), warm, f"{dt * 1e3:.1f} ms")

    def step_lookup(self, s: Series, warm: bool) -> str:
        return self._lookup(s, warm, with_slots=False)

    def step_lookup_slots(self, s: Series, warm: bool) -> str:
        return self._lookup(s, warm, with_slots=True)

    def _daemon_jiffies(self) -> int:
        return proc_jiffies(self.daemon.proc.pid) if self.daemon.proc else 0

    def _count_cpu(self, what: str, jiffies_before: int, calls: int, warm: bool) -> None:
        if not warm:
            spent = self.daemon_cpu.setdefault(what, [0, 0])
            spent[0] += self._daemon_jiffies() - jiffies_before
            spent[1] += calls

    def daemon_cpu_us(self) -> dict[str, float]:
        """The daemon's CPU microseconds per call (busy polling included), by kind of call."""
        return {what: round(jiffies / _HZ / calls * 1e6, 1)
                for what, (jiffies, calls) in self.daemon_cpu.items() if calls}

    def _lookup(self, s: Series, warm: bool, with_slots: bool) -> str:
        for _ in range(WARM_CALLS):
            self.shm.release(self.shm.lookup(self.ns, self.hashes, lease_ms=LEASE_MS,
                                             with_slots=with_slots).lease)
        lookups, totals = [], []
        jiffies = self._daemon_jiffies()
        for _ in range(self.p.lookup_samples):
            t0 = time.perf_counter()
            result = self.shm.lookup(self.ns, self.hashes, lease_ms=LEASE_MS,
                                     with_slots=with_slots)
            t1 = time.perf_counter()
            if result.num_hits != self.p.num_blocks or result.lease is None:
                raise AssertionError(f"lookup: {result}")
            if with_slots and (result.slots is None or len(result.slots) != self.p.num_blocks):
                raise AssertionError(f"lookup with slots: {result}")
            if not self.shm.release(result.lease):
                raise AssertionError("release of a fresh lease failed")
            t2 = time.perf_counter()
            lookups.append((t1 - t0) * 1e3)
            totals.append((t2 - t0) * 1e3)
        self._count_cpu("lookup_slots_release" if with_slots else "lookup_release", jiffies,
                        len(lookups), warm)
        if not with_slots:
            self._record_latency(self.lookup_release, totals, warm)
        return self._record_latency(s, lookups, warm) + \
            f", with release {statistics.median(totals):.3f} ms"

    def step_ping(self, s: Series, warm: bool) -> str:
        for _ in range(WARM_CALLS):
            self.shm.ping()
        jiffies = self._daemon_jiffies()
        samples = [self.shm.ping() * 1e3 for _ in range(self.p.rtt_samples)]
        self._count_cpu("ping", jiffies, len(samples), warm)
        return self._record_latency(s, samples, warm)

    def _fresh_put(self, client: Client) -> list[tuple[bytes, bytes | None, Any]]:
        """Untimed: empty the put namespace and make a new chain of hashes, so every put stores."""
        client.invalidate(self.put_ns.name)
        self._put_round += 1
        keys = chain(f"bench-store-put-{self._put_round}".encode(), self.p.num_blocks)
        return [(h, par, src) for (h, par), src in zip(keys, self.sources)]

    def _put(self, s: Series, warm: bool, client: Client, what: str) -> str:
        blocks = self._fresh_put(client)
        t0 = time.perf_counter()
        result = client.put(self.put_ns, blocks)
        dt = time.perf_counter() - t0
        if result.num_stored != self.p.num_blocks:
            raise AssertionError(f"{what}: stored {result}, expected all {self.p.num_blocks} new")
        if warm:
            zero(self.dests)
            self._expect(self.shm.get_into(self.put_ns, [b[0] for b in blocks], self.dests), what)
            check_equal(self.dests, self.sources, what)
        return self._record(s, gbps(self.p.prefix_bytes, dt), warm, f"{dt * 1e3:.1f} ms")

    def step_shm_put(self, s: Series, warm: bool) -> str:
        return self._put(s, warm, self.shm, "shm put")

    def step_tcp_put(self, s: Series, warm: bool) -> str:
        return self._put(s, warm, self.tcp, "tcp put")

    # --- helpers
    def _expect(self, n: int, what: str) -> None:
        if n != self.p.num_blocks:
            raise AssertionError(f"{what}: {n} of {self.p.num_blocks} blocks")

    def _record(self, s: Series, value: float, warm: bool, extra: str) -> str:
        if not warm:
            s.values.append(value)
        return f"{value:7.2f} {s.unit} ({extra})"

    def _record_latency(self, s: Series, samples: list[float], warm: bool) -> str:
        med = statistics.median(samples)
        if not warm:
            s.values.append(med)
            s.samples.extend(samples)
        return f"{med:7.3f} ms median of {len(samples)}"

    def settle(self, window_s: float = 0.05, max_s: float = 1.0) -> None:
        """Wait until the daemon and the raw peer are idle, so that work left over from the last
        step (freeing received frames, finishing zero-copy sends) does not overlap the next one."""
        pids = [self.daemon.proc.pid if self.daemon.proc else 0, self.peer.proc.pid or 0,
                self.socket_peer.proc.pid or 0]
        deadline = time.monotonic() + max_s
        before = sum(proc_jiffies(p) for p in pids)
        while time.monotonic() < deadline:
            time.sleep(window_s)
            now = sum(proc_jiffies(p) for p in pids)
            if now == before:
                return
            before = now

    def run(self) -> None:
        total = self.p.rounds
        for r in range(total + 1):
            warm = r == 0
            tag = "warm-up+verify" if warm else f"round {r}/{total}"
            if r == 1:
                self.busy.start()
            for s, step in self.steps:
                self.settle()
                text = step(s, warm)
                progress(f"{tag:>14}  {s.name:<8} {text}")
        self.load = self.busy.stop()

    # --- results
    def ratios(self) -> dict[str, float]:
        """Each ratio whose two series were measured (all of them unless --only)."""
        m = {k: s.median for k, s in self.series.items() if s.values}
        return {name: m[a] / m[b] for name, (a, b) in RATIO_OF.items() if a in m and b in m}

    def per_round_ratios(self) -> dict[str, dict[str, float]]:
        """The same ratios computed within each round (less exposed to drift between rounds)."""
        v = {k: s.values for k, s in self.series.items() if s.values}
        out = {}
        for name, (a, b) in RATIO_OF.items():
            if a not in v or b not in v:
                continue
            rs = [x / y for x, y in zip(v[a], v[b])]
            out[name] = {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}
        return out


def met(name: str, value: float) -> bool:
    op, goal, _ = GOALS[name]
    return value >= goal if op == ">=" else value <= goal


def report(bench: Bench, machine: dict[str, Any], wall_s: float, command: str,
           load_before: list[float], load_after: list[float]) -> dict[str, Any]:
    p = bench.p
    ratios = bench.ratios()
    goals = {name: {"goal": f"{op} {goal}", "ratio": ratios[name], "met": met(name, ratios[name]),
                    "meaning": meaning}
             for name, (op, goal, meaning) in GOALS.items() if name in ratios}
    busy = bench.load
    return {
        "benchmark": "store",
        **{k: round(v, 4) for k, v in ratios.items()},
        "goals": goals,
        "all_goals_met": all(g["met"] for g in goals.values()),
        "information": {name: {"ratio": ratios[name], "meaning": meaning}
                        for name, meaning in INFORMATION.items() if name in ratios},
        "per_round_ratios": bench.per_round_ratios(),
        "daemon_cpu_us_per_call": bench.daemon_cpu_us(),
        "figures": {k: s.as_json() for k, s in bench.series.items()},
        "parameters": {
            "command": command,
            "quick": p.quick,
            "only": list(p.only),
            "rounds": p.rounds,
            "warmup_rounds": 1,
            "rtt_samples_per_round": p.rtt_samples,
            "lookup_samples_per_round": p.lookup_samples,
            "model": "Llama-3-8B (32 layers, 8 KV heads, head dim 128, bf16)",
            "block_tokens": BLOCK_TOKENS,
            "prefix_tokens": p.num_blocks * BLOCK_TOKENS,
            "num_blocks": p.num_blocks,
            "block_bytes": p.block_bytes,
            "prefix_bytes": p.prefix_bytes,
            "chunk_bytes": CHUNK_BYTES,
            "pool_bytes": p.pool_bytes,
            "pool_factor": POOL_FACTOR,
            "working_set": "one stored prefix + one put batch",
            "lease_ms": LEASE_MS,
            "warm_calls_per_latency_step": WARM_CALLS,
            "daemon_busy_poll_us": bench.busy_poll_us,
            "hashes": "sha256(parent + index), one namespace",
            "gb": "10^9 bytes",
            "method": "rounds interleave every measurement; round 0 is an untimed warm-up that "
                      "verifies the bytes; before each step the daemon and the raw peer are let "
                      "go idle; each latency step first makes warm_calls_per_latency_step untimed "
                      "calls; throughput per round = one prefix transfer; latency per round = "
                      "median of its calls; figures are median/min/max over rounds; ratios are "
                      "of the medians (per_round_ratios: the ratio within each round)",
        },
        "load": {"load_avg_before": load_before, "load_avg_after": load_after, **busy},
        "wall_s": round(wall_s, 1),
        "machine": machine,
    }


def print_table(res: dict[str, Any]) -> None:
    print()
    print(f"kvstore store benchmark — {summary(res['machine'])}")
    p = res["parameters"]
    print(f"{p['num_blocks']} blocks x {p['block_bytes'] // MiB} MiB = {p['prefix_bytes'] // MiB} MiB "
          f"prefix, {p['rounds']} rounds{' (quick)' if p['quick'] else ''}, pool "
          f"{p['pool_bytes'] / MiB:.0f} MiB")
    print()
    print(f"{'measurement':<48} {'median':>9} {'min':>9} {'max':>9}  unit  bound")
    for name, f in res["figures"].items():
        fmt = "{:9.2f}" if f["unit"] == "GB/s" else "{:9.3f}"
        print(f"{f['what']:<48} {fmt.format(f['median'])} {fmt.format(f['min'])} "
              f"{fmt.format(f['max'])}  {f['unit']:<5} {f['bound']}")
    print()
    print(f"{'ratio':<20} {'value':>7}  {'per-round med':>13}  {'goal':>7}  met")
    for name, g in res["goals"].items():
        pr = res["per_round_ratios"][name]["median"]
        print(f"{name:<20} {g['ratio']:7.3f}  {pr:13.3f}  {g['goal']:>7}  "
              f"{'yes' if g['met'] else 'NO'}")
    for name, info in res.get("information", {}).items():
        pr = res["per_round_ratios"][name]["median"]
        print(f"{name:<20} {info['ratio']:7.3f}  {pr:13.3f}  {'-':>7}  (information)")
    cpu = res.get("daemon_cpu_us_per_call") or {}
    if cpu:
        print(f"\ndaemon CPU per call (--busy-poll-us {res['parameters']['daemon_busy_poll_us']}): "
              + ", ".join(f"{k} {v:.0f} us" for k, v in cpu.items()))
    load = res["load"]
    print()
    print(f"load avg before {load['load_avg_before'][0]:.2f}, after {load['load_avg_after'][0]:.2f}; "
          f"during the rounds other processes used {load['cores_used_by_others']:.2f} cores, "
          f"the hypervisor stole {load['cores_stolen_by_hypervisor']:.2f}; wall {res['wall_s']} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (under a minute)")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds")
    parser.add_argument("--only", default="", metavar="STEP,...",
                        help="run only these steps (e.g. rtt,lookup,lookup_slots,ping); "
                             "write to a scratch --out, the full run's JSON holds every step")
    parser.add_argument("--busy-poll-us", type=int, default=None, metavar="N",
                        help="the daemon's --busy-poll-us (default: its own default; 0: off)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "store.json")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.rounds is not None:
        cfg["rounds"] = max(1, args.rounds)
    only = tuple(x for x in args.only.split(",") if x)
    params = Params(quick=args.quick, only=only, busy_poll_us=args.busy_poll_us, **cfg)
    command = shlex.join([Path(sys.executable).name, "-m", "bench.store", *sys.argv[1:]])
    start = time.perf_counter()
    load_before = list(os.getloadavg())
    progress(f"{command}: {params.rounds} rounds + 1 warm-up; load average {load_before[0]:.2f}")
    if load_before[0] > 0.5:
        progress(f"warning: the machine is busy before the start (load {load_before[0]:.2f} on "
                 f"{os.cpu_count()} cores); figures will be noisy")
    machine = describe(extra_packages=("kvstore",))
    bench = Bench(params)
    try:
        bench.setup()
        bench.run()
    finally:
        bench.close()
    load_after = list(os.getloadavg())
    res = report(bench, machine, time.perf_counter() - start, command, load_before, load_after)
    res["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    res["command"] = command
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(args.out)
    print_table(res)
    print(f"\nwrote {args.out}")
    load = res["load"]
    if load["cores_used_by_others"] > 0.25 or load["cores_stolen_by_hypervisor"] > 0.1:
        print("warning: other processes or the hypervisor took CPU during the run; "
              "re-run for clean figures")
    return 0


def render(res: dict[str, Any]) -> str:
    """The bench/README.md section for a store.json result."""
    p = res["parameters"]
    lines = [
        f"{p['num_blocks']} blocks of {p['block_bytes'] >> 20} MiB ({p['prefix_tokens']}-token prefix of "
        f"{p['model']} at block size {p['block_tokens']}) through a real daemon, interleaved round by "
        "round with the limits they are measured against.",
        "",
        "| ratio | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for name, g in res["goals"].items():
        met = "yes" if g["met"] else "**no**"
        lines.append(f"| `{name}` | {g['ratio']:.3f} | {g['goal']} | {met} |")
    for name, info in res.get("information", {}).items():
        lines.append(f"| `{name}` | {info['ratio']:.3f} | information: {info['meaning']} | |")
    lines += ["", "| measurement | median | min–max | bound |", "|---|---|---|---|"]
    for f in res["figures"].values():
        lines.append(f"| {f['what']} | {f['median']:.3g} {f['unit']} | "
                     f"{f['min']:.3g}–{f['max']:.3g} | {f['bound']} |")
    cpu = res.get("daemon_cpu_us_per_call") or {}
    if cpu:
        lines += ["", f"The daemon ran with `--busy-poll-us {p['daemon_busy_poll_us']}`; its CPU time "
                  "per call: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} µs"
                                           for k, v in cpu.items()) + "."]
    load = res["load"]
    lines += ["", f"{p['rounds']} rounds; during them other processes used "
              f"{load['cores_used_by_others']:.2f} cores and the hypervisor stole "
              f"{load['cores_stolen_by_hypervisor']:.2f}. Small-message figures (lookup, round trip) "
              "swing by about ±20% between runs on a shared VM; the per-round ratio spread is in the JSON."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

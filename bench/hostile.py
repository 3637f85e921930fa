"""Hostile messages against a real daemon: how long other clients wait, how much memory grows.

Each attack of issue 10 (bounded work, bounded memory) is sent from a raw DEALER to one of the
daemon's two TCP listeners while two more clients PING every few milliseconds, one on the same
listener as the attacker and one on the other (the listener is the unit of isolation,
kvstore/listeners.py); the result is each one's PING latency (p50, p99, max) and the daemon's
resident memory before and after. On the same listener a message of a million frames still stalls
PINGs for as long as reading it takes (libzmq delivers a message whole, after every frame). Writes
bench/results/hostile.json. The attack builders are shared with tests/integration/test_hostile_*.py
(which assert only generous bounds; the figures are measured here).

    python -m bench.hostile            # every attack at the issue's scale
    python -m bench.hostile --quick    # scaled down (seconds)
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import zmq

from kvstore.protocol import CHUNK_BYTES, MAX_BLOCKS, MAX_WRITE_ROWS, VERSION, Op

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1 << 20
PROBE_INTERVAL_S = 0.005  # a PING every 5 ms: fine enough to see a 50 ms stall
PROBE_TIMEOUT_S = 120.0  # a PING that waits this long counts as lost (the stall is that long)
_ids = itertools.count(1)


# --- raw messages --------------------------------------------------------------------------------
def header(op: Op, **fields: Any) -> bytes:
    return msgpack.packb({"v": VERSION, "op": int(op), "id": next(_ids), **fields},
                         use_bin_type=True)


def dealer(ctx: zmq.Context, address: str, timeout_ms: int = 10_000) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
    sock.setsockopt(zmq.SNDHWM, 0)  # the attack must not stall in our own queue
    sock.connect(address)
    return sock


def call(sock: zmq.Socket, frames: list[bytes]) -> dict[str, Any]:
    """Send one request and return its decoded reply header."""
    sock.send_multipart(frames, copy=False)
    return recv_reply(sock)


def recv_reply(sock: zmq.Socket) -> dict[str, Any]:
    """The next reply's decoded header."""
    return msgpack.unpackb(sock.recv_multipart()[0], raw=False)


def hello_token(sock: zmq.Socket) -> bytes:
    reply = call(sock, [header(Op.HELLO, version=VERSION)])
    return bytes(reply["token"])


def tiny_hashes(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i}".encode() for i in range(n)]


def put_tiny(sock: zmq.Socket, name: bytes, hashes: list[bytes], nbytes: int = 1) -> int:
    """Store one-byte (or nbytes) blocks over TCP, MAX_WRITE_ROWS per PUT; returns how many
    stored."""
    stored = 0
    for i in range(0, len(hashes), MAX_WRITE_ROWS):
        batch = hashes[i:i + MAX_WRITE_ROWS]
        reply = call(sock, [header(Op.PUT, ns=[name, 0], blocks=[[h, None] for h in batch],
                                   sizes=[nbytes] * len(batch)), *[b"x" * nbytes] * len(batch)])
        assert reply.get("ok"), reply
        stored += reply["num_stored"]
        if reply["num_full"]:
            break
    return stored


def put_chain(sock: zmq.Socket, name: bytes, hashes: list[bytes], nbytes: int) -> int:
    """Store one chain (each block the child of the one before), MAX_WRITE_ROWS per PUT."""
    stored = 0
    for i in range(0, len(hashes), MAX_WRITE_ROWS):
        rows = [[hashes[j], hashes[j - 1] if j else None]
                for j in range(i, min(i + MAX_WRITE_ROWS, len(hashes)))]
        reply = call(sock, [header(Op.PUT, ns=[name, 0], blocks=rows, sizes=[nbytes] * len(rows)),
                            *[bytes(nbytes)] * len(rows)])
        assert reply.get("ok"), reply
        stored += reply["num_stored"]
    return stored


def reserve_tiny(sock: zmq.Socket, name: bytes, hashes: list[bytes], token: bytes) -> int:
    """Reserve one-byte blocks and never commit them (the daemon reclaims them on expiry)."""
    num = 0
    for i in range(0, len(hashes), MAX_WRITE_ROWS):
        batch = hashes[i:i + MAX_WRITE_ROWS]
        reply = call(sock, [header(Op.RESERVE, ns=[name, 0], token=token,
                                   blocks=[[h, None, 1] for h in batch])])
        assert reply.get("ok"), reply
        num += sum(s is not None for s in reply["slots"])
    return num


def empty_frames_message(num_frames: int) -> list[bytes]:
    """A PING followed by num_frames empty frames: ~2 bytes each on the wire."""
    return [header(Op.PING), *itertools.repeat(b"", num_frames)]


def big_message(num_bytes: int) -> Iterator[bytes | memoryview]:
    """A PUT header followed by num_bytes of CHUNK_BYTES frames (one buffer, many views)."""
    chunk = memoryview(bytearray(CHUNK_BYTES))
    yield header(Op.PUT, ns=[b"big", 0], blocks=[[b"b", None]], sizes=[1])
    for _ in range(num_bytes // CHUNK_BYTES):
        yield chunk


def send_message(sock: zmq.Socket, frames: Iterator[bytes | memoryview] | list[bytes]) -> None:
    """Send a multipart message frame by frame (never holds more than one frame's list)."""
    it = iter(frames)
    frame = next(it)
    for nxt in it:
        sock.send(frame, zmq.SNDMORE, copy=False)
        frame = nxt
    sock.send(frame, copy=False)


# --- measuring -----------------------------------------------------------------------------------
def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a process from /proc/<pid>/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class PingProbe:
    """PINGs the daemon from its own socket every PROBE_INTERVAL_S; records each latency."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.sock = dealer(ctx, address, timeout_ms=int(PROBE_TIMEOUT_S * 1000))
        call(self.sock, [header(Op.PING)])  # connected before the attack starts
        self.latencies_s: list[float] = []
        self.num_lost = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PingProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close(0)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                call(self.sock, [header(Op.PING)])
            except zmq.Again:
                self.num_lost += 1
                return
            self.latencies_s.append(time.perf_counter() - start)
            self._stop.wait(PROBE_INTERVAL_S)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s) or [float("nan")]
        return {"pings": len(self.latencies_s), "lost": self.num_lost,
                "p50_ms": round(1000 * statistics.median(lat), 2),
                "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
                "max_ms": round(1000 * lat[-1], 2)}


def ping_s(sock: zmq.Socket) -> float:
    """Seconds one PING on an already connected socket takes to be answered."""
    start = time.perf_counter()
    call(sock, [header(Op.PING)])
    return time.perf_counter() - start


# --- the attacks ---------------------------------------------------------------------------------
def attack_invalidate(ctx: zmq.Context, address: str, num_blocks: int) -> Callable[[], Any]:
    """Stores num_blocks one-byte blocks, then returns the attack: one INVALIDATE of all."""
    sock = dealer(ctx, address, timeout_ms=int(PROBE_TIMEOUT_S * 1000))
    stored = put_tiny(sock, b"tiny", tiny_hashes("inv", num_blocks))

    def attack() -> Any:
        reply = call(sock, [header(Op.INVALIDATE, name=b"tiny")])
        sock.close(0)
        return {"stored": stored, "num_dropped": reply.get("num_dropped")}
    return attack


def attack_reserve(ctx: zmq.Context, address: str, num_blocks: int) -> Callable[[], Any]:
    """The attack: RESERVE num_blocks one-byte blocks and walk away (expiry frees them)."""
    def attack() -> Any:
        sock = dealer(ctx, address)
        num = reserve_tiny(sock, b"abandoned", tiny_hashes("res", num_blocks), hello_token(sock))
        sock.close(0)
        return {"reserved": num}
    return attack


def attack_frames(ctx: zmq.Context, address: str, num_frames: int) -> Callable[[], Any]:
    def attack() -> Any:
        sock = dealer(ctx, address)
        send_message(sock, empty_frames_message(num_frames))
        try:
            reply = msgpack.unpackb(sock.recv_multipart()[0], raw=False)
        except zmq.Again:
            reply = None
        sock.close(0)
        return {"frames": num_frames, "reply": reply and reply.get("error", "ok")}
    return attack


def attack_big(ctx: zmq.Context, address: str, num_bytes: int) -> Callable[[], Any]:
    def attack() -> Any:
        sock = dealer(ctx, address, timeout_ms=60_000)
        send_message(sock, big_message(num_bytes))
        try:
            reply = msgpack.unpackb(sock.recv_multipart()[0], raw=False)
        except zmq.Again:
            reply = None
        sock.close(0)
        return {"bytes": num_bytes, "reply": reply and reply.get("error", "ok")}
    return attack


def attack_repeated_leases(ctx: zmq.Context, address: str, num_leases: int) -> Callable[[], Any]:
    """Leased LOOKUPs naming one stored block MAX_BLOCKS times each."""
    sock = dealer(ctx, address)
    put_tiny(sock, b"rep", [b"r0"], nbytes=64)

    def attack() -> Any:
        hits = [call(sock, [header(Op.LOOKUP, ns=[b"rep", 0], hashes=[b"r0"] * MAX_BLOCKS,
                                   lease_ms=60_000)])["num_hits"] for _ in range(num_leases)]
        sock.close(0)
        return {"leases": num_leases, "hits_per_lease": max(hits)}
    return attack


def attack_tiny_fill(ctx: zmq.Context, address: str, num_blocks: int) -> Callable[[], Any]:
    """Fill the pool with one-byte blocks: the index, not the pool, is what grows."""
    def attack() -> Any:
        sock = dealer(ctx, address, timeout_ms=int(PROBE_TIMEOUT_S * 1000))
        stored = put_tiny(sock, b"fill", tiny_hashes("fill", num_blocks))
        sock.close(0)
        return {"stored": stored}
    return attack


# --- running -------------------------------------------------------------------------------------
def measure(name: str, make_attack: Callable[..., Callable[[], Any]], scale: int,
            daemon_args: list[str], pool_size: str, settle_s: float = 0.0) -> dict[str, Any]:
    """Start a daemon, prepare the attack, run it under a PING probe; latency and RSS figures."""
    from bench.daemon import Daemon, free_port

    other = f"tcp://127.0.0.1:{free_port()}"
    d = Daemon(pool_size=pool_size, extra_args=["--tcp", other, *daemon_args]).start()
    d.wait_prefaulted()  # the pool's pages mapped first: RSS then grows only by what attacks cost
    ctx = zmq.Context()
    try:
        assert d.proc is not None
        pid = d.proc.pid
        attack = make_attack(ctx, d.address, scale)
        after = dealer(ctx, d.address, timeout_ms=int(PROBE_TIMEOUT_S * 1000))
        ping_s(after)  # connected before the attack
        rss_before = rss_bytes(pid)
        start = time.perf_counter()
        with PingProbe(ctx, d.address) as probe, PingProbe(ctx, other) as other_probe:
            try:
                outcome = attack()
            except zmq.Again:  # the daemon stalled past our patience
                outcome = {"error": f"no reply within {PROBE_TIMEOUT_S:.0f} s"}
            attack_s = time.perf_counter() - start
            time.sleep(settle_s)  # expiry-driven attacks happen after the message
            try:
                ping_after_s = ping_s(after)  # a socket of its own: the probe's is its thread's
            except zmq.Again:
                ping_after_s = float("inf")  # JSON: Infinity, i.e. past PROBE_TIMEOUT_S
            rss_peak = rss_bytes(pid, "VmHWM")
        after.close(0)
        rss_after = rss_bytes(pid)
        return {"attack": name, "scale": scale, "daemon_args": daemon_args, "pool_size": pool_size,
                "outcome": outcome, "attack_s": round(attack_s, 3),
                "ping_same_listener": probe.summary(),
                "ping_other_listener": other_probe.summary(),
                "ping_after_ms": round(1000 * ping_after_s, 2),
                "rss_before_mib": round(rss_before / MiB, 1),
                "rss_after_mib": round(rss_after / MiB, 1),
                "rss_peak_mib": round(rss_peak / MiB, 1),
                "rss_growth_mib": round((rss_after - rss_before) / MiB, 1)}
    finally:
        ctx.destroy(0)
        d.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="scaled-down attacks (seconds)")
    parser.add_argument("--only", nargs="*", help="attack names to run")
    parser.add_argument("--daemon-args", default="", help="extra `kvstore serve` flags")
    parser.add_argument("--out", default=str(RESULTS / "hostile.json"))
    args = parser.parse_args(argv)
    q = args.quick
    extra = args.daemon_args.split()
    plan = [  # name, attack, scale (full, quick), daemon flags, pool, seconds to wait after
        ("invalidate_tiny", attack_invalidate, 1024 if q else 8192, [], "256MiB", 0.0),
        ("reserve_abandoned", attack_reserve, 1024 if q else 8192, ["--reserve-timeout", "0.5"],
         "256MiB", 2.0),
        ("empty_frames", attack_frames, 200_000 if q else 1_000_000, [], "256MiB", 0.0),
        ("big_message", attack_big, (256 if q else 1024) * MiB, [], "256MiB", 0.0),
        ("repeated_leases", attack_repeated_leases, 200 if q else 1000, [], "256MiB", 0.0),
        ("tiny_fill", attack_tiny_fill, 1 << 18 if q else 1 << 19, [], "256MiB", 0.0),
    ]
    results = []
    for name, attack, scale, flags, pool, settle_s in plan:
        if args.only and name not in args.only:
            continue
        row = measure(name, attack, scale, flags + extra, pool, settle_s)
        print(json.dumps(row), flush=True)
        results.append(row)
    from bench.machine import describe

    out = {"results": results, "machine": describe(),
           "command": " ".join(["python", "-m", "bench.hostile", *(argv or sys.argv[1:])])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

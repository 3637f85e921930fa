"""Shared pieces of the integration tests: block data, stats polling, raw sockets, CLI runs."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from kvstore.client import Client
from bench.daemon import wait_until

MiB = 1024 * 1024
# Deadline of calls in tests that are not about timing. Generous: the machine may be shared with
# other jobs, and a call that succeeds returns at once anyway.
CALL_S = 10.0
REPO = Path(__file__).resolve().parents[2]


def random_blocks(seed: int, sizes: list[int]) -> list[bytes]:
    """Reproducible random block contents, one per size."""
    rng = np.random.default_rng(seed)
    return [rng.bytes(n) for n in sizes]


def chain_hashes(tag: str, n: int) -> list[bytes]:
    """n distinct block hashes forming one chain, root first."""
    return [f"{tag}-{i}".encode() for i in range(n)]


def as_chain(hashes: list[bytes], datas: list[bytes]) -> list[tuple[bytes, bytes | None, bytes]]:
    """(hash, parent, data) triples linking each block to the previous one."""
    return [(h, hashes[i - 1] if i else None, d) for i, (h, d) in enumerate(zip(hashes, datas))]


def stats(address: str, curve_dir: Path | None = None) -> dict[str, Any]:
    """The daemon's stats through a short-lived TCP client."""
    with Client(address, timeout_s=CALL_S, use_shm=False, curve_dir=curve_dir) as client:
        return client.stats()


def wait_stats(address: str, predicate: Callable[[dict[str, Any]], bool], timeout_s: float,
               what: str) -> dict[str, Any]:
    """Poll stats until predicate holds; returns the stats that satisfied it."""
    return wait_until(lambda: (lambda s: s if predicate(s) else None)(stats(address)),
                      timeout_s, interval_s=0.05, what=what)


def raw_dealer(ctx: zmq.Context, address: str, timeout_ms: int = 2000) -> zmq.Socket:
    """A bare DEALER speaking to the daemon without the client library."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
    sock.connect(address)
    return sock


def run_cli(*args: str, stdin: bytes | None = None,
            timeout_s: float = 30.0) -> subprocess.CompletedProcess[bytes]:
    """Run `kvstore ARGS` as its own process and capture both streams."""
    return subprocess.run([sys.executable, "-m", "kvstore.cli", *args], input=stdin,
                          capture_output=True, timeout=timeout_s, cwd=REPO)


def assert_terminates(ctx: zmq.Context, timeout_s: float = 5.0) -> None:
    """ctx.term() must return promptly: it blocks forever while any socket is left open."""
    thread = threading.Thread(target=ctx.term, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"zmq context did not terminate within {timeout_s} s: socket leak"


def is_mapped(segment: str) -> bool:
    """Whether this process still maps the named shared-memory segment."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return any(f"/dev/shm/{segment}" in line for line in maps)

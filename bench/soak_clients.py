"""The soak's well-behaved side: content-addressed blocks, honest clients that check every byte they
read, and a pinger. Each runs in its own process, so a stalled daemon shows up as latency here and
not as a client stuck behind the attacker's GIL.

A block's bytes are derived from its hash (shake_256 of the hash), so any process can check any
block it reads without having written it. Attack code that writes foreign bytes into the honest
namespace marks them with a tag (POISON_TAG, LATE_TAG) so a wrong read can be traced to its cause.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter, deque
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import numpy as np

from kvstore.client import Client
from kvstore.errors import KVStoreError, ServerError, ServerUnavailable
from kvstore.keys import Namespace
from kvstore.protocol import Ping

# Tenant "honest" (kvstore/tenants.py: a namespace name's tenant is what precedes its first "/").
HONEST_NS = Namespace(b"honest/soak")
BLOCK_SIZES = (16 * 1024, 64 * 1024)  # two size classes; attackers write the same sizes
CHAIN_LEN = 8  # blocks per chain (one "prompt prefix")
NUM_CHAINS = 1024  # ~320 MiB of distinct blocks over a 256 MiB pool: eviction runs all the time
HOT_CHAINS = 64  # chains 0..63 are shared prompts every client reads often
RECENT_CHAINS = 16  # a client rereads what it stored lately (the next turn of a conversation)
POISON_TAG = b"POISON-from-another-tenant|"  # tenant attack: foreign bytes under honest hashes
LATE_TAG = b"LATE-write-of-a-stalled-writer|"  # stalled writer: its copy after the reclaim
HONEST_TIMEOUT_S = 2.0  # honest calls: a stall longer than this is a timeout, then a reconnect
PING_TIMEOUT_S = 1.0  # the pinger's deadline: a stalled daemon costs one sample per second
PING_PERIOD_S = 0.02  # 50 pings a second
OP_PERIOD_S = 0.05  # an honest client asks at most 20 times a second: it leaves CPU to the daemon


def chain_hashes(chain: int) -> list[bytes]:
    """The hashes of honest chain number `chain`, root first (deterministic, like vLLM's)."""
    return [hashlib.sha256(b"soak-chain-%d-%d" % (chain, i)).digest() for i in range(CHAIN_LEN)]


def block_size(block_hash: bytes) -> int:
    return BLOCK_SIZES[block_hash[0] % len(BLOCK_SIZES)]


def block_bytes(block_hash: bytes) -> bytes:
    """The only right contents of the block named block_hash."""
    return hashlib.shake_256(block_hash).digest(block_size(block_hash))


def tagged(tag: bytes, nbytes: int) -> bytes:
    """nbytes of tag repeated: foreign bytes whose origin a reader can tell."""
    return (tag * (nbytes // len(tag) + 1))[:nbytes]


def wrong_cause(got: bytes) -> str:
    """Which attack the wrong bytes of a block came from, by its tag."""
    for cause, tag in (("tenant_poison", POISON_TAG), ("late_write", LATE_TAG)):
        if tag[:16] in got[:4096]:
            return cause
    return "other"


def count_wrong(block_hash: bytes, got: bytes) -> int:
    """How many bytes of got differ from the block's right bytes (a length mismatch counts)."""
    want = block_bytes(block_hash)
    n = min(len(want), len(got))
    differ = np.frombuffer(want, np.uint8, n) != np.frombuffer(got, np.uint8, n)
    diff = int(np.count_nonzero(differ))
    return diff + abs(len(want) - len(got))


@dataclass
class Recorder:
    """Every call of one process: (monotonic start, op, seconds, outcome) rows and byte counts."""

    name: str
    rows: list[tuple[float, str, float, str]]
    wrong_bytes: int = 0
    wrong_blocks: int = 0
    checked_blocks: int = 0
    checked_bytes: int = 0
    asked_blocks: int = 0
    hit_blocks: int = 0

    def __post_init__(self) -> None:
        self.wrong_by_cause: Counter[str] = Counter()
        self.hits: list[tuple[float, int, int]] = []  # (t, hits, asked) per get
        # Pingers: (t0, sent late by, to the daemon's handling, from there to the answer) seconds.
        self.ping_parts: list[tuple[float, float, float, float]] = []

    def add(self, t0: float, op: str, outcome: str) -> None:
        self.rows.append((t0, op, time.monotonic() - t0, outcome))

    def result(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows, "hits": self.hits,
                "wrong_bytes": self.wrong_bytes, "wrong_blocks": self.wrong_blocks,
                "wrong_by_cause": dict(self.wrong_by_cause), "checked_blocks": self.checked_blocks,
                "checked_bytes": self.checked_bytes, "ping_parts": self.ping_parts}


def honest_client(name: str, address: str, curve_dir: Path | None, use_shm: bool, seed: int,
                  stop: Event, ready: Any, results: Any) -> None:
    """Read random chains, check every byte, store what is missing; until stop is set."""
    rng = random.Random(seed)
    rec = Recorder(name, [])
    client = Client(address, timeout_s=HONEST_TIMEOUT_S, use_shm=use_shm, curve_dir=curve_dir)
    _say_ready(client, name, ready)
    recent: deque[int] = deque(maxlen=RECENT_CHAINS)
    next_s = time.monotonic()
    while not stop.is_set():
        chain = _pick_chain(rng, recent)
        hashes = chain_hashes(chain)
        t0, op = time.monotonic(), "get"
        try:
            got = client.get(HONEST_NS, hashes)
            rec.add(t0, "get", "ok")
            rec.hits.append((t0, len(got), len(hashes)))
            for block_hash, data in zip(hashes, got):
                _check(rec, block_hash, data)
            if len(got) < len(hashes):
                t0, op = time.monotonic(), "put"
                missing = [(h, hashes[i - 1] if i else None, block_bytes(h))
                           for i, h in enumerate(hashes) if i >= len(got)]
                put = client.put(HONEST_NS, missing)
                rec.add(t0, "put", "full" if put.num_full else "ok")
                if put.num_stored:
                    recent.append(chain)
        except ServerUnavailable:
            rec.add(t0, op, "timeout")
        except ServerError as exc:
            rec.add(t0, op, f"error:{exc.code}")
        except KVStoreError as exc:
            rec.add(t0, op, f"error:{type(exc).__name__}")
        next_s = max(next_s + OP_PERIOD_S, time.monotonic())
        stop.wait(max(0.0, next_s - time.monotonic()))
    client.close()
    results.put(rec.result())


def _say_ready(client: Client, name: str, ready: Any) -> None:
    """Connect (HELLO, and attach the segment) before the soak's clock starts."""
    for _ in range(30):
        try:
            client.connect()
            break
        except ServerUnavailable:
            continue
    ready.put(name)


def _pick_chain(rng: random.Random, recent: deque[int]) -> int:
    """A third of the time one of the client's recent chains, a third a hot one, else any."""
    draw = rng.random()
    if draw < 0.33 and recent:
        return rng.choice(recent)
    return rng.randrange(HOT_CHAINS if draw < 0.66 else NUM_CHAINS)


def _check(rec: Recorder, block_hash: bytes, data: bytes) -> None:
    rec.checked_blocks += 1
    rec.checked_bytes += len(data)
    wrong = count_wrong(block_hash, data)
    if wrong:
        rec.wrong_bytes += wrong
        rec.wrong_blocks += 1
        rec.wrong_by_cause[wrong_cause(data)] += wrong


def pinger(address: str, curve_dir: Path | None, stop: Event, ready: Any, results: Any,
           name: str = "pinger") -> None:
    """PING the daemon every PING_PERIOD_S; a timeout is recorded with its elapsed time.

    Each answered PING is also split in three (rec.ping_parts): how late this process sent it
    (it shares the CPUs with everyone: lateness is the machine's share, not the daemon's), the
    time from sending to the daemon handling it (the reply's `at_s`, the daemon's
    time.monotonic(): CLOCK_MONOTONIC is one clock for every process of the host), and the time
    from there to this process holding the answer."""
    rec = Recorder(name, [])
    client = Client(address, timeout_s=PING_TIMEOUT_S, use_shm=False, curve_dir=curve_dir)
    _say_ready(client, name, ready)
    next_s = time.monotonic()
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            reply = client._request(Ping())  # the typed reply: Client.ping() keeps only the RTT
            rec.add(t0, "ping", "ok")
            at_s = getattr(reply, "at_s", None)
            if isinstance(at_s, float):  # a daemon that stamps its PING replies
                rec.ping_parts.append((t0, t0 - next_s, at_s - t0, t0 + rec.rows[-1][2] - at_s))
        except ServerUnavailable:
            rec.add(t0, "ping", "timeout")
        except KVStoreError as exc:
            rec.add(t0, "ping", f"error:{type(exc).__name__}")
        next_s = max(next_s + PING_PERIOD_S, time.monotonic())
        stop.wait(max(0.0, next_s - time.monotonic()))
    client.close()
    results.put(rec.result())

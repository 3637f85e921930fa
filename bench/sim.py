"""A trace-driven simulator of N vLLM replicas, each with its own VRAM prefix cache, optionally in
front of one shared kvstore pool, under a routing policy. Pure Python, no sockets, no vLLM.

The VRAM tier models vLLM's automatic prefix caching block by block: a fixed number of physical
blocks, full blocks named by hashes chained through the parent, a free queue evicted oldest first,
a finished request's blocks returned tail first, and never more than (prompt - 1) // block_size
blocks served (vLLM computes at least one token). The pool tier is the daemon's own state machine,
kvstore.store.Store, driven in-process with the policy under test, and it is used the way
connectors/vllm_v1/scheduler_side.py uses it: look up (and pin) only past the VRAM hit, unpin after
the load, then save every full prompt block that did not come from the pool.

Time to first token is a linear model of the tiers' work (TtftModel), calibrated by least squares
on real runs (bench/replicas.py).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from kvstore.keys import BlockHash, Namespace
from kvstore.policy import POLICIES
from kvstore.slabs import Slabs
from kvstore.store import Store

NS = Namespace(b"sim", 0)
ROUTINGS = ("round-robin", "session", "prefix-hash")


def block_hashes(prompt: Sequence[int], block_size: int) -> list[bytes]:
    """One hash per full block, each covering its parent's hash (vLLM's chained block hashes)."""
    hashes: list[bytes] = []
    parent = b""
    for start in range(0, len(prompt) - block_size + 1, block_size):
        block = np.asarray(prompt[start:start + block_size], dtype=np.int64).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        hashes.append(parent)
    return hashes


# --- tier 0: a replica's VRAM prefix cache -----------------------------------------------------
class VramCache:
    """vLLM's prefix cache over num_blocks physical blocks (block 0 is vLLM's null block), with
    reference counts: blocks a running request holds cannot be evicted."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"a VRAM cache needs at least 2 blocks, got {num_blocks}")
        self.num_usable = num_blocks - 1
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(self.num_usable))
        self._refs: dict[int, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    def match(self, hashes: Sequence[bytes], max_blocks: int) -> int:
        """Leading blocks of hashes held here, at most max_blocks. Changes nothing."""
        num = 0
        for h in hashes[:max_blocks]:
            if h not in self._block_of:
                break
            num += 1
        return num

    def run(self, hashes: Sequence[bytes], num_hit: int, num_tokens: int, block_size: int) -> None:
        """Serve one request to completion: reuse its num_hit matched blocks, allocate the rest
        (blocks loaded from the pool included), cache its full blocks, free them all."""
        num_needed = -(-num_tokens // block_size)
        if num_needed > self.num_usable:
            raise ValueError(f"a {num_tokens}-token prompt needs {num_needed} blocks; the VRAM "
                             f"cache has {self.num_usable}")
        self.release(self.hold(hashes, num_hit, num_needed))

    def hold(self, hashes: Sequence[bytes], num_hit: int, num_needed: int) -> list[int]:
        """Take the num_hit matched blocks and fresh ones up to num_needed (as many as are free:
        vLLM would queue the request, rare at these sizes); their full blocks become cached."""
        blocks = [self._block_of[h] for h in hashes[:num_hit]]
        for block in blocks:
            self._free.pop(block, None)  # in use: out of the free queue (vLLM's touch)
            self._refs[block] = self._refs.get(block, 0) + 1
        for _ in range(num_needed - num_hit):
            if not self._free:
                break
            block, _ = self._free.popitem(last=False)  # the oldest free block is evicted
            old = self._hash_of.pop(block, None)
            if old is not None:
                del self._block_of[old]
            self._refs[block] = 1
            blocks.append(block)
        for i in range(num_hit, min(len(hashes), len(blocks))):
            if hashes[i] not in self._block_of:  # full blocks become cached
                self._block_of[hashes[i]] = blocks[i]
                self._hash_of[blocks[i]] = hashes[i]
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Give back what hold() took, tail first: a request's last blocks are evicted first."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if not self._refs[block]:
                self._free[block] = None


# --- tier 1: the shared pool (the daemon's Store) ----------------------------------------------
class Pool:
    """A real kvstore Store of capacity_blocks blocks of block_bytes each, driven in-process."""

    def __init__(self, capacity_blocks: int, block_bytes: int, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        if capacity_blocks < 1 or block_bytes < 1:
            raise ValueError("a pool needs at least one block of at least one byte")
        self.block_bytes = block_bytes
        # One slot per page: the capacity is exactly capacity_blocks whatever the size class.
        slot_bytes = -(-block_bytes // 64) * 64
        self._now = 0.0
        self.store = Store(Slabs(0, capacity_blocks, slot_bytes), POLICIES[policy](),
                           clock=lambda: self._now)

    def load(self, hashes: Sequence[bytes], start: int, end: int) -> int:
        """Blocks [start, start + n) found in the pool (pinned, then released after the copy)."""
        self._now += 1.0
        if end <= start:
            return 0
        found, lease_id = self.store.pin(NS, [BlockHash(h) for h in hashes[start:end]])
        if lease_id is not None:
            self.store.unpin(lease_id)
        return len(found)

    def save(self, hashes: Sequence[bytes], skip: range) -> None:
        """Store every block not in skip (loaded from the pool); present ones are left alone."""
        blocks = [(BlockHash(h), BlockHash(hashes[i - 1]) if i else None, self.block_bytes)
                  for i, h in enumerate(hashes) if i not in skip]
        if not blocks:
            return
        reservation = self.store.reserve(NS, blocks)
        for (block_hash, _, _), slot in zip(blocks, reservation.slots):
            if slot is not None:
                self.store.commit(NS, block_hash, slot)


# --- routing -----------------------------------------------------------------------------------
class Router(Protocol):
    def route(self, request: dict[str, Any], hashes: Sequence[bytes]) -> int: ...


class RoundRobin:
    def __init__(self, num_replicas: int) -> None:
        self.num_replicas = num_replicas
        self._next = 0

    def route(self, request: dict[str, Any], hashes: Sequence[bytes]) -> int:
        replica = self._next
        self._next = (self._next + 1) % self.num_replicas
        return replica


class SessionAffinity:
    """Every request of a session goes to the replica its session id hashes to."""

    def __init__(self, num_replicas: int) -> None:
        self.num_replicas = num_replicas

    def route(self, request: dict[str, Any], hashes: Sequence[bytes]) -> int:
        return hash64(str(request["session"]).encode()) % self.num_replicas


class PrefixHash:
    """Consistent hashing of the first key_blocks blocks, with bounded load.

    The load of a replica is its share of the last window assignments; a replica already holding
    ceil((1 + eps) * (assignments + 1) / N) of them is skipped for the next one clockwise on the
    ring (Mirrokni et al., consistent hashing with bounded loads). Some replica is always under
    that bound, so the walk always ends.
    """

    def __init__(self, num_replicas: int, key_blocks: int = 8, eps: float = 0.25,
                 window: int = 32, virtual_nodes: int = 64) -> None:
        if key_blocks < 1 or eps < 0 or window < 1 or virtual_nodes < 1:
            raise ValueError("key_blocks, window, virtual_nodes must be >= 1 and eps >= 0")
        self.num_replicas, self.key_blocks, self.eps, self.window = (
            num_replicas, key_blocks, eps, window)
        points = sorted((hash64(f"replica-{r}-{v}".encode()), r)
                        for r in range(num_replicas) for v in range(virtual_nodes))
        self._positions = [p for p, _ in points]
        self._owners = [r for _, r in points]
        self._recent: deque[int] = deque()
        self.loads: Counter[int] = Counter()

    def bound(self) -> int:
        """The most assignments one replica may hold in the window after the next one."""
        return math.ceil((1 + self.eps) * (len(self._recent) + 1) / self.num_replicas)

    def route(self, request: dict[str, Any], hashes: Sequence[bytes]) -> int:
        if len(self._recent) == self.window:
            self.loads[self._recent.popleft()] -= 1
        key = (hashes[min(self.key_blocks, len(hashes)) - 1] if hashes
               else np.asarray(request["prompt"], dtype=np.int64).tobytes())
        bound = self.bound()
        start = bisect.bisect(self._positions, hash64(key))
        for step in range(len(self._owners)):
            replica = self._owners[(start + step) % len(self._owners)]
            if self.loads[replica] < bound:
                break
        else:  # unreachable: loads sum to len(window) < N * bound
            raise AssertionError("no replica under the load bound")
        self._recent.append(replica)
        self.loads[replica] += 1
        return replica


def make_router(routing: str, num_replicas: int, **options: Any) -> Router:
    if num_replicas < 1:
        raise ValueError(f"need at least one replica, got {num_replicas}")
    if routing == "round-robin":
        return RoundRobin(num_replicas)
    if routing == "session":
        return SessionAffinity(num_replicas)
    if routing == "prefix-hash":
        return PrefixHash(num_replicas, **options)
    raise ValueError(f"unknown routing {routing!r}; choose from {', '.join(ROUTINGS)}")


def hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


# --- the simulation ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolSpec:
    capacity_blocks: int
    block_bytes: int
    policy: str = "leaf-lru"


@dataclass(slots=True, frozen=True)
class Served:
    """How one request's prompt was served."""

    replica: int
    num_prompt_tokens: int
    vram_tokens: int
    pool_tokens: int

    @property
    def recomputed_tokens(self) -> int:
        return self.num_prompt_tokens - self.vram_tokens - self.pool_tokens


@dataclass
class Outcome:
    served: list[Served] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(s.num_prompt_tokens for s in self.served)

    def hit_rate(self) -> float:
        """Prompt tokens served from any cache / prompt tokens."""
        return sum(s.vram_tokens + s.pool_tokens for s in self.served) / max(1, self.num_prompt_tokens)

    def pool_hit_rate(self) -> float:
        """Prompt tokens served from the pool / prompt tokens."""
        return sum(s.pool_tokens for s in self.served) / max(1, self.num_prompt_tokens)


def simulate(trace: Sequence[dict[str, Any]], num_replicas: int, routing: str, vram_blocks: int,
             pool: PoolSpec | None = None, block_size: int = 32,
             routing_options: dict[str, Any] | None = None) -> Outcome:
    """Replay trace in order, one request at a time; vram_blocks=0 means no VRAM tier."""
    router = make_router(routing, num_replicas, **(routing_options or {}))
    vrams = [VramCache(vram_blocks) if vram_blocks else None for _ in range(num_replicas)]
    shared = Pool(pool.capacity_blocks, pool.block_bytes, pool.policy) if pool else None
    outcome = Outcome()
    for request in trace:
        prompt = request["prompt"]
        hashes = block_hashes(prompt, block_size)
        replica = router.route(request, hashes)
        outcome.served.append(serve(prompt, hashes, vrams[replica], shared, block_size, replica))
    return outcome


def serve(prompt: Sequence[int], hashes: Sequence[bytes], vram: VramCache | None,
          pool: Pool | None, block_size: int, replica: int = 0) -> Served:
    """One request on one replica: VRAM hit, then the pool past it, then save."""
    max_blocks = min((len(prompt) - 1) // block_size, len(hashes))
    num_vram = vram.match(hashes, max_blocks) if vram else 0
    num_pool = pool.load(hashes, num_vram, max_blocks) if pool else 0
    if vram:
        vram.run(hashes, num_vram, len(prompt), block_size)
    if pool:
        pool.save(hashes, range(num_vram, num_vram + num_pool))
    return Served(replica, len(prompt), num_vram * block_size, num_pool * block_size)


# --- time to first token -----------------------------------------------------------------------
FEATURES = ("overhead_s", "recompute_s_per_token", "pool_s_per_token", "vram_s_per_token")


@dataclass(frozen=True)
class TtftModel:
    """TTFT = overhead + recompute x recomputed tokens + pool x pool tokens + vram x VRAM tokens."""

    overhead_s: float
    recompute_s_per_token: float
    pool_s_per_token: float
    vram_s_per_token: float

    def predict(self, served: Served) -> float:
        return float(np.dot(self.coefficients(), _features(served)))

    def coefficients(self) -> np.ndarray:
        return np.array([getattr(self, name) for name in FEATURES])

    @classmethod
    def fit(cls, samples: Sequence[tuple[Served, float]]) -> TtftModel:
        """Least squares on (served, measured seconds), every coefficient kept >= 0.

        A feature whose free fit is negative (noise, or a tier barely used in the runs) is
        dropped and the rest refitted, so the model never says a hit costs negative time.
        """
        if not samples:
            raise ValueError("no samples to fit")
        x = np.array([_features(s) for s, _ in samples], dtype=float)
        y = np.array([t for _, t in samples], dtype=float)
        active = [i for i in range(len(FEATURES)) if x[:, i].any()]
        while True:
            coef = np.zeros(len(FEATURES))
            solution, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
            coef[active] = solution
            negative = [i for i in active if coef[i] < 0]
            if not negative:
                return cls(*map(float, coef))
            active.remove(min(negative, key=lambda i: coef[i]))


def _features(served: Served) -> list[float]:
    return [1.0, served.recomputed_tokens, served.pool_tokens, served.vram_tokens]

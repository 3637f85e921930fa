"""The seam for tiers below the pool (issue 11, item 5): blocks leaving the pool are offered to a
next tier, and a LOOKUP that runs past the pool's prefix is continued there.

A Tier's methods run on the tier's own thread and may block; the loop never waits on them. The
loop hands work over through TierLink (copies of evicted bytes, questions with a deadline) and is
woken by a pipe in its poller when an answer is ready. Nothing here touches the Store: the server
puts found blocks into the pool and answers the pending LOOKUP. Off unless `--tier` is set.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.keys import BlockHash, Namespace

log = logging.getLogger("kvstore.tiers")

# Evicted bytes copied on the loop and not yet taken by the tier. Beyond this an eviction is not
# offered (the tier is a cache: a block it never saw is a miss), so a slow tier bounds the
# daemon's extra memory and the loop's copying instead of growing a queue.
MAX_QUEUED_BYTES = 256 * 1024 * 1024
# LOOKUPs waiting on the tier; more are answered from the pool alone (a client cannot grow it).
MAX_PENDING = 1024

# (block hash, parent hash, bytes): what a tier stores and gives back.
Block = tuple[BlockHash, BlockHash | None, bytes]


class Tier:
    """A store below the pool. Both methods run on the tier's thread; raising is a miss."""

    def put(self, ns: Namespace, block: Block) -> None:
        """Keep a block evicted from the pool (or drop it: a tier may be full)."""
        raise NotImplementedError

    def get(self, ns: Namespace, hashes: Sequence[BlockHash],
            deadline_s: float | None = None) -> list[Block]:
        """The blocks of the longest stored prefix of hashes, root first. deadline_s (the
        TierLink's clock, time.monotonic by default): when the asker stops waiting."""
        raise NotImplementedError

    def snapshot(self) -> dict[str, Any]:
        """The tier's own counts, for STATS (none by default)."""
        return {}

    def close(self) -> None:
        """Let go of what the tier holds (after its thread stopped, or gave up waiting)."""


@dataclass
class MemoryTier(Tier):
    """FOR TESTS ONLY (`--tier memory`, `memory-slow:300ms`, `memory-failing`): a dict in the
    daemon's memory, unbounded, optionally slow or failing, to prove the seam with real daemons
    (tests/integration/test_tiers.py). Not a product tier: issue 12's directory is the first."""

    delay_s: float = 0.0  # each get() sleeps this long first: a slow tier, on its own thread
    is_failing: bool = False  # each get() raises: a tier that faults
    blocks: dict[tuple[Namespace, BlockHash], Block] = field(default_factory=dict)

    def put(self, ns: Namespace, block: Block) -> None:
        self.blocks[(ns, block[0])] = block

    def get(self, ns: Namespace, hashes: Sequence[BlockHash],
            deadline_s: float | None = None) -> list[Block]:
        if self.delay_s:
            time.sleep(self.delay_s)  # the tier's thread, never the loop's
        if self.is_failing:
            raise OSError("memory-failing: a test tier that always fails")
        found = []
        for block_hash in hashes:
            block = self.blocks.get((ns, block_hash))
            if block is None:
                break
            found.append(block)
        return found


_SLOW_RE = re.compile(r"memory-slow:(\d+(?:\.\d+)?)(ms|s)")


def make_tier(spec: str) -> Tier:
    """The tier a `--tier` value names; ValueError for an unknown one."""
    if spec == "memory":
        return MemoryTier()
    if spec == "memory-failing":
        return MemoryTier(is_failing=True)
    match = _SLOW_RE.fullmatch(spec)
    if match:
        return MemoryTier(delay_s=float(match[1]) / (1000 if match[2] == "ms" else 1))
    raise ValueError(f"unknown tier {spec!r} (test tiers: memory, memory-slow:300ms, "
                     f"memory-failing)")


@dataclass(slots=True)
class _Pending:
    """A LOOKUP waiting on the tier: who asked (opaque to this module) and until when."""

    asker: Any
    deadline_s: float
    blocks: list[Block] | None = None  # the tier's answer, once it came


class TierLink:
    """The loop's side of one tier: a worker thread, a pending table and a wake-up pipe.

    Loop-only methods: offer, ask, answered, expired, timeout_ms. The worker only reads its queue,
    calls the tier, and puts answers on the done queue, then writes a byte to the pipe."""

    def __init__(self, tier: Tier, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tier, self.timeout_s, self.clock = tier, timeout_s, clock
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[int, list[Block] | None]] = queue.SimpleQueue()
        self._pending: dict[int, _Pending] = {}  # insertion order is deadline order (one timeout)
        # Askers answered at their deadline while the tier was still working for them: what it
        # finds then still goes into the pool (take_late), for the next LOOKUP of that prefix.
        self._late: dict[int, Any] = {}
        self._late_blocks: list[tuple[Any, list[Block]]] = []
        self._next_id = 0
        self._queued_bytes = 0  # offered bytes the worker has not stored yet
        self._lock = threading.Lock()  # guards _queued_bytes only (the worker lowers it)
        self.wake_fd, self._wake_w = os.pipe()
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(self._wake_w, False)  # the worker never blocks on a full pipe
        self.counts = {"num_offered": 0, "num_not_offered": 0, "num_asked": 0,
                       "num_blocks_found": 0, "num_failed": 0, "num_timed_out": 0,
                       "num_blocks_late": 0}
        self._thread = threading.Thread(target=self._work, name="kvstore-tier", daemon=True)
        self._thread.start()

    # --- the loop's side -------------------------------------------------------------------
    def offer(self, ns: Namespace, block_hash: BlockHash, parent_hash: BlockHash | None,
              data: memoryview) -> None:
        """An evicted block: copied now, on the loop, so its slot can be reused at once (no
        use-after-free); dropped when MAX_QUEUED_BYTES are already waiting for the tier."""
        with self._lock:
            if self._queued_bytes + len(data) > MAX_QUEUED_BYTES:
                self.counts["num_not_offered"] += 1
                return
            self._queued_bytes += len(data)
        self.counts["num_offered"] += 1
        self._jobs.put(("put", ns, (block_hash, parent_hash, bytes(data))))

    def ask(self, asker: Any, ns: Namespace, hashes: Sequence[BlockHash]) -> bool:
        """Ask the tier for hashes (those past the pool's prefix) on behalf of asker; False when
        the pending table is full (then answer from the pool alone)."""
        if len(self._pending) >= MAX_PENDING:
            return False
        self._next_id += 1
        self._pending[self._next_id] = _Pending(asker, self.clock() + self.timeout_s)
        self.counts["num_asked"] += 1
        self._jobs.put(("get", self._next_id, ns, list(hashes)))
        return True

    def answered(self) -> list[tuple[Any, list[Block]]]:
        """After the wake fd was readable: the askers whose answers came, with the blocks (none
        when the tier failed). Blocks answered after their asker's deadline are kept for
        take_late()."""
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except BlockingIOError:
            pass
        out: list[tuple[Any, list[Block]]] = []
        while True:
            try:
                ask_id, blocks = self._done.get_nowait()
            except queue.Empty:
                return out
            pending = self._pending.pop(ask_id, None)
            if pending is None:  # past its deadline, already answered from the pool
                asker = self._late.pop(ask_id, None)
                if asker is not None and blocks:
                    self.counts["num_blocks_late"] += len(blocks)
                    self._late_blocks.append((asker, blocks))
                continue
            if blocks is None:
                self.counts["num_failed"] += 1
                blocks = []
            self.counts["num_blocks_found"] += len(blocks)
            out.append((pending.asker, blocks))

    def expired(self) -> list[Any]:
        """The askers whose deadline passed (answered from the pool alone: a late tier is a
        miss)."""
        now, out = self.clock(), list[Any]()
        while self._pending:
            ask_id, pending = next(iter(self._pending.items()))
            if pending.deadline_s > now:
                break
            del self._pending[ask_id]
            self.counts["num_timed_out"] += 1
            out.append(pending.asker)
            if len(self._late) >= MAX_PENDING:
                del self._late[next(iter(self._late))]  # bounded: its late blocks are dropped
            self._late[ask_id] = pending.asker
        return out

    def take_late(self) -> list[tuple[Any, list[Block]]]:
        """Blocks the tier found after their asker was answered, with that asker (who is not
        answered again): the server puts them into the pool."""
        late, self._late_blocks = self._late_blocks, []
        return late

    def timeout_ms(self, default_ms: int) -> int:
        """How long the loop may wait in poll: until the earliest deadline, at most default_ms."""
        if not self._pending:
            return default_ms
        first = next(iter(self._pending.values()))
        return max(0, min(default_ms, int((first.deadline_s - self.clock()) * 1000) + 1))

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "num_pending": len(self._pending), **self.tier.snapshot()}

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=1.0)  # a tier stuck in I/O is a daemon thread: left behind
        if not self._thread.is_alive():
            self.tier.close()
        os.close(self.wake_fd)
        os.close(self._wake_w)

    # --- the tier's thread -----------------------------------------------------------------
    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job[0] == "put":
                _, ns, block = job
                try:
                    self.tier.put(ns, block)
                except Exception:
                    log.exception("tier put failed (the block is dropped)")
                with self._lock:
                    self._queued_bytes -= len(block[2])
                continue
            _, ask_id, ns, hashes = job
            pending = self._pending.get(ask_id)  # a dict read: safe beside the loop's writes
            if pending is None or pending.deadline_s <= self.clock():
                # Its asker was (or is about to be) answered without it: no work for no one (a
                # backlog behind a slow tier). Its _late entry, if any, ages out (bounded).
                continue
            blocks: list[Block] | None = None
            try:
                blocks = self.tier.get(ns, hashes, pending.deadline_s)
            except Exception as exc:  # a fault is a miss
                log.warning("tier lookup failed: %s", exc)
            self._done.put((ask_id, blocks))
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # pipe full: the loop is already due to wake; closed: shutting down

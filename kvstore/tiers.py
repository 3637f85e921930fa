"""The seam for tiers below the pool (issue 11, item 5): blocks leaving the pool are offered to a
next tier, and a LOOKUP that runs past the pool's prefix is continued there.

A Tier's methods run on the tier's own thread and may block; the loop never waits on them. The
loop hands work over through TierLink (copies of evicted bytes, questions with a deadline) and is
woken by a pipe in its poller when an answer is ready. Nothing here touches the Store: the server
puts found blocks into the pool and answers the pending LOOKUP, or, for a tier that receives
bytes (the cluster's pulls), reserves and commits pool slots the tier writes into itself
(PoolWriter: the calls run on the loop, the tier's thread waits). Off unless `--tier` is set.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvstore.keys import BlockHash, Namespace, SlotId

log = logging.getLogger("kvstore.tiers")

# Evicted bytes copied on the loop and not yet taken by the tier. Beyond this an eviction is not
# offered (the tier is a cache: a block it never saw is a miss), so a slow tier bounds the
# daemon's extra memory and the loop's copying instead of growing a queue.
MAX_QUEUED_BYTES = 256 * 1024 * 1024
# LOOKUPs waiting on the tier; more are answered from the pool alone (a client cannot grow it).
MAX_PENDING = 1024

# (block hash, parent hash, bytes): what a tier stores and gives back. bytes None: the tier wrote
# the block into the pool itself (PoolWriter), nothing is left to copy.
Block = tuple[BlockHash, BlockHash | None, bytes | None]
# How long a tier's thread waits for the loop to run a PoolWriter call (the loop answers within a
# drain slice; past this it is stuck or stopping, and the tier's pull is a miss).
LOOP_CALL_TIMEOUT_S = 1.0


class Tier:
    """A store below the pool. Both methods run on the tier's thread; raising is a miss."""

    def put(self, ns: Namespace, block: Block) -> None:
        """Keep a block evicted from the pool (or drop it: a tier may be full)."""
        raise NotImplementedError

    def get(self, ns: Namespace, hashes: Sequence[BlockHash], deadline_s: float | None = None,
            writer: PoolWriter | None = None) -> list[Block]:
        """The blocks of the longest stored prefix of hashes, root first. deadline_s (the
        TierLink's clock, time.monotonic by default): when the asker stops waiting. writer (the
        server gives one): the tier may receive blocks straight into pool slots through it and
        answer them with bytes None."""
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

    def get(self, ns: Namespace, hashes: Sequence[BlockHash], deadline_s: float | None = None,
            writer: PoolWriter | None = None) -> list[Block]:
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


class Slots(Protocol):
    """The loop's side of PoolWriter (the server's, on its Store): run on the loop only. Rows
    are (hash, parent, nbytes); reserved slots are the tier's own (a reservation that outlives
    its deadline is fenced, never handed to another writer, until the tier names it again)."""

    def reserve(self, ns: Namespace, rows: Sequence[tuple[BlockHash, BlockHash | None, int]]
                ) -> list[tuple[SlotId, memoryview] | None]: ...
    def commit(self, ns: Namespace, rows: Sequence[tuple[BlockHash, SlotId]]) -> int: ...
    def abort(self, ns: Namespace, rows: Sequence[tuple[BlockHash, SlotId]]) -> None: ...


@dataclass(eq=False)
class _LoopCall:
    """A PoolWriter call waiting for the loop. The lock makes run-or-abandon atomic: the loop
    never runs a call its tier stopped waiting for, and the tier always sees one that ran."""

    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    result: Any = None
    is_abandoned: bool = False


class PoolWriter:
    """A tier's way to put the blocks it receives for one LOOKUP straight into pool slots (the
    bytes move once, from the socket into the slot; the loop copies nothing): reserve the next
    blocks of the chain, write into the views, then commit, or abort on any failure. Used on the
    tier's thread only; reserve waits for the loop, commit and abort are queued in order."""

    def __init__(self, link: TierLink, slots: Slots, ns: Namespace,
                 parent: BlockHash | None) -> None:
        self._link, self._slots, self.ns = link, slots, ns
        # The parent of the next block reserved, and of the first one since the last commit (an
        # abort goes back to it: another holder may be asked for the same blocks).
        self._parent = self._committed_parent = parent
        self._reserved: list[tuple[BlockHash, SlotId]] = []

    def reserve(self, rows: Sequence[tuple[BlockHash, int]]) -> list[memoryview | None]:
        """A slot's view for each (hash, nbytes), the chain's next blocks in order; None for a
        block the pool holds already and, once the pool has no room, for the rest. Raises
        TimeoutError when the loop does not answer within LOOP_CALL_TIMEOUT_S."""
        chained, parent = [], self._parent
        for block_hash, nbytes in rows:
            chained.append((block_hash, parent, nbytes))
            parent = block_hash
        self._parent = parent
        got = self._link.on_loop(lambda: self._slots.reserve(self.ns, chained), wait=True)
        views: list[memoryview | None] = []
        for (block_hash, _, _), slot in zip(chained, got):
            if slot is not None:
                self._reserved.append((block_hash, slot[0]))
            views.append(None if slot is None else slot[1])
        return views

    def commit(self) -> None:
        """Make every reserved block readable (before the LOOKUP is answered: the loop runs it
        first)."""
        rows, self._reserved = self._reserved, []
        self._committed_parent = self._parent
        if rows:
            self._link.on_loop(lambda: self._slots.commit(self.ns, rows), wait=False)

    def abort(self) -> None:
        """Give every reserved slot back (a failed or cut pull: nothing of it is readable)."""
        rows, self._reserved = self._reserved, []
        self._parent = self._committed_parent
        if rows:
            self._link.on_loop(lambda: self._slots.abort(self.ns, rows), wait=False)


def _drained(items: queue.SimpleQueue[Any]) -> list[Any]:
    """What items holds now, taken out (never waits)."""
    out = []
    while True:
        try:
            out.append(items.get_nowait())
        except queue.Empty:
            return out


def worker_of(block_hash: BlockHash, num_workers: int) -> int:
    """The worker thread a question whose chain starts at block_hash goes to (stable: crc32)."""
    return zlib.crc32(block_hash) % num_workers


@dataclass(slots=True)
class _Pending:
    """A LOOKUP waiting on the tier: who asked (opaque to this module) and until when."""

    asker: Any
    deadline_s: float


class TierLink:
    """The loop's side of one tier: a worker thread, a pending table and a wake-up pipe.

    Loop-only methods: offer, ask, run_calls, answered, expired, timeout_ms. The worker only
    reads its queue, calls the tier, and puts answers on the done queue (and PoolWriter calls on
    the calls queue), then writes a byte to the pipe. slots: the server's (None: tiers get no
    PoolWriter and hand bytes back)."""

    def __init__(self, tier: Tier, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic, slots: Slots | None = None,
                 num_workers: int = 1) -> None:
        self.tier, self.timeout_s, self.clock, self.slots = tier, timeout_s, clock, slots
        # A queue per worker thread: a question goes to worker_of() its first hash, so the same
        # chain asked twice is served in turn (the second finds the first's blocks in the pool)
        # and different chains side by side (a stalled holder holds up only its own worker).
        self._queues: list[queue.SimpleQueue[tuple[Any, ...] | None]] = [
            queue.SimpleQueue() for _ in range(num_workers)]
        self._done: queue.SimpleQueue[tuple[int, list[Block] | None]] = queue.SimpleQueue()
        self._calls: queue.SimpleQueue[_LoopCall] = queue.SimpleQueue()
        self._is_closing = False
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
                       "num_blocks_late": 0, "num_call_errors": 0}
        self._threads = [threading.Thread(target=self._work, args=(jobs,), daemon=True,
                                          name=f"kvstore-tier-{i}")
                         for i, jobs in enumerate(self._queues)]
        for thread in self._threads:
            thread.start()

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
        self._queues[0].put(("put", ns, (block_hash, parent_hash, bytes(data))))

    def ask(self, asker: Any, ns: Namespace, hashes: Sequence[BlockHash],
            parent: BlockHash | None = None) -> bool:
        """Ask the tier for hashes (those past the pool's prefix, whose last block is parent) on
        behalf of asker; False when the pending table is full (then answer from the pool
        alone)."""
        if len(self._pending) >= MAX_PENDING:
            return False
        self._next_id += 1
        self._pending[self._next_id] = _Pending(asker, self.clock() + self.timeout_s)
        self.counts["num_asked"] += 1
        jobs = self._queues[worker_of(hashes[0], len(self._queues))] if hashes else self._queues[0]
        jobs.put(("get", self._next_id, ns, list(hashes), parent))
        return True

    def run_calls(self) -> None:
        """Run the PoolWriter calls the tier's thread queued, in order (before answered(): a
        pull's commit lands before its LOOKUP is answered). A call that raises is logged and
        answers None (its tier takes that as a failed pull)."""
        for call in _drained(self._calls):
            with call.lock:
                if call.is_abandoned:
                    continue  # its tier gave up waiting: running it now would leak slots
                try:
                    call.result = call.fn()
                except Exception:  # a bug: counted (num_call_errors), the pull is a miss
                    self.counts["num_call_errors"] += 1
                    log.exception("a tier's pool call failed")
                call.done.set()

    def on_loop(self, fn: Callable[[], Any], wait: bool) -> Any:
        """The tier's thread: have the loop run fn; with wait, its result (TimeoutError when the
        loop does not run it within LOOP_CALL_TIMEOUT_S or is closing)."""
        call = _LoopCall(fn)
        self._calls.put(call)
        self._wake()
        if not wait:
            return None
        if not self._is_closing:
            call.done.wait(LOOP_CALL_TIMEOUT_S)
        with call.lock:
            if not call.done.is_set():
                call.is_abandoned = True
                raise TimeoutError("the daemon's loop did not answer the tier")
        if call.result is None:
            raise TimeoutError("the daemon's loop could not run the tier's call")
        return call.result

    def answered(self) -> list[tuple[Any, list[Block]]]:
        """After the wake fd was readable: run the PoolWriter calls queued, then the askers
        whose answers came, with the blocks (none when the tier failed). Blocks answered after
        their asker's deadline are kept for take_late()."""
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except BlockingIOError:
            pass
        done = _drained(self._done)
        # After taking the answers: a pull queues its commit before its answer, so each answer
        # taken finds its blocks committed (and reserve calls are answered on every wake).
        self.run_calls()
        out: list[tuple[Any, list[Block]]] = []
        for ask_id, blocks in done:
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
        return out

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
        self._is_closing = True  # no loop runs calls from now on: a tier waiting stops waiting
        for call in _drained(self._calls):
            with call.lock:
                call.is_abandoned = True
                call.done.set()  # result None: the tier's reserve fails, its pull is a miss
        for jobs in self._queues:
            jobs.put(None)
        give_up_at = time.monotonic() + 1.0  # a tier stuck in I/O is a daemon thread: left behind
        for thread in self._threads:
            thread.join(timeout=max(0.0, give_up_at - time.monotonic()))
        if not any(thread.is_alive() for thread in self._threads):
            self.tier.close()
        os.close(self.wake_fd)
        os.close(self._wake_w)

    # --- the tier's thread -----------------------------------------------------------------
    def _work(self, jobs: queue.SimpleQueue[tuple[Any, ...] | None]) -> None:
        while (job := jobs.get()) is not None:
            if job[0] == "put":
                _, ns, block = job
                try:
                    self.tier.put(ns, block)
                except Exception:
                    log.exception("tier put failed (the block is dropped)")
                with self._lock:
                    self._queued_bytes -= len(block[2])
                continue
            _, ask_id, ns, hashes, parent = job
            pending = self._pending.get(ask_id)  # a dict read: safe beside the loop's writes
            if pending is None or pending.deadline_s <= self.clock():
                # Its asker was (or is about to be) answered without it: no work for no one (a
                # backlog behind a slow tier). Its _late entry, if any, ages out (bounded).
                continue
            blocks: list[Block] | None = None
            writer = None if self.slots is None else PoolWriter(self, self.slots, ns, parent)
            try:
                blocks = self.tier.get(ns, hashes, pending.deadline_s, writer)
            except Exception as exc:  # a fault is a miss
                log.warning("tier lookup failed: %s", exc)
            if writer is not None:
                writer.abort()  # what the tier reserved and neither committed nor gave back
            self._done.put((ask_id, blocks))
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass  # pipe full: the loop is already due to wake; closed: shutting down

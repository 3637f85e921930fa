"""TierLink (kvstore/tiers.py) without a daemon: the bound on evicted bytes waiting for a slow
tier, the wake-up pipe, and deadlines from an injected clock."""

from __future__ import annotations

import select
import threading
import time

from kvstore import tiers
from kvstore.keys import BlockHash, Namespace
from kvstore.tiers import Block, MemoryTier, TierLink

NS = Namespace(b"m")


class _StuckTier(MemoryTier):
    """A tier whose put() waits until released: evictions pile up in front of it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def put(self, ns: Namespace, block: Block) -> None:
        self.release.wait(10)
        super().put(ns, block)


def test_evictions_beyond_the_queued_bytes_bound_are_not_offered(monkeypatch) -> None:
    monkeypatch.setattr(tiers, "MAX_QUEUED_BYTES", 300)
    tier = _StuckTier()
    link = TierLink(tier, timeout_s=5)
    try:
        for i in range(5):
            link.offer(NS, BlockHash(bytes([i])), None, memoryview(bytes(100)))
        assert link.counts["num_offered"] == 3 and link.counts["num_not_offered"] == 2
        tier.release.set()
        assert link.ask("asker", NS, [BlockHash(b"\x00"), BlockHash(b"\x01")])
        assert select.select([link.wake_fd], [], [], 10)[0]  # the worker woke the loop
        assert link.answered() == [("asker", [(b"\x00", None, bytes(100)),
                                              (b"\x01", None, bytes(100))])]
    finally:
        tier.release.set()
        link.close()


class _CountingTier(MemoryTier):
    """A slow tier that says when a get() starts and counts them."""

    def __init__(self) -> None:
        super().__init__(delay_s=0.2)
        self.started = threading.Event()
        self.num_gets = 0

    def get(self, ns: Namespace, hashes, deadline_s=None, writer=None):  # type: ignore[no-untyped-def]
        self.num_gets += 1
        self.started.set()
        return super().get(ns, hashes, deadline_s, writer)


def test_a_late_answer_is_dropped_after_its_deadline() -> None:
    """The first question's answer comes after its deadline and is dropped; the second, whose
    deadline passed while it waited behind the first, is never asked (no work for no one)."""
    now = [0.0]
    tier = _CountingTier()
    link = TierLink(tier, timeout_s=0.1, clock=lambda: now[0])
    try:
        assert link.ask("first", NS, [BlockHash(b"a")])
        assert link.ask("second", NS, [BlockHash(b"b")])
        assert tier.started.wait(10)  # the worker is inside the first get()
        assert link.timeout_ms(50) == 50  # no deadline before the loop's own wake-up
        assert link.expired() == []
        now[0] = 0.2
        assert link.timeout_ms(50) == 0
        assert link.expired() == ["first", "second"]
        assert select.select([link.wake_fd], [], [], 10)[0]
        assert link.answered() == []  # both already answered from the pool
        assert link.stats()["num_timed_out"] == 2 and link.stats()["num_pending"] == 0
    finally:
        link.close()
    assert tier.num_gets == 1  # close() joined the worker: the second was skipped


def test_blocks_found_after_the_deadline_are_kept_for_the_pool() -> None:
    """The asker was answered without them; the server still puts them into the pool."""
    now = [0.0]
    tier = _CountingTier()
    tier.blocks[(NS, BlockHash(b"a"))] = (BlockHash(b"a"), None, b"x")
    link = TierLink(tier, timeout_s=0.1, clock=lambda: now[0])
    try:
        assert link.ask("asker", NS, [BlockHash(b"a")])
        assert tier.started.wait(10)
        now[0] = 0.2
        assert link.expired() == ["asker"]
        assert select.select([link.wake_fd], [], [], 10)[0]
        assert link.answered() == []  # not answered twice
        assert link.take_late() == [("asker", [(b"a", None, b"x")])]
        assert link.take_late() == [] and link.stats()["num_blocks_late"] == 1
    finally:
        link.close()


class _Slots:
    """The loop's side of PoolWriter as a dict of slots (the server's is TierSlots, on a Store),
    recording what the loop ran, in order."""

    def __init__(self) -> None:
        self.memory = bytearray(1024)
        self.reserved: dict[int, tuple[BlockHash, BlockHash | None, int]] = {}
        self.stored: dict[BlockHash, tuple[BlockHash | None, bytes]] = {}
        self.log: list[str] = []

    def reserve(self, ns, rows):  # type: ignore[no-untyped-def]
        out = []
        for row in rows:
            slot = len(self.reserved) * 64
            self.reserved[slot] = row
            out.append((slot, memoryview(self.memory)[slot:slot + row[2]]))
        self.log.append("reserve")
        return out

    def commit(self, ns, rows):  # type: ignore[no-untyped-def]
        for block_hash, slot in rows:
            _, parent, nbytes = self.reserved.pop(slot)
            self.stored[block_hash] = (parent, bytes(self.memory[slot:slot + nbytes]))
        self.log.append("commit")
        return len(rows)

    def abort(self, ns, rows):  # type: ignore[no-untyped-def]
        for _, slot in rows:
            del self.reserved[slot]
        self.log.append("abort")


class _WritingTier(MemoryTier):
    """Receives its blocks straight into pool slots through the PoolWriter, in two reserves (as a
    pull whose reply came in two messages); fails before committing when told to."""

    def __init__(self, is_failing_late: bool = False) -> None:
        super().__init__()
        self.is_failing_late = is_failing_late

    def get(self, ns, hashes, deadline_s=None, writer=None):  # type: ignore[no-untyped-def]
        assert writer is not None
        for part in (hashes[:1], hashes[1:]):
            for block_hash, view in zip(part, writer.reserve([(h, 3) for h in part])):
                view[:] = block_hash * 3
        if self.is_failing_late:
            raise OSError("the stream was cut")
        writer.commit()
        return [(h, None, None) for h in hashes]


def _serve_loop(link: TierLink, stop: threading.Event) -> threading.Thread:
    """The server loop's part: run the tier's calls and collect answers when woken."""
    answers: list = []

    def loop() -> None:
        while not stop.is_set():
            if select.select([link.wake_fd], [], [], 0.05)[0]:
                answers.extend(link.answered())

    thread = threading.Thread(target=loop, daemon=True)
    thread.answers = answers  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_a_tier_writes_into_reserved_slots_and_its_commit_lands_before_its_answer() -> None:
    slots, stop = _Slots(), threading.Event()
    link = TierLink(_WritingTier(), timeout_s=10, slots=slots)
    loop = _serve_loop(link, stop)
    try:
        assert link.ask("asker", NS, [BlockHash(b"a"), BlockHash(b"b")], BlockHash(b"root"))
        deadline = time.monotonic() + 10
        while not loop.answers and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
        assert loop.answers == [("asker", [(b"a", None, None), (b"b", None, None)])]  # type: ignore[attr-defined]
        # Chained parents across the two reserves; the bytes written in place, committed.
        assert slots.stored == {b"a": (b"root", b"aaa"), b"b": (b"a", b"bbb")}
        assert slots.log == ["reserve", "reserve", "commit"] and not slots.reserved
    finally:
        stop.set()
        loop.join(10)  # before close() closes the pipe it reads
        link.close()


def test_slots_of_a_failed_tier_call_are_given_back() -> None:
    slots, stop = _Slots(), threading.Event()
    link = TierLink(_WritingTier(is_failing_late=True), timeout_s=10, slots=slots)
    loop = _serve_loop(link, stop)
    try:
        assert link.ask("asker", NS, [BlockHash(b"a"), BlockHash(b"b")])
        deadline = time.monotonic() + 10
        while not loop.answers and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
        assert loop.answers == [("asker", [])]  # type: ignore[attr-defined]
        assert slots.log == ["reserve", "reserve", "abort"]
        assert not slots.reserved and not slots.stored
    finally:
        stop.set()
        loop.join(10)  # before close() closes the pipe it reads
        link.close()


def test_a_reserve_the_loop_does_not_run_in_time_is_never_run(monkeypatch) -> None:
    """The tier stops waiting (the loop is stuck); when the loop runs its calls later, the
    abandoned reserve is skipped: no slot is reserved that nobody would commit or abort."""
    monkeypatch.setattr(tiers, "LOOP_CALL_TIMEOUT_S", 0.05)
    slots = _Slots()
    link = TierLink(_WritingTier(), timeout_s=10, slots=slots)
    try:
        assert link.ask("asker", NS, [BlockHash(b"a")])
        assert select.select([link.wake_fd], [], [], 10)[0]  # the reserve is queued...
        deadline = time.monotonic() + 10
        while link._done.empty() and time.monotonic() < deadline:  # ...and given up on
            time.sleep(0.01)
        assert link.answered() == [("asker", [])]  # the failed tier call: a miss
        assert slots.log == [] and not slots.reserved
    finally:
        link.close()


def test_close_ends_a_tier_waiting_on_the_loop_at_once(monkeypatch) -> None:
    monkeypatch.setattr(tiers, "LOOP_CALL_TIMEOUT_S", 30.0)
    link = TierLink(_WritingTier(), timeout_s=60, slots=_Slots())
    assert link.ask("asker", NS, [BlockHash(b"a")])
    assert select.select([link.wake_fd], [], [], 10)[0]  # the tier waits for its reserve
    started = time.monotonic()
    link.close()
    assert time.monotonic() - started < 5.0
    assert not any(thread.is_alive() for thread in link._threads)

"""TierLink (kvstore/tiers.py) without a daemon: the bound on evicted bytes waiting for a slow
tier, the wake-up pipe, and deadlines from an injected clock."""

from __future__ import annotations

import select
import threading

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

    def get(self, ns: Namespace, hashes, deadline_s=None):  # type: ignore[no-untyped-def]
        self.num_gets += 1
        self.started.set()
        return super().get(ns, hashes, deadline_s)


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

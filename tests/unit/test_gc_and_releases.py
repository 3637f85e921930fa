"""Two things that keep work off the loop's latency (issue 10): Python's full GC passes run only
when the daemon's loop says so (kvstore/gcpolicy.py), and a very large message's frames are let go
a slice at a time (kvstore/releases.py), over real ZeroMQ frames."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import zmq

from kvstore import gcpolicy
from kvstore.releases import Releases

MiB = 1 << 20


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_settle_leaves_full_passes_to_the_loop_and_they_still_free_cycles(restored_gc) -> None:
    passes = gcpolicy.settle()
    assert gc.get_freeze_count() > 0, "startup's objects were not frozen"
    assert gc.get_threshold()[2] >= 2**30, "automatic full passes are still on"
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # a cycle: only the cyclic collector frees it
    gc.collect(1)  # survivors of a young pass: now in the old generation, like the index
    gone = weakref.ref(a)
    del a, b
    gc.collect(1)  # young passes (still automatic) never reach it
    passes.collect_if_due(passes.next_s - 1)
    assert gone() is not None, "a full pass ran before it was due"
    passes.collect_if_due(passes.next_s)
    assert gone() is None, "the loop's full pass left a cycle behind"


def test_frames_are_let_go_a_slice_at_a_time_and_trimmed_after_each() -> None:
    trims: list[int] = []
    releases = Releases(lambda: trims.append(1), slice_bytes=4 * MiB)
    frames = [zmq.Frame(bytes(MiB)) for _ in range(10)]
    tracked = [weakref.ref(f) for f in frames]
    releases.add(frames)
    del frames
    assert releases.is_pending
    assert releases.step() and sum(r() is None for r in tracked) == 4 and len(trims) == 1
    assert releases.step() and sum(r() is None for r in tracked) == 8
    assert not releases.step() and all(r() is None for r in tracked)
    assert len(trims) == 3 and not releases.is_pending


def test_a_message_dropped_as_read_is_trimmed_at_the_next_step() -> None:
    trims: list[int] = []
    releases = Releases(lambda: trims.append(1))
    releases.add([])  # an oversized message: its frames were dropped as they were read
    assert releases.is_pending
    assert not releases.step() and trims == [1] and not releases.is_pending

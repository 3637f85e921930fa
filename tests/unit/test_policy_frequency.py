"""The frequency-aware leaf-first policy (freq-lru): what it adds to leaf-first LRU.

The contract every policy keeps is in tests/unit/test_policy.py (TestFrequencyLRUContract) and the
Store invariants in tests/unit/test_store_stateful.py; the workload-level effect in
tests/unit/test_sim.py and bench/eviction.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.policy import FrequencyLRU
from tests.unit.test_policy import Tree


def hit(tree: Tree, name: str, times: int = 1) -> None:
    for _ in range(times):
        tree.policy.touch(tree.entries[name])


def test_block_hit_by_several_requests_outlives_newer_unhit_blocks() -> None:
    """A block hit protect_hits times goes after every block hit fewer times, however recent."""
    tree = Tree(FrequencyLRU)
    tree.add("hot")
    hit(tree, "hot", 2)
    for name in "abc":
        tree.add(name)
    assert tree.victim_names() == ["a", "b", "c", "hot"]


def test_one_hit_is_only_recency() -> None:
    """Below the threshold the order is plain leaf-first LRU: one hit makes a block most recent."""
    tree = Tree(FrequencyLRU)
    tree.add("once")
    tree.add("a")
    hit(tree, "once")
    tree.add("b")
    assert tree.victim_names() == ["a", "once", "b"]


def test_protected_parent_still_waits_for_its_children() -> None:
    """Leaf-first holds across segments: an unprotected child goes before its protected parent,
    and the parent itself only after every unprotected block."""
    tree = Tree(FrequencyLRU)
    tree.add("sys")
    hit(tree, "sys", 3)
    tree.add("tail", "sys")
    tree.add("doc")
    assert tree.victim_names() == ["tail", "doc", "sys"]
    assert tree.drain() == ["tail", "doc", "sys"]


def test_protected_segment_is_bounded_and_demotes_its_least_recent_block() -> None:
    """With half the entries protected at most, promoting one more demotes the oldest protected."""
    tree = Tree(FrequencyLRU)
    for name in "abcd":
        tree.add(name)
    hit(tree, "a", 2)
    hit(tree, "b", 2)  # two of four entries: the segment is full
    hit(tree, "c", 2)  # promotes c, demotes a (least recently hit of the protected)
    assert tree.victim_names() == ["d", "a", "b", "c"]
    hit(tree, "a")  # one more hit protects a again, demoting b
    assert tree.victim_names() == ["d", "b", "c", "a"]


def test_removed_block_forgets_its_hits() -> None:
    """Counts belong to a resident block; a block stored again starts from zero."""
    tree = Tree(FrequencyLRU)
    entry = tree.add("x")
    hit(tree, "x", 2)
    tree.evict(entry)
    tree.add("y")
    tree.add("x2")
    hit(tree, "x2")
    assert len(tree.policy) == 2
    assert tree.victim_names() == ["y", "x2"]


@pytest.mark.parametrize("kwargs", [{"protect_hits": 0}, {"protected_fraction": 0.0},
                                    {"protected_fraction": 1.5}])
def test_bad_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        FrequencyLRU(**kwargs)


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 12), fraction=st.sampled_from([0.1, 0.25, 0.5, 1.0]),
       batches=st.lists(st.lists(st.integers(0, 11), max_size=14), max_size=8),
       num_removed=st.integers(0, 4))
def test_touch_many_equals_touch_in_turn(num_blocks: int, fraction: float,
                                         batches: list[list[int]], num_removed: int) -> None:
    """touch_many (a lookup's hits in one call, kvstore/store.py _touch) leaves the same order,
    hit counts and protected segment as touch() on each entry in turn, also with a protected
    segment over its limit after removals (touch() trims only after a promotion)."""
    one, many = Tree(FrequencyLRU), Tree(FrequencyLRU)
    for tree in (one, many):
        tree.policy.protected_fraction = fraction
        for i in range(num_blocks):
            tree.add(f"b{i}")
    for batch_no, batch in enumerate(batches):
        names = [f"b{i}" for i in batch if f"b{i}" in one.entries]
        for name in names:
            one.policy.touch(one.entries[name])
        many.policy.touch_many([many.entries[n] for n in names])
        if batch_no == 1:  # shrink the pool: the protected limit drops under its size
            for tree in (one, many):
                for name in sorted(tree.entries)[:num_removed]:
                    tree.policy.remove(tree.entries.pop(name))

        def state(tree: Tree) -> tuple[list[str], list[str], list[int]]:
            names_of = {id(e): n for n, e in tree.entries.items()}
            policy = tree.policy
            assert isinstance(policy, FrequencyLRU)
            return ([names_of[k] for k in policy._order], [names_of[k] for k in policy._protected],
                    [policy._num_hits[id(tree.entries[n])] for n in sorted(tree.entries)])
        assert state(one) == state(many)

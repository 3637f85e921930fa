"""The Store's counts behind STATS and /metrics: per-namespace blocks and bytes, slot bytes,
reservations, reclaimed writes, lookup hit counts and the hottest prefixes."""

from __future__ import annotations

from kvstore.keys import Namespace
from kvstore.slabs import Slabs
from kvstore.store import Limits, Store
from tests.unit.test_store import LARGE_BYTES, NS, SMALL_BYTES, h, make_store, put
from tests.unit.test_store_stateful import FakeClock

OTHER = Namespace(b"other", 0)


def occupancy_agrees(store: Store) -> None:
    """The counts kept as blocks come and go equal a full scan of the index and slabs."""
    occ = store.occupancy()
    assert store.num_blocks == occ["num_blocks"]
    assert store.num_reserved == occ["num_reserved"]
    assert store.slot_bytes_used == occ["used_bytes"] == sum(
        store.slabs.slot_bytes_for(n) for n in _slot_sizes(store))
    assert sum(s.num_blocks for s in store.stats.values()) == occ["num_blocks"]


def _slot_sizes(store: Store) -> list[int]:
    return [e.nbytes for t in store.index.tables.values() for e in t.values()]


def test_counts_follow_commits_evictions_invalidation_and_expiry() -> None:
    """num_blocks, num_bytes and slot bytes rise on commit and fall on every way out."""
    store, clock = make_store(num_pages=2, reserve_s=5.0)
    put(store, [("a", None), ("b", "a"), ("c", "b")])
    put(store, [("x", None)], ns=OTHER)
    assert (store.stats[NS.name].num_blocks, store.stats[NS.name].num_bytes) == (3, 3 * SMALL_BYTES)
    assert store.stats[OTHER.name].num_blocks == 1
    occupancy_agrees(store)
    store.reserve(NS, [(h("r"), None, LARGE_BYTES)])  # the second page: one large slot
    assert store.num_reserved == 1
    occupancy_agrees(store)
    clock.advance(6.0)
    store.expire()  # the reservation was abandoned: reclaimed, counted as a timeout
    assert (store.num_reclaimed, store.num_reserved) == (1, 0)
    occupancy_agrees(store)
    put(store, [("big", None)], nbytes=LARGE_BYTES)
    put(store, [("big2", None)], nbytes=LARGE_BYTES)  # evicts the small page's blocks
    assert store.stats[NS.name].num_evictions + store.stats[OTHER.name].num_evictions == 4
    occupancy_agrees(store)
    assert store.invalidate(NS.name) == 2  # the two large blocks
    assert store.stats[NS.name].num_blocks == 0 and store.stats[NS.name].num_bytes == 0
    occupancy_agrees(store)


def test_slot_of_a_leased_block_counts_until_the_lease_ends() -> None:
    """An invalidated block still pinned by a lease keeps its slot bytes until unpinned."""
    store, _ = make_store()
    put(store, [("a", None)])
    _, lease = store.pin(NS, [h("a")])
    assert lease is not None
    store.invalidate(NS.name)
    assert store.num_blocks == 0 and store.slot_bytes_used == store.slabs.slot_bytes_for(SMALL_BYTES)
    assert store.unpin(lease)
    assert store.slot_bytes_used == 0


def test_record_lookup_counts_requests_hits_and_misses() -> None:
    """record_lookup adds one request and the asked blocks split into found and not found."""
    store, _ = make_store()
    store.record_lookup(NS, num_asked=5, num_hits=3)
    store.record_lookup(NS, num_asked=2, num_hits=0)
    stats = store.stats[NS.name]
    assert (stats.num_lookups, stats.num_hits, stats.num_misses) == (2, 3, 4)


def test_hottest_lists_the_deepest_block_of_a_prefix_read_together() -> None:
    """A chain read as a whole is one prefix (its deepest block); a shorter hot root is another."""
    store, _ = make_store(num_pages=2)
    put(store, [("sys", None), ("q1", "sys"), ("q1b", "q1"), ("q2", "sys")])
    for _ in range(3):
        store.unpin(store.pin(NS, [h("sys"), h("q1"), h("q1b")])[1])
    store.unpin(store.pin(NS, [h("sys"), h("q2")])[1])
    hot = store.hottest(NS.name, 5)
    # sys was read 4 times, more than any child: a prefix of its own, of one block.
    assert [(p.block_hash, p.num_hits, p.num_blocks) for p in hot] == [
        (h("sys"), 4, 1), (h("q1b"), 3, 3), (h("q2"), 1, 2)]
    assert store.hottest(NS.name, 1) == hot[:1]
    assert store.hottest(OTHER.name, 5) == []


def test_hottest_forgets_evicted_blocks() -> None:
    """Read counts live on resident blocks only: gone with the block, nothing grows."""
    store, _ = make_store()
    put(store, [("a", None)])
    store.unpin(store.pin(NS, [h("a")])[1])
    assert store.hottest(NS.name, 5)[0].num_hits == 1
    store.invalidate(NS.name)
    assert store.hottest(NS.name, 5) == []
    put(store, [("a", None)])
    assert store.hottest(NS.name, 5) == [], "a re-stored block starts with no reads"


def test_namespace_counters_beyond_the_bound_are_pooled(monkeypatch) -> None:
    """More namespace names than MAX_NAMESPACE_STATS share one pooled row, still counted."""
    monkeypatch.setattr("kvstore.store.MAX_NAMESPACE_STATS", 2)
    store = Store(Slabs(0, 4, 4096), limits=Limits(), clock=FakeClock())
    for i in range(4):
        put(store, [("a", None)], ns=Namespace(f"m{i}".encode()))
    assert set(store.stats) == {b"m0", b"m1", b""}
    assert store.stats[b""].num_blocks == 2
    occupancy_agrees(store)

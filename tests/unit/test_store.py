"""Store scenarios the state machine reaches rarely or not at all, each pinned down by name."""

from __future__ import annotations

from kvstore.keys import BlockHash, Namespace
from kvstore.slabs import Slabs
from kvstore.store import Limits, Store
from tests.unit.test_store_stateful import FakeClock

NS = Namespace(b"model", 0)
PAGE_BYTES = 4096
SMALL_BYTES = 1000  # a 1024-byte slot: four per page
LARGE_BYTES = 4000  # a 4032-byte slot: one per page


def h(name: str) -> BlockHash:
    return BlockHash(name.encode())


def make_store(num_pages: int = 1, **limits: float | None) -> tuple[Store, FakeClock]:
    clock = FakeClock()
    store = Store(Slabs(0, num_pages, PAGE_BYTES), limits=Limits(**limits), clock=clock)
    return store, clock


def put(store: Store, blocks: list[tuple[str, str | None]], nbytes: int = SMALL_BYTES,
        ns: Namespace = NS) -> list[int | None]:
    """Reserve and commit (hash, parent) blocks root first, like a PUT; returns the slots."""
    result = store.reserve(ns, [(h(b), None if p is None else h(p), nbytes) for b, p in blocks])
    for (block, _), slot in zip(blocks, result.slots):
        if slot is not None:
            assert store.commit(ns, h(block), slot)
    return result.slots


def test_reserved_block_is_invisible_until_committed() -> None:
    """A lookup does not see a reserved block; after commit it does."""
    store, _ = make_store()
    slot = store.reserve(NS, [(h("a"), None, SMALL_BYTES)]).slots[0]
    assert slot is not None
    assert store.lookup(NS, [h("a")]) == 0
    assert store.commit(NS, h("a"), slot)
    assert store.lookup(NS, [h("a")]) == 1


def test_lookup_counts_only_a_consecutive_prefix() -> None:
    """A gap in the chain ends the hit, even when later blocks are stored."""
    store, _ = make_store()
    put(store, [("a", None), ("b", "a"), ("c", "b")])
    assert store.lookup(NS, [h("a"), h("b"), h("c")]) == 3
    assert store.lookup(NS, [h("a"), h("x"), h("c")]) == 1
    assert store.lookup(NS, [h("b"), h("c")]) == 2  # a prefix of the hashes asked for
    assert store.lookup(Namespace(b"model", 1), [h("a")]) == 0  # another epoch is another model


def test_abandoned_reservation_is_reclaimed_after_its_deadline() -> None:
    """expire() frees a reservation past reserve_s, and a late commit is refused."""
    store, clock = make_store(reserve_s=10.0)
    slot = store.reserve(NS, [(h("a"), None, SMALL_BYTES)]).slots[0]
    assert slot is not None
    clock.advance(9.0)
    assert store.expire() == 0
    clock.advance(1.0)
    assert store.expire() == 1
    assert store.slabs.num_slots_used() == 0
    assert not store.commit(NS, h("a"), slot)


def test_lease_expires_on_its_own_and_is_clamped_to_max_lease() -> None:
    """A lease asked for longer than max_lease_s ends at max_lease_s."""
    store, clock = make_store(lease_s=5.0, max_lease_s=8.0)
    put(store, [("a", None)])
    entries, lease = store.pin(NS, [h("a")], lease_s=100.0)
    assert lease is not None and entries[0].num_pins == 1
    clock.advance(7.9)
    assert store.expire() == 0
    clock.advance(0.1)
    assert store.expire() == 1
    assert entries[0].num_pins == 0
    assert not store.unpin(lease)


def test_ttl_expires_committed_blocks() -> None:
    """With ttl_s set a block stops being a hit at its expiry and expire() drops it."""
    store, clock = make_store(ttl_s=30.0)
    put(store, [("a", None)])
    clock.advance(29.0)
    assert store.lookup(NS, [h("a")]) == 1
    clock.advance(1.0)
    assert store.lookup(NS, [h("a")]) == 0
    assert store.expire() == 1
    assert store.slabs.num_slots_used() == 0


def test_lookup_ends_at_a_block_past_its_ttl_that_expire_has_not_dropped() -> None:
    """A chain stops at its first block past the TTL, whether or not expire() removed it yet (a
    sliced expiry leaves some for later), and a reserved block is never a hit."""
    store, clock = make_store(ttl_s=30.0)
    put(store, [("a", None)])
    clock.advance(10.0)
    put(store, [("b", "a"), ("c", "b")])
    clock.advance(20.0)  # a is due now, b and c are not
    assert store.lookup(NS, [h("a"), h("b"), h("c")]) == 0
    assert store.lookup(NS, [h("b"), h("c")]) == 2
    store.reserve(NS, [(h("d"), h("c"), SMALL_BYTES)])
    assert store.lookup(NS, [h("b"), h("c"), h("d")]) == 2
    clock.advance(10.0)  # b and c are due too; expire() drops one of the three, by its budget
    assert store.expire(1) == 1
    assert store.lookup(NS, [h("b"), h("c")]) == 0
    assert store.lookup(NS, [h("c")]) == 0


def test_pinned_block_keeps_its_slot_through_invalidate_until_unpinned() -> None:
    """Invalidate hides a leased block but its slot is not reused before the lease ends."""
    store, _ = make_store()
    (slot,) = put(store, [("a", None)])
    entries, lease = store.pin(NS, [h("a")])
    assert store.invalidate(NS.name) == 1
    assert store.lookup(NS, [h("a")]) == 0
    new_slots = put(store, [(f"n{i}", None) for i in range(4)])
    assert slot not in new_slots and new_slots.count(None) == 1  # three free slots, one held
    assert lease is not None and store.unpin(lease)
    assert store.slabs.num_slots_used() == 3


def test_invalidate_below_epoch_keeps_newer_epochs() -> None:
    """invalidate(name, below_epoch) drops only older epochs of that name."""
    store, _ = make_store()
    for epoch in range(3):
        put(store, [("a", None)], ns=Namespace(NS.name, epoch))
    put(store, [("a", None)], ns=Namespace(b"other", 0))
    assert store.invalidate(NS.name, below_epoch=2) == 2
    assert store.lookup(Namespace(NS.name, 2), [h("a")]) == 1
    assert store.lookup(Namespace(b"other", 0), [h("a")]) == 1
    assert store.invalidate(NS.name) == 1


def test_full_pool_of_pinned_blocks_refuses_and_changes_nothing() -> None:
    """reserve returns None with num_full when every slot is pinned, and evicts nothing."""
    store, _ = make_store()
    put(store, [("a", None), ("b", "a"), ("c", "b"), ("d", "c")])
    _, lease = store.pin(NS, [h("a"), h("b"), h("c"), h("d")])
    result = store.reserve(NS, [(h("x"), None, SMALL_BYTES), (h("y"), h("x"), SMALL_BYTES)])
    assert result.slots == [None, None] and result.num_full == 2
    assert store.lookup(NS, [h("a"), h("b"), h("c"), h("d")]) == 4
    assert store.num_evictions == 0


def test_chain_filling_the_pool_is_evicted_for_another_size_class() -> None:
    """A large block evicts a whole unpinned chain, leaf first, to free a page."""
    store, _ = make_store()
    put(store, [("a", None), ("b", "a"), ("c", "b"), ("d", "c")])
    result = store.reserve(NS, [(h("big"), None, LARGE_BYTES)])
    assert result.num_full == 0 and result.slots[0] is not None
    assert store.num_evictions == 4
    assert store.lookup(NS, [h("a")]) == 0


def test_pinned_leaf_keeps_its_whole_chain_against_another_size_class() -> None:
    """With the chain's leaf leased, nothing of it may go: the large block is refused."""
    store, _ = make_store()
    put(store, [("a", None), ("b", "a"), ("c", "b"), ("d", "c")])
    _, lease = store.pin(NS, [h("a"), h("b"), h("c"), h("d")])
    assert store.reserve(NS, [(h("big"), None, LARGE_BYTES)]).num_full == 1
    assert store.num_evictions == 0
    assert lease is not None and store.unpin(lease)
    assert store.reserve(NS, [(h("big"), None, LARGE_BYTES)]).num_full == 0


def test_parent_committed_after_its_child_counts_the_child() -> None:
    """Two writers: the child commits before the shared parent, which still becomes its parent."""
    store, _ = make_store()
    parent_slot = store.reserve(NS, [(h("p"), None, SMALL_BYTES)]).slots[0]  # writer 1
    second = store.reserve(NS, [(h("p"), None, SMALL_BYTES), (h("c"), h("p"), SMALL_BYTES)])
    assert second.slots[0] is None and second.slots[1] is not None  # writer 2: p is in flight
    assert store.commit(NS, h("c"), second.slots[1])
    assert parent_slot is not None and store.commit(NS, h("p"), parent_slot)
    parent, child = store.index.get((NS, h("p"))), store.index.get((NS, h("c")))
    assert parent.num_children == 1 and child.parent is parent
    assert [e.key[1] for e in store.policy.victims()] == [b"c", b"p"]


def test_re_stored_parent_adopts_children_that_outlived_it() -> None:
    """A parent that expired before its child and is stored again counts the child again."""
    store, clock = make_store(ttl_s=10.0)
    put(store, [("p", None)])
    clock.advance(5.0)
    put(store, [("c", "p")])
    clock.advance(5.0)
    assert store.expire() == 1  # p only
    assert store.index.get((NS, h("c"))).parent is None
    put(store, [("p", None)])
    assert store.index.get((NS, h("p"))).num_children == 1
    assert store.lookup(NS, [h("p"), h("c")]) == 2


def test_block_naming_itself_as_parent_can_still_be_evicted() -> None:
    """A pool filled with self-parented blocks (bad client input) still accepts new blocks."""
    store, _ = make_store()
    put(store, [(f"s{i}", f"s{i}") for i in range(4)])
    assert store.slabs.num_slots_used() == 4
    assert all(e.num_children == 0 for e in store.index.tables[NS].values())
    result = store.reserve(NS, [(h("new"), None, SMALL_BYTES)])
    assert result.num_full == 0 and store.num_evictions == 1


def test_hash_cycle_from_client_input_never_locks_blocks() -> None:
    """Blocks whose parents form a cycle are still evicted when room is needed."""
    store, _ = make_store()
    put(store, [("x", "y")])
    put(store, [("y", "x")])
    assert sum(e.num_children for e in store.index.tables[NS].values()) <= 1
    assert store.reserve(NS, [(h("big"), None, LARGE_BYTES)]).num_full == 0
    assert store.num_evictions == 2


def test_lease_naming_a_block_twice_pins_it_once_and_frees_its_slot_once() -> None:
    """A lookup repeating a hash matches up to the repeat (a chain never names a block twice):
    the block is pinned once, and unpinning after invalidate frees its slot once (issue 10)."""
    store, _ = make_store()
    put(store, [("a", None), ("b", None)])
    entries, lease = store.pin(NS, [h("a"), h("a"), h("b")])
    assert len(entries) == 1 and entries[0].num_pins == 1
    store.invalidate(NS.name)
    assert lease is not None and store.unpin(lease)
    assert store.slabs.num_slots_used() == 0
    slots = put(store, [(f"n{i}", None) for i in range(4)])
    assert None not in slots and len(set(slots)) == 4  # no slot handed out twice


def test_expired_lease_naming_a_block_twice_frees_its_slot_once() -> None:
    """The same holds when the lease ends by expiry instead of unpin."""
    store, clock = make_store(lease_s=1.0)
    put(store, [("a", None)])
    store.pin(NS, [h("a"), h("a")])
    store.invalidate(NS.name)
    clock.advance(1.0)
    assert store.expire() == 1
    assert store.slabs.num_slots_used() == 0


def test_occupancy_counts_blocks_reservations_and_leases() -> None:
    """occupancy() reports what the index and slabs hold."""
    store, _ = make_store(num_pages=2)
    put(store, [("a", None), ("b", "a")])
    store.reserve(NS, [(h("r"), None, LARGE_BYTES)])
    store.pin(NS, [h("a")])
    occ = store.occupancy()
    assert (occ["num_blocks"], occ["num_reserved"], occ["num_leases"]) == (2, 1, 1)
    assert (occ["num_slots_used"], occ["num_pages"], occ["num_free_pages"]) == (3, 2, 0)
    assert occ["bytes_stored"] == 2 * SMALL_BYTES + LARGE_BYTES


def test_unexpiring_leases_leave_no_rows_behind() -> None:
    """Leases with no deadline (the daemon's zero-copy sends) do not grow the expiry heap."""
    store, _ = make_store()
    put(store, [("a", None)])
    entry = store.index.get((NS, h("a")))
    for _ in range(100):
        assert store.unpin(store.index.pin([entry], float("inf")))
    assert len(store.index._lease_heap) == 0 and not store.index.leases


def test_chain_saved_in_parts_keeps_its_head_when_the_pool_fills() -> None:
    """A prompt longer than the pool, saved one chunk per call, keeps its first blocks.

    The ancestors are not in the later calls' lists; evicting them would leave every new block
    unreachable, so the pool refuses the tail instead (the CI failure of 2026-12-02: an e2e
    test loaded 0 blocks from a full pool).
    """
    store, _ = make_store()
    put(store, [("a", None), ("b", "a")])
    put(store, [("c", "b"), ("d", "c")])
    result = store.reserve(NS, [(h("e"), h("d"), SMALL_BYTES), (h("f"), h("e"), SMALL_BYTES)])
    assert result.slots == [None, None] and result.num_full == 2
    assert store.num_evictions == 0
    assert store.lookup(NS, [h(b) for b in "abcd"]) == 4
    assert all(e.num_pins == 0 for t in store.index.tables.values() for e in t.values())


def test_another_chain_still_evicts_an_unrelated_one() -> None:
    """The guard covers only the chain being written: other chains are evicted as before."""
    store, _ = make_store()
    put(store, [("a", None), ("b", "a")])
    put(store, [("x", None), ("y", "x")])
    slots = put(store, [("c", "b"), ("d", "c")])
    assert None not in slots
    assert store.lookup(NS, [h(b) for b in "abcd"]) == 4
    assert store.lookup(NS, [h("x")]) == 0


def test_invalidate_in_slices_hides_blocks_at_once_and_frees_them_slice_by_slice() -> None:
    """begin_invalidate() counts and hides a namespace's blocks; drain_invalidated(n) removes at
    most n per call, and blocks written to the namespace meanwhile are kept."""
    store, _ = make_store(num_pages=8)
    put(store, [(f"b{i}", None) for i in range(6)])
    assert store.begin_invalidate(NS.name) == 6
    assert store.lookup(NS, [h("b0")]) == 0 and store.occupancy()["num_blocks"] == 6
    put(store, [("b0", None)])  # rewritten while the old one waits to be removed
    assert store.drain_invalidated(4) and store.num_blocks == 3
    assert not store.drain_invalidated(4)
    assert store.num_blocks == 1 and store.lookup(NS, [h("b0")]) == 1
    assert store.slabs.num_slots_used() == 1 and store.bytes_stored == SMALL_BYTES


def test_mass_expiry_runs_in_slices() -> None:
    """expire(max_items) removes at most that many expired blocks a call; the rest stay due."""
    store, clock = make_store(num_pages=8, ttl_s=1.0)
    put(store, [(f"b{i}", None) for i in range(5)])
    clock.advance(1.0)
    assert store.expire(2) == 2 and store.num_blocks == 3
    assert store.expire(2) == 2 and store.expire(2) == 1 and store.num_blocks == 0
    assert store.slabs.num_slots_used() == 0


# --- a new size class in a full pool (issue 10: bounded work per message) ----------------------
TINY_BYTES = 64  # 64 slots per page with a 64-byte minimum slot
CAP = 16  # evictions per message in these tests: a page of tiny blocks takes four messages


def tiny_store(num_pages: int) -> Store:
    """A full pool of tiny blocks t0, t1, ... (64 a page, in page order), every odd one read last
    so that the policy's victims spread over every page: freeing one in that order takes more
    than CAP evictions."""
    store = Store(Slabs(0, num_pages, PAGE_BYTES, min_slot_bytes=TINY_BYTES), clock=FakeClock(),
                  max_evictions_per_message=CAP)
    num = num_pages * PAGE_BYTES // TINY_BYTES
    for i in range(0, num, 64):
        put(store, [(f"t{j}", None) for j in range(i, i + 64)], nbytes=TINY_BYTES)
    assert store.slabs.num_free_pages == 0
    store.read(NS, [h(f"t{j}") for j in range(1, num, 2)])
    return store


def write_large_until_stored(store: Store, name: str, max_messages: int) -> list[int]:
    """Reserve one large block (a size class no page has) once per message until it gets a
    slot; returns the evictions of each message."""
    evictions: list[int] = []
    for _ in range(max_messages):
        before = store.num_evictions
        result = store.reserve(NS, [(h(name), None, LARGE_BYTES)])
        evictions.append(store.num_evictions - before)
        assert evictions[-1] <= CAP, evictions
        if result.num_full == 0:
            return evictions
    raise AssertionError(f"no slot after {max_messages} messages: {evictions}")


def pages_of(store: Store, names: list[str]) -> set[int]:
    return {store.slabs.page_of(store.index.get((NS, h(n))).slot) for n in names}


def test_a_new_size_class_gets_a_page_within_the_bound_over_several_messages() -> None:
    """Freeing a page in the policy's order would take 32 + 16 evictions: one page is emptied
    instead, CAP blocks a message, the writer answered full until the page is free; the other
    pages keep every block."""
    store = tiny_store(num_pages=4)
    assert write_large_until_stored(store, "big", max_messages=8) == [CAP] * 4
    assert store.num_evictions == 64  # exactly one page's blocks
    assert store.slabs.num_slots_used() == 3 * 64 + 1


def test_a_page_being_emptied_takes_no_new_block_of_its_own_class() -> None:
    """Writes of the page's class between the messages that empty it go elsewhere (and do not
    continue emptying it, which would hand the page back to them): otherwise the new class would
    never get a slot."""
    store = tiny_store(num_pages=4)
    assert store.reserve(NS, [(h("big"), None, LARGE_BYTES)]).num_full == 1
    draining = store._repurposing
    assert draining is not None and store.slabs.page_num_used(draining.page_idx) == 64 - CAP
    other = next(p for p in range(4) if p != draining.page_idx)
    for name in [f"t{other * 64 + j}" for j in range(4)]:  # room on another page
        store._remove(store.index.get((NS, h(name))))
    evictions = store.num_evictions
    assert None not in put(store, [(f"more{i}", None) for i in range(6)], nbytes=TINY_BYTES)
    assert pages_of(store, [f"more{i}" for i in range(4)]) == {other}
    assert store.slabs.page_num_used(draining.page_idx) == 64 - CAP  # nor emptied by them
    assert store.num_evictions - evictions == 2  # the two more, in the policy's order
    assert write_large_until_stored(store, "big", max_messages=8) == [CAP] * 3


def test_repurposing_passes_over_a_page_that_a_pin_keeps_from_freeing() -> None:
    """The page with the fewest blocks holds a leased one: evicting its others would free no
    page, so a page without pins is emptied instead, and the leased block is kept."""
    store = tiny_store(num_pages=4)
    page0 = [f"t{j}" for j in range(64)]
    for name in page0[:40]:  # page 0 has the fewest blocks (24), one of them leased
        assert store.index.get((NS, h(name))) is not None
        store._remove(store.index.get((NS, h(name))))
    _, lease = store.pin(NS, [h(page0[41])])
    assert lease is not None
    write_large_until_stored(store, "big", max_messages=8)
    assert all(store.index.get((NS, h(n))) is not None for n in page0[40:])
    assert store.num_evictions == 64


def test_repurposing_waits_out_pins_when_every_page_has_one() -> None:
    """With a leased block on every page the page with the fewest blocks is emptied around its
    pin and frees when the lease ends: the new size class is never refused for good."""
    store = tiny_store(num_pages=2)
    leases = [store.pin(NS, [h(f"t{page * 64 + 3}")])[1] for page in range(2)]
    for _ in range(10):
        assert store.reserve(NS, [(h("big"), None, LARGE_BYTES)]).num_full == 1
    draining = store._repurposing
    assert draining is not None and store.slabs.page_num_used(draining.page_idx) == 1
    for lease in leases:
        assert lease is not None and store.unpin(lease)
    write_large_until_stored(store, "big", max_messages=2)
    assert store.index.get((NS, h("t3"))) is None or store.index.get((NS, h("t67"))) is None


def test_a_page_being_emptied_is_finished_when_no_other_block_could_go() -> None:
    """Once the blocks outside the page being emptied are all leased, the policy's order has
    nothing to offer: the next writes still go on emptying the page, and get it."""
    store = tiny_store(num_pages=2)
    assert store.reserve(NS, [(h("big"), None, LARGE_BYTES)]).num_full == 1
    draining = store._repurposing
    assert draining is not None
    other = 1 - draining.page_idx
    for j in range(64):
        assert store.pin(NS, [h(f"t{other * 64 + j}")])[1] is not None
    assert write_large_until_stored(store, "big", max_messages=8) == [CAP] * 3
    assert store.slabs.page_num_used(other) == 64


def test_reserve_views_hands_out_the_slots_memory_and_stops_at_a_block_too_large(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A tier's writer (kvstore/tiers.py PoolWriter) writes through the views; the commit makes
    exactly those bytes readable. A block larger than a page ends the chain there."""
    import uuid

    from kvstore.pool import HEADER_BYTES, Pool

    pool = Pool.create(f"kvstore-test-{uuid.uuid4().hex[:12]}", HEADER_BYTES + 2 * PAGE_BYTES)
    try:
        store = Store.on_pool(pool, PAGE_BYTES, 64, "lru", Limits(), FakeClock())
        got = store.reserve_views(NS, [(h("a"), None, SMALL_BYTES), (h("b"), h("a"), 2 * PAGE_BYTES),
                                       (h("c"), h("b"), SMALL_BYTES)], b"tier")
        assert got[1:] == [None, None] and got[0] is not None
        slot, view = got[0]
        assert len(view) == SMALL_BYTES
        view[:] = b"k" * SMALL_BYTES
        assert store.commit_many(NS, [(h("a"), slot)], b"tier").num_stored == 1
        assert [bytes(pool.view(e.slot, e.nbytes)) for e in store.read(NS, [h("a")])] == [
            b"k" * SMALL_BYTES]
        assert store.num_reserved == 0
    finally:
        pool.close()

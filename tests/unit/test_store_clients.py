"""Store with client owners (kvstore/clients.py): who may finish a write, fenced slots, per-client
caps, a fair full lease table, and a connection's holdings ending with it."""

from __future__ import annotations

import pytest

from kvstore import store as store_module
from kvstore.clients import MAX_CLIENT_LEASES
from tests.unit.test_store import NS, SMALL_BYTES, h, make_store, put

A, B, C = b"client-a", b"client-b", b"client-c"


def test_only_the_reserving_client_commits_or_aborts() -> None:
    """COMMIT and ABORT of another client (or in-process, no owner) change nothing."""
    store, _ = make_store()
    slot = store.reserve(NS, [(h("x"), None, SMALL_BYTES)], owner=A).slots[0]
    assert slot is not None
    assert not store.commit(NS, h("x"), slot, owner=B)
    assert not store.abort(NS, h("x"), slot, owner=B)
    assert not store.commit(NS, h("x"), slot)
    assert store.lookup(NS, [h("x")]) == 0
    assert store.commit(NS, h("x"), slot, owner=A)
    assert store.lookup(NS, [h("x")]) == 1
    assert len(store.clients) == 0, "a client holding nothing is forgotten"


def test_expired_reservation_is_fenced_until_its_writer_names_it() -> None:
    """Past its deadline the key is free for others but the slot stays taken until the writer's
    late COMMIT (or ABORT) says it is done; then the slot is free."""
    store, clock = make_store(reserve_s=1.0)
    slot = store.reserve(NS, [(h("x"), None, SMALL_BYTES)], owner=A).slots[0]
    assert slot is not None
    clock.advance(2.0)
    store.expire()
    assert store.occupancy()["num_reserved"] == 0 and store.num_fenced == 1
    other = store.reserve(NS, [(h("x"), None, SMALL_BYTES)], owner=B).slots[0]
    assert other is not None and other != slot, "a fenced slot was handed out again"
    assert store.slabs.num_slots_used() == 2
    assert not store.commit(NS, h("x"), slot, owner=A)
    assert store.num_fenced == 0 and store.slabs.num_slots_used() == 1
    assert store.commit(NS, h("x"), other, owner=B)


def test_invalidated_reservation_is_fenced_too() -> None:
    """INVALIDATE during a write does not free the slot under the writer."""
    store, _ = make_store()
    slot = store.reserve(NS, [(h("x"), None, SMALL_BYTES)], owner=A).slots[0]
    assert slot is not None
    assert store.invalidate(NS.name) == 1
    assert store.num_fenced == 1 and store.slabs.num_slots_used() == 1
    assert not store.abort(NS, h("x"), slot, owner=A)
    assert store.slabs.num_slots_used() == 0


def test_end_client_frees_leases_reservations_and_fenced_slots() -> None:
    store, clock = make_store(num_pages=2, reserve_s=1.0)
    put(store, [("p", None)])
    _, lease = store.pin(NS, [h("p")], 60.0, owner=A)
    assert lease is not None
    fenced = store.reserve(NS, [(h("f"), None, SMALL_BYTES)], owner=A).slots[0]
    clock.advance(2.0)
    store.expire()
    live = store.reserve(NS, [(h("r"), None, SMALL_BYTES)], owner=A).slots[0]
    assert fenced is not None and live is not None and store.num_fenced == 1
    assert store.end_client(A) == 3
    assert store.index.leases == {} and store.num_fenced == 0
    assert store.occupancy()["num_reserved"] == 0 and store.slabs.num_slots_used() == 1
    assert store.end_client(A) == 0


def test_reservations_of_one_client_are_capped_at_half_the_pool() -> None:
    """Past its share a client's reserve answers full; another client still gets slots."""
    store, _ = make_store(num_pages=2)  # 8 slots of 1024 bytes; a client may hold 4
    result = store.reserve(NS, [(h(f"a{i}"), None, SMALL_BYTES) for i in range(8)], owner=A)
    assert sum(s is not None for s in result.slots) == 4 and result.num_full == 4
    result = store.reserve(NS, [(h(f"b{i}"), None, SMALL_BYTES) for i in range(4)], owner=B)
    assert sum(s is not None for s in result.slots) > 0


def test_past_the_reservation_table_a_client_gets_only_its_fair_share() -> None:
    """The table (half the pool) is full once A holds its 4 slots: B then gets its fair share of
    it (4 / 2), C a third (1), and what A gives back makes room again."""
    store, _ = make_store(num_pages=2)  # 8 slots of 1024 bytes; the table holds 4
    a = store.reserve(NS, [(h(f"a{i}"), None, SMALL_BYTES) for i in range(4)], owner=A)
    assert a.num_full == 0
    result = store.reserve(NS, [(h(f"b{i}"), None, SMALL_BYTES) for i in range(4)], owner=B)
    assert sum(s is not None for s in result.slots) == 2 and result.num_full == 2
    result = store.reserve(NS, [(h(f"c{i}"), None, SMALL_BYTES) for i in range(4)], owner=C)
    assert sum(s is not None for s in result.slots) == 1
    for i, slot in enumerate(a.slots):
        assert slot is not None and store.abort(NS, h(f"a{i}"), slot, owner=A)
    assert store.reserve(NS, [(h("b-more"), None, SMALL_BYTES)], owner=B).num_full == 0


def test_leases_of_one_client_are_capped() -> None:
    store, _ = make_store()
    put(store, [("p", None)])
    for _ in range(MAX_CLIENT_LEASES):
        assert store.pin(NS, [h("p")], owner=A)[1] is not None
    assert store.pin(NS, [h("p")], owner=A) == ([], None)
    assert store.pin(NS, [h("p")], owner=B)[1] is not None


def test_full_lease_table_takes_the_biggest_holders_oldest_lease(monkeypatch) -> None:
    """When the table is full a smaller holder gets a lease: the biggest gives up its oldest one;
    the biggest itself (or an equal) gets a miss."""
    monkeypatch.setattr(store_module, "MAX_LEASES", 8)
    store, _ = make_store()
    put(store, [("p", None)])
    leases = [store.pin(NS, [h("p")], owner=A)[1] for _ in range(8)]
    assert store.pin(NS, [h("p")], owner=A) == ([], None)
    _, mine = store.pin(NS, [h("p")], owner=B)
    assert mine is not None and leases[0] not in store.index.leases
    assert len(store.index.leases) == 8 and store.num_leases_dropped == 1
    for _ in range(2):
        assert store.pin(NS, [h("p")], owner=B)[1] is not None
    assert store.clients.num_leases(A) == 5 and store.clients.num_leases(B) == 3
    assert store.pin(NS, [h("p")], owner=B)[1] is not None  # 4 and 4 after this
    assert store.pin(NS, [h("p")], owner=B) == ([], None), "took a lease from an equal holder"


@pytest.mark.parametrize("new_owner", [B, b""])
def test_a_lease_presented_by_a_reader_becomes_the_readers(new_owner: bytes) -> None:
    """The lease ends with the reader's connection, not with its taker's."""
    store, _ = make_store()
    put(store, [("p", None)])
    _, lease = store.pin(NS, [h("p")], owner=A)
    assert lease is not None
    store.transfer_lease(lease, new_owner)
    assert store.clients.num_leases(A) == 0
    store.end_client(A)
    assert lease in store.index.leases
    store.end_client(new_owner)
    assert (lease in store.index.leases) == (new_owner == b"")

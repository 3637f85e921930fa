"""Two-phase writes: reserve, write, commit; invisible until commit, reclaimed when abandoned."""

from __future__ import annotations

import pytest

from kvstore.client import Client
from kvstore.keys import Namespace
from tests.integration.helpers import CALL_S, chain_hashes, random_blocks, wait_stats

NS = Namespace(b"model-a")


@pytest.mark.timeout(90)
def test_reserved_block_is_invisible_until_commit(daemon, ctx):
    """Reserved and written but uncommitted blocks miss in lookup and get; commit shows them."""
    hashes = chain_hashes("two-phase", 2)
    datas = random_blocks(1, [5000, 3000])
    with Client(daemon.address, CALL_S, ctx=ctx) as writer, \
            Client(daemon.address, CALL_S, ctx=ctx) as reader:
        refs, num_full = writer.reserve(NS, [(hashes[0], None, 5000), (hashes[1], hashes[0], 3000)])
        assert num_full == 0 and all(r is not None for r in refs)
        assert writer.pool is not None
        for ref, data in zip(refs, datas):
            writer.pool.view(ref.slot, ref.nbytes)[:] = data
        assert reader.lookup(NS, hashes).num_hits == 0
        assert reader.lookup(NS, hashes, lease_ms=1000).lease is None
        assert reader.get(NS, hashes) == []
        s = reader.stats()
        assert (s["num_reserved"], s["num_blocks"], s["num_slots_used"]) == (2, 0, 2)
        assert writer.commit(NS, list(zip(hashes, refs))) == 2
        assert reader.lookup(NS, hashes).num_hits == 2
        assert reader.get(NS, hashes) == datas
        s = reader.stats()
        assert (s["num_reserved"], s["num_blocks"], s["num_slots_used"]) == (0, 2, 2)


@pytest.mark.timeout(90)
def test_abandoned_reservation_is_reclaimed_after_reserve_timeout(make_daemon, ctx):
    """A reservation never committed is taken back after --reserve-timeout, its slot fenced
    while its writer may still write it; the late commit fails and frees the slot."""
    d = make_daemon(extra_args=["--reserve-timeout", "0.5"]).start()
    hashes = chain_hashes("abandoned", 3)
    with Client(d.address, CALL_S, ctx=ctx) as client:
        refs, _ = client.reserve(NS, [(h, None, 4096) for h in hashes])
        s = client.stats()
        assert (s["num_reserved"], s["num_slots_used"]) == (3, 3)
        wait_stats(d.address, lambda s: s["num_reserved"] == 0 and s["num_fenced"] == 3,
                   20.0, "reservations reclaimed")
        assert client.stats()["num_slots_used"] == 3
        assert client.commit(NS, list(zip(hashes, refs))) == 0
        s = client.stats()
        assert (s["num_fenced"], s["num_slots_used"]) == (0, 0)
        assert client.lookup(NS, hashes).num_hits == 0
        # The keys are free again: a fresh put stores them.
        assert client.put(NS, [(h, None, bytes(4096)) for h in hashes]).num_stored == 3


@pytest.mark.timeout(90)
def test_aborted_reservation_frees_its_slot_at_once(daemon, ctx):
    """abort gives reserved slots back immediately and the key can be written again."""
    with Client(daemon.address, CALL_S, ctx=ctx) as client:
        refs, _ = client.reserve(NS, [(b"aborted", None, 4096)])
        assert client.abort(NS, [(b"aborted", refs[0])]) == 1
        assert client.abort(NS, [(b"aborted", refs[0])]) == 0
        s = client.stats()
        assert (s["num_reserved"], s["num_slots_used"]) == (0, 0)
        assert client.put(NS, [(b"aborted", None, b"x" * 4096)]).num_stored == 1


@pytest.mark.timeout(90)
def test_block_being_written_is_not_reserved_twice(daemon, ctx):
    """While one client writes a block, another client's reserve of it gets no slot."""
    with Client(daemon.address, CALL_S, ctx=ctx) as first, \
            Client(daemon.address, CALL_S, ctx=ctx) as second:
        mine, _ = first.reserve(NS, [(b"contended", None, 4096)])
        theirs, num_full = second.reserve(NS, [(b"contended", None, 4096)])
        assert mine[0] is not None and theirs == [None] and num_full == 0
        result = second.put(NS, [(b"contended", None, b"y" * 4096)])
        assert (result.num_stored, result.num_present) == (0, 1)
        assert first.pool is not None
        first.pool.view(mine[0].slot, 4096)[:] = b"x" * 4096
        assert first.commit(NS, [(b"contended", mine[0])]) == 1
        assert second.get(NS, [b"contended"]) == [b"x" * 4096]
        assert second.stats()["num_slots_used"] == 1


@pytest.mark.timeout(90)
def test_commit_naming_another_slot_commits_nothing(daemon, ctx):
    """A commit whose slot does not match the reservation is ignored; the real one still works."""
    with Client(daemon.address, CALL_S, ctx=ctx) as client:
        refs, _ = client.reserve(NS, [(b"a", None, 4096), (b"b", None, 4096)])
        assert client.commit(NS, [(b"a", refs[1]), (b"b", refs[0])]) == 0
        assert client.lookup(NS, [b"a"]).num_hits == 0
        assert client.commit(NS, [(b"a", refs[0]), (b"b", refs[1])]) == 2
        assert client.lookup(NS, [b"a", b"b"]).num_hits == 2

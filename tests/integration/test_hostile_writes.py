"""Writes cannot corrupt (issue 10): COMMIT and ABORT count only from the client that reserved, and
a slot whose reservation expired is fenced until its writer is done with it, so a late write never
lands in another block's slot. Every read is checked against the bytes its hash names."""

from __future__ import annotations

import hashlib

import pytest

from kvstore.client import Client
from kvstore.keys import Namespace
from kvstore.protocol import MAX_LEASE_MS
from tests.integration.helpers import CALL_S, MiB, stats, wait_stats

NS = Namespace(b"hostile-writes")
BLOCK_BYTES = 64 * 1024
RESERVE_S = "0.3"  # --reserve-timeout: short, so a stalled writer is overtaken quickly


def content(block_hash: bytes, nbytes: int = BLOCK_BYTES) -> bytes:
    """The only bytes a block of this hash may ever be read as (content-addressed)."""
    seed = hashlib.sha256(block_hash).digest()
    return (seed * (nbytes // len(seed) + 1))[:nbytes]


def assert_reads_true(reader: Client, hashes: list[bytes]) -> int:
    """Read each block alone; every block read must carry its own bytes. Returns blocks read."""
    num_read = 0
    for block_hash in hashes:
        for data in reader.get(NS, [block_hash]):
            assert hashlib.sha256(data).digest() == hashlib.sha256(content(block_hash)).digest(), (
                f"block {block_hash!r} read with foreign bytes")
            num_read += 1
    return num_read


@pytest.mark.timeout(90)
def test_foreign_commit_publishes_nothing(daemon, ctx):
    """A COMMIT naming another client's reservation commits nothing; the writer's own still does."""
    with Client(daemon.address, CALL_S, ctx=ctx) as writer, \
            Client(daemon.address, CALL_S, ctx=ctx) as other:
        refs, _ = writer.reserve(NS, [(b"w", None, BLOCK_BYTES)])
        assert refs[0] is not None
        assert other.commit(NS, [(b"w", refs[0])]) == 0, "a foreign COMMIT published a slot"
        assert other.lookup(NS, [b"w"]).num_hits == 0
        assert writer.pool is not None
        writer.pool.view(refs[0].slot, BLOCK_BYTES)[:] = content(b"w")
        assert writer.commit(NS, [(b"w", refs[0])]) == 1
        assert assert_reads_true(other, [b"w"]) == 1


@pytest.mark.timeout(90)
def test_foreign_abort_frees_nothing(daemon, ctx):
    """An ABORT naming another client's reservation keeps it; the slot is not handed out again."""
    with Client(daemon.address, CALL_S, ctx=ctx) as writer, \
            Client(daemon.address, CALL_S, ctx=ctx) as other:
        refs, _ = writer.reserve(NS, [(b"w", None, BLOCK_BYTES)])
        assert refs[0] is not None
        assert other.abort(NS, [(b"w", refs[0])]) == 0, "a foreign ABORT freed a reservation"
        theirs, _ = other.reserve(NS, [(b"x", None, BLOCK_BYTES)])
        assert theirs[0] is not None and theirs[0].slot != refs[0].slot
        assert writer.pool is not None and other.pool is not None
        other.pool.view(theirs[0].slot, BLOCK_BYTES)[:] = content(b"x")
        writer.pool.view(refs[0].slot, BLOCK_BYTES)[:] = content(b"w")
        assert writer.commit(NS, [(b"w", refs[0])]) == 1
        assert other.commit(NS, [(b"x", theirs[0])]) == 1
        assert assert_reads_true(other, [b"w", b"x"]) == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("second_writes_by", ["shm", "tcp"])
def test_writer_stalled_past_reserve_timeout_never_lands_in_another_block(
        make_daemon, ctx, second_writes_by):
    """A shm writer stalls past --reserve-timeout while another writer waits for room in a full
    pool; the second gets room, the first one's late copy lands: readers never see foreign bytes."""
    # Two pages of 1 MiB, 16 slots of 64 KiB each: one is held by a reader's lease, the other
    # by the first writer's reservations (half the pool: within one client's share).
    d = make_daemon(pool_size="2MiB", page_size="1MiB",
                    extra_args=["--reserve-timeout", RESERVE_S]).start()
    held = [b"held-%d" % i for i in range(16)]
    stalled = [b"stalled-%d" % i for i in range(16)]
    waiting = [b"waiting-%d" % i for i in range(16)]
    with Client(d.address, CALL_S, ctx=ctx) as first, \
            Client(d.address, CALL_S, ctx=ctx, use_shm=second_writes_by == "shm") as second, \
            Client(d.address, CALL_S, ctx=ctx) as reader:
        assert reader.put(NS, [(h, None, content(h)) for h in held]).num_stored == 16
        assert reader.lookup(NS, held, lease_ms=MAX_LEASE_MS).num_hits == 16
        refs, num_full = first.reserve(NS, [(h, None, BLOCK_BYTES) for h in stalled])
        assert num_full == 0 and all(r is not None for r in refs)
        # The pool is full of the first writer's reservations: the second writer gets nothing.
        assert second.put(NS, [(h, None, content(h)) for h in waiting]).num_stored == 0
        # The first writer stalls past its deadline; the daemon gives up on its reservations.
        wait_stats(d.address, lambda s: s["num_reserved"] == 0, 20.0, "reservations expired")
        # The second writer tries again, as a waiting writer does.
        stored = second.put(NS, [(h, None, content(h)) for h in waiting]).num_stored
        # The first writer wakes up and finishes its copy into the slots it was given.
        assert first.pool is not None
        for block_hash, ref in zip(stalled, refs):
            first.pool.view(ref.slot, ref.nbytes)[:] = content(block_hash)
        assert first.commit(NS, list(zip(stalled, refs))) == 0, "a late commit published a block"
        assert assert_reads_true(reader, waiting) == stored
        assert assert_reads_true(reader, stalled) == 0
        # Once the first writer has said it is done, its fenced slots are free for new writes.
        assert second.put(NS, [(h, None, content(h)) for h in waiting]).num_stored == 16 - stored
        assert assert_reads_true(reader, waiting) == 16
        assert assert_reads_true(reader, held) == 16


@pytest.mark.timeout(90)
def test_fenced_slots_are_freed_when_the_writer_disconnects(make_daemon, ctx):
    """A writer that reserved and vanished: its slots come back when its connection goes."""
    d = make_daemon(pool_size="4MiB", page_size="1MiB",
                    extra_args=["--reserve-timeout", "30"]).start()
    writer = Client(d.address, CALL_S, ctx=ctx)
    refs, _ = writer.reserve(NS, [(b"gone-%d" % i, None, BLOCK_BYTES) for i in range(8)])
    assert all(r is not None for r in refs)
    assert stats(d.address)["num_slots_used"] == 8
    writer.close()
    # Far sooner than the 30 s reserve timeout: the connection's end ends its reservations.
    wait_stats(d.address, lambda s: s["num_reserved"] == 0 and s["num_slots_used"] == 0, 10.0,
               "reservations of a closed connection released")


@pytest.mark.timeout(90)
def test_reservations_per_client_are_capped(make_daemon, ctx):
    """One client cannot reserve the whole pool: past its share, its reserve answers full while
    another client still gets room."""
    d = make_daemon(pool_size="16MiB", page_size="1MiB").start()
    with Client(d.address, CALL_S, ctx=ctx) as greedy, \
            Client(d.address, CALL_S, ctx=ctx) as honest:
        blocks = [(b"greedy-%d" % i, None, BLOCK_BYTES) for i in range(8192)]
        taken = 0
        for start in range(0, len(blocks), 1024):
            refs, _ = greedy.reserve(NS, blocks[start:start + 1024])
            taken += sum(r is not None for r in refs)
        assert taken * BLOCK_BYTES <= 16 * MiB // 2, f"one client reserved {taken} blocks"
        assert honest.put(NS, [(b"h", None, content(b"h"))]).num_stored == 1


@pytest.mark.timeout(120)
def test_connections_together_cannot_reserve_the_whole_pool(ctx):
    """Reservations have the leases' fair global rule: past the reservation table (half the pool)
    a client reserves only up to its fair share, so two connections that each reserve all they
    may still leave a third its share (before, each took half the pool and the third got full)."""
    from bench.daemon import Daemon

    d = Daemon(pool_size="64MiB", page_size="1MiB").start()
    clients = [Client(d.address, CALL_S, ctx=ctx) for _ in range(3)]
    try:
        for i, attacker in enumerate(clients[:2]):
            num_full, n = 0, 0
            while not num_full:
                blocks = [(b"a%d-%d" % (i, n + j), None, BLOCK_BYTES) for j in range(64)]
                _, num_full = attacker.reserve(NS, blocks)
                n += len(blocks)
        share = 32 * MiB // 3  # the table over the three clients
        wanted = [(b"h-%d" % j, None, BLOCK_BYTES) for j in range(share // BLOCK_BYTES)]
        refs, num_full = clients[2].reserve(NS, wanted)
        assert num_full == 0, f"a newcomer got {len(wanted) - num_full} of its fair share's " \
                              f"{len(wanted)} slots: the other connections hold the pool"
    finally:
        for client in clients:
            client.close()
        d.stop()

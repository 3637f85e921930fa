"""Every pin ends, and one client cannot take the lease table (issue 10): a TCP reader that never
takes its replies pins nothing, a connection's leases and reservations end with it, and a client
(or many connections of one) filling the lease table leaves other clients their hits."""

from __future__ import annotations

import itertools

import pytest
import zmq

from kvstore import protocol
from kvstore.client import Client
from kvstore.keys import Namespace
from kvstore.protocol import Op
from bench.daemon import wait_until
from tests.integration.helpers import CALL_S, MiB, raw_dealer, stats, wait_stats

NS = Namespace(b"hostile-pins")
MAX_LEASES = 65_536  # kvstore.store.MAX_LEASES when the attack was found
BATCH = 500  # requests in flight per socket: under both sides' high-water marks


def lookups(sock: zmq.Socket, ids: itertools.count, hashes: list[bytes], num: int) -> int:
    """Send num leased LOOKUPs pipelined on a raw socket; returns how many got a lease."""
    num_leased = 0
    for start in range(0, num, BATCH):
        n = min(BATCH, num - start)
        for _ in range(n):
            sock.send(protocol.encode_request(Op.LOOKUP, next(ids), ns=NS, hashes=hashes,
                                              lease_ms=protocol.MAX_LEASE_MS))
        for _ in range(n):
            reply = protocol.decode_header(sock.recv())
            num_leased += reply.get("lease") is not None
    return num_leased


def store_blocks(address: str, ctx: zmq.Context, tag: bytes, num: int, nbytes: int) -> list[bytes]:
    hashes = [b"%s-%d" % (tag, i) for i in range(num)]
    with Client(address, CALL_S, ctx=ctx, use_shm=False) as client:
        assert client.put(NS, [(h, None, bytes(nbytes)) for h in hashes]).num_stored == num
    return hashes


@pytest.mark.timeout(120)
def test_one_client_cannot_take_the_lease_table(daemon, ctx):
    """A client sending MAX_LEASES leased lookups leaves another client its leased hits."""
    hashes = store_blocks(daemon.address, ctx, b"b", 1, 4096)
    sock = raw_dealer(ctx, daemon.address, timeout_ms=int(CALL_S * 1000))
    try:
        lookups(sock, itertools.count(1), hashes, MAX_LEASES)
        with Client(daemon.address, CALL_S, ctx=ctx, use_shm=False) as honest:
            result = honest.lookup(NS, hashes, lease_ms=1000)
            assert result.num_hits == 1 and result.lease is not None, "the lease table is taken"
            assert honest.get(NS, hashes) == [bytes(4096)]
    finally:
        sock.close(0)


@pytest.mark.timeout(180)
def test_many_connections_cannot_take_the_lease_table(daemon, ctx):
    """Many connections of one attacker together fill the lease table: another client still gets
    its lease (the biggest holder gives up its oldest one)."""
    hashes = store_blocks(daemon.address, ctx, b"b", 1, 4096)
    socks = [raw_dealer(ctx, daemon.address, timeout_ms=int(CALL_S * 1000)) for _ in range(20)]
    try:
        ids = itertools.count(1)
        for sock in socks:
            lookups(sock, ids, hashes, MAX_LEASES // 16)
        assert stats(daemon.address)["num_leases"] >= MAX_LEASES // 2
        with Client(daemon.address, CALL_S, ctx=ctx, use_shm=False) as honest:
            for _ in range(3):
                result = honest.lookup(NS, hashes, lease_ms=1000)
                assert result.num_hits == 1 and result.lease is not None, "lease table taken"
    finally:
        for sock in socks:
            sock.close(0)


@pytest.mark.timeout(120)
def test_tcp_reader_that_never_reads_pins_nothing(make_daemon, ctx):
    """A TCP client sending GETs for the whole pool and never reading the replies: other clients'
    writes still evict and store, and their reads still hit."""
    d = make_daemon(pool_size="16MiB", page_size="1MiB").start()
    hashes = store_blocks(d.address, ctx, b"old", 16, MiB - 4096)  # one block per page: pool full
    sock = non_reader(ctx, d.address)
    try:
        for i in range(20):
            sock.send(protocol.encode_request(Op.GET, i + 1, ns=NS, hashes=hashes, shm=False))
        wait_stats(d.address, lambda s: s["requests"].get("get", 0) >= 20, 20.0, "GETs served")
        with Client(d.address, CALL_S, ctx=ctx, use_shm=False) as honest:
            new = [b"new-%d" % i for i in range(8)]
            result = honest.put(NS, [(h, None, b"n" * (MiB - 4096)) for h in new])
            assert result.num_full == 0, f"{result.num_full} of 8 writes answered full"
            assert honest.lookup(NS, new).num_hits == 8
            assert len(honest.get(NS, new[:1])) == 1
    finally:
        sock.close(0)


@pytest.mark.timeout(90)
def test_leases_of_a_closed_connection_end_with_it(daemon, ctx):
    """Leases of a client whose connection goes are released at once, not after their lease time."""
    hashes = store_blocks(daemon.address, ctx, b"b", 4, 4096)
    client = Client(daemon.address, CALL_S, ctx=ctx, use_shm=False)
    assert client.lookup(NS, hashes, lease_ms=protocol.MAX_LEASE_MS).lease is not None
    assert stats(daemon.address)["num_leases"] == 1
    client.close()
    wait_stats(daemon.address, lambda s: s["num_leases"] == 0, 10.0, "leases released")


@pytest.mark.timeout(90)
def test_leases_still_expire_on_their_own(daemon, ctx):
    """A connected client's lease ends at its deadline."""
    hashes = store_blocks(daemon.address, ctx, b"b", 4, 4096)
    with Client(daemon.address, CALL_S, ctx=ctx, use_shm=False) as client:
        assert client.lookup(NS, hashes, lease_ms=300).lease is not None
        wait_stats(daemon.address, lambda s: s["num_leases"] == 0, 10.0, "lease expired")


def non_reader(ctx: zmq.Context, address: str) -> zmq.Socket:
    """A DEALER that takes (almost) nothing off the wire."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(address)
    return sock


@pytest.mark.timeout(150)
def test_clients_that_never_read_are_cut_and_their_replies_freed(make_daemon, ctx):
    """Clients that keep sending GETs and never read: replies queue in the daemon up to its budget
    (then GETs answer busy), and once a reply stays unsent past the bound the connection is cut,
    freeing its queued bytes; TCP reads are served in full again."""
    d = make_daemon(pool_size="16MiB", page_size="1MiB").start()
    hashes = store_blocks(d.address, ctx, b"old", 16, MiB - 4096)
    socks = [non_reader(ctx, d.address) for _ in range(6)]
    ids = itertools.count(1)

    def attack_until_cut() -> bool:
        # One more GET each, paced: their own buffers fill first, then replies stay queued.
        for sock in socks:
            sock.send(protocol.encode_request(Op.GET, next(ids), ns=NS, hashes=hashes,
                                              shm=False))
        return stats(d.address)["errors_by_kind"].get("unread", 0) >= 1

    try:
        wait_until(attack_until_cut, 60.0, interval_s=0.3, what="a non-reader cut")
    finally:
        for sock in socks:
            sock.close(0)
    wait_stats(d.address, lambda s: s["unsent_bytes"] == 0, 30.0, "queued replies freed")
    with Client(d.address, CALL_S, ctx=ctx, use_shm=False) as honest:
        assert honest.get(NS, hashes) == [bytes(MiB - 4096)] * 16

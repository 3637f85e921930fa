"""TCP GET payloads on a side stream (kvstore/bulk.py, issue 12): the bytes arrive equal, a client
that never takes (or never reads) its stream keeps no pins past the bound, and a wrong or already
used token takes nothing."""

from __future__ import annotations

import os
import socket

import pytest
import zmq

from kvstore import bulk, protocol
from kvstore.client import Client
from kvstore.keys import Namespace
from kvstore.protocol import Op
from tests.integration.helpers import CALL_S, MiB, raw_dealer, random_blocks, stats, wait_stats

NS = Namespace(b"bulk")
BLOCK = 2 * MiB
# Past the bound (CLAIM or STALL timeout), plus the loop's collection and a loaded machine.
PINS_END_S = bulk.STALL_TIMEOUT_S + bulk.CLAIM_TIMEOUT_S + 8.0


def store(address: str, ctx, tag: bytes, num: int) -> tuple[list[bytes], list[bytes]]:  # type: ignore[no-untyped-def]
    hashes = [b"%s-%d" % (tag, i) for i in range(num)]
    datas = random_blocks(num, [BLOCK] * num)
    with Client(address, CALL_S, ctx=ctx, use_shm=False) as client:
        assert client.put(NS, [(h, None, d) for h, d in zip(hashes, datas)]).num_stored == num
    return hashes, datas


def offer(ctx, address: str, hashes: list[bytes]) -> dict:  # type: ignore[no-untyped-def]
    """A raw GET asking for a side stream; the reply (its token and port), nothing taken."""
    sock = raw_dealer(ctx, address)
    try:
        sock.send(protocol.encode_request(Op.GET, 1, ns=NS, hashes=hashes, bulk=True))
        reply = protocol.decode_header(sock.recv())
        assert not sock.getsockopt(zmq.RCVMORE), "payload frames with an offer"
    finally:
        sock.close(0)
    assert reply["ok"] and reply.get("bulk_token"), reply
    return reply


@pytest.mark.timeout(120)
def test_large_tcp_get_comes_on_a_side_stream_with_equal_bytes(make_daemon, ctx):
    d = make_daemon(pool_size="256MiB").start()
    hashes, datas = store(d.address, ctx, b"eq", 12)  # 24 MiB: over BULK_MIN_BYTES
    with Client(d.address, CALL_S, ctx=ctx, use_shm=False) as client:
        dests = [bytearray(BLOCK) for _ in hashes]
        assert client.get_into(NS, hashes, dests) == len(hashes)
        assert [bytes(x) for x in dests] == datas
        assert client.get(NS, hashes) == datas
        with client.reading(NS, hashes) as blocks:
            assert [bytes(b) for b in blocks] == datas
    s = wait_stats(d.address, lambda s: s["unsent_pinned_bytes"] == 0, 10.0, "pins let go")
    assert s["bulk"]["sent"] >= 3 and s["bulk"]["refused"] == 0, s["bulk"]
    with Client(d.address, CALL_S, ctx=ctx, use_shm=False, use_bulk=False) as client:
        assert client.get(NS, hashes) == datas  # the ZeroMQ frames, as before
        assert client.get(NS, hashes[:2]) == datas[:2]  # under BULK_MIN_BYTES
    assert stats(d.address)["bulk"]["offered"] == s["bulk"]["offered"]


@pytest.mark.timeout(120)
def test_an_offer_never_taken_keeps_no_pins_past_the_bound(make_daemon, ctx):
    d = make_daemon(pool_size="256MiB").start()
    hashes, datas = store(d.address, ctx, b"unclaimed", 8)
    offer(ctx, d.address, hashes)
    assert stats(d.address)["unsent_pinned_bytes"] == 8 * BLOCK
    s = wait_stats(d.address, lambda s: s["unsent_pinned_bytes"] == 0, PINS_END_S, "pins let go")
    assert s["bulk"]["given_up"] == 1, s["bulk"]
    with Client(d.address, CALL_S, ctx=ctx, use_shm=False) as client:
        assert client.get(NS, hashes) == datas


@pytest.mark.timeout(120)
def test_a_stream_taken_but_never_read_keeps_no_pins_past_the_bound(make_daemon, ctx):
    d = make_daemon(pool_size="512MiB").start()  # pinned budget: an eighth, 64 MiB
    hashes, datas = store(d.address, ctx, b"unread", 32)  # 64 MiB: more than socket buffers hold
    reply = offer(ctx, d.address, hashes)
    conn = socket.create_connection(("127.0.0.1", reply["bulk_port"]), timeout=CALL_S)
    try:
        conn.sendall(reply["bulk_token"])
        s = wait_stats(d.address, lambda s: s["unsent_pinned_bytes"] == 0, PINS_END_S,
                       "pins of a stalled stream let go")
        assert s["bulk"]["given_up"] == 1 and s["bulk"]["sent"] == 0, s["bulk"]
    finally:
        conn.close()
    with Client(d.address, CALL_S, ctx=ctx, use_shm=False) as client:
        assert client.get(NS, hashes) == datas


def take(port: int, token: bytes, nbytes: int) -> bytes:
    """Connect, send token, read until nbytes or the end of the stream."""
    with socket.create_connection(("127.0.0.1", port), timeout=CALL_S) as conn:
        conn.sendall(token)
        got = bytearray()
        while len(got) < nbytes:
            chunk = conn.recv(nbytes - len(got))
            if not chunk:
                break
            got += chunk
        return bytes(got)


@pytest.mark.timeout(120)
def test_a_wrong_or_used_token_takes_nothing(make_daemon, ctx):
    d = make_daemon(pool_size="256MiB").start()
    hashes, datas = store(d.address, ctx, b"token", 8)
    reply = offer(ctx, d.address, hashes)
    port, token = reply["bulk_port"], reply["bulk_token"]
    assert take(port, os.urandom(len(token)), 1) == b""  # a guess
    assert take(port, token[:-1] + bytes([token[-1] ^ 1]), 1) == b""  # one bit off
    assert take(port, token, 8 * BLOCK) == b"".join(datas)  # the asker's
    assert take(port, token, 1) == b""  # replayed (stolen after use)
    s = wait_stats(d.address, lambda s: s["unsent_pinned_bytes"] == 0, 10.0, "pins let go")
    assert s["bulk"]["refused"] == 3 and s["bulk"]["sent"] == 1, s["bulk"]


@pytest.mark.timeout(120)
def test_a_side_port_out_of_reach_falls_back_to_frames(make_daemon, ctx, monkeypatch):
    """Where only the daemon's port is reachable (a published container port, a firewall), the
    client takes the bytes as ZeroMQ frames and asks for no more side streams. Injected: the
    client looks for side ports on 127.0.0.2, where nothing listens (the connect is refused)."""
    d = make_daemon(pool_size="256MiB").start()
    hashes, datas = store(d.address, ctx, b"reach", 8)
    monkeypatch.setattr(bulk, "host_of", lambda address: "127.0.0.2")
    with Client(d.address, CALL_S, ctx=ctx, use_shm=False) as client:
        assert client.get(NS, hashes) == datas
        assert not client.use_bulk
        assert client.get(NS, hashes) == datas
    assert stats(d.address)["bulk"]["offered"] == 1

"""One message must not stall everyone (issue 10): block-listing messages carry at most the rows the
daemon announces in HELLO (a full-size PUT or RESERVE of 8,192 blocks cost 0.2-1 s of its loop);
larger ones are refused "too_large" with nothing done, and the client splits larger calls so every
caller keeps working. The per-row costs that chose the caps are measured by bench/row_costs.py."""

from __future__ import annotations

import pytest

from bench.hostile import call, header
from kvstore.client import Client
from kvstore.keys import Namespace
from kvstore import protocol
from kvstore.protocol import MAX_BLOCKS, Op
from tests.integration.helpers import CALL_S, as_chain, chain_hashes, random_blocks

NS = Namespace(b"caps")
BLOCK_BYTES = 4096
NUM_BLOCKS = 2500  # several messages at any cap the daemon announces


@pytest.mark.timeout(60)
def test_max_size_writes_are_refused_untouched(daemon, open_dealer):
    """A RESERVE, PUT or COMMIT of 8,192 rows is refused too_large, and nothing is reserved or
    stored: the same rows in messages of the announced size then all succeed."""
    sock = open_dealer(daemon.address)
    hello = call(sock, [header(Op.HELLO, version=protocol.VERSION)])
    token = bytes(hello["token"])
    reserve_cap = hello.get("max_rows", {}).get("reserve")
    hashes = chain_hashes("big", MAX_BLOCKS)
    rows = [[h, hashes[i - 1] if i else None] for i, h in enumerate(hashes)]
    ns = [NS.name, 0]

    reply = call(sock, [header(Op.RESERVE, ns=ns, token=token,
                               blocks=[[h, p, BLOCK_BYTES] for h, p in rows])])
    assert reply.get("error") == "too_large", reply
    reply = call(sock, [header(Op.PUT, ns=ns, blocks=rows, sizes=[BLOCK_BYTES] * MAX_BLOCKS),
                        *[bytes(BLOCK_BYTES)] * MAX_BLOCKS])
    assert reply.get("error") == "too_large", reply
    reply = call(sock, [header(Op.COMMIT, ns=ns, blocks=[[h, 0] for h in hashes])])
    assert reply.get("error") == "too_large", reply
    reply = call(sock, [header(Op.GET, ns=ns, hashes=hashes, shm=True, token=token)])
    assert reply.get("error") == "too_large", reply

    assert reserve_cap is not None and 0 < reserve_cap < MAX_BLOCKS
    cap = reserve_cap
    reply = call(sock, [header(Op.RESERVE, ns=ns, token=token,
                               blocks=[[h, p, BLOCK_BYTES] for h, p in rows[:cap]])])
    assert reply.get("ok") and all(s is not None for s in reply["slots"]), (
        "the refused RESERVE left reservations behind")
    assert call(sock, [header(Op.LOOKUP, ns=ns, hashes=hashes, lease_ms=0)])["num_hits"] == 0


@pytest.mark.timeout(60)
def test_rows_past_the_cap_are_refused_before_they_are_read(daemon, open_dealer):
    """A message over the row cap is refused from its row count alone: its rows are never
    validated one by one (that alone cost ~15 ms of the loop for 8,192 RESERVE rows). Seen from
    outside: a malformed row past the cap does not turn the answer into bad_request."""
    sock = open_dealer(daemon.address)
    hello = call(sock, [header(Op.HELLO, version=protocol.VERSION)])
    token = bytes(hello["token"])
    hashes = chain_hashes("unread", MAX_BLOCKS)
    rows: list[list[object]] = [[h, None, BLOCK_BYTES] for h in hashes]
    rows[-1] = ["not a hash", None, -1]  # would be bad_request if the rows were decoded
    reply = call(sock, [header(Op.RESERVE, ns=[NS.name, 0], token=token, blocks=rows)])
    assert reply.get("error") == "too_large", reply
    finish = [[h, 0] for h in hashes[:-1]] + [["not a hash", -1]]
    reply = call(sock, [header(Op.ABORT, ns=[NS.name, 0], blocks=finish)])
    assert reply.get("error") == "too_large", reply
    assert reply.get("id") is not None, "the refusal must name the request it answers"


@pytest.mark.timeout(60)
def test_hello_announces_the_daemons_caps(daemon, open_dealer):
    """HELLO names the rows per message and the slot bytes one client may hold reserved (the
    client sizes its batches from these, not from constants of its own)."""
    sock = open_dealer(daemon.address)
    hello = call(sock, [header(Op.HELLO, version=protocol.VERSION)])
    assert set(hello["max_rows"]) == {"lookup", "get", "reserve", "commit", "abort", "put"}
    assert hello["max_rows"]["lookup"] == MAX_BLOCKS  # a whole 128k-token prompt in one LOOKUP
    assert hello["max_put_bytes"] > 0
    assert 0 < hello["max_reserved_bytes"] <= hello["segment_bytes"]
    assert hello["min_slot_bytes"] >= 64


@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
@pytest.mark.timeout(120)
def test_calls_larger_than_the_caps_still_work(daemon, ctx, use_shm):
    """put, lookup, get, pinned, reserve, commit and abort of more rows than one message carries
    behave as one call."""
    hashes = chain_hashes(f"split-{use_shm}", NUM_BLOCKS)
    datas = random_blocks(7, [BLOCK_BYTES] * NUM_BLOCKS)
    with Client(daemon.address, CALL_S, ctx=ctx, use_shm=use_shm) as client:
        assert client.put(NS, as_chain(hashes, datas)).num_stored == NUM_BLOCKS
        assert client.lookup(NS, hashes).num_hits == NUM_BLOCKS
        assert client.get(NS, hashes) == datas
        dests = [bytearray(BLOCK_BYTES) for _ in hashes]
        assert client.get_into(NS, hashes, dests) == NUM_BLOCKS
        assert [bytes(d) for d in dests] == datas
        lease = client.lookup(NS, hashes, lease_ms=10_000).lease
        assert client.get(NS, hashes, lease=lease) == datas
        if not use_shm:
            return
        with client.pinned(NS, hashes) as refs:
            assert len(refs) == NUM_BLOCKS
        fresh = chain_hashes("two-phase", NUM_BLOCKS)
        refs, num_full = client.reserve(NS, [(h, None, BLOCK_BYTES) for h in fresh])
        assert num_full == 0 and all(r is not None for r in refs)
        half = NUM_BLOCKS // 2
        assert client.abort(NS, list(zip(fresh[half:], refs[half:]))) == NUM_BLOCKS - half
        assert client.commit(NS, list(zip(fresh[:half], refs[:half]))) == half
        assert client.lookup(NS, [fresh[0]]).num_hits == 1
        assert client.stats()["num_reserved"] == 0


def test_a_get_past_the_stored_prefix_stops_there(daemon, ctx):
    """Split GETs keep prefix semantics: a missing block ends the read, even at a message edge."""
    hashes = chain_hashes("prefix", NUM_BLOCKS)
    datas = random_blocks(8, [BLOCK_BYTES] * NUM_BLOCKS)
    with Client(daemon.address, CALL_S, ctx=ctx, use_shm=False) as client:
        stored = 1500
        assert client.put(NS, as_chain(hashes[:stored], datas[:stored])).num_stored == stored
        assert client.get(NS, hashes) == datas[:stored]

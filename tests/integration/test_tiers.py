"""The seam for tiers below the pool (issue 11, item 5), against the real daemon with the test-only
in-memory tier (`--tier memory`, kvstore/tiers.py): evicted blocks reach the tier with their bytes,
a LOOKUP past the pool's prefix is continued by the tier without the loop waiting on it, and a
tier that fails or is late is a miss, never an error."""

from __future__ import annotations

import threading
import time

import pytest

from kvstore.client import Client
from kvstore.keys import Namespace
from tests.integration.helpers import CALL_S, MiB, as_chain, chain_hashes, random_blocks

# 32 MiB of 4 MiB pages holding 1 MiB blocks: exactly 32 slots (as in test_eviction.py).
POOL, PAGE, BLOCK, CAPACITY = "32MiB", "4MiB", MiB, 32
NS = Namespace(b"model-a")


def _evicted_chain(make_daemon, ctx, n: int, *tier_args: str):  # type: ignore[no-untyped-def]
    """A daemon with tier_args whose pool held a chain of n random blocks, then unrelated blocks
    enough to evict all of it (leaf first). Returns the daemon, the chain's hashes and bytes."""
    d = make_daemon(pool_size=POOL, page_size=PAGE, extra_args=list(tier_args)).start()
    hashes, datas = chain_hashes("old", n), random_blocks(7, [BLOCK] * n)
    with Client(d.address, CALL_S, ctx=ctx) as client:
        assert client.put(NS, as_chain(hashes, datas)).num_stored == n
        filler = chain_hashes("filler", CAPACITY)
        for h in filler:
            assert client.put(NS, [(h, None, bytes(BLOCK))]).num_full == 0
        assert client.stats()["num_evictions"] >= n
    return d, hashes, datas


@pytest.mark.timeout(60)
def test_evicted_blocks_reach_the_tier_and_a_lookup_past_the_pool_brings_them_back(
        make_daemon, ctx):
    d, hashes, datas = _evicted_chain(make_daemon, ctx, 6, "--tier", "memory")
    with Client(d.address, CALL_S, ctx=ctx) as client:
        assert client.stats()["tier"]["num_offered"] >= 6
        # The pool has none of the chain: the tier continues the lookup with all six...
        assert client.lookup(NS, hashes).num_hits == 6
        # ...and put them back into the pool with the bytes they left it with.
        assert client.get(NS, hashes) == datas
        tier = client.stats()["tier"]
        assert tier["num_blocks_found"] >= 6 and tier["num_failed"] == 0


@pytest.mark.timeout(60)
def test_a_slow_tier_does_not_delay_other_clients(make_daemon, ctx):
    """While one LOOKUP waits 1 s on the tier, another client's PINGs and LOOKUPs are answered
    (each well before the tier answers: ordering, not a tight timing)."""
    d, hashes, _ = _evicted_chain(make_daemon, ctx, 4, "--tier", "memory-slow:1s",
                                  "--tier-timeout", "5")
    answered: dict[str, float] = {}

    def slow_lookup() -> None:
        with Client(d.address, CALL_S, ctx=ctx) as a:
            answered["hits"] = a.lookup(NS, hashes).num_hits
        answered["at"] = time.monotonic()

    with Client(d.address, CALL_S, ctx=ctx) as b:
        b.ping()  # connected before the slow lookup starts
        started = time.monotonic()
        thread = threading.Thread(target=slow_lookup)
        thread.start()
        latencies = []
        while thread.is_alive() and time.monotonic() - started < 0.8:
            latencies.append(b.ping())
            t = time.monotonic()
            assert b.lookup(NS, chain_hashes("filler", 4)).num_hits == 4  # all in the pool
            latencies.append(time.monotonic() - t)
        thread.join(CALL_S)
    assert answered["hits"] == 4
    assert answered["at"] - started >= 1.0  # the tier's delay was real
    assert len(latencies) >= 6 and max(latencies) < 0.5, latencies


@pytest.mark.timeout(60)
def test_a_failing_tier_gives_the_pools_prefix_without_an_error(make_daemon, ctx):
    d = make_daemon(pool_size=POOL, page_size=PAGE,
                    extra_args=["--tier", "memory-failing"]).start()
    hashes = chain_hashes("chain", 4)
    with Client(d.address, CALL_S, ctx=ctx) as client:
        assert client.put(NS, as_chain(hashes[:2], [bytes(BLOCK)] * 2)).num_stored == 2
        assert client.lookup(NS, hashes).num_hits == 2  # the tier raised: the pool's two
        assert client.stats()["tier"]["num_failed"] == 1
        assert client.ping() >= 0  # still serving


@pytest.mark.timeout(60)
def test_a_tier_past_its_deadline_gives_the_pools_prefix(make_daemon, ctx):
    d, hashes, _ = _evicted_chain(make_daemon, ctx, 4, "--tier", "memory-slow:3s",
                                  "--tier-timeout", "0.2")
    with Client(d.address, CALL_S, ctx=ctx) as client:
        started = time.monotonic()
        assert client.lookup(NS, hashes).num_hits == 0  # none in the pool, the tier too late
        assert time.monotonic() - started < 2.5
        assert client.stats()["tier"]["num_timed_out"] == 1


@pytest.mark.timeout(60)
def test_without_a_tier_the_daemon_answers_as_before(make_daemon, ctx):
    """Off by default: no tier section in STATS, a miss is answered at once from the pool."""
    d = make_daemon(pool_size=POOL, page_size=PAGE).start()
    with Client(d.address, CALL_S, ctx=ctx) as client:
        assert client.lookup(NS, chain_hashes("none", 3)).num_hits == 0
        assert "tier" not in client.stats()


@pytest.mark.timeout(60)
def test_an_asker_gone_before_the_tier_answers_holds_nothing(make_daemon, ctx, open_dealer):
    """A client that asked with a lease and closed while the tier worked: the blocks still reach
    the pool, but no lease (nor client record) outlives its connection."""
    from kvstore import protocol

    d, hashes, _ = _evicted_chain(make_daemon, ctx, 4, "--tier", "memory-slow:500ms",
                                  "--tier-timeout", "5")
    sock = open_dealer(d.address)
    sock.send(protocol.encode_request(protocol.Op.LOOKUP, 1, ns=NS, hashes=hashes,
                                      lease_ms=30_000))
    with Client(d.address, CALL_S, ctx=ctx) as client:
        client.ping()  # the LOOKUP was read (one loop, messages in order per listener)
        sock.close(0)
        deadline = time.monotonic() + 10
        while client.stats()["tier"]["num_pending"] and time.monotonic() < deadline:
            client.ping()  # the loop's round trip paces this, no sleep
        stats = client.stats()
        assert stats["tier"]["num_blocks_found"] == 4
        assert client.lookup(NS, hashes).num_hits == 4  # in the pool now
        assert stats["num_leases"] == 0 and stats["num_clients"] <= 1, stats

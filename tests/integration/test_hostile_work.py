"""One message cannot stall everyone (issue 10): work a client causes, or that the daemon does on
its own afterwards (expiry, invalidation), runs in bounded slices between other clients' messages,
and SIGTERM is honoured whatever runs. Latency figures are measured by bench/hostile.py; these tests
assert only bounds 10-50x looser than the budget, far below the stalls they catch."""

from __future__ import annotations

import signal
import time

import pytest

from bench.hostile import (
    call, header, hello_token, ping_s, put_chain, put_tiny, recv_reply,
    reserve_tiny, tiny_hashes)
from kvstore.protocol import MAX_WRITE_ROWS, Op
from bench.daemon import wait_until

# Today's budget is 50 ms at p99 (bench/hostile.py); a shared 2-core CI machine gets 20x that.
ANSWER_S = 1.0
NUM_TINY = 2048  # one-byte blocks: each free used to scan a page's free list (~6 ms each)


@pytest.mark.timeout(120)
def test_invalidate_of_many_tiny_blocks_leaves_other_clients_answered(
        make_daemon, open_dealer):
    """While an INVALIDATE of thousands of one-byte blocks runs, others' PINGs are answered."""
    d = make_daemon().start()
    writer, other = open_dealer(d.address), open_dealer(d.address)
    assert put_tiny(writer, b"tiny", tiny_hashes("t", NUM_TINY)) == NUM_TINY
    ping_s(other)  # connected and served once before the attack
    writer.send_multipart([header(Op.INVALIDATE, name=b"tiny")])
    assert ping_s(other) < ANSWER_S
    assert recv_reply(writer)["num_dropped"] == NUM_TINY
    assert call(writer, [header(Op.LOOKUP, ns=[b"tiny", 0], hashes=tiny_hashes("t", 4),
                                 lease_ms=0)])["num_hits"] == 0


@pytest.mark.timeout(120)
def test_abandoned_reservation_of_many_tiny_blocks_expires_without_a_stall(
        make_daemon, open_dealer):
    """Reclaiming thousands of abandoned one-byte reservations never holds up other clients."""
    d = make_daemon(extra_args=["--reserve-timeout", "0.3"]).start()
    writer, other = open_dealer(d.address), open_dealer(d.address)
    token = hello_token(writer)
    assert reserve_tiny(writer, b"gone", tiny_hashes("g", NUM_TINY), token) == NUM_TINY
    worst_s, deadline = 0.0, time.monotonic() + 1.5  # spans the expiry at 0.3 s
    while time.monotonic() < deadline:
        worst_s = max(worst_s, ping_s(other))
    assert worst_s < ANSWER_S
    stats = call(other, [header(Op.STATS)])["stats"]
    # The writer is still connected and may still write: its slots stay fenced until it is gone.
    assert stats["num_reserved"] == 0 and stats["num_slots_used"] == stats["num_fenced"]


@pytest.mark.timeout(120)
def test_sigterm_during_a_large_invalidate_exits_within_a_second(
        make_daemon, open_dealer):
    """SIGTERM sent while the daemon drops thousands of blocks ends it within a second or so."""
    d = make_daemon().start()
    writer = open_dealer(d.address)
    assert put_tiny(writer, b"tiny", tiny_hashes("t", 2 * NUM_TINY)) == 2 * NUM_TINY
    writer.send_multipart([header(Op.INVALIDATE, name=b"tiny")])
    writer.send_multipart([header(Op.PING)])
    time.sleep(0.05)  # the INVALIDATE is being handled (there is no event to wait for)
    start = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: d.proc.poll() is not None, 10.0, what="daemon exit after SIGTERM")
    assert time.monotonic() - start < 2 * ANSWER_S


@pytest.mark.timeout(120)
def test_writing_into_a_pool_full_of_one_long_chain_leaves_other_clients_answered(
        make_daemon, open_dealer):
    """Evicting for a write looks for leaves once per message, not once per block: a pool full
    of one never-read chain (its leaf is the newest block) used to be scanned for every block."""
    d = make_daemon(pool_size="16MiB", page_size="2MiB").start()  # 4,096 slots of 4 KiB
    writer, other = open_dealer(d.address), open_dealer(d.address)
    assert put_chain(writer, b"long", tiny_hashes("a", 4096), 4096) == 4096
    ping_s(other)
    rows = [[h, None] for h in tiny_hashes("b", 2048)]
    for i in range(0, len(rows), MAX_WRITE_ROWS):  # PUTs of the largest size served
        batch = rows[i:i + MAX_WRITE_ROWS]
        writer.send_multipart([header(Op.PUT, ns=[b"long", 0], blocks=batch,
                                      sizes=[4096] * len(batch)), *[bytes(4096)] * len(batch)])
    assert ping_s(other) < ANSWER_S
    assert sum(recv_reply(writer)["num_stored"] for _ in range(0, len(rows), MAX_WRITE_ROWS)) == 2048

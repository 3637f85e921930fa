"""The daemon's memory follows the pool, not what clients send (issue 10): a message of countless
frames is dropped as it is read, tiny blocks are bounded by the minimum slot size, a lease naming
one block many times pins it once. Memory is read from /proc/<pid>/status of the real daemon;
bench/hostile.py measures the figures, these tests assert bounds far below the growth they catch."""

from __future__ import annotations

import pytest

from bench.hostile import (
    call, empty_frames_message, header, ping_s, put_tiny, recv_reply,
    rss_bytes, send_message, tiny_hashes)
from kvstore.protocol import MAX_BLOCKS, Op

MiB = 1 << 20
NUM_FRAMES = 200_000  # ~400 KB on the wire; cost the daemon ~130 MB of frame objects before


@pytest.mark.timeout(120)
def test_message_of_many_empty_frames_is_refused_without_holding_them(
        make_daemon, open_dealer):
    """A PING followed by 200k empty frames is answered with an error; peak memory barely moves."""
    d = make_daemon().start()
    d.wait_prefaulted()  # the pool's pages count in RSS once mapped: before the baseline
    attacker, other = open_dealer(d.address), open_dealer(d.address)
    ping_s(other)
    peak_before = rss_bytes(d.proc.pid, "VmHWM")
    send_message(attacker, empty_frames_message(NUM_FRAMES))
    reply = recv_reply(attacker)
    assert ping_s(other) < 1.0
    # libzmq itself holds the message while it arrives (64 B a frame): 13 MB here.
    assert rss_bytes(d.proc.pid, "VmHWM") - peak_before < 40 * MiB
    assert reply["ok"] is False and reply["error"] == "too_large"


@pytest.mark.timeout(120)
def test_one_byte_blocks_take_a_minimum_slot_so_the_index_is_bounded_by_the_pool(
        make_daemon, open_dealer):
    """A pool filled with one-byte blocks holds pool / --min-block-bytes of them, not pool / 64."""
    d = make_daemon(pool_size="16MiB").start()
    writer = open_dealer(d.address)
    stored = put_tiny(writer, b"tiny", tiny_hashes("t", 4 * MAX_BLOCKS))
    stats = call(writer, [header(Op.STATS)])["stats"]
    # Once full, each PUT evicts older blocks for its own: more are stored than stay resident.
    assert stats["num_blocks"] <= 16 * MiB // 4096 <= stored  # the default minimum slot: 4 KiB


@pytest.mark.timeout(120)
def test_lease_naming_one_block_many_times_pins_it_once(
        make_daemon, open_dealer):
    """A leased LOOKUP repeating one hash MAX_BLOCKS times finds (and pins) that block once."""
    d = make_daemon().start()
    sock = open_dealer(d.address)
    put_tiny(sock, b"rep", [b"r0", b"r1"], nbytes=64)
    reply = call(sock, [header(Op.LOOKUP, ns=[b"rep", 0], hashes=[b"r0"] * MAX_BLOCKS,
                                lease_ms=60_000)])
    assert reply["num_hits"] == 1 and reply["lease"] is not None
    reply = call(sock, [header(Op.LOOKUP, ns=[b"rep", 0], hashes=[b"r0", b"r1", b"r0", b"r1"],
                                lease_ms=0)])
    assert reply["num_hits"] == 2  # a chain never names a block twice: the match stops there


"""Clients leave nothing behind: their private zmq.Context terminates promptly after close, and the
shared segment is unmapped, whatever happened to the daemon in between."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from kvstore.client import Client
from kvstore.errors import ServerUnavailable
from kvstore.keys import Namespace
from bench.daemon import wait_until
from tests.integration.helpers import CALL_S, assert_terminates, is_mapped

NS = Namespace(b"model-a")


def _segment_inodes(segment: str) -> set[str]:
    """Inodes of this process's mappings of the named segment (a restart makes a new inode)."""
    return {line.split()[4] for line in Path("/proc/self/maps").read_text().splitlines()
            if f"/dev/shm/{segment}" in line}


def _traffic(client: Client) -> None:
    client.put(NS, [(b"a", None, bytes(5 * 1024 * 1024)), (b"b", b"a", b"b" * 100)])
    assert client.lookup(NS, [b"a", b"b"], lease_ms=1000).num_hits == 2
    assert len(client.get(NS, [b"a", b"b"])) == 2
    if client.is_local:
        with client.pinned(NS, [b"a"]) as refs:
            assert refs[0].nbytes == 5 * 1024 * 1024


@pytest.mark.timeout(90)
@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
def test_context_terminates_and_segment_unmaps_after_client_traffic(daemon, use_shm):
    """After puts, gets and pins, closing the clients lets ctx.term() finish and unmaps the pool."""
    ctx = zmq.Context()
    clients = [Client(daemon.address, CALL_S, ctx=ctx, use_shm=use_shm) for _ in range(3)]
    for client in clients:
        _traffic(client)
    assert is_mapped(daemon.segment) is use_shm
    for client in clients:
        client.close()
    assert not is_mapped(daemon.segment)
    assert_terminates(ctx)


@pytest.mark.timeout(90)
def test_context_terminates_after_calls_to_a_dead_daemon(daemon):
    """Timed-out calls leave no socket behind: term() finishes after close."""
    ctx = zmq.Context()
    with Client(daemon.address, 0.3, ctx=ctx) as client:
        _traffic(client)
        daemon.stop()
        for _ in range(3):
            with pytest.raises(ServerUnavailable):
                client.get(NS, [b"a"])
    assert not is_mapped(daemon.segment)
    assert_terminates(ctx)


@pytest.mark.timeout(120)
def test_reattach_after_restart_unmaps_the_old_segment(daemon):
    """Rejoining a restarted daemon maps its new segment and drops the old mapping."""
    ctx = zmq.Context()
    with Client(daemon.address, CALL_S, ctx=ctx) as client:
        _traffic(client)
        before = _segment_inodes(daemon.segment)
        daemon.restart()
        _traffic(client)
        after = _segment_inodes(daemon.segment)
        assert len(before) == len(after) == 1 and before != after
    assert not is_mapped(daemon.segment)
    assert_terminates(ctx)


@pytest.mark.timeout(90)
def test_leak_check_catches_a_client_left_open(daemon):
    """The termination check is not vacuous: an unclosed client blocks term() until it is closed."""
    ctx = zmq.Context()
    client = Client(daemon.address, CALL_S, ctx=ctx, use_shm=False)
    client.ping()
    with pytest.raises(AssertionError, match="socket leak"):
        assert_terminates(ctx, timeout_s=0.5)
    client.close()  # the term() still waiting in assert_terminates' thread now returns
    wait_until(lambda: ctx.closed, 20.0, what="context terminated after close")

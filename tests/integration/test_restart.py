"""The daemon goes away and comes back: calls fail fast with ServerUnavailable, then the same
Client object works again, shared segment re-attached, without being recreated."""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path

import pytest

from kvstore.client import Client
from kvstore.errors import ServerUnavailable
from kvstore.keys import Namespace
from bench.daemon import Daemon, free_port, wait_until
from tests.integration.helpers import CALL_S, random_blocks

NS = Namespace(b"model-a")
_SEGMENT_HEADER = struct.Struct("<8sQ16s")  # pool.py's header page: magic, owner pid, token
TIMEOUT_S = 0.5
SLACK_S = 1.5  # process scheduling on a loaded, possibly shared 2-core machine


def _unavailable_within_timeout(call) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    with pytest.raises(ServerUnavailable):
        call()
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT_S + SLACK_S, f"a call to a dead daemon took {elapsed:.2f} s"
    return elapsed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
def test_same_client_fails_fast_while_daemon_down_and_works_after_restart(daemon, ctx, use_shm):
    """Every call raises ServerUnavailable within the timeout while down; after restart it works."""
    data = random_blocks(1, [8192])[0]
    with Client(daemon.address, TIMEOUT_S, ctx=ctx, use_shm=use_shm) as client:
        client.put(NS, [(b"before", None, data)])
        old_token = client.pool.token if client.pool else None
        daemon.stop()
        for call in (client.ping, lambda: client.lookup(NS, [b"before"]),
                     lambda: client.get(NS, [b"before"]), client.stats,
                     lambda: client.put(NS, [(b"during", None, data)])):
            _unavailable_within_timeout(call)
        daemon.start()
        # Back up: what follows is about rejoining, not speed. A daemon just started on a loaded
        # CI machine once took longer than TIMEOUT_S to answer.
        client.timeout_s = CALL_S
        assert client.lookup(NS, [b"before"]).num_hits == 0, "a fresh daemon starts empty"
        assert client.put(NS, [(b"after", None, data)]).num_stored == 1
        assert client.get(NS, [b"after"]) == [data]
        assert client.is_local is use_shm
        if use_shm:
            assert client.pool is not None and client.pool.token != old_token, "old segment kept"
            assert client.stats()["bytes_in"]["shm"] == len(data)


@pytest.mark.timeout(120)
def test_restart_between_calls_reattaches_the_new_segment_without_an_error(daemon, ctx):
    """A daemon restarted between two calls is rejoined transparently (stale segment -> HELLO)."""
    data = random_blocks(2, [4096])[0]
    with Client(daemon.address, CALL_S, ctx=ctx) as client:
        client.put(NS, [(b"first", None, data)])
        old_token = client.pool.token
        daemon.restart()
        assert client.put(NS, [(b"second", None, data)]).num_stored == 1
        assert client.get(NS, [b"second"]) == [data]
        assert client.pool.token != old_token
        with client.pinned(NS, [b"second"]) as refs:
            assert bytes(client.pool.view(refs[0].slot, refs[0].nbytes)) == data


@pytest.mark.timeout(120)
@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
def test_first_call_after_a_restart_does_not_wait_for_zeromq_reconnect_backoff(
        daemon, ctx, use_shm, monkeypatch):
    """A socket in ZeroMQ's reconnect backoff is replaced by a fresh one at the first call.

    The backoff is stretched to 30 s here, so the old socket cannot reconnect in time: only a
    new socket can answer within the 1 s timeout (the default backoff reaches 1 s, which made a
    vLLM load right after a daemon restart fail in the e2e tests).
    """
    monkeypatch.setattr("kvstore.calls._RECONNECT_IVL_MS", 30_000)
    monkeypatch.setattr("kvstore.calls._RECONNECT_IVL_MAX_MS", 30_000)
    data = random_blocks(4, [8192])[0]
    with Client(daemon.address, 1.0, ctx=ctx, use_shm=use_shm) as client:
        client.put(NS, [(b"before", None, data)])
        daemon.stop()
        time.sleep(0.3)  # the socket notices the disconnect and schedules its reconnect
        daemon.start()
        start = time.monotonic()
        assert client.put(NS, [(b"after", None, data)]).num_stored == 1
        assert client.get(NS, [b"after"]) == [data]
        assert time.monotonic() - start < 1.0 + SLACK_S


@pytest.mark.timeout(120)
def test_sigkill_mid_run_turns_calls_into_misses_then_recovers(daemon, ctx):
    """A client loop never hangs across a SIGKILL: calls fail within the timeout, then succeed."""
    data = random_blocks(3, [64 * 1024])[0]
    outcomes: list[tuple[str, float]] = []
    recovered = threading.Event()

    def run() -> None:
        with Client(daemon.address, TIMEOUT_S, ctx=ctx) as client:
            i = 0
            while not recovered.is_set():
                start = time.monotonic()
                try:
                    client.put(NS, [(b"k%d" % i, None, data)])
                    ok = client.get(NS, [b"k%d" % i]) == [data]
                    outcomes.append(("ok" if ok else "corrupt", time.monotonic() - start))
                except ServerUnavailable:
                    outcomes.append(("unavailable", time.monotonic() - start))
                i += 1

    worker = threading.Thread(target=run)
    worker.start()
    try:
        wait_until(lambda: len(outcomes) >= 20, 30.0, what="traffic before the kill")
        daemon.kill()
        assert daemon.segment_path.exists(), "SIGKILL leaves the segment behind"
        wait_until(lambda: outcomes[-1][0] == "unavailable", 20.0, what="calls failing")
        daemon.start()  # the same segment name: the stale segment is replaced
        n = len(outcomes)
        wait_until(lambda: any(o == "ok" for o, _ in outcomes[n:]), 30.0, what="recovery")
    finally:
        recovered.set()
        worker.join(10.0)
    assert not worker.is_alive(), "client loop hung"
    kinds = {kind for kind, _ in outcomes}
    assert kinds == {"ok", "unavailable"}, kinds
    # put + get is two calls: the slowest failing iteration may wait out two timeouts.
    slowest = max(t for _, t in outcomes)
    assert slowest < 2 * TIMEOUT_S + SLACK_S, f"an iteration took {slowest:.2f} s"


@pytest.mark.timeout(90)
def test_client_of_a_daemon_that_never_started_fails_within_timeout(ctx):
    """With nothing listening, calls raise ServerUnavailable within the timeout, repeatedly."""
    with Client(f"tcp://127.0.0.1:{free_port()}", TIMEOUT_S, ctx=ctx) as client:
        for _ in range(3):
            _unavailable_within_timeout(client.ping)
        _unavailable_within_timeout(lambda: client.get(NS, [b"x"]))


@pytest.mark.timeout(120)
def test_restarted_daemon_replaces_segment_left_by_a_killed_one(make_daemon):
    """A daemon started on the segment name of a SIGKILLed one removes the stale segment."""
    d: Daemon = make_daemon().start()
    killed_pid = d.proc.pid
    d.kill()
    assert _owner_pid(d.segment_path) == killed_pid
    d.start()
    assert _owner_pid(d.segment_path) == d.proc.pid
    assert d.stop() == 0
    assert not d.segment_path.exists()


def _owner_pid(path: Path) -> int:
    with open(path, "rb") as f:
        magic, pid, _ = _SEGMENT_HEADER.unpack(f.read(_SEGMENT_HEADER.size))
    assert magic == b"KVSTORE1"
    return int(pid)

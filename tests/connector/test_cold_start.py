"""Cold starts and daemon restarts against the real daemon: the connector says HELLO when it starts
and again when a daemon comes back, so no request pays for connecting or misses because of it."""

from __future__ import annotations

import signal
import time

import pytest

from connectors.vllm_v1.config import ConnectorConfig
from connectors.vllm_v1.keeper import Keeper
from connectors.vllm_v1.scheduler_side import SchedulerSide
from connectors.vllm_v1.worker_side import WorkerSide
from kvstore.client import Client
from kvstore.keys import Namespace
from tests.connector import fakes
from bench.daemon import Daemon, wait_until

pytestmark = pytest.mark.timeout(60)

BLOCK = 4
NS = Namespace(b"cold-start-test")


class Watcher:
    """Reads the daemon's request counts over one connection (one HELLO of its own, up front)."""

    def __init__(self, address: str) -> None:
        self.client = Client(address, 2.0, use_shm=False)
        self.base = self.requests()

    def requests(self) -> dict[str, int]:
        return dict(self.client.stats()["requests"])

    def new(self, op: str) -> int:
        """op requests since this watcher started."""
        return self.requests().get(op, 0) - self.base.get(op, 0)


def config(address: str, **overrides: int) -> ConnectorConfig:
    # Generous budgets: CI machines are shared (a daemon just restarted there once took over 1 s
    # to answer a lookup); what is tested never waits them out.
    settings = {"timeout_ms": 5000, "lookup_timeout_ms": 5000, "lookup_wait_ms": 5,
                "retry_interval_ms": 1000, **overrides}
    return ConnectorConfig(address=address, **settings)  # type: ignore[arg-type]


def ask(sched: SchedulerSide, req: fakes.Req) -> int | None:
    """Ask as vLLM's scheduler does, step after step, until the lookup settles; the tokens."""
    deadline = time.monotonic() + 10.0
    while (answer := sched.get_num_new_matched_tokens(req, 0))[0] is None:
        assert time.monotonic() < deadline, "the lookup never settled"
    return answer[0]


def test_scheduler_says_hello_when_it_starts(daemon: Daemon) -> None:
    """Constructed, and no request yet: the daemon has had a HELLO, and no lookup."""
    watcher = Watcher(daemon.address)
    sched = SchedulerSide(config(daemon.address), NS, BLOCK)
    try:
        wait_until(lambda: sched.is_connected, 10, what="connected")
        assert watcher.new("hello") >= 1
        assert watcher.new("lookup") == 0
    finally:
        sched.shutdown()
        watcher.client.close()


def test_worker_says_hello_when_it_starts(daemon: Daemon) -> None:
    """The worker side connects its load and save clients before its first load or save."""
    watcher = Watcher(daemon.address)
    worker = WorkerSide(config(daemon.address), NS, BLOCK)
    try:
        # the keeper's own HELLO, then one for each of the load and save clients
        wait_until(lambda: watcher.new("hello") >= 3, 10, what="HELLOs from the worker side")
    finally:
        worker.shutdown()
        watcher.client.close()


def test_first_lookup_right_after_start_is_not_charged_for_connecting(daemon: Daemon) -> None:
    """A request arriving while the first HELLO is on its way still gets its hits, even with a
    lookup budget far below what connecting costs on a busy machine."""
    req = fakes.make_request("r", 4, BLOCK)
    fakes.store(daemon.address, NS, req, 4)
    sched = SchedulerSide(config(daemon.address, lookup_timeout_ms=1, lookup_wait_ms=1), NS, BLOCK)
    try:
        assert ask(sched, req) == 4 * BLOCK
    finally:
        sched.shutdown()


def test_after_a_daemon_restart_the_next_lookup_hits(daemon: Daemon) -> None:
    """A lookup that failed while the daemon was down opens the breaker; once the daemon is back
    the connector says HELLO on its own, and the next request gets its hits at once instead of
    missing until the breaker's pause (here 10 s) runs out."""
    first = fakes.make_request("first", 4, BLOCK)
    fakes.store(daemon.address, NS, first, 4)
    sched = SchedulerSide(config(daemon.address, retry_interval_ms=10_000), NS, BLOCK)
    try:
        wait_until(lambda: sched.is_connected, 10, what="connected")
        assert ask(sched, first) == 4 * BLOCK
        daemon.stop()
        assert ask(sched, fakes.make_request("down", 4, BLOCK)) == 0
        daemon.start()
        req = fakes.make_request("r", 4, BLOCK)
        fakes.store(daemon.address, NS, req, 4)
        watcher = Watcher(daemon.address)  # counts from after the store's own HELLO
        # the keeper's HELLO, then its fresh client's for the lookup thread
        wait_until(lambda: watcher.new("hello") >= 2 and sched.is_connected, 10,
                   what="HELLOs to the new daemon")
        assert ask(sched, req) == 4 * BLOCK
        watcher.client.close()
    finally:
        sched.shutdown()


def test_one_slow_keepalive_does_not_turn_lookups_into_misses(daemon: Daemon) -> None:
    """A daemon that misses one keepalive (stalled past the probe's timeout, here by SIGSTOP, on a
    loaded machine by the scheduler) is still up for lookups, which have their own budget; one
    that misses two in a row is down (CI: a replica reported 0 pool tokens right after a hit)."""
    keeper = Keeper(lambda use_shm: Client(daemon.address, 0.6, use_shm=False),
                    {"lookup": False}, probe_timeout_s=0.6).start()
    assert daemon.proc is not None
    try:
        wait_until(lambda: keeper.is_up, 10, what="first HELLO")
        generations = keeper.num_generations
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: keeper.num_failed_probes >= 1, 10, interval_s=0.01,
                       what="a probe timing out")
            assert keeper.is_up, "one missed keepalive marked the daemon down"
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: keeper.num_failed_probes == 0, 10, what="a probe answering")
        assert keeper.is_up and keeper.num_generations == generations
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: not keeper.is_up, 10, what="two probes timing out: down")
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: keeper.is_up, 10, what="up again")
    finally:
        keeper.stop()


def test_stop_waits_for_a_hello_in_flight_and_leaves_no_client(daemon: Daemon) -> None:
    """stop() while the keeper's HELLO waits on a stalled daemon: when stop() returns the thread
    has ended and no connected client is left for a slot. (Before, stop() returned at once and
    the thread logged its failed connect after the connector had shut down: seen in a CI log.)"""
    keeper = Keeper(lambda use_shm: Client(daemon.address, 0.5, use_shm=False),
                    {"lookup": False}, probe_timeout_s=0.5).start()
    assert daemon.proc is not None
    try:
        wait_until(lambda: keeper.is_up, 10, what="first HELLO")
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            keeper.poke()  # probe now: the HELLO waits on the stalled daemon
            time.sleep(0.1)
            keeper.stop()
            assert not keeper.is_running, "stop() returned with the keeper's thread still running"
            assert keeper.take("lookup") is None
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
    finally:
        keeper.stop()

"""The loop's busy polling (--busy-poll-us): it serves as before, and it costs no CPU while the
daemon is idle, however long the window.

The window is spent only while the talk is tight (each message came within the window of the
loop starting to wait); once a wait ends without one, the loop sleeps until the next message. A
loop that kept spinning on each idle wake-up (every 50 ms) would burn a fifth of a core here.
"""

from __future__ import annotations

import time

from kvstore.client import Client
from kvstore.keys import Namespace
from bench.daemon import Daemon
from bench.machine import CLOCK_TICKS, proc_jiffies
from tests.integration.helpers import CALL_S, as_chain, chain_hashes, random_blocks

NS = Namespace(b"busy-poll")


def _cpu_s(pid: int) -> float:
    return proc_jiffies(pid) / CLOCK_TICKS


def test_longest_window_serves_and_an_idle_daemon_stays_idle() -> None:
    d = Daemon(pool_size="64MiB", extra_args=["--busy-poll-us", "10000"]).start()
    try:
        assert d.proc is not None
        hashes = chain_hashes("busy", 8)
        datas = random_blocks(3, [4096] * 8)
        with Client(d.address, timeout_s=CALL_S) as client:
            assert client.put(NS, as_chain(hashes, datas)).num_stored == 8
            for _ in range(200):  # back to back: the loop spins between them
                found = client.lookup(NS, hashes, lease_ms=1000)
                assert found.num_hits == 8 and client.release(found.lease)
            assert [bytes(b) for b in client.get(NS, hashes)] == datas
        time.sleep(0.2)  # the last window ends (10 ms), the client's goodbye is handled
        before = _cpu_s(d.proc.pid)
        time.sleep(2.0)
        idle_cpu_s = _cpu_s(d.proc.pid) - before
        # Asleep: a wake-up each 50 ms for maintenance, well under 10 ms of CPU a second. The
        # same loop spinning its 10 ms window on each of those wake-ups would use ~0.4 s here.
        assert idle_cpu_s < 0.1, f"an idle daemon used {idle_cpu_s:.2f} s of CPU in 2 s"
    finally:
        d.stop()


def _paced_pings_cpu_s(window_us: int, num: int = 400, pace_s: float = 0.0006) -> float:
    """The daemon's CPU over num pings, each sent pace_s after the last reply."""
    d = Daemon(pool_size="64MiB", extra_args=["--busy-poll-us", str(window_us)]).start()
    try:
        assert d.proc is not None
        with Client(d.address, timeout_s=CALL_S) as client:
            for _ in range(20):
                client.ping()
            time.sleep(0.1)
            before = _cpu_s(d.proc.pid)
            for _ in range(num):
                time.sleep(pace_s)
                client.ping()
            return _cpu_s(d.proc.pid) - before
    finally:
        d.stop()


def test_a_conversation_paced_slower_than_the_window_costs_no_polling() -> None:
    """Pings 0.6 ms apart against a 300 us window: each comes after the window would have
    ended, so the loop sleeps instead of spinning in vain (a 1 ms "talking" gate spun a whole
    window per message: ~2.4x the CPU of a daemon that never polls, bench.lookup_cost)."""
    never_polls_s = _paced_pings_cpu_s(0)
    window_s = _paced_pings_cpu_s(300)
    assert window_s < 1.5 * never_polls_s + 0.02, (
        f"paced pings cost the daemon {window_s:.3f} s of CPU with a 300 us window, "
        f"{never_polls_s:.3f} s without polling")

"""Python's cyclic garbage collector kept off the loop's latency (issue 10: another client's PING
is answered within 50 ms at p99).

A full (generation 2) pass scans every tracked object the daemon holds, whatever the loop is
doing. The index holds about three per block (100,000 blocks: 69 ms a pass, 400,000: 176 ms, on
the 2-core bench host), and startup leaves about 25,000 more (modules, classes, functions: 12 ms).
CPython starts a full pass whenever the old generation has grown by a quarter, so clients that
add many small blocks (a tiny fill, RESERVE or INVALIDATE of tiny blocks) set one off every
second or so: in the soak those passes took up to 290 ms and found nothing to free. The
daemon's objects are freed by reference counting (an entry that leaves the index is gone);
cycles are rare.

So, once the daemon is up (settle()):
- what startup made is frozen (gc.freeze): never scanned again;
- the automatic young passes stay (they scan only objects made since the last pass: cheap), the
  automatic full pass is off (its threshold out of reach);
- the loop runs the full pass itself every FULL_PASS_PERIOD_S (collect_if_due()), so cyclic
  garbage cannot pile up: it lives at most that long.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)

# Cyclic garbage lives at most this long; one pass this rarely is outside any p99 of PINGs.
FULL_PASS_PERIOD_S = 600.0
_NEVER = 2**31 - 1  # a generation-2 threshold no count reaches: no automatic full pass


class FullPasses:
    """When the loop's next full pass is due."""

    def __init__(self, period_s: float = FULL_PASS_PERIOD_S) -> None:
        self.period_s = period_s
        self.next_s = time.monotonic() + period_s

    def collect_if_due(self, now_s: float) -> None:
        if now_s < self.next_s:
            return
        self.next_s = now_s + self.period_s
        start_s = time.perf_counter()
        num = gc.collect()
        log.debug("full GC pass: %d unreachable objects, %.1f ms", num,
                  (time.perf_counter() - start_s) * 1000)


def settle() -> FullPasses:
    """Freeze what startup made and turn off the automatic full pass (call once, before the
    loop); the loop then calls collect_if_due() between messages."""
    gc.collect()  # startup's own garbage goes first, it must not be frozen
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, _NEVER)
    return FullPasses()

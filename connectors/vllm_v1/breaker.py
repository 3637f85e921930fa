"""A circuit breaker: after a daemon failure, skip the daemon for a while, doubling the pause.

While open, the connector reports misses and skips saves at no cost, so a dead daemon costs
one timeout per pause instead of one per request or per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Breaker:
    MAX_DOUBLINGS = 5  # the pause grows to 32x the base (32 s with the default 1 s)

    def __init__(self, base_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._base_s = base_s
        self._max_s = base_s * 2**self.MAX_DOUBLINGS
        self._clock = clock
        self._pause_s = 0.0
        self._closed_at_s = 0.0  # the daemon is tried again from this time on

    def is_open(self) -> bool:
        """True while the daemon should be skipped."""
        return self._clock() < self._closed_at_s

    def failure(self) -> None:
        self._pause_s = min(self._max_s, self._pause_s * 2 if self._pause_s else self._base_s)
        self._closed_at_s = self._clock() + self._pause_s

    def success(self) -> None:
        self._pause_s = 0.0

    def close(self) -> None:
        """The daemon is known to answer again (a new connection): stop skipping it now."""
        self._pause_s = 0.0
        self._closed_at_s = 0.0

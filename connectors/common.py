"""What both connectors (vllm_v1, lmcache) share: the circuit breaker and settings checks.

The breaker: after a daemon failure, skip the daemon for a while, doubling the pause. While
open, a connector reports misses and skips saves at no cost, so a dead daemon costs one timeout
per pause instead of one per request or per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


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


def checked_setting(name: str, value: Any, default: Any) -> Any:
    """value, if it has the type of the setting's default; a clear error naming it otherwise."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
    elif value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, not {value!r}")
    return value

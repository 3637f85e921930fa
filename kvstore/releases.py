"""The frames of a very large message, let go a slice at a time after it has been answered.

Only the loop thread uses it. Dropping a message's last Python reference frees libzmq's buffers
on the spot, and malloc_trim (kvstore/malloc.py) then returns the memory to the kernel: for a
message of ~1 GiB (one a client may send: libzmq bounds a frame, never a message) that was about
0.1 ms a MiB to free and 0.06 a MiB to trim here, 100-200 ms of the loop at once, while every
other client waited (issue 10: a PING within 50 ms at p99). Released in slices of SLICE_BYTES,
each followed by a trim, the loop serves the other listeners between slices.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import zmq

# Frame bytes freed (and trimmed) per step: ~5-10 ms of loop time on the bench host.
SLICE_BYTES = 64 << 20


class Releases:
    """Frames waiting to be let go, oldest first, and the trim to run after each slice."""

    def __init__(self, trim: Callable[[], object], slice_bytes: int = SLICE_BYTES) -> None:
        self._frames: deque[zmq.Frame] = deque()
        self._trim = trim
        self._is_trim_due = False
        self.slice_bytes = slice_bytes

    @property
    def is_pending(self) -> bool:
        return bool(self._frames) or self._is_trim_due

    def add(self, frames: list[zmq.Frame]) -> None:
        """Take over frames (the caller drops its own references right after); with none (a
        message already dropped as it was read), just trim at the next step."""
        self._frames.extend(frames)
        self._is_trim_due = True

    def step(self) -> bool:
        """Let go of up to slice_bytes of frames, then trim; whether frames are left."""
        frames, num_bytes = self._frames, 0
        while frames and num_bytes < self.slice_bytes:
            num_bytes += len(frames.popleft())  # its last reference: libzmq frees the buffer
        if num_bytes or self._is_trim_due:
            self._trim()
        self._is_trim_due = bool(frames)
        return bool(frames)

"""Reading messages off the daemon's ROUTER with a bound on the frames the daemon holds of one.

Only the loop thread uses it. ZeroMQ delivers a peer's multipart message whole, after assembling
it (libzmq 4.3 bounds one frame, ZMQ_MAXMSGSIZE, never a message's frame count or total: see
docs/operating.md, Memory). This keeps at most max_frames of a message as Python objects and reads
the rest off in slices, dropping each as it comes, so a message of a million empty frames costs
neither a million objects nor one unbroken stall of the loop (signals, expiry run in between).
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq


@dataclass(slots=True)
class Oversized:
    """A message dropped for having more than max_frames frames; the daemon answers the peer."""

    identity: bytes
    header: bytes  # its first frame after the identity (the request header), for the reply's id
    num_frames: int


class Inbox:
    """Whole messages from sock, or Oversized once an over-long one has been read and dropped."""

    def __init__(self, sock: zmq.Socket, max_frames: int, drop_slice: int) -> None:
        self.sock = sock
        self.max_frames = max_frames  # identity and header included
        self.drop_slice = drop_slice  # frames dropped per call while discarding a message
        self._dropping: Oversized | None = None

    @property
    def is_dropping(self) -> bool:
        """Whether a message is being read off in slices (its frames are ready: poll at once)."""
        return self._dropping is not None

    def next(self) -> list[zmq.Frame] | Oversized | None:
        """The next message (identity first); None when none is ready, or a drop slice ended."""
        if self._dropping is None:
            try:
                first = self.sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            frames, more = [first], first.more
            recv = self.sock.recv
            # The rest of a message is already here: ZeroMQ delivers a message whole.
            while more and len(frames) < self.max_frames:
                frame = recv(copy=False)
                frames.append(frame)
                more = frame.more
            if not more:
                return frames
            header = frames[1].bytes if len(frames) > 1 else b""
            self._dropping = Oversized(first.bytes, header, len(frames))
        return self._drop_slice()

    def _drop_slice(self) -> Oversized | None:
        dropping = self._dropping
        assert dropping is not None, "no message being dropped"
        recv = self.sock.recv
        for _ in range(self.drop_slice):
            frame = recv(copy=False)  # a view of libzmq's buffer: dropped without a copy
            dropping.num_frames += 1
            if not frame.more:
                self._dropping = None
                return dropping
        return None

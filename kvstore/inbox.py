"""Reading messages off one of the daemon's ROUTER sockets in bounded slices of frames.

Only the loop thread uses it. ZeroMQ delivers a peer's multipart message whole, after assembling
it (libzmq 4.3 bounds one frame, ZMQ_MAXMSGSIZE, never a message's frame count or total: see
docs/operating.md, Memory), and no other message of that socket can be read before all of its
frames are. So each call reads at most slice_frames frames and keeps a message read in part for
the next call: the loop serves its other sockets (listeners, kvstore/listeners.py), signals and
expiry in between. At most max_frames of a message are kept as Python objects; the rest are read
off and dropped, so a message of a million empty frames costs neither a million objects nor one
unbroken stall.
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq

_POLLIN = int(zmq.POLLIN)  # a plain int: IntFlag's & runs in Python, on every idle turn


@dataclass(slots=True)
class Oversized:
    """A message dropped for having more than max_frames frames; the daemon answers the peer."""

    identity: bytes
    header: bytes  # its first frame after the identity (the request header), for the reply's id
    num_frames: int


class Inbox:
    """Whole messages from sock, or Oversized once an over-long one has been read and dropped."""

    def __init__(self, sock: zmq.Socket, max_frames: int, slice_frames: int) -> None:
        self.sock = sock
        self.max_frames = max_frames  # identity and header included
        self.slice_frames = slice_frames  # frames read per call at most
        self._frames: list[zmq.Frame] = []  # a message read in part
        self._dropping: Oversized | None = None

    @property
    def is_reading(self) -> bool:
        """Whether a message is read in part (its other frames are here: call again at once)."""
        return bool(self._frames) or self._dropping is not None

    def next(self) -> list[zmq.Frame] | Oversized | None:
        """The next whole message (identity first), or Oversized once one is read off; None when
        nothing is ready or this call's slice ended inside a message."""
        budget = self.slice_frames
        if self._dropping is not None:
            return self._drop(budget)
        frames = self._frames
        if not frames:
            # Asked first: a recv that finds nothing raises zmq.Again, whose construction costs
            # more than the rest of an idle turn (pyzmq imports inside ZMQError.__init__).
            if not self.sock.get(zmq.EVENTS) & _POLLIN:
                return None
            try:
                frames.append(self.sock.recv(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                return None
            budget -= 1
        more = frames[-1].more
        recv = self.sock.recv
        # The rest of a message is already here: ZeroMQ delivers a message whole.
        while more and budget > 0 and len(frames) < self.max_frames:
            frame = recv(copy=False)
            frames.append(frame)
            more = frame.more
            budget -= 1
        if not more:
            self._frames = []
            return frames
        if len(frames) < self.max_frames:
            return None  # the slice ended: the rest of this message on the next call
        header = frames[1].bytes if len(frames) > 1 else b""
        self._dropping = Oversized(frames[0].bytes, header, len(frames))
        self._frames = []
        return self._drop(budget)

    def _drop(self, budget: int) -> Oversized | None:
        dropping = self._dropping
        assert dropping is not None, "no message being dropped"
        recv = self.sock.recv
        for _ in range(budget):
            frame = recv(copy=False)  # a view of libzmq's buffer: dropped without a copy
            dropping.num_frames += 1
            if not frame.more:
                self._dropping = None
                return dropping
        return None

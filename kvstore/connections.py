"""The daemon's view of client connections: which connection (socket fd) a ROUTER peer identity
speaks on, when that connection closes, and how many reply bytes are still queued to it.

No cache logic: server.py ends a closed connection's holdings in the Store (kvstore/clients.py).
"""

from __future__ import annotations

import logging
import socket
from collections import deque

from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from kvstore.protocol import CHUNK_BYTES

log = logging.getLogger("kvstore.server")

# Copied reply bytes queued to one client and not yet taken by ZeroMQ: a client that stops reading
# costs the daemon this much, then its GETs answer "busy". Eight worker batches (32 MiB); a quarter
# of a smaller pool, so the daemon's memory margin scales with it.
MAX_CLIENT_UNSENT_BYTES = 256 * 1024 * 1024
MAX_UNSENT_BYTES = 1024 * 1024 * 1024  # the same over all clients: a bound on the daemon's RSS
# A reply ZeroMQ could not hand to the kernel for this long has no reader: every client gives up
# well before (the connector's load timeout is 5 s), so its connection is cut and its bytes freed.
MAX_UNSENT_AGE_S = 10.0
_POLLIN = int(zmq.POLLIN)  # a plain int: IntFlag's & runs in Python, on every loop turn


class Connections:
    """Maps peer identities to the fd of their connection, from each message's source fd and the
    socket monitor's disconnect events (which name the fd). Both work for tcp:// and ipc://.

    An fd is reused once closed, so before an identity is first mapped the pending events are read:
    libzmq reports a disconnect before it closes the fd, so a new connection's first message is
    never read before the old one's end on the same fd.
    """

    def __init__(self, sock: zmq.Socket) -> None:
        self._sock = sock
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._fd_of: dict[bytes, int] = {}
        self._on_fd: dict[int, set[bytes]] = {}
        self._ended_early: list[bytes] = []  # read by cut(), reported by the next closed()

    def seen(self, identity: bytes, fd: int) -> list[bytes]:
        """Note a message of identity from fd; returns identities whose connection ended."""
        if self._fd_of.get(identity) == fd:
            return []
        ended = self.closed()
        old = self._fd_of.pop(identity, None)
        if old is not None:
            # The same identity on another connection (it reconnected with a chosen routing id):
            # the old connection's holdings end, the new one starts with none.
            self._on_fd[old].discard(identity)
            ended.append(identity)
        self._fd_of[identity] = fd
        self._on_fd.setdefault(fd, set()).add(identity)
        return ended

    def cut(self, identity: bytes) -> bool:
        """Close identity's connection under ZeroMQ (shutdown of its fd): ZeroMQ then drops the
        connection and its queued replies, and the monitor reports the disconnect as usual."""
        for ended in self.closed():  # an fd already closed may belong to another connection now
            self._ended_early.append(ended)
        fd = self._fd_of.get(identity)
        if fd is None or fd < 0:
            return False
        try:
            sock = socket.socket(fileno=fd)  # a view of ZeroMQ's fd: detached below, never closed
        except OSError:
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            log.warning("cannot cut connection of %s: %s", identity.hex(), exc)
            return False
        finally:
            sock.detach()
        return True

    def is_open(self, identity: bytes) -> bool:
        """Whether identity's connection has not been seen closing (a deferred reply's asker may
        be gone; one whose end is not read yet is ended by the next closed(), as usual)."""
        return identity in self._fd_of

    def closed(self) -> list[bytes]:
        """Identities whose connection closed since the last call."""
        ended, self._ended_early = self._ended_early, []
        monitor = self._monitor
        while True:
            if not monitor.get(zmq.EVENTS) & _POLLIN:  # no zmq.Again to build (inbox.py)
                return ended
            try:
                frames = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return ended
            event = parse_monitor_message(frames)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                for identity in self._on_fd.pop(int(event["value"]), ()):
                    self._fd_of.pop(identity, None)
                    ended.append(identity)

    def close(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(0)


class Unsent:
    """TCP GET replies ZeroMQ still holds, per client and in total (send trackers).

    A reply to a client with nothing queued is sent zero-copy from the pool, its blocks pinned
    until ZeroMQ lets the frames go, as long as such pins stay under an eighth of the pool. Other
    replies are copies, in buffers of CHUNK_BYTES reused once ZeroMQ lets them go (fresh
    allocations of MiBs page-fault on first touch: 0.3 GB/s here, 2-3 GB/s into a used buffer).
    So a client that stops reading pins at most one reply, and for at most MAX_UNSENT_AGE_S.
    """

    def __init__(self, pool_bytes: int) -> None:
        self.max_client_bytes = min(MAX_CLIENT_UNSENT_BYTES, max(pool_bytes // 4, 2 * CHUNK_BYTES))
        self.max_total_bytes = min(MAX_UNSENT_BYTES, max(pool_bytes, 4 * self.max_client_bytes))
        self.max_pinned_bytes = pool_bytes // 8
        self.total_bytes = 0  # of copies
        self.pinned_bytes = 0  # of zero-copy replies
        # Per client, oldest first: (tracker, copy buffers, sent at, pinned bytes, what is pinned:
        # the blocks, handed back by collect() for the caller to let go).
        self._queued: dict[bytes, deque[tuple[Any, list[bytearray], float, int, Any]]] = {}
        self._free: list[bytearray] = []  # at most max_total_bytes of them
        self._bytes: dict[bytes, int] = {}
        self._cut: set[bytes] = set()  # clients already cut, until their replies are let go

    def room_for(self, identity: bytes) -> int:
        """How many more reply bytes identity may have queued now (0: answer busy)."""
        return max(0, min(self.max_client_bytes - self._bytes.get(identity, 0),
                          self.max_total_bytes - self.total_bytes))

    def can_pin(self, identity: bytes, nbytes: int) -> bool:
        """Whether a reply of nbytes to identity may go zero-copy (pinning its blocks)."""
        return identity not in self._queued and self.pinned_bytes + nbytes <= self.max_pinned_bytes

    def copy(self, views: list[memoryview]) -> tuple[list[zmq.Frame], list[bytearray]]:
        """Payload frames holding copies of views (each at most CHUNK_BYTES), packed into
        buffers; hand both to add() once sent, or give the buffers back with release()."""
        frames: list[zmq.Frame] = []
        buffers: list[bytearray] = []
        buf, used = memoryview(b""), 0
        for view in views:
            n = len(view)
            if used + n > len(buf):
                buffers.append(self._free.pop() if self._free else bytearray(CHUNK_BYTES))
                buf, used = memoryview(buffers[-1]), 0
            buf[used:used + n] = view
            frames.append(zmq.Frame(buf[used:used + n], track=True, copy=False))
            used += n
        return frames, buffers

    def release(self, buffers: list[bytearray]) -> None:
        """Buffers ZeroMQ holds no more (or never got): kept for reuse, up to the total budget."""
        room = self.max_total_bytes // CHUNK_BYTES - len(self._free)
        self._free.extend(buffers[:max(room, 0)])

    def add(self, identity: bytes, frames: list[zmq.Frame], buffers: list[bytearray],
            now: float, pinned_bytes: int = 0, pinned: Any = None, tracker: Any = None) -> None:
        """Count a sent reply (its copy buffers, or its pinned bytes and what they pin) against
        identity until ZeroMQ lets its frames go, or until tracker (a side stream's
        kvstore/bulk.py Offer: anything with .done) is done."""
        nbytes = len(buffers) * CHUNK_BYTES + pinned_bytes
        self.pinned_bytes += pinned_bytes
        self.total_bytes += nbytes - pinned_bytes
        self._queued.setdefault(identity, deque()).append(
            (tracker if tracker is not None else zmq.MessageTracker(*frames), buffers, now,
             pinned_bytes, pinned))
        self._bytes[identity] = self._bytes.get(identity, 0) + nbytes

    def collect(self) -> list[Any]:
        """Forget replies ZeroMQ has let go (sent, or dropped with their connection); returns
        what those sent zero-copy pinned, for the caller to let go."""
        done: list[Any] = []
        for identity in list(self._queued):
            queued = self._queued[identity]
            while queued and queued[0][0].done:  # one peer's replies are sent in order
                _, buffers, _, pinned_bytes, pinned = queued.popleft()
                copied_bytes = len(buffers) * CHUNK_BYTES
                self._bytes[identity] -= copied_bytes + pinned_bytes
                self.total_bytes -= copied_bytes
                self.pinned_bytes -= pinned_bytes
                self.release(buffers)
                if pinned is not None:
                    done.append(pinned)
            if not queued:
                del self._queued[identity], self._bytes[identity]
                self._cut.discard(identity)
        return done

    def stale(self, before: float) -> list[bytes]:
        """Clients with a reply queued since before, not cut yet (each is returned once)."""
        found = [i for i, q in self._queued.items() if q[0][2] < before and i not in self._cut]
        self._cut.update(found)
        return found

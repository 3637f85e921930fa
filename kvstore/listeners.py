"""The daemon's listeners: one ROUTER socket per address (the ipc socket, each --tcp address, each
tenant's own `listen` address), served in turn by the one loop thread.

Why one socket each (issue 10): libzmq assembles a ROUTER message whole before delivering it and
bounds only one frame's size (ZMQ_MAXMSGSIZE), never a message's frame count, so once a message of
a million frames is in, every other message of that socket waits until the loop has read all of
it. Sockets are independent queues: reading each in bounded slices, in turn, a flood on one
listener stalls only the clients of that listener. Each socket also gets its own libzmq I/O thread
(up to MAX_IO_THREADS), so a large message arriving on one does not hold up another's bytes.

A client is (listener, ROUTER identity): owner_of() makes one bytes key of the two for the Store's
per-client bookkeeping (kvstore/clients.py); replies go out on the socket the request came in on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq

from kvstore import ipc, protocol
from kvstore.config import ServeConfig
from kvstore.connections import Connections
from kvstore.gate import CURVE_FRAME_OVERHEAD_BYTES, Gate
from kvstore.inbox import Inbox, Oversized
from kvstore.releases import Releases

_LINGER_MS = 0  # on shutdown, drop undelivered replies: clients time out and retry
_SNDHWM = 10_000  # replies queued per peer before ROUTER drops; bounds memory per slow client
_RCVHWM = 10_000
# Frames read from one listener per turn before the next listener's turn: 2-10 us each here
# (pyzmq's recv), so a turn stays well under the 50 ms PING budget of the other listeners.
SLICE_FRAMES = 1024
MAX_IO_THREADS = 4  # one libzmq I/O thread per listener, up to this many (each idles on epoll)
MAX_LISTENERS = 255  # a listener's index is the first byte of its clients' owner keys


class AddressInUse(Exception):
    """A bind address is taken by another process."""


@dataclass(slots=True, eq=False)
class Listener:
    """One bound ROUTER socket, what has been read of it, and its client connections."""

    index: int
    address: str
    sock: zmq.Socket
    inbox: Inbox
    connections: Connections
    tenant: str | None = None  # a tenant's own listener: only its keys are admitted (ZAP)

    def owner(self, identity: bytes) -> bytes:
        return owner_of(self.index, identity)

    def close(self) -> None:
        self.connections.close()
        self.sock.close(0)


def owner_of(index: int, identity: bytes) -> bytes:
    """The Store's key of a client: its listener's index, then its ROUTER identity."""
    return bytes((index,)) + identity


def identity_of(owner: bytes) -> tuple[int, bytes]:
    return owner[0], owner[1:]


def io_threads(config: ServeConfig, gate: Gate | None) -> int:
    """libzmq I/O threads for the listeners config and gate name (set before any socket)."""
    num = len(config.bind_addresses()) + (len(gate.access.listeners) if gate is not None else 0)
    return max(1, min(num, MAX_IO_THREADS))


def open_listeners(ctx: zmq.Context, config: ServeConfig,
                   gate: Gate | None) -> tuple[list[Listener], tuple[Path, int] | None]:
    """Bind every listener; returns them and the ipc socket file bound (path, inode), if any.
    AddressInUse names an address that cannot be had; nothing stays bound then."""
    addresses: list[tuple[str, str | None]] = [(a, None) for a in config.tcp]
    if gate is not None:
        addresses += [(a, t) for t, a in sorted(gate.access.listeners.items())]
    path = config.ipc_path()
    listeners: list[Listener] = []
    bound_ipc: tuple[Path, int] | None = None
    try:
        for address, tenant in addresses:
            sock = _socket(ctx, gate, tenant, len(listeners))
            listeners.append(_listener(len(listeners), address, sock, tenant))
            try:
                sock.bind(address)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EADDRINUSE:
                    raise AddressInUse(f"address {address} is already in use") from None
                raise AddressInUse(f"cannot listen on {address}: {exc.strerror}") from None
        if path is not None:
            sock = _socket(ctx, gate, None, len(listeners))
            listeners.append(_listener(len(listeners), f"ipc://{path}", sock, None))
            bound_ipc = _bind_ipc(sock, path, is_default=config.ipc is None)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    if len(listeners) > MAX_LISTENERS:
        raise AddressInUse(f"{len(listeners)} listeners: at most {MAX_LISTENERS}")
    return listeners, bound_ipc


Handler = Callable[[Listener, list[zmq.Frame] | Oversized], bool]  # answers; True: big


def drain(listeners: list[Listener], handle: Handler, releases: Releases,
          deadline_s: float, is_stopping: Callable[[], bool]) -> None:
    """Serve the listeners in turn, one step each (a whole message handled, or a slice of a long
    one read), until none has anything ready or deadline_s (perf_counter) passes. The frames of a
    message handle() calls big go to releases, let go a slice per turn (kvstore/releases.py)."""
    while not is_stopping() and time.perf_counter() < deadline_s:
        is_progress = releases.is_pending and releases.step()
        for listener in listeners:
            message = listener.inbox.next()
            if message is None:
                is_progress = is_progress or listener.inbox.is_reading
                continue
            is_progress = True
            if handle(listener, message):
                releases.add(message if isinstance(message, list) else [])
            message = None  # the last reference to its frames, unless releases took them
        if not is_progress:
            return


def _listener(index: int, address: str, sock: zmq.Socket, tenant: str | None) -> Listener:
    inbox = Inbox(sock, 2 + protocol.MAX_PAYLOAD_FRAMES, SLICE_FRAMES)
    return Listener(index, address, sock, inbox, Connections(sock), tenant)


def _socket(ctx: zmq.Context, gate: Gate | None, tenant: str | None, index: int) -> zmq.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, _LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, _SNDHWM)
    sock.setsockopt(zmq.RCVHWM, _RCVHWM)
    sock.setsockopt(zmq.AFFINITY, 1 << (index % ctx.get(zmq.IO_THREADS)))
    # Bound one frame: no payload frame is larger than a chunk, no header larger than its max.
    # libzmq checks the frame as it is on the wire: under CURVE, its encrypted form.
    max_frame_bytes = max(protocol.CHUNK_BYTES, protocol.MAX_HEADER_BYTES)
    if gate is not None:
        max_frame_bytes += CURVE_FRAME_OVERHEAD_BYTES
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to vanished peers are dropped
    if gate is not None:
        gate.enable(ctx, sock, tenant)
    return sock


def _bind_ipc(sock: zmq.Socket, path: Path, is_default: bool) -> tuple[Path, int]:
    """Bind the ipc socket mode 0600 (the default one in a directory private to our uid)."""
    try:
        if is_default:
            ipc.ensure_private_dir(path.parent)
        ipc.prepare_bind(path)
    except ipc.IpcError as exc:
        raise AddressInUse(str(exc)) from None
    umask = os.umask(0o077)  # no window in which another uid may connect
    try:
        sock.bind(f"ipc://{path}")
    except zmq.ZMQError as exc:
        raise AddressInUse(f"cannot listen on ipc://{path}: {exc.strerror}") from None
    finally:
        os.umask(umask)
    ipc.restrict(path)
    return path, os.lstat(path).st_ino

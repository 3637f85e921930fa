"""The request layer under kvstore/client.py's Client (a mixin): send one request or a batch on a
DEALER socket and wait for the typed replies until a deadline (Lazy Pirate: on a timeout the
socket is dropped and the next call starts afresh), receiving a GET's payload frames straight
into the caller's buffers. Client adds HELLO, shared memory, batching and the public API.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from kvstore import protocol
from kvstore.errors import ProtocolError, ServerError, ServerUnavailable, VersionMismatch
from kvstore.ipc import connect_refusal
from kvstore.protocol import HelloReply, Request

LINGER_MS = 0  # a dead daemon must not make close() or Context.term() hang
_SNDHWM = 1000  # requests queued while disconnected; beyond this send fails fast
_CONNECT_TIMEOUT_MS = 1000  # give up a TCP connect attempt after this, then retry
_RECONNECT_IVL_MS = 100  # fast rejoin after a daemon restart
_RECONNECT_IVL_MAX_MS = 1000
# How long a send waits for a socket that is not connected before starting a fresh one. After a
# daemon restart a socket may sit in ZeroMQ's reconnect backoff for up to _RECONNECT_IVL_MAX_MS;
# a new socket connects at once (a load right after a restart failed on this in the e2e tests).
_STALE_SOCKET_WAIT_MS = 100
# Where a reply's blocks go once their sizes are known (client.py get_placed).
Place = Callable[[Sequence[int]], list[memoryview]]
_POLLIN = int(zmq.POLLIN)  # plain ints: IntFlag's & and | run in Python, per call
_SNDMORE = int(zmq.SNDMORE)


class Calls:
    """The request layer of Client: one DEALER socket, a deadline on every call, a fresh socket
    when the old one is stuck reconnecting. State (declared for readers) is Client's."""

    if TYPE_CHECKING:
        address: str
        timeout_s: float
        _ctx: zmq.Context
        _curve: tuple[bytes, bytes, bytes] | None
        _ids: Iterator[int]
        _sock: zmq.Socket | None
        _hello: HelloReply | None
        _sndtimeo: tuple[zmq.Socket, int] | None  # the last SNDTIMEO set, and on which socket

    def _call(self, req: Request, payload: Sequence[Any] = (),
              dests: list[memoryview] | Place | None = None,
              copies: list[memoryview] | None = None) -> Any:
        """Send one request and wait for its typed reply until the deadline (Lazy Pirate). A
        GET's payload lands in dests (views to receive into, or a Place that gives them for the
        reply's sizes), or is appended to copies."""
        is_fresh = self._sock is None
        if self._sock is None:
            self._sock = self._new_socket()
        req_id = next(self._ids)
        header = protocol.encode(req, req_id)
        deadline = time.monotonic() + self.timeout_s
        try:
            sock = self._send(deadline, [header, *payload], is_fresh)
            while _wait(sock, deadline):
                reply = self._receive(sock, req_id, dests, copies)
                if reply is not None:
                    return protocol.decode_reply(req.OP, _check(reply))
        except zmq.ZMQError as exc:
            raise self._unavailable(exc) from None
        self._reset()
        raise ServerUnavailable(f"no reply from {self.address} within {self.timeout_s:.3g} s")

    def _call_many(self, requests: Sequence[Request]) -> list[Any]:
        """Send requests (header-only) back to back, then wait for all replies until one
        deadline; the daemon answers each in turn, so this costs one round trip."""
        is_fresh = self._sock is None
        if self._sock is None:
            self._sock = self._new_socket()
        ids = [next(self._ids) for _ in requests]
        headers = [protocol.encode(r, i) for i, r in zip(ids, requests)]
        deadline = time.monotonic() + self.timeout_s
        replies: dict[int, dict[str, Any]] = {}
        try:
            sock = self._send(deadline, [headers[0]], is_fresh)
            for header in headers[1:]:  # connected now: these queue at once
                sock.send(header, copy=False)
            while len(replies) < len(ids) and _wait(sock, deadline):
                reply = protocol.decode_header(sock.recv())
                _drain(sock)
                if reply.get("id") in ids:
                    replies[reply["id"]] = reply
        except zmq.ZMQError as exc:
            raise self._unavailable(exc) from None
        if len(replies) < len(ids):
            self._reset()
            raise ServerUnavailable(f"no reply from {self.address} within {self.timeout_s:.3g} s")
        return [protocol.decode_reply(r.OP, _check(replies[i])) for i, r in zip(ids, requests)]

    def _unavailable(self, exc: zmq.ZMQError) -> ServerUnavailable:
        """Drop the socket and say why a call failed; zmq.Again means IMMEDIATE made the send
        wait SNDTIMEO for a connection that never came."""
        self._reset()
        if isinstance(exc, zmq.Again):
            return ServerUnavailable(f"cannot reach {self.address} within {self.timeout_s:.3g} s "
                                     f"(is the daemon running?)")
        return ServerUnavailable(f"{self.address}: {exc.strerror}")

    def _send(self, deadline: float, frames: list[Any], is_fresh: bool) -> zmq.Socket:
        """Send on the current socket; if an older one is not connected within
        _STALE_SOCKET_WAIT_MS, send on a fresh one instead. Either may wait until the deadline
        for a connection (IMMEDIATE), then raises zmq.Again."""
        assert self._sock is not None
        sock = self._sock
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        first_wait_ms = remaining_ms if is_fresh else min(_STALE_SOCKET_WAIT_MS, remaining_ms)
        try:
            self._send_frames(sock, frames, max(first_wait_ms, 0))
            return sock
        except zmq.Again:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if is_fresh or remaining_ms <= 0:
                raise
        sock.close(LINGER_MS)
        sock = self._sock = self._new_socket()
        self._send_frames(sock, frames, remaining_ms)
        return sock

    def _send_frames(self, sock: zmq.Socket, frames: list[Any], wait_ms: int) -> None:
        """Send frames as one message, waiting up to wait_ms for a connection (SNDTIMEO).

        NOTE: not send_multipart, and SNDTIMEO set only when it changes (a connected socket's
        wait is always _STALE_SOCKET_WAIT_MS; reading it back costs as much as setting it): each
        cost a small call about as much as encoding it, and a 256-hash LOOKUP's client Python
        is ~36 of its ~164 us round trip (2 cores: client_us_lookup256 in bench.lookup_cost)."""
        if self._sndtimeo != (sock, wait_ms):
            sock.setsockopt(zmq.SNDTIMEO, wait_ms)
            self._sndtimeo = (sock, wait_ms)
        send = sock.send
        for frame in frames[:-1]:
            send(frame, _SNDMORE, copy=False)
        send(frames[-1], 0, copy=False)

    def _receive(self, sock: zmq.Socket, req_id: int, dests: list[memoryview] | Place | None,
                 copies: list[memoryview] | None) -> dict[str, Any] | None:
        """Read one whole reply; None if it answered an earlier, abandoned request."""
        reply = protocol.decode_header(sock.recv())
        if reply.get("id") != req_id:
            _drain(sock)
            return None
        sizes = reply.get("sizes") or []
        if not sock.getsockopt(zmq.RCVMORE):
            return reply
        if copies is not None:  # get() and reading(): each block received into its own buffer
            copies += [_recv_block(sock, memoryview(bytearray(n)), n) for n in sizes]
        elif dests is not None:
            if callable(dests):
                try:
                    dests = dests(sizes)
                except BaseException:
                    _drain(sock)  # the payload of a reply with nowhere to go
                    raise
            for n, dest in zip(sizes, dests):
                if len(dest) < n:
                    _drain(sock)
                    raise ValueError(f"destination buffer of {len(dest)} bytes < block of {n}")
                _recv_block(sock, dest, n)
        _drain(sock)
        return reply

    def _new_socket(self) -> zmq.Socket:
        refusal = connect_refusal(self.address)
        if refusal is not None:
            raise ServerUnavailable(refusal)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.SNDHWM, _SNDHWM)
        sock.setsockopt(zmq.RCVTIMEO, int(self.timeout_s * 1000))
        sock.setsockopt(zmq.CONNECT_TIMEOUT, _CONNECT_TIMEOUT_MS)
        sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_IVL_MAX_MS)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a peer that is not connected
        if self._curve is not None:
            public, secret, server = self._curve
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server
        sock.connect(self.address)
        return sock

    def _reset(self) -> None:
        """Drop the socket (and any late replies queued on it); the next call starts afresh."""
        if self._sock is not None:
            self._sock.close(LINGER_MS)
        self._sock = None
        self._hello = None


def _wait(sock: zmq.Socket, deadline: float) -> bool:
    """Whether a reply is ready to read before deadline (monotonic), waiting for one.

    NOTE: zmq_poll, not sock.poll: pyzmq's Socket.poll builds and registers a new Poller on every
    call (and ORs IntFlag enums in Python), a part of a small call's client CPU (/tmp profile of
    Client.ping: ~3 vs ~1.7 us per call here)."""
    remaining_ms = int((deadline - time.monotonic()) * 1000)
    return remaining_ms > 0 and bool(zmq.zmq_poll([(sock, _POLLIN)], remaining_ms))


def _check(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("ok"):
        return reply
    code, msg = str(reply.get("error")), str(reply.get("msg"))
    if code == "version":
        raise VersionMismatch(code, msg)
    raise ServerError(code, msg)


def _recv_block(sock: zmq.Socket, dest: memoryview, nbytes: int) -> memoryview:
    """Receive one block's frames straight into dest[:nbytes]."""
    offset = 0
    while offset < nbytes:
        if not sock.getsockopt(zmq.RCVMORE):
            raise ProtocolError("reply ended before a block was complete")
        want = min(protocol.CHUNK_BYTES, nbytes - offset)
        got = sock.recv_into(dest[offset:offset + want])
        if got != want:
            raise ProtocolError(f"payload frame of {got} bytes, expected {want}")
        offset += got
    return dest[:nbytes]


def _drain(sock: zmq.Socket) -> None:
    while sock.getsockopt(zmq.RCVMORE):
        sock.recv()


def load_client_keys(keys: Path) -> tuple[bytes, bytes, bytes]:
    from zmq.auth import load_certificate

    public, secret = load_certificate(keys / "client.key_secret")
    server_public, _ = load_certificate(keys / "server.key")
    if secret is None:
        raise ValueError(f"{keys / 'client.key_secret'} holds no secret key")
    return public, secret, server_public

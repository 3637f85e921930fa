"""A TCP GET's payload on a side stream (issue 12): the bytes of a large reply go over a plain TCP
connection, written from the pinned slots (socket.sendall of pool views) and received by the client
with recv_into straight into its destinations, while ZeroMQ keeps the control messages.

Why: ZeroMQ receives a frame into its own message and recv_into then copies it into the
destination (one more pass over every byte, plus its I/O thread's hand-off); a plain socket lets
the kernel copy into the destination once. Same-version clients ask for it (Get.bulk); the daemon
offers it only without CURVE (a plain stream would bypass the encryption: with keys configured the
bytes stay on the encrypted ZeroMQ connection) and only for replies of at least BULK_MIN_BYTES.

The reply names a port and a one-time token of TOKEN_BYTES random bytes: the client connects,
sends the token, reads the sizes the reply listed. An offer is counted like a zero-copy reply
(connections.Unsent: its blocks pinned, one per client, under the pinned budget) until it is done:
sent, refused, or given up. Unclaimed after CLAIM_TIMEOUT_S, stalled for STALL_TIMEOUT_S, or still
sending after MAX_SEND_S: given up, the connection closed, the pins let go by the loop. A wrong
token closes the connection and takes nothing.
"""

from __future__ import annotations

import logging
import secrets
import select
import socket
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("kvstore.server")

BULK_MIN_BYTES = 8 * 1024 * 1024  # below this a connect + token costs more than the copy saves
TOKEN_BYTES = 16  # 128 random bits: not guessable within an offer's life
CLAIM_TIMEOUT_S = 2.0  # a client takes its stream right after the reply; later ones gave up
STALL_TIMEOUT_S = 2.0  # one block (a few MiB) not taken by the kernel in this long: no reader
MAX_SEND_S = 10.0  # connections.MAX_UNSENT_AGE_S: the same bound as an unread ZeroMQ reply
CONNECT_TIMEOUT_S = 0.5  # the daemon's host answered the GET: its side port answers fast or never
MAX_STREAMS = 64  # concurrent sending connections; more wait in the listen backlog
_ACCEPT_POLL_S = 0.2  # how often the acceptor looks for unclaimed offers and for close()


@dataclass(slots=True, eq=False)
class Offer:
    """One reply's payload waiting for (or being sent to) the client that holds its token. done
    (read by the loop like a ZeroMQ send tracker's) turns True once the pool's bytes are no
    longer read: sent, failed, refused or given up."""

    token: bytes
    views: list[memoryview]
    claim_by: float  # time.monotonic()
    done: bool = False
    sent: bool = False
    claimed: bool = False


class BulkServer:
    """The side-stream listener of one TCP listener's host: a thread accepts connections, and a
    thread per claimed connection sends its offer."""

    def __init__(self, host: str) -> None:
        self._lsock = socket.create_server((host, 0), backlog=MAX_STREAMS)
        self._lsock.setblocking(False)
        self.port: int = self._lsock.getsockname()[1]
        self._offers: dict[bytes, Offer] = {}
        self._lock = threading.Lock()
        self._streams = threading.BoundedSemaphore(MAX_STREAMS)
        # Connections being served, to cut at close(): a sender must stop reading the pool's
        # memory before the pool is unmapped.
        self._serving: dict[socket.socket, threading.Thread] = {}
        self._closing = False
        # offered; sent whole; refused: a connection whose token matched no offer; given_up:
        # unclaimed, stalled, cut or past MAX_SEND_S. Written by the threads, read by STATS.
        self.counts = {"offered": 0, "sent": 0, "refused": 0, "given_up": 0}
        self._thread = threading.Thread(target=self._accept_loop, name="kvstore-bulk", daemon=True)
        self._thread.start()

    def offer(self, views: list[memoryview]) -> Offer:
        """Register views (pinned by the caller until the offer is done) under a fresh token."""
        offer = Offer(secrets.token_bytes(TOKEN_BYTES), views, time.monotonic() + CLAIM_TIMEOUT_S)
        with self._lock:
            self._offers[offer.token] = offer
            self.counts["offered"] += 1
        return offer

    def close(self) -> None:
        """Stop accepting, cut the streams being sent and wait for their threads."""
        self._closing = True
        self._thread.join(2 * _ACCEPT_POLL_S + 1)
        self._lsock.close()
        with self._lock:
            serving = list(self._serving.items())
        for conn, _ in serving:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # a blocked sendall returns at once
            except OSError:
                pass
        for _, thread in serving:
            thread.join(STALL_TIMEOUT_S + 1)
        with self._lock:
            for offer in self._offers.values():
                offer.done = True
            self._offers.clear()

    # --- the threads --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                readable, _, _ = select.select([self._lsock], [], [], _ACCEPT_POLL_S)
                if readable:
                    self._accept()
            except Exception:
                log.exception("bulk stream listener")
            self._give_up_unclaimed(time.monotonic())

    def _accept(self) -> None:
        try:
            conn, _ = self._lsock.accept()
        except BlockingIOError:
            return
        if not self._streams.acquire(blocking=False):
            conn.close()  # MAX_STREAMS busy: the client sees a closed stream, its call fails
            return
        thread = threading.Thread(target=self._serve, args=(conn,), name="kvstore-bulk-send",
                                  daemon=True)
        with self._lock:
            self._serving[conn] = thread
        thread.start()

    def _give_up_unclaimed(self, now: float) -> None:
        with self._lock:
            late = [t for t, o in self._offers.items() if o.claim_by < now]
            for token in late:
                self._offers.pop(token).done = True
                self.counts["given_up"] += 1

    def _serve(self, conn: socket.socket) -> None:
        offer: Offer | None = None
        try:
            conn.setblocking(True)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(CLAIM_TIMEOUT_S)
            token = _recv_exactly(conn, TOKEN_BYTES)
            with self._lock:
                offer = self._offers.pop(token, None) if token is not None else None
            if offer is None:
                with self._lock:
                    self.counts["refused"] += 1
                return
            offer.claimed = True
            give_up_at = time.monotonic() + MAX_SEND_S
            for view in offer.views:
                left_s = give_up_at - time.monotonic()
                if left_s <= 0:
                    return
                conn.settimeout(min(STALL_TIMEOUT_S, left_s))
                conn.sendall(view)
            offer.sent = True
        except OSError:
            pass  # the client went, stalled or timed out: its call fails on its side
        finally:
            if offer is not None:
                with self._lock:
                    self.counts["sent" if offer.sent else "given_up"] += 1
                offer.done = True
            with self._lock:
                self._serving.pop(conn, None)
            conn.close()
            self._streams.release()


def bulk_host(address: str) -> str:
    """The host part of a tcp:// address, to bind the side stream next to it ("*": all)."""
    host = address.removeprefix("tcp://").rsplit(":", 1)[0]
    if host == "*":
        return "0.0.0.0"
    return host.strip("[]")


def host_of(address: str) -> str | None:
    """The host a client reached the daemon at (tcp:// only; None for ipc://)."""
    if not address.startswith("tcp://"):
        return None
    return bulk_host(address)


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:])
        if not k:
            return None
        got += k
    return bytes(buf)


class Unreachable(ConnectionError):
    """The side stream's port cannot be reached (a firewall, a published container port): the
    client keeps to ZeroMQ frames for this daemon from then on."""


def connect(host: str, port: int, token: bytes, deadline: float) -> socket.socket:
    """The client's side, first: connect to an offer's stream and claim it with its token.
    Raises Unreachable when the port cannot be reached by deadline (time.monotonic())."""
    left_s = deadline - time.monotonic()
    if left_s <= 0:
        raise TimeoutError("no time left for the bulk stream")
    try:
        conn = socket.create_connection((host, port), timeout=min(left_s, CONNECT_TIMEOUT_S))
    except OSError as exc:
        raise Unreachable(f"{host}:{port}: {exc}") from None
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(token)
    except OSError:
        conn.close()
        raise
    return conn


def receive(conn: socket.socket, dests: list[memoryview], sizes: list[int],
            deadline: float) -> None:
    """Then: receive sizes[i] bytes into dests[i] by deadline (time.monotonic()). Raises OSError
    (TimeoutError included) or ConnectionError if the stream fails or ends short."""
    for dest, n in zip(dests, sizes):
        got = 0
        while got < n:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise TimeoutError("bulk stream past the call's deadline")
            conn.settimeout(left_s)
            k = conn.recv_into(dest[got:n], n - got)
            if not k:
                raise ConnectionError("bulk stream ended before the reply's bytes")
            got += k

"""The daemon's ZeroMQ ROUTER loop: decode, dispatch to the Store, reply. No cache logic here.

One thread owns the sockets (one per listener, kvstore/listeners.py), the store and the pool, so
no locks are needed. The handler of each op is in kvstore/handlers.py. Every error a client can
cause is answered with an error reply; the loop itself only stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import errno
import logging
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import zmq

from kvstore import ipc, listeners, protocol
from kvstore.bulk import BulkServer, bulk_host
from kvstore.config import ServeConfig
from kvstore.connections import MAX_UNSENT_AGE_S, Unsent
from kvstore.errors import ProtocolError
from kvstore.gate import Gate, user_id
from kvstore.gcpolicy import FullPasses
from kvstore.hashfiles import HashFiles
from kvstore.handlers import SLICE_BLOCKS, Answer, Call, Handlers, Refused, TierSlots
from kvstore.inbox import Oversized
from kvstore.listeners import AddressInUse, Listener
from kvstore.malloc import DEFAULT_TRIM_BYTES, give_back
from kvstore.metrics import Metrics, ServerCounters
from kvstore.pool import Pool
from kvstore.protocol import Op
from kvstore.releases import Releases
from kvstore.store import Limits, Store
from kvstore.tiers import TierLink, make_tier

log = logging.getLogger("kvstore.server")

_POLL_MS = 50  # how often the loop wakes to expire leases and notice signals when idle
# Work between two looks at the socket and at signals (issue 10: one message must not stall
# everyone, SIGTERM is honoured within a second). Each bound is a few to tens of milliseconds.
_DRAIN_S = 0.02  # messages handled back to back before maintenance runs
_BIG_FRAMES = DEFAULT_TRIM_BYTES // protocol.CHUNK_BYTES  # fewer frames cannot hold more bytes
# Maintenance (expiry, closed connections, sent replies) runs at most this often while messages
# keep coming, not after every one: a fifth of a PING's daemon time was _maintain. Idle or busy
# loops still run it at once; a due run bounds the next wait, so nothing waits longer than this.
_MAINTAIN_S = 0.001
_NOBLOCK = int(zmq.NOBLOCK)  # plain ints: IntFlag's | runs in Python (send_multipart, per frame)
_NOBLOCK_SNDMORE = int(zmq.NOBLOCK | zmq.SNDMORE)


__all__ = ["AddressInUse", "Server", "busy_poll"]


class Server(Handlers):
    """Serves one Store over one ROUTER socket per listener (kvstore/listeners.py)."""

    def __init__(self, config: ServeConfig, pool: Pool, ctx: zmq.Context | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.pool = pool
        limits = Limits(lease_s=config.lease_s, reserve_s=config.reserve_s, ttl_s=config.ttl_s)
        self.store = Store.on_pool(pool, config.effective_page_bytes(), config.min_block_bytes,
                                   config.policy, limits, clock)
        self.counters = ServerCounters()
        self.metrics = Metrics(self.store, self.counters)
        self._op_names = {op: op.name.lower() for op in Op}
        # CURVE keys and tenants; None without --curve-keys. Read before anything listens.
        self.gate = Gate(config.curve_dir) if config.curve_dir is not None else None
        if ctx is None:
            ctx = zmq.Context()
            ctx.set(zmq.IO_THREADS, listeners.io_threads(config, self.gate))  # before any socket
        self.ctx = ctx
        self._reload_requested = False
        try:
            # The socket file we bound (and its inode), if any, to remove at close.
            self.listeners, self._ipc = listeners.open_listeners(self.ctx, config, self.gate)
        except BaseException:
            if self.gate is not None:
                self.gate.stop()
            raise
        if pool.is_owner:
            pool.prefault_in_background()  # the daemon's own first writes into a page: no fault
        self.unsent = Unsent(pool.size_bytes)  # copied TCP GET replies ZeroMQ still holds
        # Side streams for large TCP GET payloads, per TCP listener (kvstore/bulk.py); none with
        # CURVE, whose encryption a plain stream would bypass.
        self.bulk: dict[int, BulkServer] = {}
        if self.gate is None:
            for listener in self.listeners:
                if not listener.address.startswith("tcp://"):
                    continue
                try:
                    self.bulk[listener.index] = BulkServer(bulk_host(listener.address))
                except OSError as exc:  # e.g. an interface name: its GETs stay on ZeroMQ
                    log.warning("no side stream next to %s: %s", listener.address, exc)
        # Same-host LOOKUPs' hashes read from the clients' files (kvstore/hashfiles.py); none
        # under CURVE, where a remote client has no file and a name must not reach local files.
        self.hash_files = HashFiles() if self.gate is None else None
        self._stopping = False
        self._releases = Releases(give_back)  # big messages' frames, let go in slices
        # The daemon's own full GC passes (kvstore/gcpolicy.py; set by `kvstore serve`): None
        # leaves Python's automatic ones, as in a test process that serves in a thread.
        self.full_passes: FullPasses | None = None
        # The tier below the pool (kvstore/tiers.py), off by default: evictions are offered to it
        # and LOOKUPs past the pool's prefix wait on it in its pending table, not in the loop.
        self.tier: TierLink | None = None
        if config.tier:
            self.tier = TierLink(make_tier(config.tier), config.tier_timeout_s)
            self.store.on_evict = self.tier.offer
        elif config.cluster:
            from kvstore.cluster import CLUSTER_WORKERS, open_cluster

            # Commits register, and blocks leaving (evicted, invalidated, expired) unregister, no
            # bytes copied: the directory's thread writes both in batches (kvstore/directory.py).
            cluster = open_cluster(config.cluster, config.advertised_address(),
                                   config.tier_timeout_s, config.curve_dir)
            # The pulls receive into pool slots the loop reserves for them (TierSlots).
            self.tier = TierLink(cluster, config.tier_timeout_s,
                                 slots=TierSlots(self.store), num_workers=CLUSTER_WORKERS)
            self.store.on_remove = cluster.directory.unregistered
            self.store.on_commit = cluster.directory.registered
            self.metrics.add_cluster(cluster)
        # Each takes its op's request type (protocol.py); decode_request picked it by op.
        self._handlers: dict[Op, Callable[[Any, list[zmq.Frame], Call], Answer | None]] = {
            Op.HELLO: self._hello, Op.PING: self._ping, Op.LOOKUP: self._lookup, Op.GET: self._get,
            Op.RESERVE: self._reserve, Op.COMMIT: self._commit, Op.ABORT: self._abort,
            Op.PUT: self._put, Op.RELEASE: self._release, Op.STATS: self._stats,
            Op.INVALIDATE: self._invalidate,
        }

    # --- lifecycle -------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        """Ask the loop to finish its current request and exit (signal-handler safe)."""
        self._stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGHUP, self._request_reload)

    def _request_reload(self, *_: Any) -> None:
        self._reload_requested = True  # the loop reloads between messages

    def _reload(self) -> None:
        self._reload_requested = False
        if self.gate is None:
            log.warning("SIGHUP: nothing to reload without --curve-keys")
        else:
            self.gate.reload()

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        for listener in self.listeners:
            poller.register(listener.sock, zmq.POLLIN)
        if self.tier is not None:
            poller.register(self.tier.wake_fd, zmq.POLLIN)  # the tier's thread has an answer
        busy_poll_s = self.config.busy_poll_us / 1e6
        # Busy polling (--busy-poll-us) only while the talk is tight: the last message came within
        # busy_poll_s of the loop starting to wait, so the next one likely will too. A client
        # asking back to back pays no wake-up per message; one that paces its messages further
        # apart never makes the loop spin, as a spin it outlasts buys nothing (bench.lookup_cost:
        # the daemon's CPU per message of a conversation paced 0.5 ms apart).
        is_tight = False
        try:
            is_busy = False
            maintain_at_s = 0.0  # perf_counter from which maintenance runs again after a message
            is_skipped = False  # the last turn skipped it: the next wait ends by maintain_at_s
            while not self._stopping:
                try:
                    # Busy (work left in slices): only look, never wait, for messages.
                    wait_ms = _POLL_MS if self.tier is None else self.tier.timeout_ms(_POLL_MS)
                    if is_skipped:
                        wait_ms = min(wait_ms, 1 + int((maintain_at_s - time.perf_counter()) * 1e3))
                    ready = {}
                    wait_from_s = time.perf_counter()
                    if is_tight and not is_busy and busy_poll_s:
                        ready = busy_poll(poller, busy_poll_s)
                    if not ready:
                        ready = dict(poller.poll(0 if is_busy else max(wait_ms, 0)))
                except zmq.ZMQError as exc:
                    if exc.errno == errno.EINTR:
                        continue  # a signal arrived; the loop condition decides
                    raise
                # A wait that ended empty (the idle loop's maintenance wake-ups) ends the talk.
                is_tight = bool(ready) and time.perf_counter() - wait_from_s < busy_poll_s
                if ready:
                    self._drain()
                if self.tier is not None:
                    self._finish_tier_lookups(self.tier.wake_fd in ready)
                if self._reload_requested:
                    self._reload()
                now_s = time.perf_counter()
                is_skipped = not is_busy and bool(ready) and now_s < maintain_at_s
                if not is_skipped:
                    is_busy = self._maintain()
                    maintain_at_s = now_s + _MAINTAIN_S
                is_busy = (is_busy or (self._releases.is_pending and self._releases.step())
                           or any(x.inbox.is_reading for x in self.listeners))
        finally:
            self.close()

    def close(self) -> None:
        if self.tier is not None:
            self.tier.close()
        self.metrics.close()
        for listener in self.listeners:
            listener.close()
        if self.hash_files is not None:
            self.hash_files.close()
        for bulk in self.bulk.values():
            bulk.close()
        if self.gate is not None:
            self.gate.stop()
        self.ctx.term()
        if self._ipc is not None:
            ipc.remove(*self._ipc)  # ZeroMQ leaves the socket file behind
        self.pool.close()

    # --- the loop --------------------------------------------------------------------------
    def _drain(self) -> None:
        """Handle messages already queued on every listener, in turn, without blocking, for up
        to _DRAIN_S (so maintenance still runs under a flood)."""
        listeners.drain(self.listeners, self._take, self._releases,
                        time.perf_counter() + _DRAIN_S, lambda: self._stopping)

    def _take(self, listener: Listener, message: list[zmq.Frame] | Oversized) -> bool:
        """Answer one message; whether it held more memory than malloc.py keeps for the next
        PUTs (the caller hands it back once the frames, libzmq's buffers, are dropped)."""
        if isinstance(message, Oversized):
            self._refuse_oversized(listener, message)
            return True
        self._handle(listener, message)
        return len(message) > _BIG_FRAMES and sum(map(len, message)) > DEFAULT_TRIM_BYTES

    def _refuse_oversized(self, listener: Listener, message: Oversized) -> None:
        self.counters.num_errors["too_large"] += 1
        log.warning("dropped a message of %d frames from %s", message.num_frames,
                    message.identity.hex())
        try:
            req_id = protocol.decode_header(message.header).get("id")
        except ProtocolError:
            req_id = None
        req_id = req_id if isinstance(req_id, int) and 0 <= req_id < 2**63 else None
        reply = protocol.encode_error(req_id, "too_large", f"a message of {message.num_frames} "
                                      f"frames exceeds {1 + protocol.MAX_PAYLOAD_FRAMES}")
        self._send(listener, b"", zmq.Frame(message.identity), Answer([reply]))

    def _handle(self, listener: Listener, frames: list[zmq.Frame]) -> None:
        start_s = time.perf_counter()
        identity, body = frames[0], frames[1:]
        owner = listener.owner(identity.bytes)
        # The connection a message came on: its holdings end when it closes (Connections).
        fd = body[0].get(zmq.SRCFD) if body else -1
        for ended in listener.connections.seen(identity.bytes, fd):
            self._end_client(listener.owner(ended))
        req_id, op = None, None
        errors = self.counters.num_errors
        try:
            read_hashes = None if self.hash_files is None else partial(self.hash_files.read, owner)
            request = protocol.decode_request([f.buffer for f in body], check_rows=True,
                                              read_hashes=read_hashes)
            req_id, op = request.req_id, request.OP
            name = self._op_names[op]
            self.counters.num_requests[name] = self.counters.num_requests.get(name, 0) + 1
            call = Call(listener, owner, None if self.gate is None else user_id(body[0]))
            if self.gate is not None:
                refusal = self.gate.refusal(request, call.user_id)
                if refusal is not None:
                    raise Refused("forbidden", refusal)
            too_large = protocol.size_refusal(request)  # before any state is touched
            if too_large is not None:
                raise Refused("too_large", too_large)
            reply = self._handlers[op](request, body[1:], call)
            if reply is None:
                return  # a LOOKUP waiting on the tier: answered by _finish_tier_lookups()
        except protocol.TooLarge as exc:  # refused from its row count, its rows never read
            errors["too_large"] = errors.get("too_large", 0) + 1
            reply = Answer([protocol.encode_error(exc.req_id, "too_large", str(exc))])
        except protocol.HashesGone as exc:  # the client sends them inline instead
            errors["hashes_gone"] += 1
            reply = Answer([protocol.encode_error(exc.req_id, "hashes_gone", str(exc))])
        except ProtocolError as exc:
            errors["protocol"] += 1
            log.warning("bad request from %s: %s", identity.bytes.hex(), exc)
            reply = Answer([protocol.encode_error(req_id, "bad_request", str(exc))])
        except Refused as exc:
            errors[exc.code] = errors.get(exc.code, 0) + 1  # codes are literals here: bounded
            reply = Answer([protocol.encode_error(req_id, exc.code, str(exc))])
        except Exception as exc:  # a bug must not take the pool down with it
            errors["internal"] += 1
            log.exception("internal error handling a request")
            reply = Answer([protocol.encode_error(req_id, "internal",
                                                  f"{type(exc).__name__}: {exc}")])
        self._send(listener, owner, identity, reply)
        if op is not None:
            elapsed_s = time.perf_counter() - start_s
            self.metrics.request_seconds.observe(self._op_names[op], elapsed_s)
            if reply.path is not None:
                self.metrics.transfer_seconds.observe(reply.path, elapsed_s)
        try:
            self.store.settle()  # a lookup's pins: after the send, before the next request
        except Exception:
            log.exception("internal error after a reply")

    def _send(self, listener: Listener, owner: bytes, identity: zmq.Frame, reply: Answer) -> None:
        try:
            send = listener.sock.send  # send_multipart, less its per-frame IntFlag arithmetic
            send(identity, _NOBLOCK_SNDMORE, copy=False)  # may raise (HWM): nothing sent then
            frames = reply.frames
            for frame in frames[:-1]:
                send(frame, _NOBLOCK_SNDMORE, copy=False)
            send(frames[-1], _NOBLOCK, copy=False)
        except Exception as exc:  # peer queue full (HWM) or gone: drop; the client times out
            self.counters.num_errors["dropped"] += 1
            log.warning("reply dropped: %s", exc)
            if reply.offer is not None:
                reply.offer.done = True  # never claimed: its token was not sent
            # reply.copies: ZeroMQ may still hold views of them; they are never reused.
            if reply.held is not None:
                self.store.let_go(reply.held)
            return
        if reply.copies or reply.held is not None:  # a TCP GET's payload
            self.unsent.add(owner, reply.frames[1:], reply.copies, time.monotonic(),
                            reply.held_bytes, reply.held, reply.offer)

    def _maintain(self) -> bool:
        """End closed connections' holdings, count sent replies, expire leases and reservations
        and drop invalidated blocks, a slice at a time; whether work is left for the next step."""
        for listener in self.listeners:
            for ended in listener.connections.closed():
                self._end_client(listener.owner(ended))
        self._collect_sent()
        for owner in self.unsent.stale(time.monotonic() - MAX_UNSENT_AGE_S):
            index, identity = listeners.identity_of(owner)
            if self.listeners[index].connections.cut(identity):
                errors = self.counters.num_errors
                errors["unread"] = errors.get("unread", 0) + 1
                log.warning("cut the connection of %s: it left replies unread for %.0f s",
                            identity.hex(), MAX_UNSENT_AGE_S)
        self.store.expire(SLICE_BLOCKS)
        if self.full_passes is not None:
            self.full_passes.collect_if_due(time.monotonic())
        return self.store.drain_invalidated(SLICE_BLOCKS) or self.store.is_expiry_due()

    def _end_client(self, owner: bytes) -> None:
        """A connection closed: its leases, reservations and hash file end."""
        self.store.end_client(owner)
        if self.hash_files is not None:
            self.hash_files.end(owner)

    def _collect_sent(self) -> None:
        for entries in self.unsent.collect():
            self.store.let_go(entries)  # a zero-copy reply's frames are let go


def busy_poll(poller: zmq.Poller, seconds: float) -> dict[Any, int]:
    """Poll without waiting until something is ready or seconds pass; what is ready."""
    end_s = time.perf_counter() + seconds
    while True:
        ready = poller.poll(0)
        if ready or time.perf_counter() >= end_s:
            return dict(ready)

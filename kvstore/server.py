"""The daemon's ZeroMQ ROUTER loop: decode, dispatch to the Store, reply. No cache logic here.

One thread owns the sockets (one per listener, kvstore/listeners.py), the store and the pool, so
no locks are needed. Every error a client
can cause is answered with an error reply; the loop itself only stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from kvstore import ipc, listeners, protocol
from kvstore.config import ServeConfig
from kvstore.connections import MAX_UNSENT_AGE_S, Unsent
from kvstore.errors import ProtocolError
from kvstore.gate import Gate, user_id
from kvstore.gcpolicy import FullPasses
from kvstore.inbox import Oversized
from kvstore.listeners import AddressInUse, Listener
from kvstore.malloc import DEFAULT_TRIM_BYTES, give_back
from kvstore.keys import SlotId
from kvstore.metrics import Metrics, ServerCounters, error_kinds, namespace_label
from kvstore.pool import Pool
from kvstore.protocol import (Abort, Commit, Done, Get, GetReply, Hello, HelloReply, Invalidate,
                              InvalidateReply, Lookup, LookupReply, Op, Ping, Pong, Put, PutReply,
                              Release, ReleaseReply, Reserve, ReserveReply, Stats,
                              StatsReply)
from kvstore.releases import Releases
from kvstore.store import Limits, Store
from kvstore.tiers import Block, TierLink, make_tier

log = logging.getLogger("kvstore.server")

_POLL_MS = 50  # how often the loop wakes to expire leases and notice signals when idle
_NUM_HOTTEST = 5  # hottest prefixes per namespace in a STATS reply (`kvstore stats`)
# Work between two looks at the socket and at signals (issue 10: one message must not stall
# everyone, SIGTERM is honoured within a second). Each bound is a few to tens of milliseconds.
_DRAIN_S = 0.02  # messages handled back to back before maintenance runs
# Blocks expired or invalidated per step: ~3-5 ms (4,096 stalled PINGs 0.36 s at load 18).
_SLICE_BLOCKS = 1024
_BIG_FRAMES = DEFAULT_TRIM_BYTES // protocol.CHUNK_BYTES  # fewer frames cannot hold more bytes


__all__ = ["AddressInUse", "Server"]


@dataclass(slots=True, frozen=True)
class _Call:
    """Who sent the request being handled: its listener, the client (listener and peer identity,
    listeners.owner_of) whose holdings end with its connection, and its CURVE key (or None)."""

    listener: Listener
    owner: bytes
    user_id: str | None


@dataclass(slots=True)
class _Reply:
    """A handler's answer: frames after the identity. A TCP GET's payload comes with either the
    copies it is made of or the blocks pinned under it (Unsent keeps them until ZeroMQ lets go)."""

    frames: list[Any]
    path: str | None = None  # the transport that moved KV bytes, for the transfer metric
    copies: list[bytearray] = field(default_factory=list)
    held: list[Any] | None = None  # what Store.hold() pinned; opaque here
    held_bytes: int = 0


class Server:
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
        self.unsent = Unsent(pool.size_bytes)  # copied TCP GET replies ZeroMQ still holds
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
        # Each takes its op's request type (protocol.py); decode_request picked it by op.
        self._handlers: dict[Op, Callable[[Any, list[zmq.Frame], _Call], _Reply | None]] = {
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
        try:
            is_busy = False
            while not self._stopping:
                try:
                    # Busy (work left in slices): only look, never wait, for messages.
                    wait_ms = _POLL_MS if self.tier is None else self.tier.timeout_ms(_POLL_MS)
                    ready = dict(poller.poll(0 if is_busy else wait_ms))
                except zmq.ZMQError as exc:
                    if exc.errno == errno.EINTR:
                        continue  # a signal arrived; the loop condition decides
                    raise
                if ready:
                    self._drain()
                if self.tier is not None:
                    self._finish_tier_lookups(self.tier.wake_fd in ready)
                if self._reload_requested:
                    self._reload()
                is_busy = (self._maintain() or (self._releases.is_pending and self._releases.step())
                           or any(x.inbox.is_reading for x in self.listeners))
        finally:
            self.close()

    def close(self) -> None:
        if self.tier is not None:
            self.tier.close()
        self.metrics.close()
        for listener in self.listeners:
            listener.close()
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
        self._send(listener, b"", zmq.Frame(message.identity), _Reply([reply]))

    def _handle(self, listener: Listener, frames: list[zmq.Frame]) -> None:
        start_s = time.perf_counter()
        identity, body = frames[0], frames[1:]
        owner = listener.owner(identity.bytes)
        # The connection a message came on: its holdings end when it closes (Connections).
        fd = body[0].get(zmq.SRCFD) if body else -1
        for ended in listener.connections.seen(identity.bytes, fd):
            self.store.end_client(listener.owner(ended))
        req_id, op = None, None
        errors = self.counters.num_errors
        try:
            request = protocol.decode_request([f.buffer for f in body], check_rows=True)
            req_id, op = request.req_id, request.OP
            name = self._op_names[op]
            self.counters.num_requests[name] = self.counters.num_requests.get(name, 0) + 1
            call = _Call(listener, owner, None if self.gate is None else user_id(body[0]))
            if self.gate is not None:
                refusal = self.gate.refusal(request, call.user_id)
                if refusal is not None:
                    raise _Refused("forbidden", refusal)
            too_large = protocol.size_refusal(request)  # before any state is touched
            if too_large is not None:
                raise _Refused("too_large", too_large)
            reply = self._handlers[op](request, body[1:], call)
            if reply is None:
                return  # a LOOKUP waiting on the tier: answered by _finish_tier_lookups()
        except protocol.TooLarge as exc:  # refused from its row count, its rows never read
            errors["too_large"] = errors.get("too_large", 0) + 1
            reply = _Reply([protocol.encode_error(exc.req_id, "too_large", str(exc))])
        except ProtocolError as exc:
            errors["protocol"] += 1
            log.warning("bad request from %s: %s", identity.bytes.hex(), exc)
            reply = _Reply([protocol.encode_error(req_id, "bad_request", str(exc))])
        except _Refused as exc:
            errors[exc.code] = errors.get(exc.code, 0) + 1  # codes are literals here: bounded
            reply = _Reply([protocol.encode_error(req_id, exc.code, str(exc))])
        except Exception as exc:  # a bug must not take the pool down with it
            errors["internal"] += 1
            log.exception("internal error handling a request")
            reply = _Reply([protocol.encode_error(req_id, "internal",
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

    def _send(self, listener: Listener, owner: bytes, identity: zmq.Frame, reply: _Reply) -> None:
        try:
            listener.sock.send_multipart([identity, *reply.frames], zmq.NOBLOCK, copy=False)
        except Exception as exc:  # peer queue full (HWM) or gone: drop; the client times out
            self.counters.num_errors["dropped"] += 1
            log.warning("reply dropped: %s", exc)
            # reply.copies: ZeroMQ may still hold views of them; they are never reused.
            if reply.held is not None:
                self.store.let_go(reply.held)
            return
        if reply.copies or reply.held is not None:  # a TCP GET's payload
            self.unsent.add(owner, reply.frames[1:], reply.copies, time.monotonic(),
                            reply.held_bytes, reply.held)

    def _maintain(self) -> bool:
        """End closed connections' holdings, count sent replies, expire leases and reservations
        and drop invalidated blocks, a slice at a time; whether work is left for the next step."""
        for listener in self.listeners:
            for ended in listener.connections.closed():
                self.store.end_client(listener.owner(ended))
        self._collect_sent()
        for owner in self.unsent.stale(time.monotonic() - MAX_UNSENT_AGE_S):
            index, identity = listeners.identity_of(owner)
            if self.listeners[index].connections.cut(identity):
                errors = self.counters.num_errors
                errors["unread"] = errors.get("unread", 0) + 1
                log.warning("cut the connection of %s: it left replies unread for %.0f s",
                            identity.hex(), MAX_UNSENT_AGE_S)
        self.store.expire(_SLICE_BLOCKS)
        if self.full_passes is not None:
            self.full_passes.collect_if_due(time.monotonic())
        return self.store.drain_invalidated(_SLICE_BLOCKS) or self.store.is_expiry_due()

    def _collect_sent(self) -> None:
        for entries in self.unsent.collect():
            self.store.let_go(entries)  # a zero-copy reply's frames are let go

    # --- handlers: each returns a _Reply (header, then any payload frames) -------------------
    def _hello(self, req: Hello, _: list[zmq.Frame], call: _Call) -> _Reply:
        if req.version != protocol.VERSION:
            raise _Refused("version", f"daemon speaks protocol {protocol.VERSION}, client "
                                      f"{req.version}: install the same kvstore version on both")
        return _Reply([protocol.encode_reply(req.req_id, HelloReply(
            version=protocol.VERSION, segment=self.pool.path.name,
            segment_bytes=self.pool.size_bytes, token=self.pool.token,
            chunk_bytes=protocol.CHUNK_BYTES, pid=os.getpid(), max_rows=protocol.max_rows(),
            max_put_bytes=protocol.MAX_PUT_BYTES, **self.store.slot_rules()))])

    def _ping(self, req: Ping, _: list[zmq.Frame], call: _Call) -> _Reply:
        # When it was answered (CLOCK_MONOTONIC, one clock host-wide): a pinger on the host tells
        # the daemon's share of its latency from its own scheduling (bench/soak_clients.py).
        return _Reply([protocol.encode_reply(req.req_id, Pong(at_s=time.monotonic()))])

    def _lookup(self, req: Lookup, _: list[zmq.Frame], call: _Call) -> _Reply | None:
        if req.shm:
            self._check_token(req.token)
        if self.tier is not None:
            num_hits = self.store.lookup(req.ns, req.hashes)
            if num_hits < len(req.hashes) and self.tier.ask((call, req, time.perf_counter()), req.ns,
                                                            req.hashes[num_hits:]):
                return None  # answered when the tier is (or its deadline passes)
        return self._answer_lookup(req, call)

    def _answer_lookup(self, req: Lookup, call: _Call) -> _Reply:
        found = self.store.answer_lookup(req.ns, req.hashes,
                                         req.lease_ms / 1000 if req.lease_ms else None,
                                         call.owner, with_slots=req.shm)
        reply = LookupReply(num_hits=found.num_hits, lease=found.lease, slots=found.slots,
                            sizes=found.sizes)
        self.counters.bytes_out["shm"] += sum(found.sizes or ())
        return _Reply([protocol.encode_reply(req.req_id, reply)],
                      path="shm" if found.slots else None)

    def _finish_tier_lookups(self, is_woken: bool) -> None:
        """Answer the LOOKUPs whose tier answered (its blocks put into the pool first) or whose
        deadline passed (the pool's prefix alone: a late or failed tier is a miss)."""
        assert self.tier is not None
        done: list[tuple[Any, list[Block]]] = self.tier.answered() if is_woken else []
        done += [(asker, []) for asker in self.tier.expired()]
        for (call, req, start_s), blocks in done:
            identity = listeners.identity_of(call.owner)[1]
            try:
                # A block that fits no page of this pool ends the chain there.
                fit = [self.store.fits(len(data)) for _, _, data in blocks] + [False]
                blocks = blocks[:fit.index(False)]
                if blocks:
                    self.store.put(req.ns, [(h, parent, len(data)) for h, parent, data in blocks],
                                   [[memoryview(data)] for _, _, data in blocks])
                if not call.listener.connections.is_open(identity):
                    continue  # the asker is gone and its holdings ended: no lease may outlive it
                reply = self._answer_lookup(req, call)
            except Exception as exc:  # a bug must not leave the client waiting
                log.exception("answering a LOOKUP after the tier")
                self.counters.num_errors["internal"] += 1
                reply = _Reply([protocol.encode_error(req.req_id, "internal", str(exc))])
            self._send(call.listener, call.owner, zmq.Frame(identity), reply)
            self.metrics.request_seconds.observe("lookup", time.perf_counter() - start_s)
            self.store.settle()

    def _get(self, req: Get, _: list[zmq.Frame], call: _Call) -> _Reply:
        if not req.shm:
            return self._get_tcp(req, call)
        self._check_token(req.token)
        pinned = self.store.pin_for_reader(req.ns, req.hashes, req.lease, call.owner)
        self.counters.bytes_out["shm"] += sum(pinned.sizes)
        reply = GetReply(num_hits=len(pinned.slots), sizes=pinned.sizes, lease=pinned.lease,
                         slots=pinned.slots)
        return _Reply([protocol.encode_reply(req.req_id, reply)],
                      path="shm" if pinned.slots else None)

    def _get_tcp(self, req: Get, call: _Call) -> _Reply:
        """The bytes go out zero-copy while the client keeps up and such pins are few, else as
        copies (Unsent): a client that does not take its replies pins at most one, and only until
        its connection is cut. They count against the client until ZeroMQ lets them go; a reply
        cut short by that budget says partial; with no budget left the answer is busy."""
        room = self.unsent.room_for(call.owner)
        if room <= 0:
            self._collect_sent()  # its last replies may be sent, not yet counted
            room = self.unsent.room_for(call.owner)
        if room <= 0:
            raise _Refused("busy", "too many reply bytes queued to this client: read them first")
        out = self.store.read_out(req.ns, req.hashes, req.lease, room)
        sizes = [len(v) for v in out.views]
        header = protocol.encode_reply(req.req_id, GetReply(
            num_hits=len(sizes), sizes=sizes, lease=None, partial=out.partial))
        if not sizes:
            return _Reply([header])
        nbytes = sum(sizes)
        self.counters.bytes_out["tcp"] += nbytes
        views = [c for v in out.views for c in protocol.chunk(v)]
        if not self.unsent.can_pin(call.owner, nbytes):
            payload, copies = self.unsent.copy(views)
            return _Reply([header, *payload], path="tcp", copies=copies)
        # Zero-copy: the frames are views of the slots, pinned until ZeroMQ lets them go, or
        # the connection is cut after MAX_UNSENT_AGE_S (Unsent).
        self.store.hold(out.held)
        return _Reply([header, *(zmq.Frame(v, track=True, copy=False) for v in views)],
                      path="tcp", held=out.held, held_bytes=nbytes)

    def _reserve(self, req: Reserve, _: list[zmq.Frame], call: _Call) -> _Reply:
        self._check_token(req.token)
        self._check_sizes(req.sizes)
        result = self.store.reserve(req.ns, list(zip(req.hashes, req.parents, req.sizes)),
                                    call.owner)
        self.counters.num_full += result.num_full > 0
        reply = ReserveReply(slots=list(result.slots), num_full=result.num_full)
        return _Reply([protocol.encode_reply(req.req_id, reply)])

    def _commit(self, req: Commit, _: list[zmq.Frame], call: _Call) -> _Reply:
        done = self.store.commit_many(req.ns, _rows(req), call.owner)
        self.counters.bytes_in["shm"] += done.nbytes
        if done.began_s is not None:
            # A shared-memory write spans RESERVE, the client's copy and COMMIT.
            self.metrics.transfer_seconds.observe(
                "shm", max(0.0, self.store.clock() - done.began_s))
        return _Reply([protocol.encode_reply(req.req_id, Done(num_done=done.num_stored))])

    def _abort(self, req: Abort, _: list[zmq.Frame], call: _Call) -> _Reply:
        num_done = self.store.abort_many(req.ns, _rows(req), call.owner)
        return _Reply([protocol.encode_reply(req.req_id, Done(num_done=num_done))])

    def _put(self, req: Put, payload: list[zmq.Frame], call: _Call) -> _Reply:
        self._check_sizes(req.sizes)
        blocks = _split_payload(payload, req.sizes)  # validates before any slot is taken
        done = self.store.put(req.ns, list(zip(req.hashes, req.parents, req.sizes)), blocks)
        self.counters.num_full += done.num_full > 0
        self.counters.bytes_in["tcp"] += done.nbytes
        reply = PutReply(num_stored=done.num_stored, num_present=done.num_present,
                         num_full=done.num_full)
        return _Reply([protocol.encode_reply(req.req_id, reply)], path="tcp")

    def _release(self, req: Release, _: list[zmq.Frame], call: _Call) -> _Reply:
        reply = ReleaseReply(released=self.store.unpin(req.lease))
        return _Reply([protocol.encode_reply(req.req_id, reply)])

    def _stats(self, req: Stats, _: list[zmq.Frame], call: _Call) -> _Reply:
        stats = self.stats()
        if self.gate is not None:
            stats["namespaces"] = self.gate.visible(call.user_id, stats["namespaces"])
        return _Reply([protocol.encode_reply(req.req_id, StatsReply(stats=stats))])

    def _invalidate(self, req: Invalidate, _: list[zmq.Frame], call: _Call) -> _Reply:
        # The blocks are unreadable from now on. Up to a slice of them are removed before the
        # reply; the rest (an invalidate of millions) in slices by _maintain(), between other
        # clients' messages (docs/operating.md, "What one client can cost the others").
        num = self.store.begin_invalidate(req.name, req.below_epoch)
        self.store.drain_invalidated(_SLICE_BLOCKS)
        log.info("invalidated %d blocks of namespace %s", num, req.name.hex())
        return _Reply([protocol.encode_reply(req.req_id, InvalidateReply(num_dropped=num))])

    # --- helpers ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The STATS reply: occupancy, per-namespace counts and hottest prefixes, counters (and
        the tier's, only with one: without a tier the reply is as before)."""
        tier = {} if self.tier is None else {"tier": self.tier.stats()}
        return {
            **tier,
            **self.store.occupancy(),
            "pool_bytes": self.pool.size_bytes,
            "unsent_bytes": self.unsent.total_bytes,  # TCP GET replies not yet taken by ZeroMQ
            "namespaces": {name.hex(): self._namespace_stats(name)
                           for name in list(self.store.stats)},
            "requests": dict(self.counters.num_requests),
            "errors": sum(self.counters.num_errors.values()),  # error replies and dropped ones
            "errors_by_kind": error_kinds(self.store, self.counters),
            "bytes_in": dict(self.counters.bytes_in),
            "bytes_out": dict(self.counters.bytes_out),
        }

    def _namespace_stats(self, name: bytes) -> dict[str, Any]:
        s = self.store.stats[name]
        hottest = self.store.hottest(name, _NUM_HOTTEST) if name else []
        return {"label": namespace_label(name), "lookups": s.num_lookups, "hits": s.num_hits,
                "misses": s.num_misses, "evictions": s.num_evictions, "stored": s.num_stored,
                "blocks": s.num_blocks, "bytes": s.num_bytes,
                "hottest": [{"hash": p.block_hash.hex(), "hits": p.num_hits,
                             "blocks": p.num_blocks} for p in hottest]}

    def _check_token(self, token: bytes) -> None:
        if token != self.pool.token:
            raise _Refused("stale_segment", "segment token does not match: say HELLO again")

    def _check_sizes(self, sizes: tuple[int, ...]) -> None:
        for nbytes in sizes:
            if not self.store.fits(nbytes):
                raise _Refused("too_large", f"a block of {nbytes} bytes does not fit a page of "
                                            f"{self.store.page_bytes} bytes (--page-size)")


class _Refused(Exception):
    """A well-formed request the daemon will not serve; becomes an error reply with code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _split_payload(payload: list[zmq.Frame], sizes: tuple[int, ...]) -> list[list[memoryview]]:
    """Each block's payload frames (their buffers), checking each adds up to its block's size."""
    blocks, idx = [], 0
    for nbytes in sizes:
        num = protocol.num_frames(nbytes)
        frames = [f.buffer for f in payload[idx:idx + num]]
        idx += num
        if sum(len(f) for f in frames) != nbytes:
            raise ProtocolError(f"payload frames of a block do not add up to its size {nbytes}")
        blocks.append(frames)
    return blocks


def _rows(req: Commit | Abort) -> list[tuple[bytes, SlotId]]:
    """The (hash, slot) rows of a COMMIT or ABORT."""
    return [(block_hash, SlotId(slot)) for block_hash, slot in zip(req.hashes, req.slots)]

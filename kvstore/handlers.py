"""The daemon's answer to each op (a mixin of kvstore/server.py's Server): each handler takes its
op's typed request (kvstore/messages.py), calls the Store and returns the reply's frames. The
loop, the sockets and the lifecycle stay in server.py; the cache logic is the Store's.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from kvstore import listeners, protocol
from kvstore.bulk import BULK_MIN_BYTES, BulkServer, Offer
from kvstore.connections import Unsent
from kvstore.errors import ProtocolError
from kvstore.gate import Gate
from kvstore.hashfiles import HashFiles
from kvstore.keys import BlockHash, Namespace, SlotId
from kvstore.listeners import Listener
from kvstore.metrics import Metrics, ServerCounters, error_kinds, namespace_label
from kvstore.pool import Pool
from kvstore.protocol import (Abort, Commit, Done, Get, GetReply, Hello, HelloReply, Invalidate,
                              InvalidateReply, Lookup, LookupReply, Ping, Pong, Put, PutReply,
                              Release, ReleaseReply, Reserve, ReserveReply, Stats, StatsReply)
from kvstore.store import Store
from kvstore.tiers import Block, TierLink

log = logging.getLogger("kvstore.server")

NUM_HOTTEST = 5  # hottest prefixes per namespace in a STATS reply (`kvstore stats`)
# Blocks expired or invalidated per step: ~3-5 ms (4,096 stalled PINGs 0.36 s at load 18).
SLICE_BLOCKS = 1024


# The Store's owner of a tier's reservations: no connection's (listeners.owner_of starts with a
# listener index, and a daemon has a handful of listeners, never 256). Owned, so a reservation
# that outlives its deadline is fenced while the tier may still be writing into its slot.
TIER_OWNER = b"\xfftier"


@dataclass(slots=True)
class TierSlots:
    """The loop's side of a tier's PoolWriter (kvstore/tiers.py Slots): reservations owned by
    TIER_OWNER, under the same per-client share as any writer, so pulls cannot crowd the pool."""

    store: Store

    def reserve(self, ns: Namespace, rows: Sequence[tuple[BlockHash, BlockHash | None, int]]
                ) -> list[tuple[SlotId, memoryview] | None]:
        return self.store.reserve_views(ns, rows, TIER_OWNER)

    def commit(self, ns: Namespace, rows: Sequence[tuple[BlockHash, SlotId]]) -> int:
        return self.store.commit_many(ns, rows, TIER_OWNER).num_stored

    def abort(self, ns: Namespace, rows: Sequence[tuple[BlockHash, SlotId]]) -> None:
        self.store.abort_many(ns, rows, TIER_OWNER)


@dataclass(slots=True, frozen=True)
class Call:
    """Who sent the request being handled: its listener, the client (listener and peer identity,
    listeners.owner_of) whose holdings end with its connection, and its CURVE key (or None)."""

    listener: Listener
    owner: bytes
    user_id: str | None


@dataclass(slots=True)
class Answer:
    """A handler's answer: frames after the identity. A TCP GET's payload comes with either the
    copies it is made of or the blocks pinned under it (Unsent keeps them until ZeroMQ lets go)."""

    frames: list[Any]
    path: str | None = None  # the transport that moved KV bytes, for the transfer metric
    copies: list[bytearray] = field(default_factory=list)
    held: list[Any] | None = None  # what Store.hold() pinned; opaque here
    held_bytes: int = 0
    offer: Offer | None = None  # the payload on a side stream (kvstore/bulk.py), not in frames


class Handlers:
    """The op handlers of Server; the state they use is Server's (declared here for readers)."""

    if TYPE_CHECKING:
        pool: Pool
        store: Store
        counters: ServerCounters
        metrics: Metrics
        gate: Gate | None
        tier: TierLink | None
        unsent: Unsent
        hash_files: HashFiles | None

        def _send(self, listener: Listener, owner: bytes, identity: zmq.Frame,
                  reply: Answer) -> None: ...
        def _collect_sent(self) -> None: ...
        bulk: dict[int, BulkServer]

    def _hello(self, req: Hello, _: list[zmq.Frame], call: Call) -> Answer:
        if req.version != protocol.VERSION:
            raise Refused("version", f"daemon speaks protocol {protocol.VERSION}, client "
                                      f"{req.version}: install the same kvstore version on both")
        return Answer([protocol.encode_reply(req.req_id, HelloReply(
            version=protocol.VERSION, segment=self.pool.path.name,
            segment_bytes=self.pool.size_bytes, token=self.pool.token,
            chunk_bytes=protocol.CHUNK_BYTES, pid=os.getpid(), max_rows=protocol.max_rows(),
            max_put_bytes=protocol.MAX_PUT_BYTES, hash_files=self.hash_files is not None,
            **self.store.slot_rules()))])

    def _ping(self, req: Ping, _: list[zmq.Frame], call: Call) -> Answer:
        # When it was answered (CLOCK_MONOTONIC, one clock host-wide): a pinger on the host tells
        # the daemon's share of its latency from its own scheduling (bench/soak_clients.py).
        return Answer([protocol.encode_reply(req.req_id, Pong(at_s=time.monotonic()))])

    def _lookup(self, req: Lookup, _: list[zmq.Frame], call: Call) -> Answer | None:
        if req.shm:
            self._check_token(req.token)
        if self.tier is not None:
            num_hits = self.store.lookup(req.ns, req.hashes)
            if num_hits < len(req.hashes) and self.tier.ask(
                    (call, req, time.perf_counter()), req.ns, req.hashes[num_hits:],
                    req.hashes[num_hits - 1] if num_hits else None):
                return None  # answered when the tier is (or its deadline passes)
        return self._answer_lookup(req, call)

    def _answer_lookup(self, req: Lookup, call: Call) -> Answer:
        found = self.store.answer_lookup(req.ns, req.hashes,
                                         req.lease_ms / 1000 if req.lease_ms else None,
                                         call.owner, with_slots=req.shm)
        reply = LookupReply(num_hits=found.num_hits, lease=found.lease, slots=found.slots,
                            sizes=found.sizes)
        self.counters.bytes_out["shm"] += sum(found.sizes or ())
        return Answer([protocol.encode_reply(req.req_id, reply)],
                      path="shm" if found.slots else None)

    def _finish_tier_lookups(self, is_woken: bool) -> None:
        """Answer the LOOKUPs whose tier answered (its blocks put into the pool first) or whose
        deadline passed (the pool's prefix alone: a late or failed tier is a miss)."""
        assert self.tier is not None
        done: list[tuple[Any, list[Block]]] = self.tier.answered() if is_woken else []
        done += [(asker, []) for asker in self.tier.expired()]
        for (_, req, _), blocks in self.tier.take_late():  # answered already: the pool only
            try:
                self._put_tier_blocks(req, blocks)
            except Exception:
                log.exception("putting late tier blocks into the pool")
        for (call, req, start_s), blocks in done:
            identity = listeners.identity_of(call.owner)[1]
            try:
                self._put_tier_blocks(req, blocks)
                if not call.listener.connections.is_open(identity):
                    continue  # the asker is gone and its holdings ended: no lease may outlive it
                reply = self._answer_lookup(req, call)
            except Exception as exc:  # a bug must not leave the client waiting
                log.exception("answering a LOOKUP after the tier")
                self.counters.num_errors["internal"] += 1
                reply = Answer([protocol.encode_error(req.req_id, "internal", str(exc))])
            self._send(call.listener, call.owner, zmq.Frame(identity), reply)
            self.metrics.request_seconds.observe("lookup", time.perf_counter() - start_s)
            self.store.settle()

    def _put_tier_blocks(self, req: Lookup, blocks: list[Block]) -> None:
        """Put blocks a tier found for req into the pool (a block that fits no page of this pool
        ends the chain there). Blocks without bytes are in the pool already (PoolWriter)."""
        blocks = [b for b in blocks if b[2] is not None]
        fit = [self.store.fits(len(data)) for _, _, data in blocks] + [False]
        blocks = blocks[:fit.index(False)]
        if blocks and blocks[0][1] is None:  # a tier that did not keep it: req knows it
            at = req.hashes.index(blocks[0][0])
            blocks[0] = (blocks[0][0], req.hashes[at - 1] if at else None, blocks[0][2])
        if blocks:
            self.store.put(req.ns, [(h, parent, len(data)) for h, parent, data in blocks],
                           [[memoryview(data)] for _, _, data in blocks])

    def _get(self, req: Get, _: list[zmq.Frame], call: Call) -> Answer:
        if not req.shm:
            return self._get_tcp(req, call)
        self._check_token(req.token)
        pinned = self.store.pin_for_reader(req.ns, req.hashes, req.lease, call.owner)
        self.counters.bytes_out["shm"] += sum(pinned.sizes)
        reply = GetReply(num_hits=len(pinned.slots), sizes=pinned.sizes, lease=pinned.lease,
                         slots=pinned.slots)
        return Answer([protocol.encode_reply(req.req_id, reply)],
                      path="shm" if pinned.slots else None)

    def _get_tcp(self, req: Get, call: Call) -> Answer:
        """The bytes go out zero-copy while the client keeps up and such pins are few, else as
        copies (Unsent): a client that does not take its replies pins at most one, and only until
        its connection is cut. They count against the client until ZeroMQ lets them go; a reply
        cut short by that budget says partial; with no budget left the answer is busy."""
        bulk = self.bulk.get(call.listener.index) if req.bulk else None
        room = self.unsent.room_for(call.owner)
        if room <= 0 or bulk is not None:
            self._collect_sent()  # its last replies may be sent, not yet counted
            room = self.unsent.room_for(call.owner)
        if room <= 0:
            raise Refused("busy", "too many reply bytes queued to this client: read them first")
        if bulk is not None and self.unsent.can_pin(call.owner, BULK_MIN_BYTES):
            # A side stream pins what it sends: cut the reply at the pinned budget (partial).
            room = min(room, self.unsent.max_pinned_bytes - self.unsent.pinned_bytes)
        out = self.store.read_out(req.ns, req.hashes, req.lease, room)
        sizes = [len(v) for v in out.views]
        nbytes = sum(sizes)
        if bulk is not None and nbytes >= BULK_MIN_BYTES and self.unsent.can_pin(call.owner, nbytes):
            # Pinned until the side stream is done (sent, failed or given up: kvstore/bulk.py).
            self.counters.bytes_out["tcp"] += nbytes
            self.store.hold(out.held)
            offer = bulk.offer(list(out.views))
            header = protocol.encode_reply(req.req_id, GetReply(
                num_hits=len(sizes), sizes=sizes, lease=None, partial=out.partial,
                bulk_port=bulk.port, bulk_token=offer.token))
            return Answer([header], path="tcp", held=out.held, held_bytes=nbytes, offer=offer)
        header = protocol.encode_reply(req.req_id, GetReply(
            num_hits=len(sizes), sizes=sizes, lease=None, partial=out.partial))
        if not sizes:
            return Answer([header])
        self.counters.bytes_out["tcp"] += nbytes
        views = [c for v in out.views for c in protocol.chunk(v)]
        if not self.unsent.can_pin(call.owner, nbytes):
            payload, copies = self.unsent.copy(views)
            return Answer([header, *payload], path="tcp", copies=copies)
        # Zero-copy: the frames are views of the slots, pinned until ZeroMQ lets them go, or
        # the connection is cut after MAX_UNSENT_AGE_S (Unsent).
        self.store.hold(out.held)
        return Answer([header, *(zmq.Frame(v, track=True, copy=False) for v in views)],
                      path="tcp", held=out.held, held_bytes=nbytes)

    def _reserve(self, req: Reserve, _: list[zmq.Frame], call: Call) -> Answer:
        self._check_token(req.token)
        self._check_sizes(req.sizes)
        result = self.store.reserve(req.ns, list(zip(req.hashes, req.parents, req.sizes)),
                                    call.owner)
        self.counters.num_full += result.num_full > 0
        reply = ReserveReply(slots=list(result.slots), num_full=result.num_full)
        return Answer([protocol.encode_reply(req.req_id, reply)])

    def _commit(self, req: Commit, _: list[zmq.Frame], call: Call) -> Answer:
        done = self.store.commit_many(req.ns, _rows(req), call.owner)
        self.counters.bytes_in["shm"] += done.nbytes
        if done.began_s is not None:
            # A shared-memory write spans RESERVE, the client's copy and COMMIT.
            self.metrics.transfer_seconds.observe(
                "shm", max(0.0, self.store.clock() - done.began_s))
        return Answer([protocol.encode_reply(req.req_id, Done(num_done=done.num_stored))])

    def _abort(self, req: Abort, _: list[zmq.Frame], call: Call) -> Answer:
        num_done = self.store.abort_many(req.ns, _rows(req), call.owner)
        return Answer([protocol.encode_reply(req.req_id, Done(num_done=num_done))])

    def _put(self, req: Put, payload: list[zmq.Frame], call: Call) -> Answer:
        self._check_sizes(req.sizes)
        blocks = _split_payload(payload, req.sizes)  # validates before any slot is taken
        done = self.store.put(req.ns, list(zip(req.hashes, req.parents, req.sizes)), blocks)
        self.counters.num_full += done.num_full > 0
        self.counters.bytes_in["tcp"] += done.nbytes
        reply = PutReply(num_stored=done.num_stored, num_present=done.num_present,
                         num_full=done.num_full)
        return Answer([protocol.encode_reply(req.req_id, reply)], path="tcp")

    def _release(self, req: Release, _: list[zmq.Frame], call: Call) -> Answer:
        reply = ReleaseReply(released=self.store.unpin(req.lease))
        return Answer([protocol.encode_reply(req.req_id, reply)])

    def _stats(self, req: Stats, _: list[zmq.Frame], call: Call) -> Answer:
        stats = self.stats()
        if self.gate is not None:
            stats["namespaces"] = self.gate.visible(call.user_id, stats["namespaces"])
        return Answer([protocol.encode_reply(req.req_id, StatsReply(stats=stats))])

    def _invalidate(self, req: Invalidate, _: list[zmq.Frame], call: Call) -> Answer:
        # The blocks are unreadable from now on. Up to a slice of them are removed before the
        # reply; the rest (an invalidate of millions) in slices by _maintain(), between other
        # clients' messages (docs/operating.md, "What one client can cost the others").
        num = self.store.begin_invalidate(req.name, req.below_epoch)
        self.store.drain_invalidated(SLICE_BLOCKS)
        log.info("invalidated %d blocks of namespace %s", num, req.name.hex())
        return Answer([protocol.encode_reply(req.req_id, InvalidateReply(num_dropped=num))])

    # --- helpers ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The STATS reply: occupancy, per-namespace counts and hottest prefixes, counters (and
        the tier's, only with one: without a tier the reply is as before)."""
        tier = {} if self.tier is None else {"tier": self.tier.stats()}
        return {
            **tier,
            **self.store.occupancy(),
            "pool_bytes": self.pool.size_bytes,
            "pool_prefaulted_bytes": self.pool.prefaulted_bytes,  # mapped in the daemon so far
            "unsent_bytes": self.unsent.total_bytes,  # TCP GET replies not yet taken by ZeroMQ
            "unsent_pinned_bytes": self.unsent.pinned_bytes,  # zero-copy and side-stream replies
            "bulk": {k: sum(b.counts[k] for b in self.bulk.values())
                     for k in ("offered", "sent", "refused", "given_up")},  # kvstore/bulk.py
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
        hottest = self.store.hottest(name, NUM_HOTTEST) if name else []
        return {"label": namespace_label(name), "lookups": s.num_lookups, "hits": s.num_hits,
                "misses": s.num_misses, "evictions": s.num_evictions, "stored": s.num_stored,
                "blocks": s.num_blocks, "bytes": s.num_bytes,
                "hottest": [{"hash": p.block_hash.hex(), "hits": p.num_hits,
                             "blocks": p.num_blocks} for p in hottest]}

    def _check_token(self, token: bytes) -> None:
        if token != self.pool.token:
            raise Refused("stale_segment", "segment token does not match: say HELLO again")

    def _check_sizes(self, sizes: tuple[int, ...]) -> None:
        for nbytes in sizes:
            if not self.store.fits(nbytes):
                raise Refused("too_large", f"a block of {nbytes} bytes does not fit a page of "
                                            f"{self.store.page_bytes} bytes (--page-size)")


class Refused(Exception):
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

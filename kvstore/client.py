"""The daemon's client: a DEALER socket with a deadline on every call, reconnect, batching, and,
on the daemon's host, direct access to pool slots through the shared segment.

Not thread-safe: give each thread its own Client. Any failure to get an answer in time raises
ServerUnavailable, which callers treat as a miss; the next call reconnects and says HELLO again.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from kvstore import bulk, protocol
from kvstore.calls import LINGER_MS, Calls, Place, load_client_keys
from kvstore.errors import ProtocolError, ServerError, ServerUnavailable
from kvstore.hashfiles import MIN_HASHES as HASH_FILE_MIN_HASHES
from kvstore.hashfiles import HashFile, record_bytes
from kvstore.ipc import default_address
from kvstore.keys import Namespace, SlotId
from kvstore.pool import Pool
from kvstore.protocol import (Abort, Commit, Get, GetReply, Hello, HelloReply, Invalidate, Lookup,
                              LookupReply, Ping, Put, Release, Request, Reserve, Stats)

# What a daemon restarted between calls refuses once per call, for the segment or hash file of
# the daemon before it (Client._recover).
_RESTART_REFUSALS = ("stale_segment", "hashes_gone")
# First wait before asking again for the rest of a partial TCP GET answered busy (doubles).
_BUSY_RETRY_S = 0.001

# The default daemon of this uid on this host (kvstore serve with no address given).
DEFAULT_ADDRESS = default_address()

Buffer = Any  # anything exporting a writable (or readable, for puts) buffer: memoryview, numpy


@dataclass(slots=True, frozen=True)
class LookupResult:
    num_hits: int
    lease: int | None
    # with_slots: where the hits lie in the segment whose token this is, pinned under lease: the
    # byte offset and size of each hit, as the reply carried them.
    slots: list[int] | None = None
    sizes: list[int] | None = None
    token: bytes | None = None

    @property
    def refs(self) -> list[SlotRef] | None:
        """slots and sizes as SlotRefs (built on each call: 256 frozen SlotRefs cost ~80 us, about
        as much as the whole LOOKUP's Python on both ends, so the hot path reads the lists)."""
        if self.slots is None or self.sizes is None:
            return None
        return [SlotRef(SlotId(s), n) for s, n in zip(self.slots, self.sizes)]


@dataclass(slots=True, frozen=True)
class PutResult:
    num_stored: int
    num_present: int
    num_full: int


@dataclass(slots=True)
class Writing:
    """A write in progress (Client.writing): fill dests[i] with block i's bytes; None where the
    pool already has the block or has no room for it. refs: the reserved slots behind dests on
    the daemon's host (for a device copy straight into the pool), [] over TCP."""

    dests: list[memoryview | None]
    refs: list[SlotRef | None]
    num_full: int = 0
    num_done: int = 0  # blocks committed (made readable) at the clean exit
    result: PutResult | None = None  # set at the clean exit


@dataclass(slots=True, frozen=True)
class SlotRef:
    """A reserved or pinned slot of the shared segment: where a block's bytes live."""

    slot: SlotId
    nbytes: int


class Client(Calls):
    """One connection to one daemon."""

    def __init__(self, address: str, timeout_s: float = 1.0, *, ctx: zmq.Context | None = None,
                 curve_dir: str | Path | None = None, use_shm: bool = True,
                 use_bulk: bool = True) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.use_shm = use_shm
        # TCP GETs may take large payloads on a side stream (kvstore/bulk.py); False keeps every
        # byte on the ZeroMQ connection (the daemon offers none with CURVE anyway).
        self.use_bulk = use_bulk
        self._ctx = ctx or zmq.Context.instance()
        self._curve = load_client_keys(Path(curve_dir)) if curve_dir else None
        self._ids = itertools.count(1)
        self._sock: zmq.Socket | None = None
        self._sndtimeo: tuple[zmq.Socket, int] | None = None
        self._hello: HelloReply | None = None
        self.pool: Pool | None = None  # the daemon's segment, when on its host
        # Where large lookups' hashes go on the daemon's host (kvstore/hashfiles.py): made on
        # first use, dropped with the socket; _hash_file_failed: /dev/shm refused one.
        self._hash_file: HashFile | None = None
        self._hash_file_failed = False

    # --- connection ------------------------------------------------------------------------
    def connect(self) -> HelloReply:
        """Say HELLO (connecting if needed) and attach the segment when on the daemon's host."""
        if self._sock is None:
            self._sock = self._new_socket()
        reply: HelloReply = self._call(Hello(version=protocol.VERSION))
        self._hello = reply
        if self.pool is not None and self.pool.token != reply.token:
            self.pool.close()  # the daemon restarted with a new segment
            self.pool = None
        if self.use_shm and self.pool is None:
            self.pool = Pool.attach(reply.segment, reply.token)
        return reply

    @property
    def is_local(self) -> bool:
        """Whether slots are reachable through shared memory (same host as the daemon)."""
        return self.pool is not None

    def maps(self, token: bytes | None) -> bool:
        """Whether the segment of token (a LOOKUP's answer names it) is the one mapped here: its
        slots can be copied by this process."""
        return self.pool is not None and token is not None and self.pool.token == token

    def has_shm(self) -> bool:
        """Connect if needed; True when the shared segment is attached (same host)."""
        return self._shm_ready()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(LINGER_MS)
            self._sock = None
        self._drop_hash_file()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        self._hello = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # --- small calls -----------------------------------------------------------------------
    def ping(self) -> float:
        """Round-trip time in seconds."""
        start = time.perf_counter()
        self._request(Ping())
        return time.perf_counter() - start

    def lookup(self, ns: Namespace, hashes: Sequence[bytes], lease_ms: int = 0,
               with_slots: bool = False) -> LookupResult:
        """How many of hashes are stored as a consecutive prefix; lease_ms > 0 pins them.

        with_slots (with a lease): the answer also says where each hit lies in the daemon's
        segment (refs, token), so a same-host reader copies them and releases the lease: two
        round trips, no GET. Read them only from the segment of that token (same host), and
        trust the copy only if release() then says True (the lease held throughout)."""
        if self._hello is None:
            self.connect()  # first: whether the hashes may go by file is in HELLO's answer
        reply = self._request(self._lookup_request(ns, hashes, lease_ms, with_slots))
        return _found(reply, self._token() if with_slots else None)

    def lookup_many(self, queries: Sequence[tuple[Namespace, Sequence[bytes]]],
                    lease_ms: int = 0, with_slots: bool = False) -> list[LookupResult]:
        """One LOOKUP per (namespace, hashes), sent back to back and answered in one round trip
        (tensor parallelism: a namespace per rank). A failed one fails all; their leases expire."""
        if self._hello is None:
            self.connect()
        retries = _RESTART_REFUSALS
        while True:
            try:
                replies = self._call_many(self._lookup_requests(queries, lease_ms, with_slots))
                break
            except ServerError as exc:
                retries = self._recover(exc, retries)
        return [_found(r, self._token() if with_slots else None) for r in replies]

    def _lookup_requests(self, queries: Sequence[tuple[Namespace, Sequence[bytes]]],
                         lease_ms: int, with_slots: bool) -> list[Lookup]:
        """One LOOKUP per query, their hashes side by side in the hash file while they fit."""
        requests, offset = [], 0
        for ns, hashes in queries:
            requests.append(self._lookup_request(ns, hashes, lease_ms, with_slots, offset))
            ref = requests[-1].hashes_file
            if ref is not None:
                offset += record_bytes(len(requests[-1].hashes), ref[2])
        return requests

    def _lookup_request(self, ns: Namespace, hashes: Sequence[bytes], lease_ms: int,
                        with_slots: bool, offset: int = 0) -> Lookup:
        """The LOOKUP of hashes; by the hash file at offset when they go that way."""
        hashes = tuple(hashes)
        if not with_slots:
            return Lookup(ns=ns, hashes=hashes, lease_ms=lease_ms,
                          hashes_file=self._hashes_file(hashes, offset))
        if not lease_ms:
            raise ValueError("slot references need a lease (lease_ms > 0)")
        if self._hello is None:
            self.connect()  # the request carries the token HELLO hands out
        return Lookup(ns=ns, hashes=hashes, lease_ms=lease_ms, shm=True, token=self._token(),
                      hashes_file=self._hashes_file(hashes, offset))

    def _hashes_file(self, hashes: tuple[bytes, ...], offset: int) -> tuple[str, int, int] | None:
        """(name, offset, hash size) once hashes are written in this client's hash file, when
        they go that way: on the daemon's host, which takes them, enough of them to gain by it,
        all of one length, and room left at offset (kvstore/hashfiles.py); else None (inline)."""
        if (len(hashes) < HASH_FILE_MIN_HASHES or self.pool is None or self._hello is None
                or not self._hello.hash_files or self._hash_file_failed):
            return None
        if self._hash_file is None:
            try:
                self._hash_file = HashFile()
            except OSError:  # /dev/shm full or closed to us: inline, as over TCP
                self._hash_file_failed = True
                return None
        size = len(hashes[0])
        if not self._hash_file.put(hashes, size, offset):
            return None
        return self._hash_file.name, offset, size

    def _drop_hash_file(self) -> None:
        if self._hash_file is not None:
            self._hash_file.close()
            self._hash_file = None

    def _reset(self) -> None:
        """Drop the socket and the hash file: a new connection starts a new file (the daemon
        holds the old one per connection, and unlinked its name)."""
        super()._reset()
        self._drop_hash_file()

    def release(self, lease: int) -> bool:
        return bool(self._request(Release(lease=lease)).released)

    def stats(self) -> dict[str, Any]:
        return dict(self._request(Stats()).stats)

    def invalidate(self, name: bytes, below_epoch: int | None = None) -> int:
        return int(self._request(Invalidate(name=name, below_epoch=below_epoch)).num_dropped)

    def invalidate_all(self, below_epoch: int | None = None) -> dict[str, int]:
        """invalidate() every namespace name the daemon reports; blocks dropped per name (hex)."""
        names = [name for name in self.stats()["namespaces"] if name]
        return {name: self.invalidate(bytes.fromhex(name), below_epoch) for name in names}

    # --- reads -----------------------------------------------------------------------------
    # One transfer path: get, get_into and reading all go through _read, so both transports
    # treat a lease alike: get and get_into keep the caller's lease (it holds until RELEASE, a
    # large prefix read in several calls stays leased); reading() ends it at its exit.
    def get_into(self, ns: Namespace, hashes: Sequence[bytes], dests: Sequence[Buffer],
                 lease: int | None = None) -> int:
        """Copy the stored prefix of hashes into dests (one buffer per block); returns how many.

        Same host: one memcpy per block straight from the slot. Other hosts: the payload frames
        are received directly into dests, with no intermediate buffer. A lease given stays held.
        """
        if len(dests) < len(hashes):
            raise ValueError("need one destination buffer per hash")
        views = [_as_bytes(d) for d in dests]
        with self._read(ns, hashes, lease, views, keep_lease=True) as (blocks, is_in_place):
            if not is_in_place:
                for block, view in zip(blocks, views):
                    view[:len(block)] = block
            return len(blocks)

    def get(self, ns: Namespace, hashes: Sequence[bytes], lease: int | None = None) -> list[bytes]:
        """The stored prefix of hashes as bytes (a copy; use get_into or reading on hot paths).
        A lease given stays held."""
        with self._read(ns, hashes, lease, None, keep_lease=True) as (blocks, _):
            return [bytes(b) for b in blocks]

    def get_placed(self, ns: Namespace, hashes: Sequence[bytes], place: Place) -> int:
        """Over TCP (use_shm=False): receive the stored prefix of hashes into the buffers
        place(sizes) gives, called once per reply message with its blocks' sizes, in chain
        order; returns how many blocks came. For a caller that picks where the bytes go only
        once it knows their sizes: a daemon pulling from a peer receives into its own pool's
        slots, with no buffer in between."""
        if self._shm_ready():
            raise ValueError("get_placed reads over TCP: open the client with use_shm=False")
        return sum(reply.num_hits for reply, _ in self._get_tcp(ns, hashes, None, place))

    @contextmanager
    def reading(self, ns: Namespace, hashes: Sequence[bytes],
                lease: int | None = None) -> Iterator[list[memoryview]]:
        """The stored prefix of hashes (under lease, from a lookup, when given) as one buffer per
        block, valid inside the with-block. The lease ends at its exit on either transport. On
        the daemon's host the buffers are the pinned slots themselves (no copy: copy out of them
        inside the block); elsewhere they were received from the payload frames."""
        with self._read(ns, hashes, lease, None, keep_lease=False) as (blocks, _):
            yield blocks

    @contextmanager
    def _read(self, ns: Namespace, hashes: Sequence[bytes], lease: int | None,
              dests: list[memoryview] | None,
              keep_lease: bool) -> Iterator[tuple[list[memoryview], bool]]:
        """The stored prefix of hashes as buffers, and whether they already are dests' fronts
        (TCP into dests) rather than views to copy from (pinned slots, or received copies). With
        keep_lease the caller's lease outlives the call; any other lease ends at its exit."""
        if self._shm_ready():
            with self._pinned(ns, hashes, lease, keep_lease) as refs:
                assert self.pool is not None
                yield [self.pool.view(r.slot, r.nbytes) for r in refs], False
            return
        try:
            blocks: list[memoryview] = []
            for reply, copies in self._get_tcp(ns, hashes, lease, dests):
                if dests is None:
                    blocks += copies
                else:
                    blocks += [dests[len(blocks) + i][:n] for i, n in enumerate(reply.sizes)]
            yield blocks, dests is not None
        finally:
            if lease is not None and not keep_lease:
                try:
                    self.release(lease)
                except ServerUnavailable:
                    pass  # the lease expires on its own

    def _get_tcp(self, ns: Namespace, hashes: Sequence[bytes], lease: int | None,
                 views: list[memoryview] | Place | None
                 ) -> Iterator[tuple[GetReply, list[memoryview]]]:
        """The replies of a TCP GET of the stored prefix of hashes, in messages of max_rows; a
        reply cut short by the daemon's reply budget (partial) goes on, any other short one ends
        the prefix. With views, each reply's payload lands in views from its first block on (or
        in what a Place gives for it); without, it comes as copies (the list next to each
        reply)."""
        num = 0
        while num < len(hashes):
            batch = tuple(hashes[num:num + self._max_rows("get")])
            req = Get(ns=ns, hashes=batch, lease=lease, bulk=self._bulk_host() is not None)
            blocks: list[memoryview] = []
            dests = views if views is None or callable(views) else views[num:]
            reply = self._get_more(req, dests, None if views is not None else blocks,
                                   is_first=not num)
            yield reply, blocks
            num += reply.num_hits
            if not reply.num_hits or (reply.num_hits < len(batch) and not reply.partial):
                return

    def _get_more(self, req: Get, dests: list[memoryview] | Place | None,
                  copies: list[memoryview] | None, is_first: bool) -> GetReply:
        """One TCP GET. After a partial reply the daemon may not have counted the reply just read
        as taken yet and answer busy: retried briefly, within the call's timeout."""
        deadline = time.monotonic() + self.timeout_s
        for attempt in itertools.count():
            try:
                reply: GetReply = self._call(req, dests=dests, copies=copies)
                if reply.bulk_token is not None and not self._take_bulk(reply, dests, copies,
                                                                        deadline):
                    req = dataclasses.replace(req, bulk=False)  # its port is out of reach
                    continue
                return reply
            except ServerError as exc:
                if is_first or exc.code != "busy" or time.monotonic() > deadline:
                    raise
            time.sleep(min(_BUSY_RETRY_S * 2**attempt, 0.1))
        raise AssertionError("unreachable")

    def _take_bulk(self, reply: GetReply, dests: list[memoryview] | Place | None,
                   copies: list[memoryview] | None, deadline: float) -> bool:
        """Receive a GET reply's payload from its side stream (kvstore/bulk.py) into dests, or
        into new buffers appended to copies, by the call's deadline; a stream that fails or stalls
        is the call's timeout (the daemon gives the offer up and lets its pins go). False: the
        side port cannot be reached (ask again without; this client asks no more)."""
        host = self._bulk_host()
        if host is None or reply.bulk_port is None or reply.bulk_token is None:
            raise ProtocolError("GET reply offers a side stream this client did not ask for")
        sizes = list(reply.sizes)
        deadline = min(deadline, time.monotonic() + self.timeout_s)
        try:
            conn = bulk.connect(host, reply.bulk_port, reply.bulk_token, deadline)
        except bulk.Unreachable:
            self.use_bulk = False
            return False
        except OSError as exc:
            raise ServerUnavailable(f"side stream from {self.address}: {exc}") from None
        with conn:
            # Only once connected: a Place reserves where the bytes go, and an unreachable port
            # means asking again (the same blocks placed twice).
            if dests is None:
                bufs = [memoryview(bytearray(n)) for n in sizes]
            else:
                bufs = dests(sizes) if callable(dests) else dests
                if len(bufs) < len(sizes) or any(len(d) < n for d, n in zip(bufs, sizes)):
                    raise ValueError("destination buffers smaller than the blocks")
            try:
                bulk.receive(conn, bufs, sizes, deadline)
            except OSError as exc:
                raise ServerUnavailable(f"side stream from {self.address}: {exc}") from None
        if copies is not None:
            copies += [b[:n] for b, n in zip(bufs, sizes)]
        return True

    def _bulk_host(self) -> str | None:
        """Where to take side streams from: the daemon's TCP host, unless CURVE is configured
        (the daemon never offers one then) or bulk streams are off for this client."""
        if self._curve is not None or not self.use_bulk:
            return None
        return bulk.host_of(self.address)

    @contextmanager
    def pinned(self, ns: Namespace, hashes: Sequence[bytes],
               lease: int | None = None) -> Iterator[list[SlotRef]]:
        """Slot references of the stored prefix, pinned until the block exits (same host only);
        the lease given ends there too.

        Read them with self.pool.view(ref.slot, ref.nbytes): zero-copy access to the pool.
        """
        if not self._shm_ready():
            raise RuntimeError("pinned() needs the daemon's shared segment (same host)")
        with self._pinned(ns, hashes, lease, keep_lease=False) as refs:
            yield refs

    @contextmanager
    def _pinned(self, ns: Namespace, hashes: Sequence[bytes], lease: int | None,
                keep_lease: bool) -> Iterator[list[SlotRef]]:
        refs: list[SlotRef] = []
        leases: list[int] = []
        try:
            for batch in _batches(hashes, self._max_rows("get")):  # pinned as they come
                reply: GetReply = self._request(Get(ns=ns, hashes=tuple(batch), lease=lease,
                                                    shm=True, token=self._token()))
                refs += [SlotRef(SlotId(s), n) for s, n in zip(reply.slots or (), reply.sizes)]
                if reply.lease is not None and reply.lease not in leases:
                    leases.append(reply.lease)
                if reply.num_hits < len(batch):
                    break  # the stored prefix ends here
            yield refs
        finally:
            for held in leases:
                if keep_lease and held == lease:
                    continue  # the caller's: it holds until the caller releases it
                try:
                    self.release(held)
                except ServerUnavailable:
                    pass  # the lease expires on its own

    # --- writes ----------------------------------------------------------------------------
    def put(self, ns: Namespace, blocks: Sequence[tuple[bytes, bytes | None, Buffer]]) -> PutResult:
        """Store (hash, parent_hash, bytes) blocks, root first; blocks already stored are skipped.

        Sent in as many messages as the daemon's caps (HELLO) need; a block the pool refused
        ends the chain: the blocks after it count as full and are not sent."""
        if self._shm_ready():
            return self._put_shm(ns, blocks)
        views = [memoryview(data).cast("B") for _, _, data in blocks]

        def put_span(start: int, end: int) -> PutResult:
            req = Put(ns=ns, hashes=tuple(h for h, _, _ in blocks[start:end]),
                      parents=tuple(p for _, p, _ in blocks[start:end]),
                      sizes=tuple(len(v) for v in views[start:end]))
            payload = [c for v in views[start:end] for c in protocol.chunk(v)]
            reply = self._call(req, payload=payload)
            return PutResult(reply.num_stored, reply.num_present, reply.num_full)

        max_bytes = int(self._limit("max_put_bytes", protocol.MAX_PUT_BYTES))
        spans = _spans([len(v) for v in views], self._max_rows("put"), max_bytes)
        return _put_spans(spans, len(blocks), put_span)

    def reserve(self, ns: Namespace,
                blocks: Sequence[tuple[bytes, bytes | None, int]]) -> tuple[list[SlotRef | None], int]:
        """Two-phase write, step 1 (same host): a slot per (hash, parent, nbytes), or None.

        In messages of max_rows; past a block the daemon refused, the rest count as full (a
        chain's later blocks hang from it), as within one message."""
        if self._hello is None:
            self.connect()  # the request carries the token HELLO hands out
        refs: list[SlotRef | None] = []
        num_full = 0
        for batch in _batches(blocks, self._max_rows("reserve")):
            if num_full:
                refs += [None] * len(batch)
                num_full += len(batch)
                continue
            reply = self._request(Reserve(
                ns=ns, hashes=tuple(b[0] for b in batch), parents=tuple(b[1] for b in batch),
                sizes=tuple(b[2] for b in batch), token=self._token()))
            refs += [None if s is None else SlotRef(SlotId(s), b[2])
                     for s, b in zip(reply.slots, batch)]
            num_full += reply.num_full
        return refs, num_full

    def commit(self, ns: Namespace, written: Sequence[tuple[bytes, SlotRef]]) -> int:
        """Two-phase write, step 2: make written slots readable; returns how many committed."""
        return self._finish(Commit, ns, written)

    def abort(self, ns: Namespace, reserved: Sequence[tuple[bytes, SlotRef]]) -> int:
        return self._finish(Abort, ns, reserved)

    def _finish(self, kind: type[Commit] | type[Abort], ns: Namespace,
                rows: Sequence[tuple[bytes, SlotRef]]) -> int:
        """COMMIT or ABORT in messages of max_rows, sent back to back (one round trip)."""
        if self._hello is None:
            self.connect()
        requests: list[Request] = [
            kind(ns=ns, hashes=tuple(h for h, _ in batch), slots=tuple(r.slot for _, r in batch))
            for batch in _batches(rows, self._max_rows(kind.OP.name.lower()))]
        if len(requests) == 1:
            return int(self._request(requests[0]).num_done)
        return sum(int(r.num_done) for r in self._call_many(requests))

    def _put_shm(self, ns: Namespace,
                 blocks: Sequence[tuple[bytes, bytes | None, Buffer]]) -> PutResult:
        """Write in batches the daemon takes whole: at most max_rows blocks, and at most half the
        slot bytes it lets one client hold reserved (HELLO max_reserved_bytes; what this client
        has fenced counts too), so one large put goes in several rounds."""
        assert self.pool is not None
        align = int(self._limit("slot_align_bytes", 64))
        min_slot = int(self._limit("min_slot_bytes", align))
        max_reserved = self._limit("max_reserved_bytes", None)
        max_bytes = (self.pool.size_bytes if max_reserved is None else int(max_reserved)) // 2
        # The slot each block takes in the daemon (kvstore/slabs.py slot_bytes_for).
        slot_bytes = [-(-max(len(memoryview(data).cast("B")), min_slot) // align) * align
                      for _, _, data in blocks]
        spans = _spans(slot_bytes, self._max_rows("reserve"), max_bytes)
        return _put_spans(spans, len(blocks),
                          lambda start, end: self._put_shm_batch(ns, blocks[start:end]))

    def _put_shm_batch(self, ns: Namespace,
                       blocks: Sequence[tuple[bytes, bytes | None, Buffer]]) -> PutResult:
        views = [memoryview(data).cast("B") for _, _, data in blocks]
        with self.writing(ns, [(h, p, len(v)) for (h, p, _), v in zip(blocks, views)]) as w:
            for dest, view in zip(w.dests, views):
                if dest is not None:
                    dest[:] = view
        assert w.result is not None
        return w.result

    @contextmanager
    def writing(self, ns: Namespace,
                blocks: Sequence[tuple[bytes, bytes | None, int]]) -> Iterator[Writing]:
        """Write (hash, parent, nbytes) blocks, root first, by filling the destinations it
        yields. A clean exit makes them readable (w.result says how many); an exception gives
        every reservation back and stores nothing. On the daemon's host the destinations are the
        reserved slots themselves (RESERVE, your copy, COMMIT); elsewhere buffers sent in PUTs.
        At most max_rows blocks and half of HELLO's max_reserved_bytes per call on the same
        host (put() splits larger writes)."""
        if not self._shm_ready():
            buffers = [bytearray(n) for _, _, n in blocks]
            w = Writing([memoryview(b) for b in buffers], [])
            yield w
            w.result = self.put(ns, [(h, p, b) for (h, p, _), b in zip(blocks, buffers)])
            w.num_full, w.num_done = w.result.num_full, w.result.num_stored
            return
        refs, num_full = self.reserve(ns, blocks)
        assert self.pool is not None  # reserve re-attaches a restarted daemon's segment
        w = Writing([None if r is None else self.pool.view(r.slot, r.nbytes) for r in refs],
                    refs, num_full)
        reserved = [(h, r) for (h, _, _), r in zip(blocks, refs) if r is not None]
        try:
            yield w
        except BaseException:
            # Every reservation, written or not: one never named again stays fenced (counted
            # against this client) until the connection closes.
            try:
                self.abort(ns, reserved)
            except ServerUnavailable:
                pass  # the connection is gone, and its reservations with it
            raise
        w.num_done = self.commit(ns, reserved) if reserved else 0
        w.result = PutResult(w.num_done, len(blocks) - len(reserved) - num_full, num_full)

    # --- plumbing --------------------------------------------------------------------------
    def _shm_ready(self) -> bool:
        if self._hello is None:
            self.connect()
        return self.pool is not None

    def _token(self) -> bytes:
        assert self._hello is not None
        return bytes(self._hello.token)

    def _limit(self, key: str, default: Any) -> Any:
        """A cap the daemon announced in HELLO (default when it announced none)."""
        if self._hello is None:
            self.connect()
        assert self._hello is not None
        value = getattr(self._hello, key, None)
        return default if value is None else value

    def _max_rows(self, op: str) -> int:
        """Rows the daemon takes in one message of op (HELLO max_rows)."""
        announced = self._limit("max_rows", {})
        return max(1, int(announced.get(op, protocol.MAX_BLOCKS)))

    def _request(self, req: Request) -> Any:
        """req's typed reply (protocol.py), sent again after each refusal a daemon restarted
        between calls gives (_recover)."""
        if self._hello is None:
            self.connect()
        retries = _RESTART_REFUSALS
        while True:
            try:
                return self._call(req)
            except ServerError as exc:
                retries = self._recover(exc, retries)
            req = self._renewed(req)

    def _recover(self, exc: ServerError, retries: tuple[str, ...]) -> tuple[str, ...]:
        """Make good a refusal from a daemon restarted between calls, each kind once per call
        (retries: the kinds left; returns those left after this one), in either order:
        re-attach its segment (stale_segment) or drop the hash file it never held
        (hashes_gone). Anything else raises exc."""
        if exc.code not in retries:
            raise exc
        if exc.code == "stale_segment":
            self.connect()
        else:
            self._drop_hash_file()
        return tuple(code for code in retries if code != exc.code)

    def _renewed(self, req: Request) -> Request:
        """req to send again after _recover(): a LOOKUP built anew (the new token, a new hash
        file), another request with the new token."""
        if isinstance(req, Lookup):
            return self._lookup_request(req.ns, req.hashes, req.lease_ms, req.shm)
        if getattr(req, "token", b""):
            return dataclasses.replace(req, token=self._token())  # type: ignore[type-var]
        return req

def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """items in consecutive slices of at most size (one empty slice for no items)."""
    return [items[i:i + size] for i in range(0, len(items), size)] or [items[:0]]


def _spans(sizes: Sequence[int], max_rows: int, max_bytes: int) -> list[tuple[int, int]]:
    """(start, end) runs of at most max_rows items and max_bytes, each at least one item."""
    spans: list[tuple[int, int]] = []
    start, nbytes = 0, 0
    for i, n in enumerate(sizes):
        if i > start and (i - start >= max_rows or nbytes + n > max_bytes):
            spans.append((start, i))
            start, nbytes = i, 0
        nbytes += n
    if start < len(sizes) or not spans:
        spans.append((start, len(sizes)))
    return spans


def _put_spans(spans: list[tuple[int, int]], num_blocks: int,
               put_span: Callable[[int, int], PutResult]) -> PutResult:
    """A put sent span by span, root first; the totals. Once the pool refuses a block the chain
    is broken: later blocks hang from a refused one, so they count as full and are not sent."""
    num_stored = num_present = num_full = 0
    for start, end in spans:
        done = put_span(start, end)
        num_stored, num_present = num_stored + done.num_stored, num_present + done.num_present
        num_full += done.num_full
        if done.num_full:
            num_full += num_blocks - end
            break
    return PutResult(num_stored, num_present, num_full)


def _found(reply: LookupReply, token: bytes | None) -> LookupResult:
    """A LOOKUP reply as a LookupResult; refs (in token's segment) when it was asked for them."""
    if token is None:
        return LookupResult(reply.num_hits, reply.lease)
    return LookupResult(reply.num_hits, reply.lease, reply.slots or [], reply.sizes or [], token)


def _as_bytes(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")

"""The pool: index + eviction policy + slab allocator + the shared segment's bytes, and the only
place they meet.

server.py decodes a request, calls one method here and encodes what it returns; the matching of
leases, pinning, copying written bytes into slots and the accounting of reads all happen here.
Single-threaded: one thread owns the store. Time comes from an injected clock so tests can drive
expiry. A Store made without a pool (unit tests) keeps the books and never touches bytes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvstore import hottest, room
from kvstore.clients import CLIENT_RESERVED_SHARE, RESERVED_TABLE_SHARE, ClientLimits, Clients
from kvstore.hottest import HotPrefix
from kvstore.index import Entry, Index, State
from kvstore.keys import BlockHash, Namespace
from kvstore.outcomes import (Found, Limits, NamespaceStats, Outgoing, Pinned, Reservation,
                              Written)
from kvstore.policy import LRU, POLICIES, FrequencyLRU
from kvstore.pool import HEADER_BYTES, Pool
from kvstore.slabs import SLOT_ALIGN_BYTES, Slabs
from kvstore.writes import INF, Evicted, Writes

__all__ = ["Found", "HotPrefix", "Limits", "NamespaceStats", "Outgoing", "Pinned", "Reservation",
           "Store", "Written"]

# Leases are client-created; bound them so clients cannot grow the daemon. When the table is full
# the biggest holder gives up its oldest lease to a smaller one (Clients.lease_to_drop_for).
MAX_LEASES = 65_536
MAX_NAMESPACE_STATS = 1024  # per-namespace counters beyond this are pooled under b"" (bounded)


@dataclass
class Store(Writes):
    """The pool's state and bytes. Reads and leases here, writes in kvstore/writes.py."""

    slabs: Slabs
    policy: LRU = field(default_factory=FrequencyLRU)  # the daemon's default (bench/eviction.py)
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], float] = time.monotonic
    pool: Pool | None = None  # the bytes; None: bookkeeping only (unit tests)
    index: Index = field(default_factory=Index)
    stats: dict[bytes, NamespaceStats] = field(default_factory=dict)
    num_evictions: int = 0
    # Blocks one message may evict (kvstore/room.py); a page to repurpose empties over messages.
    max_evictions_per_message: int = room.MAX_EVICTIONS_PER_MESSAGE
    _repurposing: room.Repurposing | None = None  # the page being emptied for another class
    num_reclaimed: int = 0  # reservations abandoned past their deadline (a writer timed out)
    num_blocks: int = 0  # committed blocks, kept as it changes so reading it costs nothing
    slot_bytes_used: int = 0  # bytes of the slots taken (reserved or committed, or still pinned)
    bytes_stored: int = 0  # bytes of the blocks in the index (reserved or committed)
    # Tables unlinked by invalidate, their entries still to be removed (drain_invalidated()).
    _doomed: deque[dict[BlockHash, Entry]] = field(default_factory=deque)
    # Per-connection holdings and caps. Owner b"" (in-process callers, tests) is not tracked.
    clients: Clients = field(default_factory=Clients)
    num_fenced: int = 0  # slots of taken-back reservations whose writer may still be copying
    num_leases_dropped: int = 0  # leases the biggest holder gave up when the table was full
    # Work a request leaves for after its reply is sent (settle()), off the client's latency.
    _unsettled: deque[Callable[[], None]] = field(default_factory=deque)
    # Told of each evicted block with a view of its bytes, valid only during the call (the slot
    # is reused next): the tier below the pool copies it (kvstore/tiers.py). None: no tier.
    on_evict: Evicted | None = None
    # Told of each block committed (readable from now on): the cluster directory registers it
    # (kvstore/directory.py, queued, never waited on). None: no cluster.
    on_commit: Callable[[Namespace, BlockHash], None] | None = None
    # Told of each committed block leaving the pool, whatever the reason (evicted, invalidated,
    # expired): the cluster directory unregisters it. None: no cluster.
    on_remove: Callable[[Namespace, BlockHash], None] | None = None

    def __post_init__(self) -> None:
        if self.clients.limits.max_reserved_bytes is None:
            pool_bytes = self.slabs.num_pages * self.slabs.page_bytes
            self.clients = Clients(ClientLimits(
                max_reserved_bytes=pool_bytes // CLIENT_RESERVED_SHARE,
                reserved_table_bytes=pool_bytes // RESERVED_TABLE_SHARE))

    @classmethod
    def on_pool(cls, pool: Pool, page_bytes: int, min_block_bytes: int, policy: str,
                limits: Limits, clock: Callable[[], float] = time.monotonic) -> Store:
        """The store of a daemon: slots in pages of page_bytes after pool's header page."""
        slabs = Slabs(HEADER_BYTES, (pool.size_bytes - HEADER_BYTES) // page_bytes, page_bytes,
                      min_block_bytes)
        assert slabs.num_pages >= 1, "segment smaller than one page"
        return cls(slabs, POLICIES[policy](), limits, clock, pool)

    @property
    def num_reserved(self) -> int:
        """Reservations not yet committed or given back."""
        return self.index.num_entries - self.num_blocks

    @property
    def page_bytes(self) -> int:
        return self.slabs.page_bytes

    def slot_rules(self) -> dict[str, int | None]:
        """How blocks map to slots, for HELLO: clients size their writes by these."""
        return {"page_bytes": self.slabs.page_bytes, "min_slot_bytes": self.slabs.min_slot_bytes,
                "slot_align_bytes": SLOT_ALIGN_BYTES,
                "max_reserved_bytes": self.clients.limits.max_reserved_bytes}

    def fits(self, nbytes: int) -> bool:
        """Whether a block of nbytes fits one page (larger ones are never stored)."""
        return self.slabs.fits(nbytes)

    def settle(self) -> None:
        """Run what the last request left for after its reply (the server calls this after each
        send, before it reads the next request)."""
        while self._unsettled:
            self._unsettled.popleft()()

    # --- reads -----------------------------------------------------------------------------
    def lookup(self, ns: Namespace, hashes: Sequence[BlockHash]) -> int:
        """How many of hashes are stored as a consecutive prefix. Changes nothing."""
        return len(self.index.prefix(ns, hashes, self.clock()))

    def answer_lookup(self, ns: Namespace, hashes: Sequence[BlockHash], lease_s: float | None,
                      owner: bytes = b"", with_slots: bool = False) -> Found:
        """A LOOKUP: the stored prefix of hashes, counted for the hit rate. With lease_s it is
        pinned for that long, but only at settle(): the answer goes out first (one thread owns
        the store, so no other request runs in between and the client never sees the lease
        before it holds). with_slots (a lease only) also says where each block lies."""
        if lease_s is None:
            num_hits = self.lookup(ns, hashes)
            self.record_lookup(ns, len(hashes), num_hits)
            return Found(num_hits, None)
        found, lease_id = self._find_to_pin(ns, hashes, owner)
        # Counted as found even when no lease could be had (MAX_LEASES): the blocks are there,
        # and the miss is the lease table's, which the leases gauge shows.
        self.record_lookup(ns, len(hashes), len(found))
        if lease_id is None:
            return Found(0, None)
        self._unsettled.append(lambda: self._apply_pin(found, lease_id, lease_s, owner))
        if not with_slots:
            return Found(len(found), lease_id)
        return Found(len(found), lease_id, [e.slot for e in found], [e.nbytes for e in found])

    def record_lookup(self, ns: Namespace, num_asked: int, num_hits: int) -> None:
        """Count one LOOKUP request and its hit and missed blocks (hit rate, metrics)."""
        stats = self._ns_stats(ns)
        stats.num_lookups += 1
        stats.num_hits += num_hits
        stats.num_misses += num_asked - num_hits

    def pin(self, ns: Namespace, hashes: Sequence[BlockHash], lease_s: float | None = None,
            owner: bytes = b"") -> tuple[list[Entry], int | None]:
        """Find the stored prefix of hashes and pin it under a lease; records hits and recency."""
        found, lease_id = self._find_to_pin(ns, hashes, owner)
        if lease_id is None:
            return [], None  # nothing to pin, or no lease to protect it with: a miss
        self._apply_pin(found, lease_id, lease_s, owner)
        return found, lease_id

    def pin_for_reader(self, ns: Namespace, hashes: Sequence[BlockHash], lease: int | None,
                       owner: bytes) -> Pinned:
        """A GET through shared memory: the blocks of hashes under the lease the reader names
        (owner holds it from now on), or, without a usable one, the stored prefix under a new
        lease of owner's."""
        held = self._held(ns, hashes, lease)
        if held is not None:
            assert lease is not None
            # The reader holds the lease from now on: the slots it copies from stay pinned until
            # it releases them or its own connection goes, whatever happens to the lease's taker.
            self._transfer_lease(lease, owner)
            entries: list[Entry] = held
        else:
            entries, lease = self.pin(ns, hashes, owner=owner)
        return Pinned(lease, [e.slot for e in entries], [e.nbytes for e in entries])

    def read_out(self, ns: Namespace, hashes: Sequence[BlockHash], lease: int | None,
                 max_bytes: int) -> Outgoing:
        """A GET over TCP: views of the blocks of hashes (leased, or the stored prefix, read
        now), as many as max_bytes holds but at least one, so a large block is never refused
        forever. Sending them without a copy needs hold(held) until they are sent."""
        entries = self._held(ns, hashes, lease)
        if entries is None:
            entries = self.index.prefix(ns, hashes, self.clock())
            self._touch(entries)
        num, nbytes = 0, 0
        for entry in entries:
            if num and nbytes + entry.nbytes > max_bytes:
                break
            num, nbytes = num + 1, nbytes + entry.nbytes
        pool = self._pool()
        return Outgoing([pool.view(e.slot, e.nbytes) for e in entries[:num]], entries[:num],
                        num < len(entries))

    def read(self, ns: Namespace, hashes: Sequence[BlockHash]) -> list[Entry]:
        """The stored prefix of hashes, for a read done before this returns (no lease needed):
        records per-block reads and recency like a pin."""
        found = self.index.prefix(ns, hashes, self.clock())
        self._touch(found)
        return found

    def transfer_lease(self, lease_id: int, owner: bytes) -> None:
        """Make owner the holder of a lease it presented: the lease then ends with owner's
        connection, not with the one that took it (a scheduler hands its leases to workers)."""
        self._transfer_lease(lease_id, owner)

    def unpin(self, lease_id: int) -> bool:
        """Release a lease early; False when it was unknown or already expired."""
        lease = self.index.leases.get(lease_id)
        if lease is None:
            return False
        self.clients.drop_lease(lease.owner, lease_id)
        entries = self.index.unpin(lease_id)
        assert entries is not None, "a held lease vanished"
        self._free_dead(entries)
        return True

    def hold(self, entries: list[Entry]) -> None:
        """Pin entries outside the lease table, for a zero-copy send in flight; see let_go()."""
        for entry in entries:
            entry.num_pins += 1

    def let_go(self, entries: list[Entry]) -> None:
        """Undo hold(): free the slots of entries removed meanwhile."""
        for entry in entries:
            entry.num_pins -= 1
            assert entry.num_pins >= 0, "negative pin count"
        self._free_dead(entries)

    def lease_entries(self, lease_id: int) -> list[Entry] | None:
        lease = self.index.leases.get(lease_id)
        return lease.entries if lease else None

    # --- connections -----------------------------------------------------------------------
    def end_client(self, owner: bytes) -> int:
        """A connection is gone: release its leases and reservations and free its fenced slots
        (nothing writes through a closed connection); returns how many things it held."""
        state = self.clients.pop(owner)
        if state is None:
            return 0
        for lease_id in state.leases:
            lease = self.index.leases.get(lease_id)
            if lease is not None:
                lease.owner = b""  # already forgotten by self.clients
                self.unpin(lease_id)
        for entry in state.reserved.values():
            self._drop_reserved(entry)
        for entry in state.fenced.values():
            self._free_slot(entry)
        self.num_fenced -= len(state.fenced)
        return len(state.leases) + len(state.reserved) + len(state.fenced)
    # --- maintenance -----------------------------------------------------------------------
    def invalidate(self, name: bytes, below_epoch: int | None = None) -> int:
        """Drop a namespace's blocks (all epochs, or epochs < below_epoch); returns how many."""
        num = self.begin_invalidate(name, below_epoch)
        self.drain_invalidated()
        return num

    def begin_invalidate(self, name: bytes, below_epoch: int | None = None) -> int:
        """invalidate() in O(epochs): the blocks vanish from reads now and are counted; their
        entries and slots go in drain_invalidated() slices (the server's loop runs them between
        other clients' messages, so an invalidate of millions stalls nobody)."""
        tables = self.index.take_tables(name, below_epoch)
        self._doomed.extend(tables)
        return sum(map(len, tables))

    def drain_invalidated(self, max_items: float = INF) -> bool:
        """Remove up to max_items entries of invalidated tables; whether any are left."""
        doomed = self._doomed
        while doomed and max_items > 0:
            table = doomed[0]
            while table and max_items > 0:
                _, entry = table.popitem()
                max_items -= 1
                if entry.is_live:  # evicted or expired meanwhile: already gone
                    self._remove(entry)
            if not table:
                doomed.popleft()
        return bool(doomed)

    def expire(self, max_items: float = INF) -> int:
        """Drop expired leases, abandoned reservations and TTL-expired blocks; returns a count.

        At most about max_items blocks are unpinned or removed per call (a lease counts its
        blocks), so mass expiry runs in slices too; the rest is due at the next call.
        """
        now = self.clock()
        count = 0
        budget = max_items
        while budget > 0:
            due = self.index.expired_leases(now, 1)  # one at a time: none popped and left held
            if not due:
                if not self.index.is_lease_due(now):
                    break
                budget -= 1  # a stale row (the lease was released early) was popped
                continue
            entries = self.lease_entries(due[0])
            budget -= len(entries) if entries else 1
            count += self.unpin(due[0])
        if budget <= 0:
            return count
        reclaimed = self.index.expired_reservations(now, budget)
        self.num_reclaimed += len(reclaimed)
        budget -= len(reclaimed)
        for entry in reclaimed + self.index.expired_entries(now, max(budget, 0)):
            self._remove(entry)
            count += 1
        return count

    def is_expiry_due(self) -> bool:
        """Whether expire() has work now (the server then runs it again without waiting)."""
        return self.index.is_due(self.clock())

    def hottest(self, name: bytes, k: int) -> list[HotPrefix]:
        """The k most-read prefixes of a namespace name, most reads first (kvstore/hottest.py)."""
        return hottest.hottest(self.index, name, k)

    def occupancy(self) -> dict[str, int]:
        """Counts for stats replies and metrics."""
        # O(1): counters kept as things change, never a scan (STATS with millions stored).
        return {
            "num_blocks": self.num_blocks,
            "num_reserved": self.num_reserved,
            "num_leases": len(self.index.leases),
            "num_slots_used": self.slabs.num_slots_used(),
            "num_pages": self.slabs.num_pages,
            "num_free_pages": self.slabs.num_free_pages,
            "page_bytes": self.slabs.page_bytes,
            "bytes_stored": self.bytes_stored,
            "num_evictions": self.num_evictions,
            "num_reclaimed": self.num_reclaimed,
            "num_fenced": self.num_fenced,
            "num_leases_dropped": self.num_leases_dropped,
            "num_clients": len(self.clients),
            "capacity_bytes": self.slabs.num_pages * self.slabs.page_bytes,
            "used_bytes": self.slot_bytes_used,
        }

    # --- internals -------------------------------------------------------------------------
    def _find_to_pin(self, ns: Namespace, hashes: Sequence[BlockHash],
                     owner: bytes) -> tuple[list[Entry], int | None]:
        """The stored prefix of hashes and the id of a lease to pin it under (None when empty or
        no lease can be had); changes nothing but, when the lease table is full, the biggest
        holder's oldest lease (given up to make room for owner)."""
        found = self.index.prefix(ns, hashes, self.clock())
        if not found or not self._can_lease(owner, len(found)):
            return found, None
        return found, self.index.new_lease_id()

    def _can_lease(self, owner: bytes, num_blocks: int) -> bool:
        if not self.clients.can_lease(owner, num_blocks):
            return False  # over this client's caps: its miss, nobody else's
        if len(self.index.leases) < MAX_LEASES:
            return True
        victim = self.clients.lease_to_drop_for(owner)
        if victim is None:
            return False
        self.unpin(victim)
        self.num_leases_dropped += 1
        return True

    def _apply_pin(self, found: list[Entry], lease_id: int, lease_s: float | None,
                   owner: bytes) -> None:
        """Pin what _find_to_pin() found, and record per-block reads and recency."""
        self._touch(found)
        lease_s = self.limits.lease_s if lease_s is None else min(lease_s, self.limits.max_lease_s)
        self.index.pin(found, self.clock() + lease_s, lease_id, owner)
        self.clients.add_lease(owner, lease_id, len(found))

    def _touch(self, found: list[Entry]) -> None:
        # Deepest first, so a parent is always more recent than its children: LRU order then
        # reaches leaves before the prefixes they hang from.
        for entry in found:
            entry.num_hits += 1
        self.policy.touch_many(reversed(found))

    def _held(self, ns: Namespace, hashes: Sequence[BlockHash],
              lease_id: int | None) -> list[Entry] | None:
        """The blocks of hashes under lease_id, or None without a usable lease. The hashes may
        start anywhere in the leased prefix (a load read in batches). The namespace counts too:
        two models share vLLM's block hashes, so a lease of one must never read the other's bytes
        (tests/integration/test_roundtrip.py::test_lease_of_one_namespace_never_reads_another)."""
        if lease_id is None or not hashes:
            return None
        held = self.lease_entries(lease_id)
        if held is None or not all(e.is_live for e in held):
            return None
        start = next((i for i, e in enumerate(held) if e.key == (ns, hashes[0])), 0)
        n = 0
        for entry, block_hash in zip(held[start:], hashes):
            if entry.key != (ns, block_hash):
                break
            n += 1
        return held[start:start + n] if n else None

    def _transfer_lease(self, lease_id: int, owner: bytes) -> None:
        lease = self.index.leases.get(lease_id)
        if lease is None or lease.owner == owner:
            return
        self.clients.drop_lease(lease.owner, lease_id)
        lease.owner = owner
        self.clients.add_lease(owner, lease_id, len(lease.entries))

    def _pool(self) -> Pool:
        assert self.pool is not None, "a store without a pool keeps the books only"
        return self.pool

    def _remove(self, entry: Entry) -> None:
        """Take an entry out of the index and policy; free its slot unless a lease still pins it,
        or a client may still be writing it (then it is fenced)."""
        if entry.state is State.RESERVED and entry.owner:
            self._fence(entry)
            return
        if entry.state is State.COMMITTED:
            if self.on_remove is not None:
                self.on_remove(*entry.key)
            self.policy.remove(entry)
            stats = self._ns_stats(entry.key[0])
            stats.num_blocks -= 1
            stats.num_bytes -= entry.nbytes
            self.num_blocks -= 1
        self.index.detach(entry)
        self.bytes_stored -= entry.nbytes
        if entry.num_pins == 0:
            self._free_slot(entry)

    def _free_dead(self, entries: list[Entry]) -> None:
        # A lookup may name a hash twice, so a lease can hold an entry twice: free its slot once.
        # Filtered before the dedup: a release almost always finds no dead entry among hundreds.
        for entry in {id(e): e for e in entries if not e.is_live and e.num_pins == 0}.values():
            self._free_slot(entry)

    def _free_slot(self, entry: Entry) -> None:
        self.slabs.free(entry.slot)
        self.slot_bytes_used -= self.slabs.slot_bytes_for(entry.nbytes)

    def _ns_stats(self, ns: Namespace) -> NamespaceStats:
        stats = self.stats.get(ns.name)
        if stats is None:
            name = ns.name if len(self.stats) < MAX_NAMESPACE_STATS else b""
            stats = self.stats.setdefault(name, NamespaceStats())
        return stats


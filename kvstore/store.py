"""The pool's state machine: index + eviction policy + slab allocator, and the only place they meet.

Pure and single-threaded: it hands out slot offsets and never touches the bytes (server.py does,
through pool.py). Time comes from an injected clock so tests can drive expiry.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvstore.clients import CLIENT_RESERVED_SHARE, RESERVED_TABLE_SHARE, ClientLimits, Clients
from kvstore.index import Entry, Index, State
from kvstore.keys import BlockHash, Namespace, SlotId
from kvstore.policy import LRU, FrequencyLRU
from kvstore.slabs import Slabs

# Leases are client-created; bound them so clients cannot grow the daemon. When the table is full
# the biggest holder gives up its oldest lease to a smaller one (Clients.lease_to_drop_for).
MAX_LEASES = 65_536
MAX_NAMESPACE_STATS = 1024  # per-namespace counters beyond this are pooled under b"" (bounded)
HOTTEST_SCAN_BLOCKS = 200_000  # blocks one STATS reads for hottest(): ~50 ms, whatever is stored
INF = float("inf")


@dataclass(slots=True, frozen=True)
class Limits:
    lease_s: float = 10.0  # default pin time after lookup; clients may ask for less or more
    max_lease_s: float = 60.0
    reserve_s: float = 10.0  # an unfinished write is reclaimed after this
    ttl_s: float | None = None  # committed blocks expire after this, when set


@dataclass(slots=True)
class NamespaceStats:
    """Counters of one namespace name (all epochs). Only ints: the metrics thread reads them."""

    num_lookups: int = 0  # LOOKUP requests
    num_hits: int = 0  # blocks asked for by lookups and found
    num_misses: int = 0  # blocks asked for by lookups and not found
    num_evictions: int = 0
    num_stored: int = 0  # commits, ever
    num_blocks: int = 0  # committed blocks resident now
    num_bytes: int = 0  # their bytes


@dataclass(slots=True, frozen=True)
class HotPrefix:
    """A prefix that reads keep coming back to: its last block, read count and length in blocks."""

    block_hash: BlockHash
    num_hits: int
    num_blocks: int


@dataclass(slots=True, frozen=True)
class Reservation:
    """Outcome of reserve(): a slot per block, None where the block is present or in flight."""

    slots: list[SlotId | None]
    num_full: int  # blocks refused because the pool is full of pinned or reserved blocks


@dataclass
class Store:
    slabs: Slabs
    policy: LRU = field(default_factory=FrequencyLRU)  # the daemon's default (bench/eviction.py)
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], float] = time.monotonic
    index: Index = field(default_factory=Index)
    stats: dict[bytes, NamespaceStats] = field(default_factory=dict)
    num_evictions: int = 0
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

    def __post_init__(self) -> None:
        if self.clients.limits.max_reserved_bytes is None:
            pool_bytes = self.slabs.num_pages * self.slabs.page_bytes
            self.clients = Clients(ClientLimits(
                max_reserved_bytes=pool_bytes // CLIENT_RESERVED_SHARE,
                reserved_table_bytes=pool_bytes // RESERVED_TABLE_SHARE))

    @property
    def num_reserved(self) -> int:
        """Reservations not yet committed or given back."""
        return self.index.num_entries - self.num_blocks

    # --- reads -----------------------------------------------------------------------------
    def lookup(self, ns: Namespace, hashes: Sequence[BlockHash]) -> int:
        """How many of hashes are stored as a consecutive prefix. Changes nothing."""
        return len(self.index.prefix(ns, hashes, self.clock()))

    def record_lookup(self, ns: Namespace, num_asked: int, num_hits: int) -> None:
        """Count one LOOKUP request and its hit and missed blocks (hit rate, metrics)."""
        stats = self._ns_stats(ns)
        stats.num_lookups += 1
        stats.num_hits += num_hits
        stats.num_misses += num_asked - num_hits

    def pin(self, ns: Namespace, hashes: Sequence[BlockHash], lease_s: float | None = None,
            owner: bytes = b"") -> tuple[list[Entry], int | None]:
        """Find the stored prefix of hashes and pin it under a lease; records hits and recency."""
        found, lease_id = self.find_to_pin(ns, hashes, owner)
        self.apply_pin(ns, len(hashes), found, lease_id, lease_s, owner)
        return found, lease_id

    def find_to_pin(self, ns: Namespace, hashes: Sequence[BlockHash],
                    owner: bytes = b"") -> tuple[list[Entry], int | None]:
        """What pin() would pin and under which lease id; changes nothing but, when the lease
        table is full, the biggest holder's oldest lease (given up to make room for owner).

        The server answers a lookup with this and calls apply_pin() right after the reply is
        sent: one thread owns the store, so no other request runs in between.
        """
        found = self.index.prefix(ns, hashes, self.clock())
        if not found or not self._can_lease(owner, len(found)):
            return [], None  # nothing to pin, or no lease to protect it with: a miss
        return found, self.index.new_lease_id()

    def _can_lease(self, owner: bytes, num_blocks: int) -> bool:
        if owner and not self.clients.can_lease(owner, num_blocks):
            return False  # over this client's caps: its miss, nobody else's
        if len(self.index.leases) < MAX_LEASES:
            return True
        victim = self.clients.lease_to_drop_for(owner)
        if victim is None:
            return False
        self.unpin(victim)
        self.num_leases_dropped += 1
        return True

    def read(self, ns: Namespace, hashes: Sequence[BlockHash]) -> list[Entry]:
        """The stored prefix of hashes, for a read done before this returns (no lease needed):
        records per-block reads and recency like a pin."""
        found = self.index.prefix(ns, hashes, self.clock())
        self._touch(found)
        return found

    def transfer_lease(self, lease_id: int, owner: bytes) -> None:
        """Make owner the holder of a lease it presented: the lease then ends with owner's
        connection, not with the one that took it (a scheduler hands its leases to workers)."""
        lease = self.index.leases.get(lease_id)
        if lease is None or lease.owner == owner:
            return
        if lease.owner:
            self.clients.drop_lease(lease.owner, lease_id)
        lease.owner = owner
        if owner:
            self.clients.add_lease(owner, lease_id, len(lease.entries))

    def apply_pin(self, ns: Namespace, num_asked: int, found: list[Entry], lease_id: int | None,
                  lease_s: float | None = None, owner: bytes = b"") -> None:
        """Pin what find_to_pin() returned, and record per-block reads and recency."""
        if lease_id is None:
            return
        self._touch(found)
        lease_s = self.limits.lease_s if lease_s is None else min(lease_s, self.limits.max_lease_s)
        self.index.pin(found, self.clock() + lease_s, lease_id, owner)
        if owner:
            self.clients.add_lease(owner, lease_id, len(found))

    def _touch(self, found: list[Entry]) -> None:
        # Deepest first, so a parent is always more recent than its children: LRU order then
        # reaches leaves before the prefixes they hang from.
        touch = self.policy.touch
        for entry in reversed(found):
            entry.num_hits += 1
            touch(entry)

    def unpin(self, lease_id: int) -> bool:
        """Release a lease early; False when it was unknown or already expired."""
        lease = self.index.leases.get(lease_id)
        if lease is None:
            return False
        if lease.owner:
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

    # --- writes ----------------------------------------------------------------------------
    def reserve(self, ns: Namespace, blocks: Sequence[tuple[BlockHash, BlockHash | None, int]],
                owner: bytes = b"") -> Reservation:
        """Take a slot per (hash, parent_hash, nbytes), evicting if needed. Present blocks get None.

        Past owner's share (kvstore/clients.py) the rest counts as full, like a full pool."""
        guard: list[Entry] = []  # pinned for the duration once eviction is needed (_guard_chains)
        try:
            return self._reserve(ns, blocks, guard, owner)
        finally:
            for entry in guard:
                entry.num_pins -= 1

    def _reserve(self, ns: Namespace, blocks: Sequence[tuple[BlockHash, BlockHash | None, int]],
                 guard: list[Entry], owner: bytes) -> Reservation:
        now = self.clock()
        slots: list[SlotId | None] = []
        num_full = 0
        is_guarded = False
        for i, (block_hash, parent_hash, nbytes) in enumerate(blocks):
            if num_full:
                # The pool refused an earlier block of this chain; a child without it is useless.
                slots.append(None)
                num_full += 1
                continue
            if self.index.get((ns, block_hash)) is not None:
                slots.append(None)  # present or being written by another client
                continue
            if owner and not self.clients.can_reserve(owner, self.slabs.slot_bytes_for(nbytes)):
                num_full += 1  # this client's share is taken: full for it, not for others
                slots.append(None)
                continue
            slot = self.slabs.alloc(nbytes)
            if slot is None:
                if not is_guarded:  # once per call: the walk is as long as the chain
                    guard.extend(self._guard_chains(ns, blocks))
                    is_guarded = True
                # Room for the whole run of such blocks at once: one scan of the eviction order
                # per run, not per block (a chain in a full pool took 26 s for 1024 blocks).
                if self._make_room(nbytes, self._num_to_place(ns, blocks, i)):
                    slot = self.slabs.alloc(nbytes)
            if slot is None:
                num_full += 1
                slots.append(None)
                continue
            self.slot_bytes_used += self.slabs.slot_bytes_for(nbytes)
            self.bytes_stored += nbytes
            entry = self.index.add_reserved((ns, block_hash), slot, nbytes, parent_hash,
                                            now + self.limits.reserve_s)
            if owner:
                entry.owner = owner
                self.clients.add_reserved(entry, self.slabs.slot_bytes_for(nbytes))
            slots.append(slot)
        return Reservation(slots, num_full)

    def _guard_chains(self, ns: Namespace,
                      blocks: Sequence[tuple[BlockHash, BlockHash | None, int]]) -> list[Entry]:
        """Pin the stored blocks of the chains being written: those listed and all their ancestors.

        Evicting them to make room for their own descendants would leave the new blocks
        unreachable (lookups match from the root). Writers save a long prompt in several calls
        (one per prefill chunk), so the ancestors are usually not in this call's list: without
        the walk a pool-sized prompt evicts its own head, block by block, and keeps only orphans.
        Returns the entries pinned; the caller unpins them.
        """
        seen: set[BlockHash] = set()
        pinned: list[Entry] = []
        for block_hash, parent_hash, _ in blocks:
            walk: BlockHash | None = block_hash
            while walk is not None and walk not in seen:  # seen: shared ancestors, hash cycles
                seen.add(walk)
                entry = self.index.get((ns, walk))
                if entry is None:
                    if walk != block_hash:
                        break  # the chain is broken here: older blocks cannot be hit through it
                    walk = parent_hash  # block_hash is new: guard from its parent up
                    continue
                entry.num_pins += 1
                pinned.append(entry)
                walk = entry.parent_hash
        return pinned

    def commit(self, ns: Namespace, block_hash: BlockHash, slot: SlotId, owner: bytes = b"") -> bool:
        """Make a reserved block readable; False when that reservation no longer exists or is
        owner's no longer (another client's, or fenced: then its writer is done with the slot)."""
        entry = self._reserved(ns, block_hash, slot, owner)
        if entry is None:
            return False
        if owner:
            self.clients.drop_reserved(entry, self.slabs.slot_bytes_for(entry.nbytes))
        expiry = INF if self.limits.ttl_s is None else self.clock() + self.limits.ttl_s
        self.index.commit(entry, expiry)
        self.policy.insert(entry)
        stats = self._ns_stats(ns)
        stats.num_stored += 1
        stats.num_blocks += 1
        stats.num_bytes += entry.nbytes
        self.num_blocks += 1
        return True

    def reserved_at(self, entry: Entry) -> float | None:
        """When a reserved block's write began, by the store's clock; None once committed."""
        if entry.state is not State.RESERVED:
            return None
        return entry.deadline_s - self.limits.reserve_s

    def abort(self, ns: Namespace, block_hash: BlockHash, slot: SlotId, owner: bytes = b"") -> bool:
        """Drop owner's reservation and free its slot; False when it no longer exists (or is not
        owner's; a fenced slot of owner's is freed then, as its writer is done with it)."""
        entry = self._reserved(ns, block_hash, slot, owner)
        if entry is None:
            return False
        if owner:
            self.clients.drop_reserved(entry, self.slabs.slot_bytes_for(entry.nbytes))
        self._drop_reserved(entry)
        return True

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
        """The k most-read prefixes of a namespace name, most reads first.

        A prefix ends at a block no resident child of which was read as often: when a whole
        chain is read together only its deepest block is listed, not every block of it. Reads
        are counted per resident block (Entry.num_hits), so this needs no memory of its own and
        forgets a block when it is evicted. Scans the namespace (up to HOTTEST_SCAN_BLOCKS of it,
        oldest first): for STATS, not hot paths.
        """
        # At most HOTTEST_SCAN_BLOCKS are looked at: STATS must stay cheap with millions stored.
        tables = [self.index.tables[ns] for ns in self.index.namespaces_of(name)]
        scanned = itertools.islice(itertools.chain.from_iterable(
            t.values() for t in tables), HOTTEST_SCAN_BLOCKS)
        entries = [e for e in scanned if e.num_hits and e.state is State.COMMITTED]
        covered = {id(e.parent) for e in entries
                   if e.parent is not None and e.parent.num_hits == e.num_hits}
        ends = [e for e in entries if id(e) not in covered]
        top = heapq.nlargest(k, ends, key=lambda e: (e.num_hits, _depth(e)))
        return [HotPrefix(e.key[1], e.num_hits, _depth(e)) for e in top]

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
    def _num_to_place(self, ns: Namespace,
                      blocks: Sequence[tuple[BlockHash, BlockHash | None, int]], start: int) -> int:
        """Blocks from start on, up to the first of another size class, that need a slot."""
        want = self.slabs.slot_bytes_for(blocks[start][2])
        absent: set[BlockHash] = set()
        for block_hash, _, nbytes in itertools.islice(blocks, start, None):
            if self.slabs.slot_bytes_for(nbytes) != want:
                break
            if self.index.get((ns, block_hash)) is None:
                absent.add(block_hash)
        return len(absent)

    def _make_room(self, nbytes: int, num_slots: int = 1) -> bool:
        """Evict until num_slots slots of nbytes' size class can be had, or as many as the
        evictable blocks give; False (and nothing evicted) when not even one can."""
        if not self.slabs.fits(nbytes):
            return False
        want = self.slabs.slot_bytes_for(nbytes)
        per_page = self.slabs.page_bytes // want
        victims: list[Entry] = []
        num_useful, num_got = 0, 0  # victims up to the last that freed room, and the room
        page_used: dict[int, int] = {}
        for entry in self.policy.victims():
            assert entry.num_pins == 0 and entry.state is State.COMMITTED, "policy yielded a pinned block"
            victims.append(entry)
            page_idx = self.slabs.page_of(entry.slot)
            if self.slabs.page_slot_bytes(page_idx) == want:
                num_got += 1  # its slot serves this size class directly
            else:
                left = page_used.get(page_idx, self.slabs.page_num_used(page_idx)) - 1
                page_used[page_idx] = left
                if left:
                    continue
                num_got += per_page  # a whole page frees up and can take any size class
            num_useful = len(victims)
            if num_got >= num_slots:
                break
        if not num_useful:
            return False  # not enough evictable blocks: change nothing
        victims = victims[:num_useful]  # the rest would free no whole slot
        for entry in victims:
            self._ns_stats(entry.key[0]).num_evictions += 1
            self._remove(entry)
        self.num_evictions += len(victims)
        return True

    def _reserved(self, ns: Namespace, block_hash: BlockHash, slot: SlotId,
                  owner: bytes) -> Entry | None:
        entry = self.index.get((ns, block_hash))
        if (entry is None or entry.state is not State.RESERVED or entry.slot != slot
                or entry.owner != owner):
            if owner:
                self._unfence(owner, ns, block_hash, slot)
            return None
        return entry

    def _fence(self, entry: Entry) -> None:
        """Take a reservation away from a writer that may still be copying into its slot: the key
        is free for other writers, the slot stays taken (counted against the writer) until the
        writer names it again or its connection goes (docs/operating.md, Writes)."""
        self.index.detach(entry)
        self.bytes_stored -= entry.nbytes
        self.clients.fence(entry)
        self.num_fenced += 1

    def _drop_reserved(self, entry: Entry) -> None:
        """Remove a reservation whose writer is done (or gone) and free its slot."""
        if entry.is_live:  # not when an invalidate has already taken it (drain_invalidated)
            self.index.detach(entry)
            self.bytes_stored -= entry.nbytes
        self._free_slot(entry)

    def _unfence(self, owner: bytes, ns: Namespace, block_hash: BlockHash, slot: SlotId) -> None:
        """owner names a slot it no longer holds as a reservation: its write is over, so a fenced
        slot is freed, and so is one an invalidate unlinked but has not removed yet."""
        entry = self.clients.fenced(owner, slot)
        if entry is not None and entry.key == (ns, block_hash):
            self.clients.unfence(entry, self.slabs.slot_bytes_for(entry.nbytes))
            self.num_fenced -= 1
            self._free_slot(entry)
            return
        entry = self.clients.reserved(owner, slot)
        if entry is not None and entry.key == (ns, block_hash):  # unreachable: being invalidated
            self.clients.drop_reserved(entry, self.slabs.slot_bytes_for(entry.nbytes))
            self._drop_reserved(entry)

    def _remove(self, entry: Entry) -> None:
        """Take an entry out of the index and policy; free its slot unless a lease still pins it,
        or a client may still be writing it (then it is fenced)."""
        if entry.state is State.RESERVED and entry.owner:
            self._fence(entry)
            return
        if entry.state is State.COMMITTED:
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
        for entry in {id(e): e for e in entries}.values():
            if not entry.is_live and entry.num_pins == 0:
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


def _depth(entry: Entry) -> int:
    """Blocks in the resident prefix ending at entry (linked parents are resident)."""
    depth, node = 1, entry.parent
    while node is not None:
        depth, node = depth + 1, node.parent
    return depth

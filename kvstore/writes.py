"""The Store's writes (a mixin of kvstore/store.py's Store): two-phase reserve -> copy -> commit
or abort by clients on the daemon's host, the one-message PUT of clients on other hosts, and the
fences that keep a slot from a new writer while a timed-out one may still be copying into it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvstore import room
from kvstore.clients import Clients
from kvstore.index import Entry, Index, State
from kvstore.keys import BlockHash, Namespace, SlotId
from kvstore.outcomes import Limits, NamespaceStats, Reservation, Written
from kvstore.policy import LRU
from kvstore.pool import Pool
from kvstore.room import BlockRow
from kvstore.slabs import Slabs

INF = float("inf")
# (namespace, hash, parent hash, a view of the bytes valid only during the call): Store.on_evict.
Evicted = Callable[[Namespace, BlockHash, "BlockHash | None", memoryview], None]


class Writes:
    """Write methods of Store; the state they use is Store's (declared here for readers)."""

    if TYPE_CHECKING:
        slabs: Slabs
        policy: LRU
        limits: Limits
        clock: Callable[[], float]
        index: Index
        clients: Clients
        num_blocks: int
        num_evictions: int
        max_evictions_per_message: int
        _repurposing: room.Repurposing | None
        num_fenced: int
        slot_bytes_used: int
        bytes_stored: int
        pool: Pool | None
        on_evict: Evicted | None
        on_commit: Callable[[Namespace, BlockHash], None] | None

        def _pool(self) -> Pool: ...
        def _remove(self, entry: Entry) -> None: ...
        def _free_slot(self, entry: Entry) -> None: ...
        def _ns_stats(self, ns: Namespace) -> NamespaceStats: ...

    def reserve(self, ns: Namespace, blocks: Sequence[BlockRow], owner: bytes = b"") -> Reservation:
        """Take a slot per (hash, parent_hash, nbytes), evicting if needed. Present blocks get None.

        Past owner's share (kvstore/clients.py) the rest counts as full, like a full pool."""
        guard: list[Entry] = []  # pinned for the duration once eviction is needed
        try:
            return self._reserve(ns, blocks, guard, owner)
        finally:
            for entry in guard:
                entry.num_pins -= 1

    def reserve_views(self, ns: Namespace, blocks: Sequence[BlockRow],
                      owner: bytes) -> list[tuple[SlotId, memoryview] | None]:
        """reserve(), handing out each slot's memory to a writer in this process (a tier's
        thread receiving a pull; a client on the host writes through its own mapping instead),
        which then names the slots in commit or abort. A block that fits no page ends the
        chain: it and the rest get None, as do blocks present and those without room."""
        fit = [self.slabs.fits(nbytes) for _, _, nbytes in blocks] + [False]
        fitting = blocks[:fit.index(False)]
        slots = self.reserve(ns, fitting, owner).slots if fitting else []
        memory = self._pool().buffer
        views = [None if slot is None else (slot, memory[slot:slot + nbytes])
                 for slot, (_, _, nbytes) in zip(slots, fitting)]
        return views + [None] * (len(blocks) - len(views))

    def put(self, ns: Namespace, blocks: Sequence[BlockRow],
            payload: Sequence[Sequence[memoryview]]) -> Written:
        """The TCP write: reserve, copy each block's payload (its frames, in order) into its slot,
        and commit, all before the next request runs; so no client's share or fence applies."""
        result = self.reserve(ns, blocks)
        memory = self._pool().buffer
        num_stored, nbytes = 0, 0
        for (block_hash, _, size), frames, slot in zip(blocks, payload, result.slots):
            if slot is None:
                continue
            offset: int = slot
            for frame in frames:
                memory[offset:offset + len(frame)] = frame
                offset += len(frame)
            self.commit(ns, block_hash, slot)
            num_stored += 1
            nbytes += size
        num_present = len(blocks) - num_stored - result.num_full
        return Written(num_stored, num_present, result.num_full, nbytes)

    def commit(self, ns: Namespace, block_hash: BlockHash, slot: SlotId, owner: bytes = b"") -> bool:
        """Make a reserved block readable; False when that reservation no longer exists or is
        owner's no longer (another client's, or fenced: then its writer is done with the slot)."""
        entry = self._reserved(ns, block_hash, slot, owner)
        if entry is None:
            return False
        self._commit(ns, entry)
        return True

    def commit_many(self, ns: Namespace, rows: Sequence[tuple[BlockHash, SlotId]],
                    owner: bytes) -> Written:
        """COMMIT: commit() each (hash, slot) of owner's; began_s: when the first committed one
        was reserved (a shared-memory write spans RESERVE, the client's copy and COMMIT)."""
        num_done, nbytes, began_s = 0, 0, None
        for block_hash, slot in rows:
            entry = self._reserved(ns, block_hash, slot, owner)
            if entry is None:
                continue
            if began_s is None:  # read before _commit() re-dates the entry
                began_s = entry.deadline_s - self.limits.reserve_s
            self._commit(ns, entry)
            num_done += 1
            nbytes += entry.nbytes
        return Written(num_done, nbytes=nbytes, began_s=began_s)

    def abort(self, ns: Namespace, block_hash: BlockHash, slot: SlotId, owner: bytes = b"") -> bool:
        """Drop owner's reservation and free its slot; False when it no longer exists (or is not
        owner's; a fenced slot of owner's is freed then, as its writer is done with it)."""
        entry = self._reserved(ns, block_hash, slot, owner)
        if entry is None:
            return False
        self.clients.drop_reserved(entry, self.slabs.slot_bytes_for(entry.nbytes))
        self._drop_reserved(entry)
        return True

    def abort_many(self, ns: Namespace, rows: Sequence[tuple[BlockHash, SlotId]],
                   owner: bytes) -> int:
        """ABORT: abort() each (hash, slot); how many were owner's reservations."""
        return sum(self.abort(ns, block_hash, slot, owner) for block_hash, slot in rows)

    def _reserve(self, ns: Namespace, blocks: Sequence[BlockRow], guard: list[Entry],
                 owner: bytes) -> Reservation:
        now = self.clock()
        slots: list[SlotId | None] = []
        num_full = 0
        is_guarded = False
        evictions_left = self.max_evictions_per_message  # for the whole message (issue 10)
        for i, (block_hash, parent_hash, nbytes) in enumerate(blocks):
            if num_full:
                # The pool refused an earlier block of this chain; a child without it is useless.
                slots.append(None)
                num_full += 1
                continue
            if self.index.get((ns, block_hash)) is not None:
                slots.append(None)  # present or being written by another client
                continue
            slot_bytes = self.slabs.slot_bytes_for(nbytes)
            if not self.clients.can_reserve(owner, slot_bytes):
                num_full += 1  # this client's share is taken: full for it, not for others
                slots.append(None)
                continue
            slot = self.slabs.alloc(nbytes)
            if slot is None:
                if not is_guarded:  # once per call: the walk is as long as the chain
                    guard.extend(room.guard_chains(self.index, ns, blocks))
                    is_guarded = True
                # Room for the whole run of such blocks at once: one scan of the eviction order
                # per run, not per block (a chain in a full pool took 26 s for 1024 blocks).
                num_evicted, is_room = self._make_room(
                    nbytes, room.num_to_place(self.index, self.slabs, ns, blocks, i),
                    evictions_left)
                evictions_left -= num_evicted
                if is_room:
                    slot = self.slabs.alloc(nbytes)
            if slot is None:
                num_full += 1
                slots.append(None)
                continue
            self.slot_bytes_used += slot_bytes
            self.bytes_stored += nbytes
            entry = self.index.add_reserved((ns, block_hash), slot, nbytes, parent_hash,
                                            now + self.limits.reserve_s)
            entry.owner = owner
            self.slabs.set_holder(slot, entry)
            self.clients.add_reserved(entry, slot_bytes)
            slots.append(slot)
        return Reservation(slots, num_full)

    def _make_room(self, nbytes: int, num_slots: int, max_evictions: int) -> tuple[int, bool]:
        """Evict up to max_evictions blocks so that num_slots slots of nbytes' size class can be
        had, or as many as can; returns (blocks evicted, whether any room was made).

        In the policy's order while that frees room within the bound. Past it (a new size class
        whose victims spread over every page: thousands of evictions to free one), a page of
        another class is repurposed instead, emptied a slice per message (_repurpose); the rows
        meanwhile are answered full. Nothing is evicted when no page could ever free."""
        if max_evictions <= 0:
            return 0, False  # this message's evictions are spent: full until the next one
        victims, is_cut = room.victims_for(self.slabs, self.policy.victims(), nbytes, num_slots,
                                           max_evictions, room.MAX_SLOT_VISITS_PER_MESSAGE)
        for entry in victims:
            self._evict(entry)
        if victims or not (is_cut or self._repurposing):  # no page could free: change nothing
            return len(victims), bool(victims)
        return self._repurpose(nbytes, max_evictions)

    def _repurpose(self, nbytes: int, max_evictions: int) -> tuple[int, bool]:
        """Evict up to max_evictions blocks of the page being repurposed (choosing one first if
        none is), looking at up to MAX_SLOT_VISITS_PER_MESSAGE of its slots from where the last
        message stopped; returns (blocks evicted, whether the page is free now). The page takes
        no new slots meanwhile, and frees by itself when its last pinned or reserved slot goes.

        Every block of the page goes, in slot order, not leaf first: a block whose children lie
        on other pages leaves them unreachable (a lookup matches from the root) until they are
        evicted in turn; freeing the page in the policy's order is what cost thousands."""
        slabs = self.slabs
        work = self._repurposing
        if work is not None and not slabs.is_draining(work.page_idx):
            work = self._repurposing = None  # freed between messages (its pins ended)
        want = slabs.slot_bytes_for(nbytes)
        if work is not None and slabs.page_slot_bytes(work.page_idx) == want:
            # Being emptied for another class: a writer of its own class would only take the
            # page back when it frees (and undo the work); it evicts in the policy's order only.
            return 0, False
        if work is None:
            page_idx = room.page_to_repurpose(slabs, nbytes, room.MAX_SLOT_VISITS_PER_MESSAGE)
            if page_idx is None:
                return 0, False
            slabs.drain(page_idx)
            work = self._repurposing = room.Repurposing(page_idx)
        holders = slabs.holders(work.page_idx)
        num_evicted, num_visits, is_wrapped = 0, 0, False
        while (num_evicted < max_evictions and num_visits < room.MAX_SLOT_VISITS_PER_MESSAGE
               and slabs.is_draining(work.page_idx)):
            if work.cursor >= len(holders):
                if is_wrapped:
                    break  # what is left is pinned or being written: it goes by itself
                work.cursor, is_wrapped = 0, True
                continue
            holder = holders[work.cursor]
            work.cursor += 1
            num_visits += 1
            if room.can_go_now(holder):
                assert isinstance(holder, Entry)
                self._evict(holder)
                num_evicted += 1
        if slabs.is_draining(work.page_idx):
            return num_evicted, False
        self._repurposing = None  # its last slot was freed: a free page now
        return num_evicted, True

    def _evict(self, entry: Entry) -> None:
        if self.on_evict is not None and self.pool is not None:
            # Before _remove frees the slot: the next tier takes its copy now (tiers.py).
            ns, block_hash = entry.key
            self.on_evict(ns, block_hash, entry.parent_hash,
                          self.pool.view(entry.slot, entry.nbytes))
        self._ns_stats(entry.key[0]).num_evictions += 1
        self._remove(entry)
        self.num_evictions += 1

    def _commit(self, ns: Namespace, entry: Entry) -> None:
        self.clients.drop_reserved(entry, self.slabs.slot_bytes_for(entry.nbytes))
        expiry = INF if self.limits.ttl_s is None else self.clock() + self.limits.ttl_s
        self.index.commit(entry, expiry)
        self.policy.insert(entry)
        stats = self._ns_stats(ns)
        stats.num_stored += 1
        stats.num_blocks += 1
        stats.num_bytes += entry.nbytes
        self.num_blocks += 1
        if self.on_commit is not None:
            self.on_commit(ns, entry.key[1])

    def _reserved(self, ns: Namespace, block_hash: BlockHash, slot: SlotId,
                  owner: bytes) -> Entry | None:
        entry = self.index.get((ns, block_hash))
        if (entry is None or entry.state is not State.RESERVED or entry.slot != slot
                or entry.owner != owner):
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


"""Bookkeeping of stored blocks: key -> entry, parent links, pins (leases), reservations, expiry.

Pure: no sockets, no memory, no clock of its own (callers pass `now`). The Store decides what to
evict and allocate; this module only keeps the records consistent.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from kvstore.keys import BlockHash, Key, Namespace, SlotId


class State(enum.Enum):
    RESERVED = 1  # slot taken, bytes being written; invisible to readers
    COMMITTED = 2  # readable


@dataclass(slots=True, eq=False)
class Entry:
    key: Key
    slot: SlotId
    nbytes: int
    parent_hash: BlockHash | None
    state: State
    deadline_s: float  # RESERVED: abandon deadline; COMMITTED: TTL expiry (inf without TTL)
    parent: Entry | None = None  # linked while both this entry and its parent are committed
    num_children: int = 0  # committed resident children linked to this entry
    num_pins: int = 0
    num_hits: int = 0
    is_live: bool = True  # False once removed from the table; the slot may still be pinned
    owner: bytes = b""  # RESERVED: the connection writing it (kvstore/clients.py); b"": in-process

    @property
    def is_evictable(self) -> bool:
        return (
            self.is_live and self.state is State.COMMITTED
            and self.num_pins == 0 and self.num_children == 0
        )


@dataclass(slots=True)
class Lease:
    entries: list[Entry]
    deadline_s: float
    owner: bytes = b""  # the connection holding it (kvstore/clients.py); b"": in-process


@dataclass(slots=True)
class Index:
    """All records of the pool, by namespace then block hash."""

    tables: dict[Namespace, dict[BlockHash, Entry]] = field(default_factory=dict)
    # The committed entries of tables (what a lookup may find), kept beside them so that
    # prefix() needs no per-entry state check; one more dict slot per block (~100 bytes).
    readable: dict[Namespace, dict[BlockHash, Entry]] = field(default_factory=dict)
    leases: dict[int, Lease] = field(default_factory=dict)
    _lease_heap: list[tuple[float, int]] = field(default_factory=list)
    _reserve_heap: list[tuple[float, int, Entry]] = field(default_factory=list)
    _ttl_heap: list[tuple[float, int, Entry]] = field(default_factory=list)
    # Committed entries by (namespace, parent hash), whether or not that parent is resident: a
    # parent committed after its children (two writers, or a re-stored prefix) adopts them.
    _by_parent: dict[Key, set[Entry]] = field(default_factory=dict)
    _seq: Iterator[int] = field(default_factory=itertools.count)
    # Namespaces (all epochs) of each name: INVALIDATE finds its tables without scanning others.
    _by_name: dict[bytes, set[Namespace]] = field(default_factory=dict)
    num_entries: int = 0

    def get(self, key: Key) -> Entry | None:
        table = self.tables.get(key[0])
        return table.get(key[1]) if table else None

    def prefix(self, ns: Namespace, hashes: Sequence[BlockHash], now: float) -> list[Entry]:
        """Committed, unexpired entries matching hashes as a consecutive prefix."""
        table = self.readable.get(ns)
        if not table:
            return []
        # Hot path (a lookup of a whole prompt): the table holds only committed entries, so one
        # C pass finds the prefix (~17 vs ~24 us in process for 256 freshly decoded hashes; a
        # 256-hash LOOKUP through the daemon answered 17-23 us sooner).
        found = list(map(table.get, hashes))
        # all() first: an Entry is true in C (~1 us for 256), while index(None) compares each one
        # with None through its type's rich comparison (~3 us), so it runs only on a miss.
        if not all(found):
            del found[found.index(None):]
        if self._ttl_heap and self._ttl_heap[0][0] <= now:
            # Some block may be past its TTL (every committed one with a TTL is on this heap until
            # expire() removes it): the slow check, only then.
            for i, entry in enumerate(found):
                if entry.deadline_s <= now:
                    del found[i:]
                    break
        # A table holds each entry under its own hash only, so the entries repeat exactly where
        # the hashes do; a set of the hashes (their hash() cached by the lookups above) costs a
        # fifth of one of the entries' ids (~5 vs ~22 us for 256).
        head = hashes[:len(found)]
        if len(found) > 1 and len(set(head)) < len(found):
            # A chain never names a block twice (hashes chain their parent): the match ends at
            # the first repeat, so one lease cannot pin a block thousands of times (issue 10).
            seen: set[BlockHash] = set()
            for i, block_hash in enumerate(head):
                if block_hash in seen:
                    return found[:i]
                seen.add(block_hash)
        return found

    def add_reserved(self, key: Key, slot: SlotId, nbytes: int,
                     parent_hash: BlockHash | None, deadline_s: float) -> Entry:
        assert self.get(key) is None, f"key already present: {key!r}"
        entry = Entry(key, slot, nbytes, parent_hash, State.RESERVED, deadline_s)
        table = self.tables.get(key[0])
        if table is None:
            table = self.tables[key[0]] = {}
            self._by_name.setdefault(key[0].name, set()).add(key[0])
        table[key[1]] = entry
        self.num_entries += 1
        heapq.heappush(self._reserve_heap, (deadline_s, next(self._seq), entry))
        return entry

    def commit(self, entry: Entry, expiry_s: float) -> None:
        """Make a reserved entry readable and link it to its resident parent and children."""
        assert entry.state is State.RESERVED and entry.is_live, "commit of a non-reserved entry"
        entry.state = State.COMMITTED
        entry.deadline_s = expiry_s
        ns, block_hash = entry.key
        if self.tables.get(ns, {}).get(block_hash) is entry:  # not when its table was taken
            self.readable.setdefault(ns, {})[block_hash] = entry
        parent_key = _parent_key(entry)
        if parent_key is not None:
            self._by_parent.setdefault(parent_key, set()).add(entry)
            parent = self.get(parent_key)
            if parent is not None and parent.state is State.COMMITTED:
                _link(entry, parent)  # entry has no children yet, so this closes no cycle
        for child in self._by_parent.get(entry.key, ()):
            # NOTE: client input may chain hashes in a cycle; linking one would make every block
            # on it a non-leaf forever (tests/unit/test_store.py).
            if child.parent is None and not _is_ancestor(child, entry):
                _link(child, entry)
        if expiry_s != float("inf"):
            heapq.heappush(self._ttl_heap, (expiry_s, next(self._seq), entry))

    def detach(self, entry: Entry) -> None:
        """Remove an entry from the table; its slot is freed by the caller once unpinned."""
        assert entry.is_live, "detach of a dead entry"
        ns, block_hash = entry.key
        table = self.tables.get(ns)
        # Not there when its table was taken by take_tables(); the caller drains that one.
        if table is not None and table.get(block_hash) is entry:
            del table[block_hash]
            self.readable.get(ns, {}).pop(block_hash, None)  # it mirrors table: entry or nothing
            if not table:
                self._drop_table(ns)
        self.num_entries -= 1
        entry.is_live = False
        parent_key = _parent_key(entry)
        if entry.state is State.COMMITTED and parent_key is not None:
            siblings = self._by_parent[parent_key]
            siblings.discard(entry)
            if not siblings:
                del self._by_parent[parent_key]
        if entry.parent is not None:
            entry.parent.num_children -= 1
            entry.parent = None
        for child in self._by_parent.get(entry.key, ()):
            if child.parent is entry:  # orphaned until this key is committed again
                child.parent = None
        entry.num_children = 0

    def take_tables(self, name: bytes, below_epoch: int | None) -> list[dict[BlockHash, Entry]]:
        """Unlink the tables of a namespace name (epochs < below_epoch, or all) and return them.

        Their entries vanish from lookups at once but stay live (counted, in the policy, holding
        slots) until the caller detaches each: an invalidate of millions runs in slices.
        """
        doomed = [ns for ns in self._by_name.get(name, ())
                  if below_epoch is None or ns.epoch < below_epoch]
        tables = [self.tables[ns] for ns in doomed]
        for ns in doomed:
            self._drop_table(ns)
        return tables

    def namespaces_of(self, name: bytes) -> list[Namespace]:
        """The namespaces (epochs) of a name that hold entries."""
        return list(self._by_name.get(name, ()))

    def _drop_table(self, ns: Namespace) -> None:
        del self.tables[ns]
        self.readable.pop(ns, None)
        names = self._by_name[ns.name]
        names.discard(ns)
        if not names:
            del self._by_name[ns.name]

    def new_lease_id(self) -> int:
        """An unused lease id. Random, not sequential: a client cannot release or consume
        another client's lease by guessing its id (a slot could be reused while being read)."""
        lease_id = secrets.randbits(62)
        while lease_id in self.leases:
            lease_id = secrets.randbits(62)
        return lease_id

    def pin(self, entries: list[Entry], deadline_s: float, lease_id: int | None = None,
            owner: bytes = b"") -> int:
        """Pin entries under a lease (new, or lease_id from new_lease_id) until deadline_s."""
        if lease_id is None:
            lease_id = self.new_lease_id()
        assert lease_id not in self.leases, "lease id reused"
        for entry in entries:
            entry.num_pins += 1
        self.leases[lease_id] = Lease(entries, deadline_s, owner)
        if deadline_s != float("inf"):  # a row that never falls due would stay forever
            heapq.heappush(self._lease_heap, (deadline_s, lease_id))
        return lease_id

    def unpin(self, lease_id: int) -> list[Entry] | None:
        """Drop a lease; returns its entries, or None when the lease is unknown or expired."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return None
        for entry in lease.entries:
            entry.num_pins -= 1
            assert entry.num_pins >= 0, "negative pin count"
        return lease.entries

    def expired_leases(self, now: float, limit: float = float("inf")) -> list[int]:
        """Ids of up to limit leases past their deadline (still held; the caller unpins them)."""
        expired: list[int] = []
        num_popped = 0  # stale rows (leases released early) count too: every pop is work
        while self._lease_heap and self._lease_heap[0][0] <= now and num_popped < limit:
            num_popped += 1
            _, lease_id = heapq.heappop(self._lease_heap)
            if lease_id in self.leases:
                expired.append(lease_id)
        return expired

    def expired_reservations(self, now: float, limit: float = float("inf")) -> list[Entry]:
        """Up to limit reserved entries past their abandon deadline."""
        return self._pop_due(self._reserve_heap, now, State.RESERVED, limit)

    def expired_entries(self, now: float, limit: float = float("inf")) -> list[Entry]:
        """Up to limit committed entries past their TTL."""
        return self._pop_due(self._ttl_heap, now, State.COMMITTED, limit)

    def is_lease_due(self, now: float) -> bool:
        return bool(self._lease_heap) and self._lease_heap[0][0] <= now

    def is_due(self, now: float) -> bool:
        """Whether a lease, reservation or TTL row falls due by now (some may be stale)."""
        return any(heap and heap[0][0] <= now
                   for heap in (self._lease_heap, self._reserve_heap, self._ttl_heap))

    @staticmethod
    def _pop_due(heap: list[tuple[float, int, Entry]], now: float, state: State,
                 limit: float) -> list[Entry]:
        due: list[Entry] = []
        num_popped = 0  # stale rows count too: every pop is work
        while heap and heap[0][0] <= now and num_popped < limit:
            num_popped += 1
            deadline_s, _, entry = heapq.heappop(heap)
            # Stale heap rows (entry since committed, removed or re-dated) are skipped.
            if entry.is_live and entry.state is state and entry.deadline_s == deadline_s:
                due.append(entry)
        return due


def _parent_key(entry: Entry) -> Key | None:
    """The key of entry's parent; None for a root, or a block naming itself as its parent."""
    if entry.parent_hash is None or entry.parent_hash == entry.key[1]:
        return None
    return (entry.key[0], entry.parent_hash)


def _link(child: Entry, parent: Entry) -> None:
    child.parent = parent
    parent.num_children += 1


def _is_ancestor(candidate: Entry, entry: Entry) -> bool:
    """Whether candidate is entry or lies on entry's chain of linked parents."""
    node: Entry | None = entry
    while node is not None:
        if node is candidate:
            return True
        node = node.parent
    return False

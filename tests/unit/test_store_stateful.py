"""Store (index + policy + slabs) driven by Hypothesis against a dict model.

Hashes are paths of tokens (b"\\x01\\x02" is the child of b"\\x01"), so the model knows every
block's parent the way vLLM's chained hashes do. Evictions happen only inside reserve(); the model
finds them by diffing and checks each one: never pinned, never a parent of a resident child (with
a leaf-first policy), and never more than needed (a refusal must mean no eviction could help).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import hypothesis.strategies as st
from hypothesis import event, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvstore.index import State
from kvstore.keys import BlockHash, Namespace
from kvstore.policy import LRU, FrequencyLRU, LeafLRU
from kvstore.slabs import Slabs
from kvstore.store import Limits, Store

PAGE_BYTES = 4096
NUM_PAGES = 4
BASE_OFFSET = 4096  # the real segment keeps a header page before the slabs
NAMESPACES = (Namespace(b"a", 0), Namespace(b"a", 1), Namespace(b"b", 0), Namespace(b"c", 0))
# Slots of 1024, 1920 and 4032 bytes: 4, 2 and 1 per page, so size classes compete for pages.
BLOCK_BYTES = {b"a": 1000, b"b": 1900, b"c": 4000}
NUM_TOKENS = 3
MAX_DEPTH = 4
LEASES_S = (None, 0.0, 2.0, 5.0, 30.0)  # None: the store's default; 30 s is clamped to max_lease_s

Key = tuple[Namespace, bytes]


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now = start_s

    def __call__(self) -> float:
        return self.now

    def advance(self, dt_s: float) -> None:
        self.now += dt_s


def parent_of(block_hash: bytes) -> bytes | None:
    return block_hash[:-1] or None


def chain_of(block_hash: bytes) -> list[bytes]:
    """The hashes of a path from its root: what a lookup for that prefix sends."""
    return [block_hash[:i] for i in range(1, len(block_hash) + 1)]


@dataclass
class Block:
    nbytes: int
    slot: int
    is_committed: bool
    deadline_s: float  # reserved: abandon deadline; committed: TTL expiry


@dataclass
class Lease:
    items: list[tuple[Key, int, int]]  # (key, slot, nbytes) of each pinned block
    deadline_s: float


@dataclass
class Model:
    blocks: dict[Key, Block] = field(default_factory=dict)
    leases: dict[int, Lease] = field(default_factory=dict)

    def prefix(self, ns: Namespace, hashes: list[bytes], now: float) -> list[Key]:
        found = []
        for block_hash in hashes:
            block = self.blocks.get((ns, block_hash))
            if block is None or not block.is_committed or block.deadline_s <= now:
                break
            found.append((ns, block_hash))
        return found

    def pinned_slots(self) -> set[int]:
        return {slot for lease in self.leases.values() for _, slot, _ in lease.items}

    def resident_children(self, key: Key) -> list[Key]:
        ns, block_hash = key
        return [k for k, b in self.blocks.items()
                if b.is_committed and k[0] == ns and parent_of(k[1]) == block_hash]


class StoreMachine(RuleBasedStateMachine):
    """Base machine; subclasses pick the policy and the TTL."""

    policy_cls: type[LRU] = LeafLRU
    ttl_s: float | None = None

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.limits = Limits(lease_s=5.0, max_lease_s=8.0, reserve_s=10.0, ttl_s=self.ttl_s)
        self.store = Store(Slabs(BASE_OFFSET, NUM_PAGES, PAGE_BYTES), policy=self.policy_cls(),
                           limits=self.limits, clock=self.clock)
        self.model = Model()

    # --- helpers -----------------------------------------------------------------------------
    @property
    def is_leaf_first(self) -> bool:
        return isinstance(self.store.policy, LeafLRU)

    def snapshot(self) -> object:
        """Everything a no-op must leave alone."""
        index = self.store.index
        entries = sorted(
            (ns.name, ns.epoch, h, e.slot, e.state.value, e.num_pins, e.num_children, e.deadline_s)
            for ns, table in index.tables.items() for h, e in table.items())
        policy_order = [(e.key, e.slot) for e in self.store.policy._order.values()]
        leases = sorted((lid, [e.slot for e in lease.entries], lease.deadline_s)
                        for lid, lease in index.leases.items())
        slabs = self.store.slabs
        pages = [(slabs.page_slot_bytes(i), slabs.page_num_used(i)) for i in range(slabs.num_pages)]
        return entries, policy_order, leases, pages, slabs.num_free_pages, self.store.num_evictions

    def known_hashes(self, ns: Namespace) -> list[bytes]:
        return sorted(h for n, h in self.model.blocks if n == ns)

    def path(self, ns: Namespace, pick: int, tokens: list[int]) -> bytes:
        """A hash path: mostly an existing block of ns, extended by tokens up to MAX_DEPTH."""
        known = self.known_hashes(ns)
        start = known[pick % len(known)] if known and pick % 4 else b""
        return (start + bytes(tokens))[:max(len(start), MAX_DEPTH)] or bytes(tokens[:1])

    def probe(self, ns: Namespace, pick: int, tokens: list[int]) -> list[bytes]:
        """Hashes a lookup sends: mostly the chain to a known block, plus tokens beyond it."""
        known = self.known_hashes(ns)
        start = known[pick % len(known)] if known and pick % 4 else b""
        return chain_of(start + bytes(tokens)) or [b"\x01"]

    def eventually_evictable(self, protected: set[Key]) -> set[Key]:
        """Committed blocks some sequence of evictions could take under the store's policy.

        protected: blocks named by the reserve being made, which it never evicts.
        """
        pinned = self.model.pinned_slots()
        candidates = {k for k, b in self.model.blocks.items()
                      if b.is_committed and b.slot not in pinned and k not in protected}
        if not self.is_leaf_first:
            return candidates
        evictable: set[Key] = set()
        changed = True
        while changed:  # a block goes once every resident child can go
            changed = False
            for key in candidates - evictable:
                if all(c in evictable for c in self.model.resident_children(key)):
                    evictable.add(key)
                    changed = True
        return evictable

    def assert_refusal_is_genuine(self, nbytes: int, protected: set[Key]) -> None:
        """A block refused as full: no free page, no room in its size class, nothing to evict."""
        slabs = self.store.slabs
        want = slabs.slot_bytes_for(nbytes)
        assert slabs.num_free_pages == 0, "refused a block while a page was free"
        evictable = self.eventually_evictable(protected)
        num_evictable_on_page = Counter(slabs.page_of(self.model.blocks[k].slot) for k in evictable)
        for page_idx in range(slabs.num_pages):
            slot_bytes, num_used = slabs.page_slot_bytes(page_idx), slabs.page_num_used(page_idx)
            if slot_bytes == want:
                assert num_used == PAGE_BYTES // want, "refused a block while its class had room"
                assert num_evictable_on_page[page_idx] == 0, (
                    "refused a block while an evictable block of its size class existed")
            assert num_evictable_on_page[page_idx] < num_used, (
                f"refused a block while every slot of page {page_idx} could be evicted")

    def check_evictions(self, before: dict[Key, Block], pinned_before: set[int],
                        protected: set[Key]) -> None:
        """Committed blocks that vanished in a reserve were evicted: check each one was allowed."""
        index = self.store.index
        evicted = []
        for key, block in before.items():
            entry = index.get(key)
            still_there = (entry is not None and entry.slot == block.slot
                           and (entry.state is State.COMMITTED) == block.is_committed)
            if not block.is_committed:
                assert still_there, f"a reservation vanished during reserve: {key!r}"
            elif not still_there:
                evicted.append(key)
        if evicted:
            event(f"reserve evicted {min(len(evicted), 3)}+ blocks")
        for key in evicted:
            assert before[key].slot not in pinned_before, f"evicted a pinned block {key!r}"
            assert key not in protected, f"evicted {key!r}, a block of the chain being reserved"
            del self.model.blocks[key]
        if self.is_leaf_first:
            for key in evicted:
                children = self.model.resident_children(key)
                assert not children, f"evicted {key!r} while its child {children[0]!r} was resident"
        assert self.store.num_evictions >= len(evicted)

    # --- rules -------------------------------------------------------------------------------
    @rule(ns_i=st.integers(0, len(NAMESPACES) - 1), pick=st.integers(0, 1 << 16),
          tokens=st.lists(st.integers(1, NUM_TOKENS), min_size=1, max_size=MAX_DEPTH),
          put=st.booleans())
    def reserve(self, ns_i: int, pick: int, tokens: list[int], put: bool) -> None:
        """Reserve a chain; with put, commit every granted slot at once, root first (PUT)."""
        ns = NAMESPACES[ns_i]
        leaf = self.path(ns, pick, tokens)
        # Write the tail of the path, starting somewhere below the root (like a partial hit).
        hashes = chain_of(leaf)[pick % len(leaf):]
        nbytes = BLOCK_BYTES[ns.name]
        blocks = [(BlockHash(h), parent_of(h), nbytes) for h in hashes]
        before = dict(self.model.blocks)
        snapshot = self.snapshot()
        pinned_before = self.model.pinned_slots()
        # The reserve never evicts the chain it writes: its listed blocks and every stored
        # ancestor up to the first missing one (a later chunk of a prompt keeps the head).
        protected: set[Key] = set()
        for h in hashes:
            walk = bytes(h) if (ns, bytes(h)) in before else parent_of(bytes(h))
            while walk is not None and (ns, walk) in before:
                protected.add((ns, walk))
                walk = parent_of(walk)

        result = self.store.reserve(ns, blocks)

        assert len(result.slots) == len(blocks)
        if all(slot is None for slot in result.slots):
            assert self.snapshot() == snapshot, "a reserve that granted nothing changed the state"
        self.check_evictions(before, pinned_before, protected)
        first_full = len(blocks) - result.num_full
        now = self.clock()
        for i, (block_hash, _, _) in enumerate(blocks):
            key, slot = (ns, bytes(block_hash)), result.slots[i]
            if i >= first_full:
                assert slot is None, "a block after a refused one got a slot"
            elif slot is None:
                assert key in before, f"{key!r} got no slot yet was neither present nor refused"
            else:
                assert key not in self.model.blocks, f"{key!r} reserved twice"
                assert self.store.index.get(key).state is State.RESERVED
                self.model.blocks[key] = Block(nbytes, slot, False, now + self.limits.reserve_s)
        if result.num_full:
            event("reserve refused a block as full")
            key = (ns, bytes(blocks[first_full][0]))
            assert key not in self.model.blocks, f"{key!r} counted full while present"
            self.assert_refusal_is_genuine(nbytes, protected)
        if put:
            for (block_hash, _, _), slot in zip(blocks, result.slots):
                if slot is not None:
                    self.commit_block((ns, bytes(block_hash)))

    def commit_block(self, key: Key) -> None:
        block = self.model.blocks[key]
        assert self.store.commit(key[0], BlockHash(key[1]), block.slot)
        block.is_committed = True
        block.deadline_s = float("inf") if self.ttl_s is None else self.clock() + self.ttl_s

    def reserved_keys(self) -> list[Key]:
        return sorted((k for k, b in self.model.blocks.items() if not b.is_committed),
                      key=lambda k: (k[0].name, k[0].epoch, k[1]))

    @precondition(lambda self: self.reserved_keys())
    @rule(pick=st.integers(0, 1 << 16), wrong_slot=st.booleans())
    def commit(self, pick: int, wrong_slot: bool) -> None:
        keys = self.reserved_keys()
        key = keys[pick % len(keys)]
        block = self.model.blocks[key]
        if wrong_slot:
            snapshot = self.snapshot()
            assert not self.store.commit(key[0], BlockHash(key[1]), block.slot + PAGE_BYTES)
            assert self.snapshot() == snapshot, "a refused commit changed the state"
            return
        self.commit_block(key)

    @precondition(lambda self: self.reserved_keys())
    @rule(pick=st.integers(0, 1 << 16))
    def abort(self, pick: int) -> None:
        keys = self.reserved_keys()
        key = keys[pick % len(keys)]
        assert self.store.abort(key[0], BlockHash(key[1]), self.model.blocks[key].slot)
        del self.model.blocks[key]
        assert not self.store.abort(key[0], BlockHash(key[1]), 0), "aborted a reservation twice"

    @rule(ns_i=st.integers(0, len(NAMESPACES) - 1), pick=st.integers(0, 1 << 16),
          tokens=st.lists(st.integers(1, NUM_TOKENS), max_size=2),
          lease_s=st.sampled_from(LEASES_S))
    def pin(self, ns_i: int, pick: int, tokens: list[int], lease_s: float | None) -> None:
        ns = NAMESPACES[ns_i]
        hashes = self.probe(ns, pick, tokens)
        now = self.clock()
        expected = self.model.prefix(ns, hashes, now)

        entries, lease_id = self.store.pin(ns, [BlockHash(h) for h in hashes], lease_s)

        assert [e.key for e in entries] == expected, "pin returned a different prefix"
        if not expected:
            assert lease_id is None
            return
        event(f"pin hit {len(expected)} blocks")
        assert lease_id is not None and lease_id not in self.model.leases
        lease_s = self.limits.lease_s if lease_s is None else min(lease_s, self.limits.max_lease_s)
        items = [(k, self.model.blocks[k].slot, self.model.blocks[k].nbytes) for k in expected]
        self.model.leases[lease_id] = Lease(items, now + lease_s)

    @rule(ns_i=st.integers(0, len(NAMESPACES) - 1), pick=st.integers(0, 1 << 16),
          tokens=st.lists(st.integers(1, NUM_TOKENS), max_size=2))
    def lookup(self, ns_i: int, pick: int, tokens: list[int]) -> None:
        ns = NAMESPACES[ns_i]
        hashes = self.probe(ns, pick, tokens)
        snapshot = self.snapshot()
        num_hits = self.store.lookup(ns, [BlockHash(h) for h in hashes])
        assert num_hits == len(self.model.prefix(ns, hashes, self.clock()))
        assert self.snapshot() == snapshot, "lookup changed the state"

    @rule(pick=st.integers(0, 1 << 16), unknown=st.booleans())
    def unpin(self, pick: int, unknown: bool) -> None:
        # Creation order, not sorted ids: lease ids are random, and a choice that depends on them
        # makes Hypothesis replay a different run (FlakyStrategyDefinition).
        lease_ids = list(self.model.leases)
        if unknown or not lease_ids:
            assert not self.store.unpin(10**9 + pick), "unpinned an unknown lease"
            return
        lease_id = lease_ids[pick % len(lease_ids)]
        assert self.store.unpin(lease_id)
        del self.model.leases[lease_id]
        assert not self.store.unpin(lease_id), "unpinned a lease twice"

    @rule(dt_s=st.sampled_from((0.0, 0.5, 2.0, 4.0, 6.0, 9.0, 12.0)))
    def advance_and_expire(self, dt_s: float) -> None:
        self.clock.advance(dt_s)
        now = self.clock()
        due_leases = [lid for lid, lease in self.model.leases.items() if lease.deadline_s <= now]
        due_blocks = [k for k, b in self.model.blocks.items() if b.deadline_s <= now]
        assert self.store.expire() == len(due_leases) + len(due_blocks)
        for lease_id in due_leases:
            del self.model.leases[lease_id]
        for key in due_blocks:
            del self.model.blocks[key]

    @rule(name=st.sampled_from((b"a", b"b", b"c", b"zz")),
          below_epoch=st.sampled_from((None, 0, 1, 2)))
    def invalidate(self, name: bytes, below_epoch: int | None) -> None:
        doomed = [k for k in self.model.blocks
                  if k[0].name == name and (below_epoch is None or k[0].epoch < below_epoch)]
        assert self.store.invalidate(name, below_epoch) == len(doomed)
        for key in doomed:
            del self.model.blocks[key]

    @rule(name=st.sampled_from((b"a", b"b", b"c")), below_epoch=st.sampled_from((None, 1)),
          first_slice=st.integers(0, 3), ns_i=st.integers(0, len(NAMESPACES) - 1),
          pick=st.integers(0, 1 << 16),
          tokens=st.lists(st.integers(1, NUM_TOKENS), min_size=1, max_size=MAX_DEPTH),
          put=st.booleans())
    def invalidate_in_slices_around_a_write(self, name: bytes, below_epoch: int | None,
                                            first_slice: int, ns_i: int, pick: int,
                                            tokens: list[int], put: bool) -> None:
        """The server's INVALIDATE: blocks vanish at once, are removed a few at a time, and a
        write (of the same keys, evicting, adopting children) may run before the rest go."""
        doomed = [k for k in self.model.blocks
                  if k[0].name == name and (below_epoch is None or k[0].epoch < below_epoch)]
        assert self.store.begin_invalidate(name, below_epoch) == len(doomed)
        for key in doomed:
            del self.model.blocks[key]
        self.store.drain_invalidated(first_slice)
        self.reserve(ns_i, pick, tokens, put)
        while self.store.drain_invalidated(1):
            pass

    # --- invariants --------------------------------------------------------------------------
    @invariant()
    def index_matches_model(self) -> None:
        index = self.store.index
        live = {(ns, h): e for ns, table in index.tables.items() for h, e in table.items()}
        assert set(live) == set(self.model.blocks)
        assert index.num_entries == len(live)
        for key, entry in live.items():
            block = self.model.blocks[key]
            assert entry.is_live and entry.slot == block.slot and entry.nbytes == block.nbytes
            assert entry.state is (State.COMMITTED if block.is_committed else State.RESERVED)
            assert entry.parent_hash == parent_of(key[1])
        assert len(self.store.policy) == sum(b.is_committed for b in self.model.blocks.values())
        # Lookups read the readable tables: exactly the committed entries of the tables.
        readable = {(ns, h): e for ns, table in index.readable.items() for h, e in table.items()}
        assert readable == {k: e for k, e in live.items() if e.state is State.COMMITTED}
        assert set(index.readable) <= set(index.tables)

    @invariant()
    def pins_match_leases(self) -> None:
        index = self.store.index
        assert set(index.leases) == set(self.model.leases)
        num_pins = Counter(slot for lease in self.model.leases.values()
                           for _, slot, _ in lease.items)
        for lease_id, lease in index.leases.items():
            items = self.model.leases[lease_id].items
            assert [(e.key, e.slot) for e in lease.entries] == [(k, s) for k, s, _ in items]
            for entry in lease.entries:
                assert entry.num_pins == num_pins[entry.slot] >= 1
                # A pinned block stays readable: live, or removed on purpose with its slot kept.
                if entry.is_live:
                    assert self.model.blocks[entry.key].slot == entry.slot
        for table in index.tables.values():
            for entry in table.values():
                assert entry.num_pins == num_pins[entry.slot] >= 0

    @invariant()
    def child_counts_match_resident_children(self) -> None:
        for key, block in self.model.blocks.items():
            entry = self.store.index.get(key)
            assert entry.num_children >= 0
            if block.is_committed:
                expected = len(self.model.resident_children(key))
                assert entry.num_children == expected, (
                    f"{key!r} counts {entry.num_children} children, {expected} are resident")

    @invariant()
    def slots_are_accounted_for(self) -> None:
        slabs = self.store.slabs
        live = [(b.slot, b.nbytes) for b in self.model.blocks.values()]
        held = [(slot, n) for lease in self.model.leases.values() for _, slot, n in lease.items]
        used = dict(live + held)
        assert len({slot for slot, _ in live}) == len(live), "two live blocks share a slot"
        # Used slots are exactly the live entries plus removed-but-still-pinned ones.
        assert slabs.num_slots_used() == len(used)
        for page_idx in range(slabs.num_pages):
            slot_bytes, num_used = slabs.page_slot_bytes(page_idx), slabs.page_num_used(page_idx)
            assert num_used <= (PAGE_BYTES // slot_bytes if slot_bytes else 0), "page over capacity"
        for slot, nbytes in used.items():
            page_idx = slabs.page_of(slot)
            page_start = BASE_OFFSET + page_idx * PAGE_BYTES
            slot_bytes = slabs.slot_bytes_for(nbytes)
            assert 0 <= page_idx < NUM_PAGES
            assert slabs.page_slot_bytes(page_idx) == slot_bytes, "slot in a page of another class"
            assert (slot - page_start) % slot_bytes == 0
            assert slot + nbytes <= page_start + PAGE_BYTES


class LeafLRUStoreMachine(StoreMachine):
    policy_cls = LeafLRU


class LeafLRUWithTTLStoreMachine(StoreMachine):
    policy_cls = LeafLRU
    ttl_s = 7.0


class LRUStoreMachine(StoreMachine):
    policy_cls = LRU


class FrequencyLRUStoreMachine(StoreMachine):
    policy_cls = FrequencyLRU


_SETTINGS = settings(max_examples=150, stateful_step_count=50, deadline=None)

TestStoreWithLeafLRUMatchesModel = LeafLRUStoreMachine.TestCase
TestStoreWithLeafLRUMatchesModel.settings = _SETTINGS
TestStoreWithLeafLRUMatchesModel.__doc__ = (
    "Store with the default leaf-first LRU keeps every invariant against the dict model.")

TestStoreWithTTLMatchesModel = LeafLRUWithTTLStoreMachine.TestCase
TestStoreWithTTLMatchesModel.settings = _SETTINGS
TestStoreWithTTLMatchesModel.__doc__ = (
    "Store with a TTL expires blocks exactly when the model does.")

TestStoreWithPlainLRUMatchesModel = LRUStoreMachine.TestCase
TestStoreWithPlainLRUMatchesModel.settings = _SETTINGS
TestStoreWithPlainLRUMatchesModel.__doc__ = (
    "Store with plain LRU keeps every invariant except leaf-first against the dict model.")

TestStoreWithFrequencyLRUMatchesModel = FrequencyLRUStoreMachine.TestCase
TestStoreWithFrequencyLRUMatchesModel.settings = _SETTINGS
TestStoreWithFrequencyLRUMatchesModel.__doc__ = (
    "Store with the frequency-aware leaf-first LRU keeps every invariant against the dict model.")

"""Making room in a full pool: which blocks a write must not evict, and which blocks to evict.

Pure functions over the index, slabs and eviction order; the Store (kvstore/store.py) applies
what they decide. No sockets, no memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvstore.index import Entry, Index, State
from kvstore.keys import BlockHash, Namespace
from kvstore.slabs import Slabs

BlockRow = tuple[BlockHash, BlockHash | None, int]  # (hash, parent hash, nbytes) of a write
INF = float("inf")
# Blocks one message may evict (issue 10: bounded work per message; another client's PING within
# 50 ms). Freeing a page in the policy's order took up to 9,216 evictions (45 ms in-process, 109
# ms of loop in the soak); 1,024 cost ~5 ms here, and a page to repurpose empties over messages.
MAX_EVICTIONS_PER_MESSAGE = 1024
# Slots looked at per message to choose and empty a page to repurpose (most are a None or an
# attribute check: ~1-2 ms at this bound), so pages of 65,536 slots are emptied in slices too.
MAX_SLOT_VISITS_PER_MESSAGE = 8 * MAX_EVICTIONS_PER_MESSAGE


def guard_chains(index: Index, ns: Namespace, blocks: Sequence[BlockRow]) -> list[Entry]:
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
            entry = index.get((ns, walk))
            if entry is None:
                if walk != block_hash:
                    break  # the chain is broken here: older blocks cannot be hit through it
                walk = parent_hash  # block_hash is new: guard from its parent up
                continue
            entry.num_pins += 1
            pinned.append(entry)
            walk = entry.parent_hash
    return pinned


def num_to_place(index: Index, slabs: Slabs, ns: Namespace, blocks: Sequence[BlockRow],
                 start: int) -> int:
    """Blocks from start on, up to the first of another size class, that need a slot."""
    want = slabs.slot_bytes_for(blocks[start][2])
    absent: set[BlockHash] = set()
    for block_hash, _, nbytes in itertools.islice(blocks, start, None):
        if slabs.slot_bytes_for(nbytes) != want:
            break
        if index.get((ns, block_hash)) is None:
            absent.add(block_hash)
    return len(absent)


def victims_for(slabs: Slabs, candidates: Iterable[Entry], nbytes: int,
                num_slots: int = 1, max_victims: float = INF,
                max_visits: float = INF) -> tuple[list[Entry], bool]:
    """The blocks to evict, in the policy's order (candidates), so that num_slots slots of
    nbytes' size class can be had, or as many as up to max_victims victims give (looking at up
    to max_visits candidates); [] when not even one. The flag: whether candidates were left
    unexamined (a bound reached), so that a page could still be freed, only not in the policy's
    order within the bounds. Blocks of a page being repurposed are passed over: it is emptied
    for another size class."""
    if not slabs.fits(nbytes):
        return [], False
    want = slabs.slot_bytes_for(nbytes)
    per_page = slabs.page_bytes // want
    victims: list[Entry] = []
    num_useful, num_got = 0, 0  # victims up to the last that freed room, and the room
    page_used: dict[int, int] = {}
    is_cut, num_visits = False, 0
    for entry in candidates:
        if len(victims) >= max_victims or num_visits >= max_visits:
            is_cut = True
            break
        num_visits += 1
        assert entry.num_pins == 0 and entry.state is State.COMMITTED, "policy yielded a pinned block"
        page_idx = slabs.page_of(entry.slot)
        if slabs.is_draining(page_idx):
            continue  # being emptied for another class (writes.py _repurpose), not for this one
        victims.append(entry)
        if slabs.page_slot_bytes(page_idx) == want:
            num_got += 1  # its slot serves this size class directly
        else:
            left = page_used.get(page_idx, slabs.page_num_used(page_idx)) - 1
            page_used[page_idx] = left
            if left:
                continue
            num_got += per_page  # a whole page frees up and can take any size class
        num_useful = len(victims)
        if num_got >= num_slots:
            break
    return victims[:num_useful], is_cut  # the rest would free no whole slot


@dataclass(slots=True)
class Repurposing:
    """A page being emptied for another size class, a slice per message (Store._repurpose)."""

    page_idx: int
    cursor: int = 0  # the next slot index to look at; wraps around until the page is free


def can_go_now(entry: object) -> bool:
    """Whether what a slot holds may be evicted now: a committed, unpinned, live block. Reserved
    slots (a writer is copying), fenced or removed-but-pinned ones free themselves later."""
    return (isinstance(entry, Entry) and entry.is_live and entry.state is State.COMMITTED
            and entry.num_pins == 0)


def page_to_repurpose(slabs: Slabs, nbytes: int, max_visits: int) -> int | None:
    """The page to empty for nbytes' size class: of the pages of other classes, the one with the
    fewest blocks whose every block can go now (pinned or reserved ones would keep it from ever
    freeing while they last); looking at up to max_visits slots, and failing that the page with
    the fewest blocks (its pins end: leases and reservations have deadlines). None: no page of
    another class is in use."""
    pages = slabs.pages_to_repurpose(slabs.slot_bytes_for(nbytes))
    num_visits = 0
    for page_idx in pages:
        holders = slabs.holders(page_idx)
        if num_visits + len(holders) > max_visits:
            break
        num_visits += len(holders)
        if all(holder is None or can_go_now(holder) for holder in holders):
            return page_idx
    return pages[0] if pages else None

"""Making room in a full pool: which blocks a write must not evict, and which blocks to evict.

Pure functions over the index, slabs and eviction order; the Store (kvstore/store.py) applies
what they decide. No sockets, no memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from kvstore.index import Entry, Index, State
from kvstore.keys import BlockHash, Namespace
from kvstore.slabs import Slabs

BlockRow = tuple[BlockHash, BlockHash | None, int]  # (hash, parent hash, nbytes) of a write


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
                num_slots: int = 1) -> list[Entry]:
    """The blocks to evict, in the policy's order (candidates), so that num_slots slots of
    nbytes' size class can be had, or as many as the candidates give; [] when not even one."""
    if not slabs.fits(nbytes):
        return []
    want = slabs.slot_bytes_for(nbytes)
    per_page = slabs.page_bytes // want
    victims: list[Entry] = []
    num_useful, num_got = 0, 0  # victims up to the last that freed room, and the room
    page_used: dict[int, int] = {}
    for entry in candidates:
        assert entry.num_pins == 0 and entry.state is State.COMMITTED, "policy yielded a pinned block"
        victims.append(entry)
        page_idx = slabs.page_of(entry.slot)
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
    return victims[:num_useful]  # the rest would free no whole slot

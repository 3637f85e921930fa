"""Size classes over the shared segment: fixed pages, each carved into equal slots of one size.

Pure bookkeeping of offsets; never touches memory. A page serves exactly one slot size while any
of its slots is in use and returns to the free list when the last one is freed, so models with
different block sizes share one segment and waste at most a page tail (less than one slot) per page.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from kvstore.keys import SlotId

SLOT_ALIGN_BYTES = 64  # cache-line alignment keeps memcpy and DMA on their fast paths


def round_up(nbytes: int, align: int) -> int:
    """Round nbytes up to a multiple of align."""
    return -(-nbytes // align) * align


@dataclass(slots=True)
class _Page:
    """One page. Slots are handed out by a bump index first, then from the stack of freed ones,
    and a byte per slot says whether it is in use: alloc and free cost O(1) whatever the number
    of slots (a free used to search a list of up to 524,288 free slots: issue 10)."""

    offset: int
    slot_bytes: int = 0  # 0 while the page is free
    num_slots: int = 0
    num_fresh: int = 0  # slots [0, num_fresh) have been handed out at least once
    freed: array[int] = field(default_factory=lambda: array("q"))  # slot indexes, stack
    in_use: bytearray = field(default_factory=bytearray)  # 1 per slot in use
    num_used: int = 0
    # What each slot handed out holds (the Store's entry; None once freed), by slot index: a
    # page is repurposed by evicting what it holds, found without a scan of the index.
    holders: list[object] = field(default_factory=list)
    is_draining: bool = False  # being emptied for another size class: takes no new slots


class Slabs:
    """Allocates slots of a block's rounded size from pages of page_bytes each."""

    def __init__(self, base_offset: int, num_pages: int, page_bytes: int,
                 min_slot_bytes: int = SLOT_ALIGN_BYTES) -> None:
        if num_pages < 1:
            raise ValueError("the pool must hold at least one page")
        self.page_bytes = page_bytes
        # Every block takes at least this much: bounds the number of blocks, and so the index's
        # memory, by the pool's size (docs/operating.md, Memory the node must have).
        self.min_slot_bytes = round_up(max(min_slot_bytes, 1), SLOT_ALIGN_BYTES)
        self.num_slots_in_use = 0
        self._base = base_offset
        self._pages = [_Page(base_offset + i * page_bytes) for i in range(num_pages)]
        self._free_pages = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._partial: dict[int, set[int]] = {}  # slot_bytes -> pages with a free slot

    @property
    def num_pages(self) -> int:
        return len(self._pages)

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    def slot_bytes_for(self, nbytes: int) -> int:
        """The slot size a block of nbytes occupies."""
        return round_up(max(nbytes, self.min_slot_bytes), SLOT_ALIGN_BYTES)

    def fits(self, nbytes: int) -> bool:
        """Whether a block of nbytes can ever be stored (it must fit in one page)."""
        return 0 < nbytes and self.slot_bytes_for(nbytes) <= self.page_bytes

    def can_alloc(self, nbytes: int) -> bool:
        """Whether alloc(nbytes) would succeed now."""
        slot_bytes = self.slot_bytes_for(nbytes)
        return bool(self._partial.get(slot_bytes)) or (
            bool(self._free_pages) and slot_bytes <= self.page_bytes)

    def alloc(self, nbytes: int) -> SlotId | None:
        """Take a slot for nbytes; None (and no change) when no page has room."""
        slot_bytes = self.slot_bytes_for(nbytes)
        partial = self._partial.get(slot_bytes)
        if partial:
            page_idx = next(iter(partial))
        elif self._free_pages and slot_bytes <= self.page_bytes:
            page_idx = self._free_pages.pop()
            self._open_page(page_idx, slot_bytes)
            partial = self._partial.setdefault(slot_bytes, set())
            partial.add(page_idx)
        else:
            return None
        page = self._pages[page_idx]
        if page.freed:
            idx = page.freed.pop()
        else:
            idx = page.num_fresh
            page.num_fresh += 1
            page.holders.append(None)
        page.in_use[idx] = 1
        page.num_used += 1
        self.num_slots_in_use += 1
        if page.num_used == page.num_slots:
            partial.discard(page_idx)
        return SlotId(page.offset + idx * page.slot_bytes)

    def free(self, slot: SlotId) -> None:
        """Return a slot; its page goes back to the free list when empty."""
        page_idx = self.page_of(slot)
        page = self._pages[page_idx]
        idx, rest = divmod(slot - page.offset, page.slot_bytes or 1)
        assert page.slot_bytes and not rest and page.in_use[idx], f"double free of slot {slot}"
        page.in_use[idx] = 0
        page.holders[idx] = None
        page.num_used -= 1
        self.num_slots_in_use -= 1
        if page.num_used == 0:
            self._partial[page.slot_bytes].discard(page_idx)
            page.slot_bytes, page.num_slots, page.num_fresh = 0, 0, 0
            page.freed, page.in_use, page.holders = array("q"), bytearray(), []
            page.is_draining = False
            self._free_pages.append(page_idx)
        else:
            page.freed.append(idx)
            if not page.is_draining:
                self._partial[page.slot_bytes].add(page_idx)

    def set_holder(self, slot: SlotId, holder: object) -> None:
        """Record what an allocated slot holds (holders() hands it back until the slot is freed)."""
        page = self._pages[self.page_of(slot)]
        page.holders[(slot - page.offset) // page.slot_bytes] = holder

    def holders(self, page_idx: int) -> list[object]:
        """What the slots of a page hold, by slot index (None: free); the list is the page's
        own, replaced when the page is freed: read it, never change it."""
        return self._pages[page_idx].holders

    def drain(self, page_idx: int) -> None:
        """Hand out no more slots of a page in use, so that it empties as its slots are freed
        (and then serves any size class, like any free page)."""
        page = self._pages[page_idx]
        assert page.slot_bytes, "drain of a free page"
        page.is_draining = True
        self._partial[page.slot_bytes].discard(page_idx)

    def is_draining(self, page_idx: int) -> bool:
        return self._pages[page_idx].is_draining

    def pages_to_repurpose(self, slot_bytes: int) -> list[int]:
        """Pages in use by another size class and not draining, fewest slots in use first.
        O(pages): there are few (pool / page; config.py keeps pages large)."""
        pages = [i for i, p in enumerate(self._pages)
                 if p.slot_bytes and p.slot_bytes != slot_bytes and not p.is_draining]
        pages.sort(key=lambda i: self._pages[i].num_used)
        return pages

    def page_of(self, slot: SlotId) -> int:
        """Index of the page holding slot."""
        return (slot - self._base) // self.page_bytes

    def page_slot_bytes(self, page_idx: int) -> int:
        return self._pages[page_idx].slot_bytes

    def page_num_used(self, page_idx: int) -> int:
        return self._pages[page_idx].num_used

    def num_slots_used(self) -> int:
        return self.num_slots_in_use

    def bytes_wasted(self) -> int:
        """Bytes in open pages that no slot of the page's size can use (page tails)."""
        return sum(self.page_bytes % p.slot_bytes for p in self._pages if p.slot_bytes)

    def _open_page(self, page_idx: int, slot_bytes: int) -> None:
        page = self._pages[page_idx]
        page.slot_bytes = slot_bytes
        page.num_slots = self.page_bytes // slot_bytes
        page.in_use = bytearray(page.num_slots)  # bump index first: slots go in address order

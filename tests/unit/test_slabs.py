"""Slabs: size classes over fixed pages, page recycling, waste, and refusals."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from kvstore.slabs import SLOT_ALIGN_BYTES, Slabs

PAGE_BYTES = 4096
BASE = 8192  # slots start after a header, as in the real segment


def test_two_block_sizes_share_the_pool_on_separate_pages() -> None:
    """Blocks of two sizes are both stored, each size class on its own page."""
    slabs = Slabs(BASE, 2, PAGE_BYTES)
    small, large = slabs.alloc(1000), slabs.alloc(3000)
    assert small is not None and large is not None
    small_page, large_page = slabs.page_of(small), slabs.page_of(large)
    assert small_page != large_page
    assert slabs.page_slot_bytes(small_page) == 1024
    assert slabs.page_slot_bytes(large_page) == 3008
    assert slabs.num_free_pages == 0


def test_a_size_class_fills_its_page_before_taking_another() -> None:
    """Slots of one size come from one page, in address order, until it is full."""
    slabs = Slabs(BASE, 3, PAGE_BYTES)
    slots = [slabs.alloc(1000) for _ in range(4)]
    assert slots == [BASE + i * 1024 for i in range(4)]
    assert slabs.num_free_pages == 2
    assert slabs.page_of(slabs.alloc(1000)) == 1


def test_full_pool_refuses_a_size_class_without_room_and_changes_nothing() -> None:
    """With no free page, only a size class that has a free slot can still allocate."""
    slabs = Slabs(BASE, 2, PAGE_BYTES)
    assert slabs.alloc(1000) is not None
    assert slabs.alloc(3000) is not None
    used = slabs.num_slots_used()
    assert slabs.alloc(3000) is None  # 3008-byte slots: one per page, and that one is taken
    assert slabs.alloc(2000) is None  # a third size class: no page for it
    assert slabs.num_slots_used() == used
    assert slabs.alloc(1000) is not None  # the 1024-byte page still has three slots


def test_emptied_page_returns_to_the_free_list_and_serves_another_size() -> None:
    """Freeing a page's last slot frees the page, which another size class then takes."""
    slabs = Slabs(BASE, 1, PAGE_BYTES)
    slots = [slabs.alloc(1000) for _ in range(3)]
    assert slabs.alloc(3000) is None
    for slot in slots[:-1]:
        slabs.free(slot)
        assert slabs.num_free_pages == 0, "page freed while a slot was still in use"
    slabs.free(slots[-1])
    assert slabs.num_free_pages == 1 and slabs.page_slot_bytes(0) == 0
    large = slabs.alloc(3000)
    assert large == BASE and slabs.page_slot_bytes(0) == 3008


def test_freed_slot_is_reused_by_its_size_class() -> None:
    """A slot freed from a full page is handed out again to the next block of that size."""
    slabs = Slabs(BASE, 1, PAGE_BYTES)
    slots = [slabs.alloc(1000) for _ in range(4)]
    assert slabs.alloc(1000) is None
    slabs.free(slots[1])
    assert slabs.can_alloc(1000) and not slabs.can_alloc(3000)
    assert slabs.alloc(1000) == slots[1]


def test_too_large_block_is_refused_and_changes_nothing() -> None:
    """alloc of a block larger than a page returns None and leaves every page free."""
    slabs = Slabs(BASE, 2, PAGE_BYTES)
    assert slabs.alloc(PAGE_BYTES + 1) is None
    assert not slabs.fits(PAGE_BYTES + 1) and not slabs.can_alloc(PAGE_BYTES + 1)
    assert slabs.num_free_pages == 2 and slabs.num_slots_used() == 0
    assert slabs.fits(PAGE_BYTES) and slabs.alloc(PAGE_BYTES) == BASE  # exactly a page fits


def test_pool_without_pages_is_refused() -> None:
    """A pool must hold at least one page."""
    with pytest.raises(ValueError, match="at least one page"):
        Slabs(BASE, 0, PAGE_BYTES)


def test_slot_sizes_are_rounded_up_to_the_alignment() -> None:
    """Slot sizes round up to SLOT_ALIGN_BYTES, and a zero-byte block never fits."""
    slabs = Slabs(0, 1, PAGE_BYTES)
    assert slabs.slot_bytes_for(1) == SLOT_ALIGN_BYTES
    assert slabs.slot_bytes_for(SLOT_ALIGN_BYTES) == SLOT_ALIGN_BYTES
    assert slabs.slot_bytes_for(SLOT_ALIGN_BYTES + 1) == 2 * SLOT_ALIGN_BYTES
    assert not slabs.fits(0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from((1, 700, 1000, 1900, 3000, 4096, 5000)),
                          st.integers(0, 1 << 16)), max_size=60))
def test_slots_never_overlap_and_pages_are_accounted(ops: list[tuple[bool, int, int]]) -> None:
    """Any alloc/free sequence: slots stay aligned, inside one page, disjoint; counts agree."""
    slabs = Slabs(BASE, 3, PAGE_BYTES)
    live: dict[int, int] = {}  # slot -> nbytes
    for is_alloc, nbytes, pick in ops:
        if is_alloc or not live:
            expected = slabs.can_alloc(nbytes)
            slot = slabs.alloc(nbytes)
            assert (slot is not None) == expected, "can_alloc disagrees with alloc"
            if slot is not None:
                assert slot not in live
                live[slot] = nbytes
        else:
            slot = sorted(live)[pick % len(live)]
            del live[slot]
            slabs.free(slot)
        spans = sorted((s, s + slabs.slot_bytes_for(n)) for s, n in live.items())
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start, "two slots overlap"
        for slot, nbytes in live.items():
            page = slabs.page_of(slot)
            page_start = BASE + page * PAGE_BYTES
            assert slabs.page_slot_bytes(page) == slabs.slot_bytes_for(nbytes)
            assert (slot - page_start) % slabs.slot_bytes_for(nbytes) == 0
            assert slot + slabs.slot_bytes_for(nbytes) <= page_start + PAGE_BYTES
        assert slabs.num_slots_used() == len(live)
        num_empty = sum(slabs.page_num_used(p) == 0 for p in range(slabs.num_pages))
        assert slabs.num_free_pages == num_empty


def fill(slabs: Slabs, sizes: list[int]) -> list[int]:
    """Allocate sizes round robin until no size fits anywhere; returns the slot size of each."""
    stored = []
    while True:
        placed = False
        for nbytes in sizes:
            if slabs.alloc(nbytes) is not None:
                stored.append(slabs.slot_bytes_for(nbytes))
                placed = True
        if not placed:
            return stored


def test_waste_per_block_is_under_half_a_slot_for_model_like_sizes() -> None:
    """64 KiB pages (a 1:1024 model of 64 MiB) holding four block sizes waste < half a slot each."""
    page_bytes = 64 * 1024
    slabs = Slabs(0, 16, page_bytes)
    stored = fill(slabs, [2000, 3000, 5000, 7000])
    assert {2048, 3008, 5056, 7040} == set(stored)
    mean_slot_bytes = sum(stored) / len(stored)
    assert slabs.bytes_wasted() / slabs.num_slots_used() < mean_slot_bytes / 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, PAGE_BYTES * 8 // 2), min_size=1, max_size=4, unique=True),
       st.integers(4, 12))
def test_waste_per_block_is_under_half_a_slot_for_any_mix(sizes: list[int], num_pages: int) -> None:
    """Any mix of sizes that fit two per page, filled up: average waste < half an average slot."""
    page_bytes = PAGE_BYTES * 8
    slabs = Slabs(0, num_pages, page_bytes)
    stored = fill(slabs, sizes)
    assert slabs.num_slots_used() == len(stored)
    mean_slot_bytes = sum(stored) / len(stored)
    assert slabs.bytes_wasted() / len(stored) < mean_slot_bytes / 2
    for page in range(slabs.num_pages):  # at most a page tail, less than one slot, per page
        slot_bytes = slabs.page_slot_bytes(page)
        assert slot_bytes and page_bytes % slot_bytes < slot_bytes


def test_bytes_wasted_counts_only_open_pages() -> None:
    """A free page wastes nothing; an open page wastes its tail after the last whole slot."""
    slabs = Slabs(0, 2, PAGE_BYTES)
    assert slabs.bytes_wasted() == 0
    slot = slabs.alloc(3000)
    assert slabs.bytes_wasted() == PAGE_BYTES - 3008
    slabs.free(slot)
    assert slabs.bytes_wasted() == 0


def test_a_draining_page_hands_out_no_slot_and_frees_when_emptied() -> None:
    """drain(): the page's freed slots are not handed out again (its class goes to another page,
    or is refused), and once its last slot is freed it is a free page for any class."""
    slabs = Slabs(BASE, 2, PAGE_BYTES)
    slots = [slabs.alloc(1000) for _ in range(4)]
    for slot in slots:
        slabs.set_holder(slot, f"block at {slot}")
    assert slabs.holders(0) == [f"block at {slot}" for slot in slots]
    slabs.drain(0)
    slabs.free(slots[0])
    assert slabs.holders(0)[0] is None and slabs.is_draining(0)
    assert slabs.page_of(slabs.alloc(1000)) == 1  # not the free slot of the draining page
    assert slabs.pages_to_repurpose(3008) == [1]  # page 0 is draining already
    for slot in slots[1:]:
        slabs.free(slot)
    assert not slabs.is_draining(0) and slabs.page_slot_bytes(0) == 0
    assert slabs.alloc(3000) == BASE

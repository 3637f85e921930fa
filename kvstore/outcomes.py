"""What the Store (kvstore/store.py) is configured with and answers: plain frozen records, so the
server encodes them without reaching into the store. No sockets, no memory."""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.index import Entry
from kvstore.keys import SlotId


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
class Reservation:
    """Outcome of reserve(): a slot per block, None where the block is present or in flight."""

    slots: list[SlotId | None]
    num_full: int  # blocks refused because the pool is full of pinned or reserved blocks


@dataclass(slots=True, frozen=True)
class Found:
    """Answer to a LOOKUP: how many blocks, under which lease, and where they lie (with_slots)."""

    num_hits: int
    lease: int | None
    slots: list[SlotId] | None = None  # byte offsets in the segment, pinned under lease
    sizes: list[int] | None = None


@dataclass(slots=True, frozen=True)
class Pinned:
    """Blocks pinned for a reader of the shared segment: a slot and size each, under lease."""

    lease: int | None
    slots: list[SlotId]
    sizes: list[int]


@dataclass(slots=True, frozen=True)
class Outgoing:
    """Blocks to send as payload frames: a view of each block's bytes in the pool. held is what
    hold() pins while the views are sent without a copy (opaque to the caller)."""

    views: list[memoryview]
    held: list[Entry]
    partial: bool  # more blocks were found than fit the byte budget


@dataclass(slots=True, frozen=True)
class Written:
    """Outcome of put() and commit_many(): blocks made readable, their bytes, and (commits) when
    the oldest of their writes began, by the store's clock."""

    num_stored: int
    num_present: int = 0
    num_full: int = 0
    nbytes: int = 0
    began_s: float | None = None


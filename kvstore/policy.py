"""Eviction order. Pure: decides which committed entries go first, never frees anything itself.

A policy sees every committed entry (insert/remove), hears about hits (touch) and yields victims
in order. The Store only evicts what a policy yields, and checks pins itself as well.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from kvstore.index import Entry


class LRU:
    """Plain least-recently-used: any unpinned block, oldest first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, Entry] = OrderedDict()  # id(entry) -> entry, oldest first

    def __len__(self) -> int:
        return len(self._order)

    def insert(self, entry: Entry) -> None:
        self._order[id(entry)] = entry

    def remove(self, entry: Entry) -> None:
        self._order.pop(id(entry), None)

    def touch(self, entry: Entry) -> None:
        self._order.move_to_end(id(entry))

    def victims(self) -> Iterator[Entry]:
        """Entries this policy would evict, first victim first. Do not mutate while iterating."""
        for entry in self._order.values():
            if self.is_victim(entry):
                yield entry

    def is_victim(self, entry: Entry) -> bool:
        return entry.num_pins == 0


class LeafLRU(LRU):
    """Leaf-first LRU: a block with resident children is never evicted before them.

    A block whose parent is gone can never be part of a hit (lookups match consecutive prefixes),
    so evicting parents first would waste the whole subtree.
    """

    name = "leaf-lru"

    def is_victim(self, entry: Entry) -> bool:
        return entry.num_pins == 0 and entry.num_children == 0


POLICIES: dict[str, type[LRU]] = {cls.name: cls for cls in (LRU, LeafLRU)}
DEFAULT_POLICY = LeafLRU.name

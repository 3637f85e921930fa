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
        """Entries in eviction order, first victim first. Do not mutate while iterating.

        The caller evicts a prefix of this sequence, so each entry yielded counts as evicted
        when the next one is chosen.
        """
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

    def victims(self) -> Iterator[Entry]:
        """Leaves oldest first; a parent follows as soon as its last child has been yielded.

        Without the cascade a page filled by one chain could never be freed for another size
        class: only its leaf would ever be offered (tests/unit/test_policy.py).
        """
        num_gone: dict[int, int] = {}  # id(parent) -> children yielded so far
        passed: set[int] = set()
        for entry in self._order.values():
            passed.add(id(entry))
            while entry.num_pins == 0 and entry.num_children == num_gone.get(id(entry), 0):
                yield entry
                parent = entry.parent
                if parent is None:
                    break
                num_gone[id(parent)] = num_gone.get(id(parent), 0) + 1
                if id(parent) not in passed:
                    break  # more recent than entry: the loop reaches it in LRU order
                entry = parent


POLICIES: dict[str, type[LRU]] = {cls.name: cls for cls in (LRU, LeafLRU)}
DEFAULT_POLICY = LeafLRU.name

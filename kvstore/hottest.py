"""The prefixes reads keep coming back to, per namespace name: for STATS, not hot paths."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from kvstore.index import Entry, Index, State
from kvstore.keys import BlockHash

HOTTEST_SCAN_BLOCKS = 200_000  # blocks one STATS reads for hottest(): ~50 ms, whatever is stored


@dataclass(slots=True, frozen=True)
class HotPrefix:
    """A prefix that reads keep coming back to: its last block, read count and length in blocks."""

    block_hash: BlockHash
    num_hits: int
    num_blocks: int


def hottest(index: Index, name: bytes, k: int) -> list[HotPrefix]:
    """The k most-read prefixes of a namespace name, most reads first.

    A prefix ends at a block no resident child of which was read as often: when a whole
    chain is read together only its deepest block is listed, not every block of it. Reads
    are counted per resident block (Entry.num_hits), so this needs no memory of its own and
    forgets a block when it is evicted. Scans the namespace (up to HOTTEST_SCAN_BLOCKS of it,
    oldest first): STATS must stay cheap with millions stored.
    """
    tables = [index.tables[ns] for ns in index.namespaces_of(name)]
    scanned = itertools.islice(itertools.chain.from_iterable(
        t.values() for t in tables), HOTTEST_SCAN_BLOCKS)
    entries = [e for e in scanned if e.num_hits and e.state is State.COMMITTED]
    covered = {id(e.parent) for e in entries
               if e.parent is not None and e.parent.num_hits == e.num_hits}
    ends = [e for e in entries if id(e) not in covered]
    top = heapq.nlargest(k, ends, key=lambda e: (e.num_hits, _depth(e)))
    return [HotPrefix(e.key[1], e.num_hits, _depth(e)) for e in top]


def _depth(entry: Entry) -> int:
    """Blocks in the resident prefix ending at entry (linked parents are resident)."""
    depth, node = 1, entry.parent
    while node is not None:
        depth, node = depth + 1, node.parent
    return depth

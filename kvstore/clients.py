"""What each client connection holds (leases, pinned blocks, reservations, fenced slots) and its caps,
so one client cannot take the tables from the others and all of it can end with its connection.

Pure bookkeeping, no sockets, no memory: the Store calls in here when it hands out or takes back a
lease or a slot, and server.py says which connection (ROUTER peer identity) asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.index import Entry
from kvstore.keys import SlotId

# A scheduler holds one lease per request whose load is scheduled and not yet read, and a worker
# one per load in progress: hundreds at most. Past this a lookup reports a miss.
MAX_CLIENT_LEASES = 4096
# Block references under one client's leases (a lease names up to protocol.MAX_BLOCKS blocks):
# 32 prompts of 128k tokens at block size 16 being loaded at once. Bounds lease memory per client.
MAX_CLIENT_PINNED_BLOCKS = 262_144
# Blocks one client may have reserved (or fenced) at once: eight full RESERVE requests.
MAX_CLIENT_RESERVED_BLOCKS = 65_536
CLIENT_RESERVED_SHARE = 2  # a client may reserve at most 1/this of the pool's bytes
# The reservation table: slot bytes reserved (or fenced) by all clients together. Past it a client
# may reserve only up to its fair share (the table over the clients holding reservations), as
# with leases: so many connections cannot together reserve the whole pool while a newcomer gets
# "full"; what they hold beyond the table is bounded by their fair shares (1/2 + 1/3 + ... of it).
RESERVED_TABLE_SHARE = 2  # 1/this of the pool's bytes
# The owner of in-process callers (a PUT's own reservations, tests): never capped nor tracked, so
# the Store calls in here for every owner without checking which.
UNTRACKED = b""


@dataclass(slots=True, frozen=True)
class ClientLimits:
    max_leases: int = MAX_CLIENT_LEASES
    max_pinned_blocks: int = MAX_CLIENT_PINNED_BLOCKS
    max_reserved_blocks: int = MAX_CLIENT_RESERVED_BLOCKS
    max_reserved_bytes: int | None = None  # None: no byte cap (the Store sets pool / 2)
    reserved_table_bytes: int | None = None  # None: no global rule (the Store sets pool / 2)


@dataclass(slots=True, eq=False)
class ClientState:
    """One connection's holdings. Leases are kept in the order taken: the first is the oldest."""

    leases: dict[int, int] = field(default_factory=dict)  # lease id -> blocks it pins
    num_pinned: int = 0
    reserved: dict[SlotId, Entry] = field(default_factory=dict)  # live reservations
    # Reservations that expired or were invalidated while the client may still be copying into
    # their slots: the slots stay taken until the client names them again or disconnects.
    fenced: dict[SlotId, Entry] = field(default_factory=dict)
    reserved_bytes: int = 0  # slot bytes of reserved and fenced

    @property
    def is_empty(self) -> bool:
        return not (self.leases or self.reserved or self.fenced)


class Clients:
    """Holdings per client, and who holds the most leases (for a fair full lease table)."""

    def __init__(self, limits: ClientLimits | None = None) -> None:
        self.limits = limits or ClientLimits()
        self._states: dict[bytes, ClientState] = {}
        # Clients by how many leases they hold, to find the biggest holder in O(1) (amortized):
        # counts are bounded by max_leases, so the max pointer only walks that far.
        self._by_num_leases: dict[int, set[bytes]] = {}
        self._max_leases = 0
        self.reserved_bytes = 0  # slot bytes reserved and fenced, all clients
        self._num_reserving = 0  # clients holding reserved or fenced slots

    def __len__(self) -> int:
        return len(self._states)

    def get(self, owner: bytes) -> ClientState | None:
        return self._states.get(owner)

    def pop(self, owner: bytes) -> ClientState | None:
        """Forget a client (its connection is gone); returns what it held, for the caller to free."""
        state = self._states.pop(owner, None)
        if state is not None and state.leases:
            self._move(owner, len(state.leases), 0)
        if state is not None and state.reserved_bytes:
            self.reserved_bytes -= state.reserved_bytes  # the caller frees the slots
            self._num_reserving -= 1
        return state

    # --- leases ----------------------------------------------------------------------------
    def can_lease(self, owner: bytes, num_blocks: int) -> bool:
        """Whether owner may take one more lease of num_blocks blocks."""
        if owner == UNTRACKED:
            return True
        state = self._states.get(owner)
        if state is None:
            return num_blocks <= self.limits.max_pinned_blocks
        return (len(state.leases) < self.limits.max_leases
                and state.num_pinned + num_blocks <= self.limits.max_pinned_blocks)

    def add_lease(self, owner: bytes, lease_id: int, num_blocks: int) -> None:
        if owner == UNTRACKED:
            return
        state = self._state(owner)
        state.leases[lease_id] = num_blocks
        state.num_pinned += num_blocks
        self._move(owner, len(state.leases) - 1, len(state.leases))

    def drop_lease(self, owner: bytes, lease_id: int) -> None:
        state = self._states.get(owner)
        if state is None or lease_id not in state.leases:
            return
        state.num_pinned -= state.leases.pop(lease_id)
        self._move(owner, len(state.leases) + 1, len(state.leases))
        self._forget_if_empty(owner, state)

    def num_leases(self, owner: bytes) -> int:
        state = self._states.get(owner)
        return len(state.leases) if state else 0

    def lease_to_drop_for(self, owner: bytes) -> int | None:
        """When the lease table is full: the oldest lease of the biggest holder, if that holder
        would still hold more than owner after giving it up; else None (owner gets a miss)."""
        while self._max_leases and not self._by_num_leases.get(self._max_leases):
            self._max_leases -= 1
        if self._max_leases <= self.num_leases(owner) + 1:
            return None
        biggest = next(iter(self._by_num_leases[self._max_leases]))
        return next(iter(self._states[biggest].leases))

    # --- reservations ----------------------------------------------------------------------
    def can_reserve(self, owner: bytes, slot_bytes: int) -> bool:
        """Whether owner may reserve one more slot of slot_bytes: within its own caps, and past
        its fair share of the reservation table only while the table has room."""
        if owner == UNTRACKED:
            return True
        state = self._states.get(owner)
        if state is None:
            num, held = 0, 0
        else:
            num, held = len(state.reserved) + len(state.fenced), state.reserved_bytes
        cap = self.limits.max_reserved_bytes
        if num >= self.limits.max_reserved_blocks or (cap is not None and held + slot_bytes > cap):
            return False
        table = self.limits.reserved_table_bytes
        if table is None or self.reserved_bytes + slot_bytes <= table:
            return True
        num_sharing = self._num_reserving + (held == 0)  # owner counts once it asks
        return held + slot_bytes <= table // num_sharing

    def add_reserved(self, entry: Entry, slot_bytes: int) -> None:
        if entry.owner == UNTRACKED:
            return
        state = self._state(entry.owner)
        state.reserved[entry.slot] = entry
        self._add_bytes(state, slot_bytes)

    def drop_reserved(self, entry: Entry, slot_bytes: int) -> None:
        """A reservation committed or given back by its writer."""
        if entry.owner == UNTRACKED:
            return
        state = self._states[entry.owner]
        del state.reserved[entry.slot]
        self._add_bytes(state, -slot_bytes)
        self._forget_if_empty(entry.owner, state)

    def fence(self, entry: Entry) -> None:
        """A reservation taken away from a writer that may still write its slot."""
        state = self._states[entry.owner]
        del state.reserved[entry.slot]
        state.fenced[entry.slot] = entry

    def unfence(self, entry: Entry, slot_bytes: int) -> None:
        """The writer of a fenced slot is done with it (it named it again, or disconnected)."""
        state = self._states[entry.owner]
        del state.fenced[entry.slot]
        self._add_bytes(state, -slot_bytes)
        self._forget_if_empty(entry.owner, state)

    def fenced(self, owner: bytes, slot: SlotId) -> Entry | None:
        state = self._states.get(owner)
        return state.fenced.get(slot) if state else None

    def reserved(self, owner: bytes, slot: SlotId) -> Entry | None:
        state = self._states.get(owner)
        return state.reserved.get(slot) if state else None

    # --- internals -------------------------------------------------------------------------
    def _add_bytes(self, state: ClientState, delta: int) -> None:
        was_holding = state.reserved_bytes > 0
        state.reserved_bytes += delta
        self.reserved_bytes += delta
        self._num_reserving += (state.reserved_bytes > 0) - was_holding

    def _state(self, owner: bytes) -> ClientState:
        assert owner, "in-process callers (owner b'') are not tracked"
        state = self._states.get(owner)
        if state is None:
            state = self._states[owner] = ClientState()
        return state

    def _forget_if_empty(self, owner: bytes, state: ClientState) -> None:
        if state.is_empty:
            del self._states[owner]

    def _move(self, owner: bytes, old: int, new: int) -> None:
        if old:
            bucket = self._by_num_leases[old]
            bucket.discard(owner)
            if not bucket:
                del self._by_num_leases[old]
        if new:
            self._by_num_leases.setdefault(new, set()).add(owner)
            self._max_leases = max(self._max_leases, new)

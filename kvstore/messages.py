"""The typed messages of the wire protocol: one frozen type per op and direction.

kvstore/protocol.py says what each field means on the wire and validates headers into these types
(decode_request, decode_reply); the server's handlers take their op's request type and return a
reply type, and the client builds requests and reads replies through them. Kept apart from the
framing and validation so a reader finds every message in one short file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from kvstore.keys import BlockHash, Namespace

VERSION = 2  # changes whenever a message changes meaning (kvstore/protocol.py, Versioning)


class Op(enum.IntEnum):
    HELLO = 1
    PING = 2
    LOOKUP = 3
    GET = 4
    RESERVE = 5
    COMMIT = 6
    ABORT = 7
    PUT = 8
    RELEASE = 9
    STATS = 10
    INVALIDATE = 11


# --- messages: one frozen type per op and direction, validated in decode ---------------------
# Fields use the wire names of the module docstring; req_id is the header's "id".
_MESSAGE = dict(slots=True, frozen=True, kw_only=True)


@dataclass(**_MESSAGE)
class Hello:
    OP: ClassVar[Op] = Op.HELLO
    req_id: int = 0
    version: int = VERSION


@dataclass(**_MESSAGE)
class Ping:
    OP: ClassVar[Op] = Op.PING
    req_id: int = 0


@dataclass(**_MESSAGE)
class Lookup:
    """shm (with a lease and the segment's token): answer the hits' slots too."""

    OP: ClassVar[Op] = Op.LOOKUP
    req_id: int = 0
    ns: Namespace
    hashes: tuple[BlockHash, ...]
    lease_ms: int = 0
    shm: bool = False
    token: bytes = b""
    # (name, offset, hash size): a same-host client wrote hashes there (kvstore/hashfiles.py);
    # the wire names the file instead of carrying them. The daemon's decode reads them back.
    hashes_file: tuple[str, int, int] | None = None


@dataclass(**_MESSAGE)
class Get:
    OP: ClassVar[Op] = Op.GET
    req_id: int = 0
    ns: Namespace
    hashes: tuple[BlockHash, ...]
    lease: int | None = None
    shm: bool = False
    token: bytes = b""
    bulk: bool = False  # TCP: the payload may come on a side stream (kvstore/bulk.py)


@dataclass(**_MESSAGE)
class Reserve:
    OP: ClassVar[Op] = Op.RESERVE
    req_id: int = 0
    ns: Namespace
    token: bytes
    hashes: tuple[BlockHash, ...]
    parents: tuple[BlockHash | None, ...]
    sizes: tuple[int, ...]


@dataclass(**_MESSAGE)
class Commit:
    OP: ClassVar[Op] = Op.COMMIT
    req_id: int = 0
    ns: Namespace
    hashes: tuple[BlockHash, ...]
    slots: tuple[int, ...]


@dataclass(**_MESSAGE)
class Abort:
    OP: ClassVar[Op] = Op.ABORT
    req_id: int = 0
    ns: Namespace
    hashes: tuple[BlockHash, ...]
    slots: tuple[int, ...]


@dataclass(**_MESSAGE)
class Put:
    """Payload frames follow the header: num_frames(sizes[i]) per block, in order."""

    OP: ClassVar[Op] = Op.PUT
    req_id: int = 0
    ns: Namespace
    hashes: tuple[BlockHash, ...]
    parents: tuple[BlockHash | None, ...]
    sizes: tuple[int, ...]


@dataclass(**_MESSAGE)
class Release:
    OP: ClassVar[Op] = Op.RELEASE
    req_id: int = 0
    lease: int


@dataclass(**_MESSAGE)
class Stats:
    OP: ClassVar[Op] = Op.STATS
    req_id: int = 0


@dataclass(**_MESSAGE)
class Invalidate:
    OP: ClassVar[Op] = Op.INVALIDATE
    req_id: int = 0
    name: bytes
    below_epoch: int | None = None


Request = Union[Hello, Ping, Lookup, Get, Reserve, Commit, Abort, Put, Release, Stats, Invalidate]
NsRequest = Union[Lookup, Get, Reserve, Commit, Abort, Put]  # the ops that name a namespace
REQUEST_TYPES: dict[Op, type[Any]] = {t.OP: t for t in Request.__args__}  # type: ignore[attr-defined]


def request(op: Op, req_id: int, **values: Any) -> Request:
    """The typed request of op with these fields (those of the module docstring)."""
    msg: Request = REQUEST_TYPES[op](req_id=req_id, **values)
    return msg


# Replies. A field marked _OMIT_NONE is left out of the header when None (older replies did not
# carry it); every other field is always sent, None as nil.
_OMIT_NONE = {"omit_none": True}


@dataclass(**_MESSAGE)
class HelloReply:
    version: int
    segment: str
    segment_bytes: int
    token: bytes
    page_bytes: int
    chunk_bytes: int
    pid: int
    max_rows: dict[str, int]
    max_put_bytes: int
    max_reserved_bytes: int | None
    min_slot_bytes: int
    slot_align_bytes: int
    hash_files: bool  # whether a LOOKUP may name a hash file (kvstore/hashfiles.py)


@dataclass(**_MESSAGE)
class Pong:
    """The reply of PING: when the daemon answered it, its time.monotonic() (CLOCK_MONOTONIC is one
    clock for every process of a host), so a client on the host can tell the daemon's share of
    its wait from its own (bench/soak_clients.py)."""

    at_s: float | None = field(default=None, metadata=_OMIT_NONE)


@dataclass(**_MESSAGE)
class Done:
    """The reply of COMMIT and ABORT (num_done)."""

    num_done: int | None = field(default=None, metadata=_OMIT_NONE)


@dataclass(**_MESSAGE)
class LookupReply:
    num_hits: int
    lease: int | None
    slots: list[int] | None = field(default=None, metadata=_OMIT_NONE)  # with shm
    sizes: list[int] | None = field(default=None, metadata=_OMIT_NONE)


@dataclass(**_MESSAGE)
class GetReply:
    """slots with shm; partial over TCP (the daemon's reply budget cut it short: ask again)."""

    num_hits: int
    sizes: list[int]
    lease: int | None
    slots: list[int] | None = field(default=None, metadata=_OMIT_NONE)
    partial: bool | None = field(default=None, metadata=_OMIT_NONE)
    # The payload on a side stream instead of frames (asked with bulk): its port, one-time token.
    bulk_port: int | None = field(default=None, metadata=_OMIT_NONE)
    bulk_token: bytes | None = field(default=None, metadata=_OMIT_NONE)


@dataclass(**_MESSAGE)
class ReserveReply:
    slots: list[int | None]
    num_full: int


@dataclass(**_MESSAGE)
class PutReply:
    num_stored: int
    num_present: int
    num_full: int


@dataclass(**_MESSAGE)
class ReleaseReply:
    released: bool


@dataclass(**_MESSAGE)
class StatsReply:
    stats: dict[str, Any]


@dataclass(**_MESSAGE)
class InvalidateReply:
    num_dropped: int


Reply = Union[HelloReply, Pong, Done, LookupReply, GetReply, ReserveReply, PutReply, ReleaseReply,
              StatsReply, InvalidateReply]
REPLY_TYPES: dict[Op, type[Any]] = {
    Op.HELLO: HelloReply, Op.PING: Pong, Op.LOOKUP: LookupReply, Op.GET: GetReply,
    Op.RESERVE: ReserveReply, Op.COMMIT: Done, Op.ABORT: Done, Op.PUT: PutReply,
    Op.RELEASE: ReleaseReply, Op.STATS: StatsReply, Op.INVALIDATE: InvalidateReply,
}

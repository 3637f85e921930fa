"""The kvstore wire protocol: frames, messages, limits and their validation. No sockets here.

Transport
    ZeroMQ DEALER (client) -> ROUTER (daemon), over tcp:// or ipc://. Every message is multipart:

        frame 0      msgpack map, the header: {"v": VERSION, "op": Op, "id": request id, ...}
        frames 1..n  raw payload bytes (only PUT requests and TCP GET replies carry any)

    KV bytes never travel inside msgpack, and nothing is ever pickled. The ROUTER prepends the
    peer identity; replies go back with the same identity and echo the request id, so a client may
    pipeline many requests and match replies by id.

Payload chunking
    A block's bytes are split into frames of at most CHUNK_BYTES (the last one shorter), because
    ZeroMQ's throughput falls several-fold for single frames of tens of MiB. Block i of sizes[i]
    bytes therefore takes ceil(sizes[i] / CHUNK_BYTES) consecutive frames. num_frames() computes it.

Lifecycle
    HELLO first: the client sends its version; a daemon of another version answers the error
    "version". The reply names the shared-memory segment and a random token written into the
    segment's header page: a client that can open the segment and read the same token is on the
    same host and may use slot references instead of payload frames (the shared-memory path).
    Every shared-memory request carries that token; after a daemon restart the token changes, the
    daemon answers "stale_segment" and the client says HELLO again and re-attaches.

Messages (request fields -> reply fields; every reply has "ok": true and echoes "id")
    HELLO      {version}                          -> {version, segment, segment_bytes, token,
                                                      page_bytes, chunk_bytes, max_rows,
                                                      max_put_bytes, max_reserved_bytes,
                                                      min_slot_bytes, slot_align_bytes,
                                                      hash_files}
               max_rows: rows per message of each block-listing op ({"put": 512, ...});
               max_put_bytes: payload of a PUT of more than one block; max_reserved_bytes: slot
               bytes one connection may hold reserved (a slot is a block rounded up to
               min_slot_bytes, then to a multiple of slot_align_bytes). Larger requests are
               answered "too_large". hash_files: whether a LOOKUP may name a hash file.
    PING       {}                                 -> {at_s}  (the daemon's time.monotonic())
    LOOKUP     {ns, hashes, lease_ms, shm, token} -> {num_hits, lease, slots, sizes}
               hashes of one length may travel packed: one bin of the hashes end to end, with
               hash_bytes their length (a prompt's 256 hashes decode ~5x faster than as a
               list); slots and sizes always travel packed, each a bin of little-endian uint64s.
               A client on the daemon's host may instead write them into a file of its own (a
               record per hash: a length byte, the hash, a zero) and send hashes_file = [name,
               offset, count, hash_bytes] (kvstore/hashfiles.py; error "hashes_gone": send them
               inline, or by a new file).
               How many of hashes (chained, root first) are stored as a consecutive prefix. With
               lease_ms > 0 the hits are pinned for that long (lease = id, or nil when num_hits is
               0), so eviction cannot take them before they are read. lease_ms = 0 changes nothing.
               shm=true (with a lease, and the token: same host) also answers where the hits lie,
               as GET shm=true does (slots, sizes), so a same-host load is LOOKUP -> copy ->
               RELEASE: two round trips. The lease stays its taker's; a RELEASE answering
               released=false means it ended before (expiry, its taker's connection closed) and
               the copy may have read reused slots: read again with GET.
    GET        {ns, hashes, lease, shm, token}    -> {num_hits, sizes, lease, slots}
               (hashes as LOOKUP's: a list, or packed with hash_bytes)
               Reads the stored prefix of hashes. With a lease id from LOOKUP, reads the leased
               blocks (hashes may start anywhere in the leased prefix, so a large prefix can be
               read in several GETs); the lease stays held until RELEASE or expiry.
               shm=false: the bytes follow as payload frames (copies: no slot stays pinned by a
               reply). The daemon bounds the bytes queued to one client: a reply it cut short
               carries partial=true (ask again for the rest), and with nothing left it answers
               "busy". bulk=true (TCP, no CURVE): a large payload may instead come on a side
               stream: the reply carries bulk_port and bulk_token (kvstore/bulk.py; connect to
               the daemon's host at that port, send the token, read the sizes).
               shm=true: slots lists the byte offset of each block in the segment, pinned
               under lease (the client's, or a new one when none was given) until RELEASE or
               expiry; a lease presented here is held by this client from then on.
    RESERVE    {ns, blocks: [[hash, parent, nbytes]...], token}
                                                  -> {slots, num_full}
               Two-phase write, step 1 (shared memory only): a slot offset per block, nil where
               the block is already stored or being written, or the pool (or this client's share
               of it) is full (num_full counts those). A reserved slot is invisible to readers.
    COMMIT     {ns, blocks: [[hash, slot]...]}    -> {num_done}   step 2: make written slots readable
    ABORT      {ns, blocks: [[hash, slot]...]}    -> {num_done}   give reserved slots back
               Both count only from the connection that reserved. A reservation not committed
               within the daemon's deadline is taken back, but its slot stays fenced (not handed
               out again) until this connection names it in a COMMIT or ABORT (num_done counts it
               not) or closes. So a client must COMMIT or ABORT every slot it reserved, after its
               last write into it, and write nothing into a slot after naming it.
    PUT        {ns, blocks: [[hash, parent]...], sizes} + payload frames
                                                  -> {num_stored, num_present, num_full}
               The TCP write: reserve, copy and commit in one message, for clients on other hosts.
    RELEASE    {lease}                            -> {released}
    STATS      {}                                 -> {stats: map}
               Occupancy, counters and, per namespace name (hex), blocks, bytes, lookups, hits,
               misses, evictions and the hottest prefixes (kvstore/server.py Server.stats).
    INVALIDATE {name, below_epoch}                -> {num_dropped}
               Drop every block of a namespace name (all epochs), or only epochs < below_epoch.

    ns is [name (bin, <= 64 bytes), epoch (int >= 0)]; hashes are bin (1..64 bytes); parent is a
    hash or nil.

Errors
    {"ok": false, "id": id or nil, "error": code, "msg": text}. Codes: "version", "bad_request"
    (the request broke this spec; the daemon logs it and keeps serving), "stale_segment",
    "too_large" (a block larger than one page, more rows or PUT bytes than HELLO's max_rows and
    max_put_bytes, nothing done; or a message of more than 1 + MAX_PAYLOAD_FRAMES frames: its
    frames are dropped as they are read), "busy" (this client's replies are not being
    read), "hashes_gone" (a LOOKUP's hashes_file is not one the daemon can read: send them
    inline). Nothing a client sends can crash the daemon, leak a slot, or grow its memory past the
    bounds in this module and kvstore/clients.py. A connection's leases and reservations end when
    it closes.

In code
    Each op has one frozen request type and one reply type below (Lookup -> LookupReply, ...):
    decode_request() validates a header into its op's request type, decode_reply() a reply into
    its reply type; the client builds and reads only these, never header maps.

Versioning
    VERSION changes whenever a message changes meaning. There is no negotiation: both ends must
    run the same version, and HELLO says so clearly when they don't.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable
from dataclasses import fields
from functools import lru_cache
from typing import Any

import msgpack

from kvstore.errors import ProtocolError
from kvstore.keys import MAX_HASH_BYTES, MAX_NAME_BYTES, BlockHash, Namespace
# The message types live in kvstore/messages.py; they are re-exported here so callers import the
# whole protocol from one module.
from kvstore.messages import (REPLY_TYPES, VERSION, Abort, Commit, Done, Get, GetReply, Hello,
                              HelloReply, Invalidate, InvalidateReply, Lookup, LookupReply,
                              NsRequest, Op, Ping, Pong, Put, PutReply, Release, ReleaseReply,
                              Reply, Request, Reserve, ReserveReply, Stats, StatsReply, request)

# The wire protocol as other modules import it (the message types re-exported).
__all__ = ["CHUNK_BYTES", "MAX_BLOCKS", "MAX_GET_ROWS", "MAX_HEADER_BYTES", "MAX_LEASE_MS",
           "MAX_PAYLOAD_FRAMES", "MAX_PUT_BYTES", "MAX_WRITE_ROWS", "VERSION", "Abort", "Commit",
           "Done", "Get", "GetReply", "Hello", "HelloReply", "Invalidate", "InvalidateReply",
           "Lookup", "LookupReply", "NsRequest", "Op", "Ping", "Pong", "Put", "PutReply",
           "Release", "ReleaseReply", "Reply", "Request", "Reserve", "ReserveReply", "Stats",
           "StatsReply", "HashesGone", "TooLarge", "chunk", "decode_header", "decode_reply",
           "decode_request", "encode", "encode_error", "encode_reply", "encode_request",
           "max_rows", "num_frames", "pack", "repeated", "request", "size_refusal"]

# A daemon's reader of a LOOKUP's hashes_file: (name, offset, count, hash_bytes) -> the hashes.
ReadHashes = Callable[[str, int, int, int], tuple[BlockHash, ...]]

CHUNK_BYTES = 4 * 1024 * 1024  # ZeroMQ moves 2-4 MiB frames ~4x faster than 32 MiB ones
MAX_HEADER_BYTES = 2 << 20  # MAX_BLOCKS rows of two 64-byte hashes and a size (~1.2 MB) fit
MAX_BLOCKS = 8192  # per request; a 128k-token prompt at block size 16
# Payload frames per message: MAX_BLOCKS blocks of up to 2 chunks (8 MiB), or fewer larger ones.
# The daemon drops frames past this as they are read and answers "too_large" (kvstore/inbox.py).
MAX_PAYLOAD_FRAMES = 2 * MAX_BLOCKS
# Rows of one message the daemon serves, per op (issue 10: one message must cost other clients
# well under the 50 ms PING budget). Per row (bench/results/row_costs.json, 4 KiB blocks, 2 busy
# cores): PUT ~40 us, RESERVE/COMMIT/ABORT 6-17 us, GET by shared memory ~3 us, LOOKUP ~1 us. So
# a full-size write costs ~20 ms and a GET ~3 ms; a LOOKUP of a whole 128k-token prompt (8,192
# rows, ~7 ms) stays one message. Larger ones are refused "too_large" untouched; HELLO announces
# these and kvstore/client.py splits larger calls.
MAX_WRITE_ROWS = 512  # PUT, RESERVE, COMMIT, ABORT
MAX_GET_ROWS = 1024
# Payload bytes of one PUT of more than one block: its copy into the pool is loop time too
# (~10-20 ms for 64 MiB here). A single larger block (up to a page) still goes in one message.
MAX_PUT_BYTES = 64 * 1024 * 1024
MAX_LEASE_MS = 600_000




def max_rows() -> dict[str, int]:
    """Rows per message of each block-listing op (the HELLO reply's max_rows)."""
    return {op.name.lower(): _MAX_ROWS.get(op, MAX_BLOCKS) for op in _LISTING_OPS}


def size_refusal(req: Request) -> str | None:
    """Why req is larger than the daemon serves in one message (error "too_large"); else None."""
    cap = _MAX_ROWS.get(req.OP)
    hashes: tuple[BlockHash, ...] = getattr(req, "hashes", ())
    if cap is not None and len(hashes) > cap:
        return (f"{req.OP.name} of {len(hashes)} rows exceeds {cap} per message (HELLO "
                f"max_rows): send it in several")
    if isinstance(req, Put) and len(req.sizes) > 1 and sum(req.sizes) > MAX_PUT_BYTES:
        return (f"PUT of {sum(req.sizes)} bytes in {len(req.sizes)} blocks exceeds "
                f"{MAX_PUT_BYTES} per message (HELLO max_put_bytes): send it in several")
    return None


def num_frames(nbytes: int) -> int:
    """How many payload frames carry a block of nbytes."""
    return max(1, -(-nbytes // CHUNK_BYTES))


def chunk(view: memoryview) -> list[memoryview]:
    """Split one block's bytes into payload frames (views, no copy)."""
    if len(view) <= CHUNK_BYTES:
        return [view]
    return [view[i:i + CHUNK_BYTES] for i in range(0, len(view), CHUNK_BYTES)]


def pack(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def encode_request(op: Op, req_id: int, **fields: Any) -> bytes:
    """The header frame of a request from raw wire fields (tests and attacks send any); clients
    send typed requests with encode()."""
    header = {"v": VERSION, "op": int(op), "id": req_id}
    if "ns" in fields and isinstance(fields["ns"], Namespace):
        fields["ns"] = [fields["ns"].name, fields["ns"].epoch]
    header.update(fields)
    return pack(header)


def encode(req: Request, req_id: int) -> bytes:
    """The header frame of a typed request, under req_id (whatever req.req_id says)."""
    if type(req) is Lookup and not req.shm:
        # A scheduler's every lookup: spelled out, without the generic path's merge of fields.
        return pack({"v": VERSION, "op": _LOOKUP, "id": req_id,
                     "ns": [req.ns.name, req.ns.epoch], "lease_ms": req.lease_ms,
                     **_lookup_hashes_wire(req)})
    return pack({"v": VERSION, "op": int(req.OP), "id": req_id, **_wire_fields(req)})


def _wire_fields(req: Request) -> dict[str, Any]:
    """A request's fields as the wire spells them: blocks as rows, ns as [name, epoch]."""
    if isinstance(req, Reserve):
        rows: list[list[Any]] = [list(r) for r in zip(req.hashes, req.parents, req.sizes)]
        return {"ns": _ns_wire(req.ns), "blocks": rows, "token": req.token}
    if isinstance(req, (Commit, Abort)):
        return {"ns": _ns_wire(req.ns), "blocks": [list(r) for r in zip(req.hashes, req.slots)]}
    if isinstance(req, Put):
        return {"ns": _ns_wire(req.ns), "blocks": [list(r) for r in zip(req.hashes, req.parents)],
                "sizes": list(req.sizes)}
    out = {name: getattr(req, name) for name in _field_names(type(req)) if name != "req_id"}
    if "ns" in out:
        out["ns"] = _ns_wire(out["ns"])
    if isinstance(req, Lookup):
        del out["hashes"], out["hashes_file"]
        out.update(_lookup_hashes_wire(req))
    elif "hashes" in out:
        out.update(_hashes_wire(out["hashes"]))
    if isinstance(req, (Lookup, Get)) and not req.shm:
        del out["shm"], out["token"]  # only a shared-memory request proves the segment
    if isinstance(req, Get) and not req.bulk:
        del out["bulk"]
    return out


def _ns_wire(ns: Namespace) -> list[Any]:
    return [ns.name, ns.epoch]


def _hashes_wire(hashes: tuple[BlockHash, ...]) -> dict[str, Any]:
    """hashes packed into one bin when they share a length (always, for a chain of one hash
    function), else as a list: one bin packs and unpacks in C, 256 of them item by item."""
    if hashes:
        try:
            blob = b"".join(hashes)
        except TypeError:
            return {"hashes": list(hashes)}  # not bytes-like: refused by the daemon as before
        size = len(hashes[0])
        if len(blob) == size * len(hashes) and _all_of_length(hashes, size):
            return {"hashes": blob, "hash_bytes": size}
    return {"hashes": list(hashes)}


def _lookup_hashes_wire(req: Lookup) -> dict[str, Any]:
    if req.hashes_file is None:
        return _hashes_wire(req.hashes)
    name, offset, size = req.hashes_file
    return {"hashes_file": [name, offset, len(req.hashes), size]}


def _all_of_length(hashes: tuple[BlockHash, ...], size: int) -> bool:
    """Whether every hash is size bytes long, given that together they are len(hashes) * size.

    NOTE: one struct pack, not max(map(len, hashes)): a Pascal-string field of size + 1 bytes
    starts with min(len, size), so none is shorter iff every such byte is size, and none shorter
    with that total means none longer. ~1.5 vs ~6 us for a prompt's 256 hashes (len() per item
    is a Python call); the request's encode was a third of a 256-hash LOOKUP's client time."""
    if size <= MAX_HASH_BYTES:  # a length byte holds it (larger: refused by the daemon anyway)
        try:
            packed = repeated("{}p", len(hashes), size + 1).pack(*hashes)
        except struct.error:  # not bytes (a memoryview, say): the plain way below
            pass
        else:
            return packed[::size + 1] == bytes((size,)) * len(hashes)
    return max(map(len, hashes)) == size


def _u64s(values: list[int]) -> bytes:
    """A list of slot offsets or sizes as one bin of little-endian uint64s."""
    packed = array("Q", values)
    if _IS_BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


def _from_u64s(value: Any, what: str) -> list[int]:
    if not isinstance(value, bytes) or len(value) % 8:
        raise ProtocolError(f"{what} must be a bin of little-endian uint64s")
    unpacked = array("Q")
    unpacked.frombytes(value)
    if _IS_BIG_ENDIAN:
        unpacked.byteswap()
    return unpacked.tolist()


_IS_BIG_ENDIAN = sys.byteorder == "big"
assert array("Q").itemsize == 8, "the packed slot lists need 8-byte unsigned integers"


def encode_reply(req_id: int | None, reply: Reply | None = None, **values: Any) -> bytes:
    """A reply header: typed (reply), or raw fields (values)."""
    if reply is not None:
        values = {}
        for name, omit_none in _reply_fields(type(reply)):
            value = getattr(reply, name)
            if value is not None or not omit_none:
                values[name] = value
        if isinstance(reply, LookupReply) and reply.slots is not None:
            values["slots"], values["sizes"] = _u64s(reply.slots), _u64s(reply.sizes or [])
    return pack({"v": VERSION, "id": req_id, "ok": True, **values})


def decode_reply(op: Op, header: dict[str, Any]) -> Any:
    """A successful reply header of op as its typed reply; raises ProtocolError when a field is
    missing or of the wrong type (a daemon of another build)."""
    if op is Op.LOOKUP and "slots" not in header:  # the hot path, checked as below
        num_hits, lease = header.get("num_hits"), header.get("lease", False)
        if type(num_hits) is int and num_hits >= 0 and (lease is None or type(lease) is int):
            return LookupReply(num_hits=num_hits, lease=lease)
    kind = REPLY_TYPES[op]
    if op is Op.LOOKUP and "slots" in header:
        header = _unpacked_slots(header)
    values = {}
    for name, omit_none in _reply_fields(kind):
        if name in header:
            value = values[name] = header[name]
            check = _REPLY_CHECKS.get(name)
            if check is not None and value is not None and not check(value):
                raise ProtocolError(f"{op.name} reply field {name!r}: {value!r}")
        elif not omit_none:
            raise ProtocolError(f"{op.name} reply lacks {name!r}")
    return kind(**values)


def _unpacked_slots(header: dict[str, Any]) -> dict[str, Any]:
    """A LOOKUP reply's packed slots and sizes as lists: one of each per hit."""
    slots = _from_u64s(header["slots"], "LOOKUP reply field 'slots'")
    sizes = _from_u64s(header.get("sizes"), "LOOKUP reply field 'sizes'")
    if len(slots) != len(sizes) or len(slots) != header.get("num_hits"):
        raise ProtocolError(f"LOOKUP reply of {header.get('num_hits')!r} hits has {len(slots)} "
                            f"slots and {len(sizes)} sizes")
    return {**header, "slots": slots, "sizes": sizes}


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


# What clients act on is checked (counts, leases, slot lists); the rest is informational.
_REPLY_CHECKS: dict[str, Any] = {
    **dict.fromkeys(("num_hits", "num_full", "num_done", "num_stored", "num_present",
                     "num_dropped"), _is_count),
    "lease": lambda v: type(v) is int, "slots": lambda v: type(v) is list,
    "sizes": lambda v: type(v) is list,
    "bulk_port": lambda v: type(v) is int and 0 < v < 65536,
    "bulk_token": lambda v: type(v) is bytes and 16 <= len(v) <= 64,
}
_FIELDS_OF: dict[type[Any], Any] = {}


def _field_names(kind: type[Any]) -> tuple[str, ...]:
    names = _FIELDS_OF.get(kind)
    if names is None:
        names = _FIELDS_OF[kind] = tuple(f.name for f in fields(kind))
    return names  # type: ignore[no-any-return]


def _reply_fields(kind: type[Any]) -> tuple[tuple[str, bool], ...]:
    """(name, omitted when None) of each field of a reply type, looked up once per type."""
    found = _FIELDS_OF.get(kind)
    if found is None:
        found = _FIELDS_OF[kind] = tuple((f.name, bool(f.metadata.get("omit_none")))
                                         for f in fields(kind))
    return found  # type: ignore[no-any-return]


def encode_error(req_id: int | None, code: str, msg: str) -> bytes:
    return pack({"v": VERSION, "id": req_id, "ok": False, "error": code, "msg": msg})


def decode_header(frame: bytes | memoryview) -> dict[str, Any]:
    """Unpack a header frame into a map; raises ProtocolError on anything else."""
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True,
                                 max_bin_len=MAX_HEADER_BYTES, max_array_len=MAX_BLOCKS * 3)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not msgpack: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a msgpack map")
    return header


class TooLarge(ProtocolError):
    """A request with more rows than the daemon serves in one message (error "too_large")."""

    def __init__(self, req_id: int, message: str) -> None:
        super().__init__(message)
        self.req_id = req_id  # for the refusal's reply


class HashesGone(ProtocolError):
    """A LOOKUP names a hash file the daemon cannot read (error "hashes_gone": the client sends
    it again by a new file; kvstore/hashfiles.py)."""

    req_id: int | None = None  # for the refusal's reply, set once the header's id is read


def decode_request(frames: list[bytes | memoryview], check_rows: bool = False,
                   read_hashes: ReadHashes | None = None) -> Request:
    """Validate a request's frames (header first) into a Request; raises ProtocolError. With
    check_rows, a request over its op's row cap raises TooLarge before its rows are validated:
    one by one in Python that is most of a refused message's cost (~15 ms for 8,192 RESERVE
    rows, against ~2 ms to unpack them), and a refused message must cost the loop little.
    read_hashes reads a LOOKUP's hashes_file (the daemon's, on the client's host); without it
    a LOOKUP that names one is refused."""
    if not frames:
        raise ProtocolError("empty message")
    h = decode_header(frames[0])
    req_id = _int(h, "id", lo=0, hi=2**63)
    try:
        op = _OPS[_int(h, "op", lo=1, hi=len(Op))]
    except KeyError:
        raise ProtocolError(f"unknown op {h.get('op')!r}") from None
    if op is not Op.HELLO and h.get("v") != VERSION:
        # HELLO carries the version check with a clear "version" error; others must match.
        raise ProtocolError(f"header version {h.get('v')!r}, this daemon speaks {VERSION}")
    if check_rows:
        _check_rows(op, h, req_id)
    file_hashes = None
    if op is Op.LOOKUP and "hashes_file" in h:
        file_hashes = _hashes_from_file(h, read_hashes, req_id)
    decoder = _DECODERS[op]
    values = decoder(h)
    if file_hashes is not None:
        values["hashes"] = file_hashes
    num_payload = len(frames) - 1
    expected = sum(num_frames(n) for n in values.get("sizes", ())) if op is Op.PUT else 0
    if num_payload != expected:
        raise ProtocolError(f"{op.name} carries {num_payload} payload frames, expected {expected}")
    return request(op, req_id, **values)


def _hashes_from_file(h: dict[str, Any], read_hashes: ReadHashes | None,
                      req_id: int) -> tuple[BlockHash, ...]:
    """A LOOKUP's hashes named by hashes_file [name, offset, count, hash_bytes] (which leaves h,
    its hashes an empty list for the decoder to pass)."""
    if read_hashes is None:
        raise ProtocolError("'hashes_file' is not served here (another host, or CURVE): send "
                            "the hashes inline")
    if "hashes" in h:
        raise ProtocolError("a LOOKUP carries 'hashes' or 'hashes_file', not both")
    ref = h.pop("hashes_file")
    if not isinstance(ref, list) or len(ref) != 4 or not isinstance(ref[0], str):
        raise ProtocolError("'hashes_file' must be [name, offset, count, hash_bytes]")
    name, offset, count, size = ref
    if not (type(offset) is int and 0 <= offset <= 2**31 and type(count) is int
            and 0 < count <= MAX_BLOCKS and type(size) is int and 0 < size <= MAX_HASH_BYTES):
        raise ProtocolError(f"'hashes_file' needs an offset in [0, 2**31], a count in [1, "
                            f"{MAX_BLOCKS}] and hash_bytes in [1, {MAX_HASH_BYTES}]: {ref!r}")
    h["hashes"] = []
    try:
        return read_hashes(name, offset, count, size)
    except HashesGone as exc:
        exc.req_id = req_id
        raise


def _check_rows(op: Op, h: dict[str, Any], req_id: int) -> None:
    cap = _MAX_ROWS.get(op)
    rows = h.get("hashes" if op is Op.GET else "blocks")
    num_rows = len(rows) if isinstance(rows, list) else -1
    size = h.get("hash_bytes")
    if isinstance(rows, bytes) and type(size) is int and size > 0:
        num_rows = len(rows) // size  # packed hashes (a GET's)
    if cap is not None and num_rows > cap:
        raise TooLarge(req_id, f"{op.name} of {num_rows} rows exceeds {cap} per message (HELLO "
                               f"max_rows): send it in several")


# --- field validators -------------------------------------------------------------------------
def _int(h: dict[str, Any], key: str, lo: int = 0, hi: int = 2**63,
         optional: bool = False) -> Any:
    value = h.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(f"{key!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _bool(h: dict[str, Any], key: str) -> bool:
    value = h.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{key!r} must be a boolean")
    return value


def _bin(value: Any, what: str, max_len: int, min_len: int = 1) -> bytes:
    if not isinstance(value, bytes) or not min_len <= len(value) <= max_len:
        raise ProtocolError(f"{what} must be {min_len}..{max_len} bytes of binary")
    return value


def _ns(h: dict[str, Any]) -> Namespace:
    value = h.get("ns")
    if not isinstance(value, list) or len(value) != 2:
        raise ProtocolError("'ns' must be [name, epoch]")
    name = _bin(value[0], "namespace name", MAX_NAME_BYTES)
    epoch = _int({"epoch": value[1]}, "epoch", lo=0)
    return Namespace(name, epoch)


def _list(h: dict[str, Any], key: str) -> list[Any]:
    value = h.get(key)
    if not isinstance(value, list) or len(value) > MAX_BLOCKS:
        raise ProtocolError(f"{key!r} must be a list of at most {MAX_BLOCKS} items")
    return value


def _hashes(h: dict[str, Any]) -> tuple[BlockHash, ...]:
    if "hash_bytes" in h or isinstance(h.get("hashes"), bytes):
        return _packed_hashes(h)
    values = _list(h, "hashes")
    # Checked in bulk (C loops), not per hash: a lookup carries a whole prompt's hashes (a third
    # of a 256-hash LOOKUP's decode went to three passes here). join() takes only bytes-like
    # items, and of what msgpack decodes only bin is bytes-like (it never yields bytearray).
    if values:
        bad = f"each block hash must be 1..{MAX_HASH_BYTES} bytes of binary"
        try:
            b"".join(values)
        except TypeError:
            raise ProtocolError(bad) from None
        lengths = set(map(len, values))
        if min(lengths) < 1 or max(lengths) > MAX_HASH_BYTES:
            raise ProtocolError(bad)
    return tuple(values)


def _packed_hashes(h: dict[str, Any]) -> tuple[BlockHash, ...]:
    """hashes as one bin of hashes of hash_bytes each, split by one C call."""
    blob = h.get("hashes")
    size = _int(h, "hash_bytes", lo=1, hi=MAX_HASH_BYTES)
    if not isinstance(blob, bytes) or len(blob) % size:
        raise ProtocolError(f"packed 'hashes' must be a bin of whole hashes of {size} bytes")
    count = len(blob) // size
    if count > MAX_BLOCKS:
        raise ProtocolError(f"'hashes' must hold at most {MAX_BLOCKS} hashes, got {count}")
    return repeated("{}s", count, size).unpack(blob) if count else ()


@lru_cache(maxsize=256)  # bounded: a hostile client's many shapes only churn it
def repeated(field: str, count: int, size: int) -> struct.Struct:
    """A struct of count fields, each field (a template such as "{}s") filled with size: a
    message's hashes packed or split in one C call. The template is a constant, so a call
    hashes no new string."""
    return struct.Struct(field.format(size) * count)


def _pairs(h: dict[str, Any], width: int) -> list[list[Any]]:
    rows = _list(h, "blocks")
    for row in rows:
        if not isinstance(row, list) or len(row) != width:
            raise ProtocolError(f"each of 'blocks' must be a list of {width} items")
    return rows


def _parent(value: Any) -> BlockHash | None:
    return None if value is None else BlockHash(_bin(value, "a parent hash", MAX_HASH_BYTES))


def _token(h: dict[str, Any]) -> bytes:
    return _bin(h.get("token"), "'token'", 64)


def _size(value: Any) -> int:
    return _int({"nbytes": value}, "nbytes", lo=1, hi=2**40)


def _slot(value: Any) -> int:
    return _int({"slot": value}, "slot", lo=0, hi=2**48)


def _hello(h: dict[str, Any]) -> dict[str, Any]:
    return {"version": _int(h, "version", lo=0, hi=2**31)}


def _empty(h: dict[str, Any]) -> dict[str, Any]:
    return {}


def _lookup(h: dict[str, Any]) -> dict[str, Any]:
    shm = _bool(h, "shm")
    lease_ms = _int(h, "lease_ms", lo=0, hi=MAX_LEASE_MS)
    if shm and not lease_ms:
        raise ProtocolError("slot references (shm) need a lease (lease_ms > 0)")
    return {"ns": _ns(h), "hashes": _hashes(h), "lease_ms": lease_ms, "shm": shm,
            "token": _token(h) if shm else b""}


def _get(h: dict[str, Any]) -> dict[str, Any]:
    shm = _bool(h, "shm")
    return {"ns": _ns(h), "hashes": _hashes(h), "lease": _int(h, "lease", optional=True),
            "shm": shm, "token": _token(h) if shm else b"", "bulk": _bool(h, "bulk")}


def _reserve(h: dict[str, Any]) -> dict[str, Any]:
    rows = _pairs(h, 3)
    return {"ns": _ns(h), "token": _token(h),
            "hashes": tuple(BlockHash(_bin(r[0], "a block hash", MAX_HASH_BYTES)) for r in rows),
            "parents": tuple(_parent(r[1]) for r in rows),
            "sizes": tuple(_size(r[2]) for r in rows)}


def _finish(h: dict[str, Any]) -> dict[str, Any]:
    rows = _pairs(h, 2)
    return {"ns": _ns(h),
            "hashes": tuple(BlockHash(_bin(r[0], "a block hash", MAX_HASH_BYTES)) for r in rows),
            "slots": tuple(_slot(r[1]) for r in rows)}


def _put(h: dict[str, Any]) -> dict[str, Any]:
    rows = _pairs(h, 2)
    sizes = tuple(_size(x) for x in _list(h, "sizes"))
    if len(sizes) != len(rows):
        raise ProtocolError("'sizes' must have one entry per block")
    return {"ns": _ns(h), "sizes": sizes,
            "hashes": tuple(BlockHash(_bin(r[0], "a block hash", MAX_HASH_BYTES)) for r in rows),
            "parents": tuple(_parent(r[1]) for r in rows)}


def _release(h: dict[str, Any]) -> dict[str, Any]:
    return {"lease": _int(h, "lease")}


def _invalidate(h: dict[str, Any]) -> dict[str, Any]:
    return {"name": _bin(h.get("name"), "'name'", MAX_NAME_BYTES),
            "below_epoch": _int(h, "below_epoch", optional=True)}


_MAX_ROWS = {Op.PUT: MAX_WRITE_ROWS, Op.RESERVE: MAX_WRITE_ROWS, Op.COMMIT: MAX_WRITE_ROWS,
             Op.ABORT: MAX_WRITE_ROWS, Op.GET: MAX_GET_ROWS}
_LISTING_OPS = (Op.LOOKUP, Op.GET, Op.RESERVE, Op.COMMIT, Op.ABORT, Op.PUT)

_OPS = {int(op): op for op in Op}  # by wire value: Op(value) runs EnumType.__call__ in Python
_LOOKUP = int(Op.LOOKUP)

_DECODERS = {
    Op.HELLO: _hello, Op.PING: _empty, Op.LOOKUP: _lookup, Op.GET: _get,
    Op.RESERVE: _reserve, Op.COMMIT: _finish, Op.ABORT: _finish, Op.PUT: _put,
    Op.RELEASE: _release, Op.STATS: _empty, Op.INVALIDATE: _invalidate,
}

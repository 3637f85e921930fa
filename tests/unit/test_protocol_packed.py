"""LOOKUP's rows packed as one binary each (issue 11, item 3): a prompt's hashes of one length as
one bin, a reply's slots and sizes as little-endian uint64 arrays. Packed or listed, a request
decodes to the same typed message, and a hostile packed field is refused like a listed one."""

from __future__ import annotations

import struct
from typing import Any

import hypothesis.strategies as st
import msgpack
import pytest
from hypothesis import given, settings

from kvstore import protocol
from kvstore.errors import ProtocolError
from kvstore.keys import MAX_HASH_BYTES, Namespace
from kvstore.protocol import (MAX_BLOCKS, Lookup, LookupReply, Op, decode_header, decode_reply,
                              decode_request, encode, encode_reply)

NS = Namespace(b"model", 3)
TOKEN = b"t" * 16


def header_of(req: Lookup) -> dict[str, Any]:
    return decode_header(encode(req, 5))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, MAX_HASH_BYTES).flatmap(
    lambda n: st.lists(st.binary(min_size=n, max_size=n), min_size=1, max_size=40)),
    st.booleans())
def test_hashes_of_one_length_travel_as_one_bin_and_decode_alike(hashes: list[bytes],
                                                                  shm: bool) -> None:
    req = Lookup(ns=NS, hashes=tuple(hashes), lease_ms=100, shm=shm, token=TOKEN if shm else b"")
    h = header_of(req)
    assert h["hashes"] == b"".join(hashes) and h["hash_bytes"] == len(hashes[0])
    assert decode_request([encode(req, 5)]) == Lookup(req_id=5, ns=NS, hashes=tuple(hashes),
                                                      lease_ms=100, shm=shm,
                                                      token=TOKEN if shm else b"")


def test_hashes_of_mixed_lengths_or_none_travel_as_a_list() -> None:
    for hashes in ((b"ab", b"abc"), ()):
        req = Lookup(ns=NS, hashes=hashes, lease_ms=0)
        h = header_of(req)
        assert h["hashes"] == list(hashes) and "hash_bytes" not in h
        assert decode_request([encode(req, 5)]) == Lookup(req_id=5, ns=NS, hashes=hashes)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=MAX_HASH_BYTES), min_size=1, max_size=12))
def test_hashes_pack_only_when_each_is_the_first_ones_length(hashes: list[bytes]) -> None:
    """Packed means split back at one length: any other length (even lengths that add up to the
    same total) must travel as a list, or the daemon would look up hashes nobody sent."""
    h = header_of(Lookup(ns=NS, hashes=tuple(hashes)))
    assert ("hash_bytes" in h) == (len(set(map(len, hashes))) == 1)
    assert decode_request([encode(Lookup(ns=NS, hashes=tuple(hashes)), 5)]).hashes == \
        tuple(hashes)


@pytest.mark.parametrize("hashes", [
    (b"\0" * 31, b"\0" * 33),  # one short, one long: the same total, zeros a padding check misses
    (b"a" * 32, b"\0" * 31, b"\0" * 33),
    (b"\0" * 32, b"\0" * 33, b"\0" * 31),
    (memoryview(b"m" * 32), b"b" * 32),  # bytes-like but not bytes: checked the plain way
])
def test_lengths_that_only_add_up_are_not_packed(hashes: tuple[Any, ...]) -> None:
    h = header_of(Lookup(ns=NS, hashes=hashes))
    same = len(set(map(len, hashes))) == 1
    assert ("hash_bytes" in h) == same
    if same:
        assert h["hashes"] == b"".join(hashes)


def test_a_lookup_of_256_hashes_is_smaller_packed() -> None:
    hashes = tuple(bytes([i]) * 32 for i in range(256))
    listed = protocol.encode_request(Op.LOOKUP, 5, ns=NS, hashes=list(hashes), lease_ms=100)
    assert len(encode(Lookup(ns=NS, hashes=hashes, lease_ms=100), 5)) < len(listed)


BAD_PACKED: list[dict[str, Any]] = [
    {"hashes": b"x" * 64},  # a bin without its hash length
    *[{"hashes": b"x" * 64, "hash_bytes": v}
      for v in (0, -1, MAX_HASH_BYTES + 1, "32", 1.5, True, None, [32])],
    {"hashes": b"x" * 63, "hash_bytes": 32},  # not a whole number of hashes
    {"hashes": b"x" * (MAX_BLOCKS + 1), "hash_bytes": 1},  # past the row bound
    {"hashes": [b"x" * 32], "hash_bytes": 32},  # the length names a bin only
    {"hashes": "x" * 64, "hash_bytes": 32},  # text, not binary
]


@pytest.mark.parametrize("fields", BAD_PACKED, ids=range(len(BAD_PACKED)))
def test_a_hostile_packed_field_is_refused(fields: dict[str, Any]) -> None:
    for op in (Op.LOOKUP, Op.GET):
        header = {"v": protocol.VERSION, "op": int(op), "id": 1, "ns": [b"m", 0], "lease_ms": 0,
                  **fields}
        with pytest.raises(ProtocolError):
            decode_request([msgpack.packb(header, use_bin_type=True)])


def test_an_empty_packed_bin_is_no_hashes() -> None:
    header = {"v": protocol.VERSION, "op": int(Op.LOOKUP), "id": 1, "ns": [b"m", 0],
              "lease_ms": 0, "hashes": b"", "hash_bytes": 32}
    assert decode_request([msgpack.packb(header, use_bin_type=True)]).hashes == ()


def test_lookup_reply_slots_travel_packed_and_decode_to_lists() -> None:
    reply = LookupReply(num_hits=3, lease=9, slots=[4096, 2**40, 7], sizes=[1, 2**33, 5])
    h = decode_header(encode_reply(5, reply))
    assert h["slots"] == struct.pack("<3Q", 4096, 2**40, 7)
    assert h["sizes"] == struct.pack("<3Q", 1, 2**33, 5)
    assert decode_reply(Op.LOOKUP, h) == reply
    assert "slots" not in decode_header(encode_reply(5, LookupReply(num_hits=0, lease=None)))


@pytest.mark.parametrize("bad", [
    {"slots": b"\x00" * 7, "sizes": b"\x00" * 8},  # not whole uint64s
    {"slots": b"\x00" * 16, "sizes": b"\x00" * 8},  # one size per slot
    {"slots": b"\x00" * 16, "sizes": b"\x00" * 16, "num_hits": 1},  # one slot per hit
    {"slots": "text", "sizes": b"\x00" * 8},
    {"slots": b"\x00" * 8},  # slots without sizes
])
def test_a_bad_packed_lookup_reply_is_a_protocol_error(bad: dict[str, Any]) -> None:
    header = {"ok": True, "id": 5, "num_hits": bad.pop("num_hits", len(bad["slots"]) // 8),
              "lease": 9, **bad}
    with pytest.raises(ProtocolError):
        decode_reply(Op.LOOKUP, header)


def test_a_packed_get_over_its_row_cap_is_refused_before_its_rows_are_read() -> None:
    """The row cap counts packed hashes as it counts listed ones (check_rows: TooLarge)."""
    hashes = tuple(i.to_bytes(4, "little") for i in range(protocol.MAX_GET_ROWS + 1))
    frame = encode(protocol.Get(ns=NS, hashes=hashes), 5)
    assert isinstance(decode_header(frame)["hashes"], bytes)
    with pytest.raises(protocol.TooLarge):
        decode_request([frame], check_rows=True)
    assert len(decode_request([frame]).hashes) == len(hashes)  # within MAX_BLOCKS otherwise

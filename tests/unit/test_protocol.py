"""Wire protocol: every request round-trips, and bad input only ever raises ProtocolError."""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
import msgpack
import pytest
from hypothesis import given, settings

from kvstore import protocol
from kvstore.errors import ProtocolError
from kvstore.keys import MAX_HASH_BYTES, MAX_NAME_BYTES, Namespace
from kvstore.protocol import (
    CHUNK_BYTES,
    MAX_BLOCKS,
    MAX_HEADER_BYTES,
    MAX_LEASE_MS,
    Op,
    Done,
    LookupReply,
    Pong,
    Request,
    decode_reply,
    decode_request,
    encode,
    num_frames,
    encode_request,
    request,
)

U63 = 2**63
block_hashes = st.binary(min_size=1, max_size=MAX_HASH_BYTES)
hash_lists = st.lists(block_hashes, max_size=16)
namespaces = st.builds(Namespace, st.binary(min_size=1, max_size=MAX_NAME_BYTES),
                       st.integers(0, U63))
tokens = st.binary(min_size=1, max_size=64)
parents = st.none() | block_hashes
slots = st.integers(0, 2**48)

# Each strategy draws (fields for encode_request, the Request fields expected back, payload frames).
Drawn = tuple[dict[str, Any], dict[str, Any], int]


@st.composite
def lookups(draw: st.DrawFn) -> Drawn:
    ns, hashes = draw(namespaces), draw(hash_lists)
    lease_ms = draw(st.integers(0, MAX_LEASE_MS))
    if lease_ms and draw(st.booleans()):  # slot references: same host, with a lease only
        token = draw(tokens)
        return ({"ns": ns, "hashes": hashes, "lease_ms": lease_ms, "shm": True, "token": token},
                {"ns": ns, "hashes": tuple(hashes), "lease_ms": lease_ms, "shm": True,
                 "token": token}, 0)
    return ({"ns": ns, "hashes": hashes, "lease_ms": lease_ms},
            {"ns": ns, "hashes": tuple(hashes), "lease_ms": lease_ms}, 0)


@st.composite
def gets(draw: st.DrawFn) -> Drawn:
    ns, hashes, shm = draw(namespaces), draw(hash_lists), draw(st.booleans())
    lease = draw(st.none() | st.integers(0, U63))
    token = draw(tokens)
    return ({"ns": ns, "hashes": hashes, "lease": lease, "shm": shm, "token": token},
            {"ns": ns, "hashes": tuple(hashes), "lease": lease, "shm": shm,
             "token": token if shm else b""}, 0)


@st.composite
def reserves(draw: st.DrawFn) -> Drawn:
    ns, token = draw(namespaces), draw(tokens)
    rows = draw(st.lists(st.tuples(block_hashes, parents, st.integers(1, 2**40)), max_size=16))
    return ({"ns": ns, "token": token, "blocks": [list(r) for r in rows]},
            {"ns": ns, "token": token, "hashes": tuple(r[0] for r in rows),
             "parents": tuple(r[1] for r in rows), "sizes": tuple(r[2] for r in rows)}, 0)


@st.composite
def finishes(draw: st.DrawFn) -> Drawn:
    ns = draw(namespaces)
    rows = draw(st.lists(st.tuples(block_hashes, slots), max_size=16))
    return ({"ns": ns, "blocks": [list(r) for r in rows]},
            {"ns": ns, "hashes": tuple(r[0] for r in rows), "slots": tuple(r[1] for r in rows)}, 0)


@st.composite
def puts(draw: st.DrawFn) -> Drawn:
    ns = draw(namespaces)
    rows = draw(st.lists(st.tuples(block_hashes, parents, st.integers(1, 3 * CHUNK_BYTES)),
                         max_size=8))
    sizes = [r[2] for r in rows]
    return ({"ns": ns, "blocks": [[r[0], r[1]] for r in rows], "sizes": sizes},
            {"ns": ns, "hashes": tuple(r[0] for r in rows), "parents": tuple(r[1] for r in rows),
             "sizes": tuple(sizes)}, sum(protocol.num_frames(n) for n in sizes))


@st.composite
def invalidates(draw: st.DrawFn) -> Drawn:
    name = draw(st.binary(min_size=1, max_size=MAX_NAME_BYTES))
    below_epoch = draw(st.none() | st.integers(0, U63))
    return ({"name": name, "below_epoch": below_epoch},
            {"name": name, "below_epoch": below_epoch}, 0)


REQUESTS: dict[Op, st.SearchStrategy[Drawn]] = {
    Op.HELLO: st.integers(0, 2**31).map(lambda v: ({"version": v}, {"version": v}, 0)),
    Op.PING: st.just(({}, {}, 0)),
    Op.LOOKUP: lookups(),
    Op.GET: gets(),
    Op.RESERVE: reserves(),
    Op.COMMIT: finishes(),
    Op.ABORT: finishes(),
    Op.PUT: puts(),
    Op.RELEASE: st.integers(0, U63).map(lambda x: ({"lease": x}, {"lease": x}, 0)),
    Op.STATS: st.just(({}, {}, 0)),
    Op.INVALIDATE: invalidates(),
}


def decode_or_protocol_error(frames: list[Any]) -> Request | None:
    """Decode; a ProtocolError is an accepted outcome, any other exception fails the test."""
    try:
        return decode_request(frames)
    except ProtocolError:
        return None


# --- round trips --------------------------------------------------------------------------------
def test_every_op_has_a_round_trip_strategy() -> None:
    """A new Op without a round-trip strategy fails here."""
    assert set(REQUESTS) == set(Op)


@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), req_id=st.integers(0, U63), as_view=st.booleans())
def test_request_round_trips(op: Op, data: st.DataObject, req_id: int, as_view: bool) -> None:
    """decode_request(encode_request(op, ...)) gives back exactly the fields sent."""
    fields, expected, num_payload = data.draw(REQUESTS[op])
    header = encode_request(op, req_id, **fields)
    frames: list[Any] = [memoryview(header) if as_view else header] + [b""] * num_payload
    assert decode_request(frames) == request(op, req_id, **expected)


def test_request_at_every_documented_limit_decodes() -> None:
    """MAX_BLOCKS rows of 64-byte hashes and parents with the largest sizes fit the header limit."""
    ns = Namespace(b"n" * MAX_NAME_BYTES, U63 - 1)
    hashes = [i.to_bytes(2, "big") * (MAX_HASH_BYTES // 2) for i in range(MAX_BLOCKS)]
    parent = b"p" * MAX_HASH_BYTES
    reserve = encode_request(Op.RESERVE, U63, ns=ns, token=b"t" * 64,
                             blocks=[[h, parent, 2**40] for h in hashes])
    assert len(decode_request([reserve]).hashes) == MAX_BLOCKS
    put = encode_request(Op.PUT, U63, ns=ns, blocks=[[h, parent] for h in hashes],
                         sizes=[CHUNK_BYTES] * MAX_BLOCKS)
    assert len(decode_request([put] + [b""] * MAX_BLOCKS).sizes) == MAX_BLOCKS
    lookup = encode_request(Op.LOOKUP, 0, ns=ns, hashes=hashes, lease_ms=MAX_LEASE_MS)
    assert len(decode_request([lookup]).hashes) == MAX_BLOCKS


def test_replies_and_errors_decode_as_maps() -> None:
    """encode_reply and encode_error produce headers decode_header reads back."""
    reply = protocol.decode_header(protocol.encode_reply(7, num_hits=3, lease=None))
    assert reply == {"v": protocol.VERSION, "id": 7, "ok": True, "num_hits": 3, "lease": None}
    error = protocol.decode_header(protocol.encode_error(None, "bad_request", "no"))
    assert error == {"v": protocol.VERSION, "id": None, "ok": False, "error": "bad_request",
                     "msg": "no"}


@pytest.mark.parametrize("nbytes", [0, 1, CHUNK_BYTES, CHUNK_BYTES + 1, 2 * CHUNK_BYTES + 5])
def test_chunk_makes_num_frames_views_that_add_up(nbytes: int) -> None:
    """chunk() splits a block into num_frames() views of at most CHUNK_BYTES, in order."""
    data = bytes(range(256)) * (nbytes // 256 + 1)
    view = memoryview(data)[:nbytes]
    frames = protocol.chunk(view)
    assert len(frames) == protocol.num_frames(nbytes)
    assert all(len(f) <= CHUNK_BYTES for f in frames)
    assert b"".join(frames) == data[:nbytes]


# --- rejection ----------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 3))
def test_random_bytes_raise_only_protocol_error(header: bytes, num_payload: int) -> None:
    """Arbitrary bytes as a header never raise anything but ProtocolError."""
    decode_or_protocol_error([header] + [b"x"] * num_payload)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=12)
WIRE_KEYS = ["v", "version", "ns", "hashes", "lease_ms", "lease", "shm", "token", "blocks",
             "sizes", "name", "below_epoch"]


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries(
    {"op": st.integers(0, len(Op) + 1) | msgpack_values,
     "id": st.integers(0, U63) | msgpack_values},
    optional={key: msgpack_values for key in WIRE_KEYS}), st.integers(0, 3))
def test_garbage_fields_raise_only_protocol_error(header: dict[str, Any], num_payload: int) -> None:
    """A map of random values under the wire's field names never raises anything else."""
    decode_or_protocol_error([msgpack.packb(header, use_bin_type=True)] + [b""] * num_payload)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), op=st.sampled_from(list(Op)), value=msgpack_values)
def test_one_garbage_field_in_a_valid_request_raises_only_protocol_error(
        data: st.DataObject, op: Op, value: Any) -> None:
    """Replacing any one field of a valid request with a random value never raises anything else."""
    fields, _, num_payload = data.draw(REQUESTS[op])
    header = {"v": protocol.VERSION, "op": int(op), "id": 1, **fields}
    if isinstance(header.get("ns"), Namespace):
        header["ns"] = [header["ns"].name, header["ns"].epoch]
    header[data.draw(st.sampled_from(sorted(header)))] = value
    decode_or_protocol_error([msgpack.packb(header, use_bin_type=True)] + [b""] * num_payload)


@pytest.mark.parametrize("header", [[], [1, 2], 1, "op", None, b"\x01", True, 1.5],
                         ids=lambda h: type(h).__name__)
def test_header_that_is_not_a_map_is_rejected(header: Any) -> None:
    """Frame 0 must be a msgpack map."""
    with pytest.raises(ProtocolError, match="map"):
        decode_request([msgpack.packb(header)])


@pytest.mark.parametrize("op", [0, len(Op) + 1, 255, -1, "PING", 3.0, None, True])
def test_unknown_op_is_rejected(op: Any) -> None:
    """An op outside the enum, or not an integer, is refused."""
    with pytest.raises(ProtocolError, match="'op'"):
        decode_request([msgpack.packb({"v": 1, "op": op, "id": 1})])


def test_empty_message_and_trailing_bytes_are_rejected() -> None:
    """No frames at all, or bytes after the header map, are refused."""
    with pytest.raises(ProtocolError, match="empty"):
        decode_request([])
    with pytest.raises(ProtocolError, match="msgpack"):
        decode_request([encode_request(Op.PING, 1) + b"\x00"])


def test_lookup_slots_need_a_lease_and_a_token() -> None:
    """Slot references are answered only under a lease (else nothing keeps the slots) and only
    to a client that proves it mapped the segment."""
    with pytest.raises(ProtocolError, match="lease"):
        decode_request([encode_request(Op.LOOKUP, 1, ns=Namespace(b"m", 0), hashes=[b"h"],
                                       lease_ms=0, shm=True, token=b"t")])
    with pytest.raises(ProtocolError, match="token"):
        decode_request([encode_request(Op.LOOKUP, 1, ns=Namespace(b"m", 0), hashes=[b"h"],
                                       lease_ms=10, shm=True)])


@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.name)
@settings(max_examples=20, deadline=None)
@given(data=st.data(), req_id=st.integers(0, U63))
def test_typed_request_encodes_to_what_decodes_back(op: Op, data: st.DataObject,
                                                    req_id: int) -> None:
    """A client's typed request (encode) reads back as the same typed request: one type per op,
    its fields validated in decode."""
    _, expected, _ = data.draw(REQUESTS[op])
    sent = request(op, req_id, **expected)
    frames: list[Any] = [encode(sent, req_id)]
    if op is Op.PUT:
        frames += [b""] * sum(num_frames(n) for n in sent.sizes)  # type: ignore[union-attr]
    got = decode_request(frames)
    assert got == sent and type(got).OP is op


def test_reply_decode_checks_the_fields_clients_act_on() -> None:
    """Replies are typed too: a missing field or a count of the wrong type is a ProtocolError."""
    header = {"v": 1, "id": 1, "ok": True, "num_hits": 2, "lease": 7}
    assert decode_reply(Op.LOOKUP, header) == LookupReply(num_hits=2, lease=7)
    for bad in ({"num_hits": 2}, {"num_hits": "2", "lease": 7}, {"num_hits": 2, "lease": b"7"},
                {"num_hits": -1, "lease": None}, {"num_hits": True, "lease": 7},
                {"num_hits": 2, "lease": True}):
        with pytest.raises(ProtocolError):
            decode_reply(Op.LOOKUP, bad)
    assert decode_reply(Op.PING, {"ok": True}) == Pong()  # a daemon that does not stamp PINGs
    assert decode_reply(Op.PING, {"ok": True, "at_s": 5.0}) == Pong(at_s=5.0)
    assert decode_reply(Op.COMMIT, {"ok": True, "num_done": 3}) == Done(num_done=3)


def test_oversize_header_is_rejected_before_unpacking() -> None:
    """A header frame past MAX_HEADER_BYTES is refused by its length alone."""
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_request([b"\x00" * (MAX_HEADER_BYTES + 1)])


NS_WIRE = [b"model", 0]
H = b"\x01" * 32
BASELINES: dict[Op, tuple[dict[str, Any], int]] = {
    Op.HELLO: ({"version": 1}, 0),
    Op.LOOKUP: ({"ns": NS_WIRE, "hashes": [H], "lease_ms": 100}, 0),
    Op.GET: ({"ns": NS_WIRE, "hashes": [H], "lease": None, "shm": True, "token": b"t" * 16}, 0),
    Op.RESERVE: ({"ns": NS_WIRE, "blocks": [[H, None, 100]], "token": b"t" * 16}, 0),
    Op.COMMIT: ({"ns": NS_WIRE, "blocks": [[H, 4096]]}, 0),
    Op.ABORT: ({"ns": NS_WIRE, "blocks": [[H, 4096]]}, 0),
    Op.PUT: ({"ns": NS_WIRE, "blocks": [[H, None]], "sizes": [100]}, 1),
    Op.RELEASE: ({"lease": 7}, 0),
    Op.INVALIDATE: ({"name": b"model", "below_epoch": None}, 0),
}
BAD_NS = [None, b"model", [b"model"], [b"model", 0, 1], ["model", 0], [b"", 0],
          [b"x" * (MAX_NAME_BYTES + 1), 0], [b"m", -1], [b"m", "0"], [b"m", 1.0], [b"m", True],
          {"name": b"m"}]
BAD_HASHES = [None, H, [None], [b""], [b"x" * (MAX_HASH_BYTES + 1)], ["text"], [[H]], {"h": H}]
BAD_VALUES: list[tuple[Op, str, Any]] = [
    *[(Op.PING, "id", v) for v in (-1, 2**64 - 1, "1", 1.0, True, None, [1])],
    *[(Op.HELLO, "version", v) for v in (-1, 2**31 + 1, "1", 1.5, None, True)],
    *[(op, "ns", v) for op in (Op.LOOKUP, Op.GET, Op.RESERVE, Op.COMMIT, Op.PUT) for v in BAD_NS],
    *[(op, "hashes", v) for op in (Op.LOOKUP, Op.GET) for v in BAD_HASHES],
    *[(Op.LOOKUP, "lease_ms", v) for v in (-1, MAX_LEASE_MS + 1, "1", 1.5, None, True)],
    *[(Op.GET, "lease", v) for v in (-1, "1", 1.5, True, [1])],
    *[(Op.GET, "shm", v) for v in (None, 1, "yes")],
    *[(op, "token", v) for op in (Op.GET, Op.RESERVE) for v in (None, b"", b"x" * 65, "tok", 1)],
    *[(Op.RESERVE, "blocks", v) for v in (
        None, [H], [[H, None]], [[H, None, 100, 1]], [[H, None, 0]], [[H, None, -1]],
        [[H, None, 2**40 + 1]], [[H, None, "100"]], [[H, None, 1.5]], [[H, None, True]],
        [[H, b"", 100]], [[H, "parent", 100]], [[b"", None, 100]], [[None, None, 100]])],
    *[(op, "blocks", v) for op in (Op.COMMIT, Op.ABORT) for v in (
        None, [[H]], [[H, -1]], [[H, 2**48 + 1]], [[H, "0"]], [[H, None]], [[None, 0]])],
    *[(Op.PUT, "blocks", v) for v in (None, [[H]], [[H, None, 100]], [[H, 5]], [[b"", None]])],
    *[(Op.PUT, "sizes", v) for v in (None, [], [0], [-1], ["100"], [100, 100], [2**40 + 1])],
    *[(Op.RELEASE, "lease", v) for v in (None, -1, "1", 1.5)],
    *[(Op.INVALIDATE, "name", v) for v in (None, b"", b"x" * (MAX_NAME_BYTES + 1), "model", 1)],
    *[(Op.INVALIDATE, "below_epoch", v) for v in (-1, "1", 1.5, True)],
]


def test_baselines_decode() -> None:
    """The valid requests the wrong-type cases start from do decode."""
    for op, (fields, num_payload) in BASELINES.items():
        decode_request([encode_request(op, 1, **fields)] + [b""] * num_payload)


@pytest.mark.parametrize(("op", "key", "value"), BAD_VALUES,
                         ids=[f"{op.name}-{key}-{i}" for i, (op, key, _) in enumerate(BAD_VALUES)])
def test_wrong_type_or_range_in_a_field_is_rejected(op: Op, key: str, value: Any) -> None:
    """Each field refuses values of the wrong type, length or range with ProtocolError."""
    fields, num_payload = BASELINES.get(op, ({}, 0))
    header = {"v": protocol.VERSION, "op": int(op), "id": 1, **fields, key: value}
    with pytest.raises(ProtocolError):
        decode_request([msgpack.packb(header, use_bin_type=True)] + [b""] * num_payload)


@pytest.mark.parametrize(("op", "key"), [(Op.LOOKUP, "hashes"), (Op.GET, "hashes"),
                                         (Op.RESERVE, "blocks"), (Op.COMMIT, "blocks"),
                                         (Op.PUT, "blocks"), (Op.PUT, "sizes")])
def test_list_longer_than_max_blocks_is_rejected(op: Op, key: str) -> None:
    """Lists are bounded by MAX_BLOCKS, so no request can make the daemon do unbounded work."""
    fields, _ = BASELINES[op]
    row = fields[key][0]
    header = encode_request(op, 1, **{**fields, key: [row] * (MAX_BLOCKS + 1)})
    with pytest.raises(ProtocolError, match=str(MAX_BLOCKS)):
        decode_request([header] + [b""] * (MAX_BLOCKS + 1))


@pytest.mark.parametrize("num_payload", [0, 1, 2, 4, 10])
def test_put_with_the_wrong_number_of_payload_frames_is_rejected(num_payload: int) -> None:
    """A PUT carries exactly num_frames(size) frames per block: here 1 + 2."""
    header = encode_request(Op.PUT, 1, ns=NS_WIRE, blocks=[[H, None], [b"\x02", H]],
                            sizes=[100, CHUNK_BYTES + 1])
    assert len(decode_request([header] + [b""] * 3).hashes) == 2
    with pytest.raises(ProtocolError, match="payload frames"):
        decode_request([header] + [b""] * num_payload)


@pytest.mark.parametrize("op", [op for op in Op if op is not Op.PUT], ids=lambda op: op.name)
def test_payload_frames_on_a_request_other_than_put_are_rejected(op: Op) -> None:
    """Only PUT requests carry payload frames."""
    fields, _ = BASELINES.get(op, ({}, 0))
    with pytest.raises(ProtocolError, match="payload frames"):
        decode_request([encode_request(op, 1, **fields), b"extra"])

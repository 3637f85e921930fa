"""Hostile input: malformed, random and out-of-range messages from raw sockets. The daemon answers
each one, keeps serving, leaks no slot or lease, and never dies (DESIGN.md, Failure model)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from kvstore import protocol
from kvstore.client import Client
from kvstore.keys import Namespace
from kvstore.protocol import MAX_BLOCKS, MAX_HEADER_BYTES, MAX_LEASE_MS, VERSION, Op
from tests.integration.helpers import (
    CALL_S, MiB, chain_hashes, random_blocks, raw_dealer, stats, wait_stats)

NUM_MESSAGES = 10_000
BATCH = 250  # messages in flight at once; well under both sides' high-water marks
SEED = 20240611
LEGIT = Namespace(b"legit")
FUZZ_NAMES = [b"fuzz-0", b"fuzz-1", b"x" * 64]
FUZZ_HASHES = [b"h%d" % i for i in range(5)]  # few: fuzz lookups hit what fuzz puts stored
PAGE_BYTES = 8 * MiB
VALID_SIZES = [1, 63, 64, 100, 4096]  # few size classes: fuzz writes cannot fill the pool
# Mostly writes and reads of a few keys, so fuzz reads hit (and lease) what fuzz writes stored.
VALID_OP_WEIGHTS = {Op.HELLO: 1, Op.PING: 1, Op.LOOKUP: 6, Op.GET: 4, Op.RESERVE: 2, Op.COMMIT: 1,
                    Op.ABORT: 1, Op.PUT: 6, Op.RELEASE: 1, Op.STATS: 1, Op.INVALIDATE: 1}
# Values that break some field's type, range or length (and a few that happen to be valid).
GARBAGE: list[Any] = [
    None, True, False, 0, -1, 1, 7, 2**31, 2**63, 2**64 - 1, -(2**63), 0.5, float("nan"),
    float("inf"), "", "text", "h0", b"", b"h0", b"\x00" * 65, b"x" * 64, [], [None], [b"h0", b"h0"],
    [[b"h0", None]], [[b"h0", 1, 2, 3]], [[b"h0", b"h0", 64]], {}, {"a": 1}, {"m": {"n": [1]}},
    msgpack.ExtType(5, b"abc"), [b"fuzz-0", 0], [b"fuzz-0", -1], [b"", 0], [b"x" * 65, 0],
    [b"fuzz-0", 2**63], list(range(40)), b"\xff" * 16, PAGE_BYTES + 1, 2**40,
]


class Fuzzer:
    """Builds hostile multipart messages; remembers what the daemon hands out to reuse it."""

    def __init__(self, rng: random.Random, token: bytes) -> None:
        self.rng = rng
        self.token = token
        self.ids = itertools.count(1)
        self.slots: list[int] = [4096]  # slot offsets seen in replies, for COMMIT/ABORT

    def message(self) -> list[bytes]:
        kinds = [(self.random_frames, 12), (self.non_map, 6), (self.wrong_fields, 10),
                 (self.garbage_values, 22), (self.garbage_in_rows, 8),
                 (self.wrong_frame_counts, 10), (self.huge, 2),
                 (self.bad_token, 5), (self.oversized_block, 1), (self.random_op, 6),
                 (self.valid, 18)]
        make = self.rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
        return make()

    # --- building blocks -------------------------------------------------------------------
    def _ns(self) -> list[Any]:
        return [self.rng.choice(FUZZ_NAMES), self.rng.choice([0, 0, 0, 1])]

    def _hashes(self) -> list[bytes]:
        hashes = self.rng.sample(FUZZ_HASHES, self.rng.randint(1, 4))
        if self.rng.random() < 0.1:
            hashes.append(self.rng.choice(hashes))  # a chain that repeats a block
        return hashes

    def _fields(self, op: Op) -> tuple[dict[str, Any], list[bytes]]:
        """A valid request's fields and payload for op."""
        r = self.rng
        if op is Op.HELLO:
            return {"version": VERSION}, []
        if op in (Op.PING, Op.STATS):
            return {}, []
        if op is Op.LOOKUP:
            return {"ns": self._ns(), "hashes": self._hashes(),
                    "lease_ms": r.choice([0, 0, 100, 1000, MAX_LEASE_MS])}, []
        if op is Op.GET:
            shm = r.random() < 0.5
            return {"ns": self._ns(), "hashes": self._hashes(), "shm": shm, "token": self.token,
                    "lease": r.choice([None, None, r.randint(1, 50)])}, []
        if op is Op.RESERVE:
            hashes = self._hashes()
            return {"ns": self._ns(), "token": self.token,
                    "blocks": [[h, r.choice([None, r.choice(FUZZ_HASHES)]), r.choice(VALID_SIZES)]
                               for h in hashes]}, []
        if op in (Op.COMMIT, Op.ABORT):
            return {"ns": self._ns(), "blocks": [[h, r.choice(self.slots)]
                                                 for h in self._hashes()]}, []
        if op is Op.PUT:
            hashes, sizes = self._hashes(), []
            blocks = [[h, r.choice([None, r.choice(FUZZ_HASHES)])] for h in hashes]
            sizes = [r.choice(VALID_SIZES) for _ in hashes]
            payload = [r.randbytes(n) for n in sizes]
            return {"ns": self._ns(), "blocks": blocks, "sizes": sizes}, payload
        if op is Op.RELEASE:
            return {"lease": r.randint(1, 50)}, []
        return {"name": r.choice(FUZZ_NAMES), "below_epoch": r.choice([None, 0, 1, 5])}, []

    def _header(self, op: int, fields: dict[str, Any]) -> bytes:
        return msgpack.packb({"v": VERSION, "op": op, "id": next(self.ids), **fields},
                             use_bin_type=True)

    # --- message kinds ---------------------------------------------------------------------
    def valid(self) -> list[bytes]:
        op = self.rng.choices(list(VALID_OP_WEIGHTS), weights=list(VALID_OP_WEIGHTS.values()))[0]
        fields, payload = self._fields(op)
        return [self._header(op, fields), *payload]

    def random_frames(self) -> list[bytes]:
        return [self.rng.randbytes(self.rng.choice([0, 1, 5, 64, 700, 3000]))
                for _ in range(self.rng.randint(1, 4))]

    def non_map(self) -> list[bytes]:
        return [msgpack.packb(self.rng.choice(GARBAGE[:-10] + [[1, 2, 3], "op", 3]),
                              use_bin_type=True)]

    def wrong_fields(self) -> list[bytes]:
        """Maps whose envelope (v, op, id) is missing, mistyped or out of range."""
        r = self.rng
        header: dict[Any, Any] = {"v": VERSION, "op": int(r.choice(list(Op))), "id": 1}
        for key in r.sample(["v", "op", "id"], r.randint(1, 3)):
            if r.random() < 0.3:
                del header[key]
            else:
                header[key] = r.choice(GARBAGE)
        if r.random() < 0.3:
            header[r.choice(["OP", "Id", "hashes", "\x00", b"bin-key"])] = r.choice(GARBAGE)
        return [msgpack.packb(header, use_bin_type=True)]

    def garbage_values(self) -> list[bytes]:
        """A valid header for a real op with one or two fields replaced, removed or added."""
        r = self.rng
        op = r.choice(list(Op))
        fields, payload = self._fields(op)
        keys = list(fields) or ["extra"]
        for key in r.sample(keys, min(len(keys), r.randint(1, 2))):
            if r.random() < 0.2:
                fields.pop(key, None)
            else:
                fields[key] = r.choice(GARBAGE)
        if r.random() < 0.2:
            fields[r.choice(["extra", "sizes", "blocks", "hashes", "ns"])] = r.choice(GARBAGE)
        return [self._header(op, fields), *payload]

    def garbage_in_rows(self) -> list[bytes]:
        """A valid write request with one value inside its blocks, sizes or hashes replaced."""
        r = self.rng
        op = r.choice([Op.RESERVE, Op.COMMIT, Op.ABORT, Op.PUT, Op.LOOKUP, Op.GET])
        fields, payload = self._fields(op)
        rows = fields.get("blocks") or fields["hashes"]
        i = r.randrange(len(rows))
        if isinstance(rows[i], list):
            rows[i][r.randrange(len(rows[i]))] = r.choice(GARBAGE)
        else:
            rows[i] = r.choice(GARBAGE)
        return [self._header(op, fields), *payload]

    def wrong_frame_counts(self) -> list[bytes]:
        r = self.rng
        fields, payload = self._fields(Op.PUT)
        choice = r.randrange(4)
        if choice == 0 and payload:
            payload.pop()  # one block short
        elif choice == 1:
            payload.append(r.randbytes(64))  # one frame too many
        elif choice == 2 and payload:
            payload[0] = payload[0] + b"!"  # right count, wrong bytes
        else:  # payload frames on an op that takes none
            op = r.choice([Op.PING, Op.LOOKUP, Op.GET, Op.STATS, Op.RESERVE, Op.COMMIT])
            fields, _ = self._fields(op)
            return [self._header(op, fields), *[r.randbytes(32)] * r.randint(1, 3)]
        return [self._header(Op.PUT, fields), *payload]

    def huge(self) -> list[bytes]:
        r = self.rng
        choice = r.randrange(5)
        if choice == 0:  # one hash over the per-request limit
            hashes = [b"%06d" % i for i in range(MAX_BLOCKS + 1)]
            return [self._header(Op.LOOKUP, {"ns": self._ns(), "hashes": hashes, "lease_ms": 0})]
        if choice == 1:  # exactly at the limit: valid, a miss
            hashes = [b"%06d" % i for i in range(MAX_BLOCKS)]
            return [self._header(Op.LOOKUP, {"ns": self._ns(), "hashes": hashes, "lease_ms": 0})]
        if choice == 2:  # an array longer than the decoder allows
            return [self._header(Op.PING, {"pad": list(range(4 * MAX_BLOCKS))})]
        if choice == 3:  # a header frame over MAX_HEADER_BYTES
            return [self._header(Op.PING, {"pad": b"x" * (MAX_HEADER_BYTES + 1)})]
        return [b"\x91" * 5000 + b"\xc0"]  # arrays nested 5000 deep

    def bad_token(self) -> list[bytes]:
        r = self.rng
        token = r.choice([b"", b"\x00" * 16, r.randbytes(16), r.randbytes(65), self.token[:8]])
        op = r.choice([Op.GET, Op.RESERVE])
        fields, _ = self._fields(op)
        fields["token"] = token
        if op is Op.GET:
            fields["shm"] = True
        return [self._header(op, fields)]

    def oversized_block(self) -> list[bytes]:
        """A well-formed reservation of a block that no page can hold."""
        fields, _ = self._fields(Op.RESERVE)
        fields["blocks"][-1][2] = self.rng.choice([PAGE_BYTES + 1, 2**40])
        return [self._header(Op.RESERVE, fields)]

    def random_op(self) -> list[bytes]:
        r = self.rng
        op = r.choice([0, -1, 12, 13, 99, 2**32, r.randint(-5, 30)])
        fields = {k: r.choice(GARBAGE) for k in r.sample(["ns", "hashes", "blocks", "lease"], 2)}
        return [self._header(op, fields)]


def _replies(sock: zmq.Socket, n: int) -> Iterator[dict[str, Any]]:
    for _ in range(n):
        frames = sock.recv_multipart()  # RCVTIMEO bounds the wait: a missing reply fails here
        yield protocol.decode_header(frames[0])


@pytest.mark.timeout(180)
def test_ten_thousand_hostile_messages_leave_the_daemon_serving_and_leak_free(make_daemon, ctx):
    """10,000 malformed or random messages each get a reply; no slot, lease or reservation leaks."""
    d = make_daemon(pool_size="128MiB", page_size="8MiB",
                    extra_args=["--reserve-timeout", "1", "--lease", "1"]).start()
    legit_hashes = chain_hashes("legit", 3)
    legit_data = random_blocks(7, [5 * MiB, 4096, 123])  # a 2-frame block among them
    legit = list(zip(legit_hashes, [None, *legit_hashes[:-1]], legit_data))
    rng = random.Random(SEED)
    counts = {"ok": 0, "error": 0}
    codes: set[str] = set()
    leases: set[int] = set()
    with Client(d.address, CALL_S, ctx=ctx) as client, raw_dealer(ctx, d.address, 10_000) as sock:
        assert client.put(LEGIT, legit).num_stored == 3
        fuzzer = Fuzzer(rng, bytes(client.connect().token))
        for _ in range(NUM_MESSAGES // BATCH):
            for _ in range(BATCH):
                sock.send_multipart(fuzzer.message())
            for reply in _replies(sock, BATCH):
                counts["ok" if reply.get("ok") else "error"] += 1
                codes.add(str(reply.get("error")))
                if reply.get("lease") is not None:
                    leases.add(reply["lease"])
                fuzzer.slots += [s for s in reply.get("slots") or [] if s is not None][:2]
            # Legit traffic keeps working between the batches.
            assert client.get(LEGIT, legit_hashes) == legit_data

        assert counts["ok"] + counts["error"] == NUM_MESSAGES
        assert counts["ok"] > 500 and counts["error"] > 5000, counts
        assert "internal" not in codes, "a request raised an unexpected exception in the daemon"
        assert codes >= {"bad_request", "stale_segment", "too_large"}, codes
        # Clean up what the fuzz legitimately holds: its leases, its reservations, its blocks.
        for lease in leases:
            sock.send_multipart([msgpack.packb({"v": VERSION, "op": Op.RELEASE, "id": 1,
                                                "lease": lease})])
        assert all(r["ok"] for r in _replies(sock, len(leases)))
    s = wait_stats(d.address, lambda s: s["num_reserved"] == 0 and s["num_leases"] == 0, 20.0,
                   "fuzz leases and reservations gone")
    assert s["errors"] == counts["error"]
    with Client(d.address, CALL_S, ctx=ctx) as client:
        for name in s["namespaces"]:
            if bytes.fromhex(name) != LEGIT.name:
                client.invalidate(bytes.fromhex(name))
        s = client.stats()
        assert (s["num_blocks"], s["num_slots_used"], s["num_reserved"], s["num_leases"],
                s["num_evictions"]) == (3, 3, 0, 0, 0)
        assert client.get(LEGIT, legit_hashes) == legit_data
        assert client.put(LEGIT, [(b"after", legit_hashes[-1], b"a" * 777)]).num_stored == 1
    with Client(d.address, CALL_S, ctx=ctx, use_shm=False) as tcp_client:
        assert tcp_client.get(LEGIT, [*legit_hashes, b"after"]) == [*legit_data, b"a" * 777]
    assert d.proc.poll() is None, "daemon died"
    assert "Traceback" not in d.output()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("end", ["expiry", "release"])
def test_lease_naming_a_block_twice_frees_it_once_when_dropped(make_daemon, ctx, end):
    """A lease over a repeated hash, its block invalidated, ends without crashing the daemon."""
    d = make_daemon().start()
    ns = Namespace(b"model-a")
    with Client(d.address, CALL_S, ctx=ctx, use_shm=False) as client:
        client.put(ns, [(b"a", None, b"1" * 1000), (b"b", b"a", b"2" * 1000)])
        lease = client.lookup(ns, [b"a", b"a"], lease_ms=300).lease
        assert lease is not None
        assert client.invalidate(b"model-a") == 2
        assert client.stats()["num_slots_used"] == 1, "the leased slot must outlive invalidate"
        if end == "release":
            assert client.release(lease)
        wait_stats(d.address, lambda s: s["num_leases"] == 0 and s["num_slots_used"] == 0, 20.0,
                   "lease gone and slot freed")
        # The freed slot is reusable exactly once: two new blocks take two distinct slots.
        fresh = [(b"c", None, b"3" * 1000), (b"d", b"c", b"4" * 1000)]
        assert client.put(ns, fresh).num_stored == 2
        assert client.get(ns, [b"c", b"d"]) == [b"3" * 1000, b"4" * 1000]
    assert d.proc.poll() is None, d.output()
    assert "Traceback" not in d.output()


@pytest.mark.timeout(90)
def test_oversized_frame_drops_only_that_connection(daemon, ctx):
    """A frame past the size limit cuts its sender off; other clients keep being served."""
    with Client(daemon.address, CALL_S, ctx=ctx) as client, \
            raw_dealer(ctx, daemon.address, 500) as sock:
        client.put(Namespace(b"m"), [(b"k", None, b"v" * 100)])
        sock.send_multipart([msgpack.packb({"v": VERSION, "op": Op.PING, "id": 1}),
                             bytes(protocol.CHUNK_BYTES + 1)])
        with pytest.raises(zmq.Again):
            sock.recv_multipart()
        assert client.get(Namespace(b"m"), [b"k"]) == [b"v" * 100]
    assert stats(daemon.address)["num_slots_used"] == 1


@pytest.mark.timeout(90)
def test_reply_for_an_unparseable_message_has_no_id_and_says_bad_request(daemon, ctx):
    """Garbage gets an error reply with id nil and code bad_request, and a message text."""
    with raw_dealer(ctx, daemon.address) as sock:
        sock.send_multipart([b"\xc1 not msgpack"])
        reply = protocol.decode_header(sock.recv_multipart()[0])
    assert reply["ok"] is False and reply["id"] is None and reply["error"] == "bad_request"
    assert "msgpack" in reply["msg"]

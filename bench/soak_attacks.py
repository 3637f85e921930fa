"""The soak's attack classes (issue 10), each from sockets of its own on loopback, each bounded in
what it sends and in how long it waits for an answer. Each returns what it sent and what the
daemon accepted or answered; the soak measures everyone else's latency around it.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from bench.soak_clients import (
    BLOCK_SIZES, HONEST_NS, HOT_CHAINS, LATE_TAG, NUM_CHAINS, POISON_TAG, block_size, chain_hashes,
    tagged)
from kvstore import protocol
from kvstore.client import Client
from kvstore.errors import KVStoreError, ServerError, ServerUnavailable
from kvstore.keys import Namespace
from kvstore.protocol import CHUNK_BYTES, Op

MiB = 1024 * 1024
_SEND_TIMEOUT_MS = 10_000  # an attack send that cannot go out in this long is abandoned
_PIPELINE = 1000  # lookups in flight at once in the lease flood: under both sides' HWMs
_UNREAD_BLOCK_BYTES = 2 * MiB  # a Llama-8B block: the pins of an unread GET reply
# Frames of the large message: under the daemon's per-frame limit (CHUNK_BYTES) also with CURVE,
# which adds its own bytes to each frame (a full CHUNK_BYTES frame is refused under CURVE).
_LARGE_FRAME_BYTES = CHUNK_BYTES - 64 * 1024
_LEASE_MS = 60_000  # the daemon's longest lease: the flood's leases outlive its slow start


@dataclass(frozen=True)
class Scale:
    """How hard each attack pushes (the issue's figures in the full run, less in --quick)."""

    tiny_blocks: int  # one-byte blocks invalidated, or reserved and left unfinished
    empty_frames: int  # empty frames in one message
    large_frames: int  # frames of ~CHUNK_BYTES in one multipart message
    leased_lookups: int  # LOOKUPs with a lease, pipelined from one socket
    lease_repeat: int  # how many times each leased LOOKUP names the same block
    unread_blocks: int  # 2 MiB blocks a never-read TCP GET pins
    hold_s: float  # how long floods of leases and unread replies are held
    foreign_blocks: int  # reservations committed/aborted from another connection
    late_blocks: int  # slots of the stalled writer
    tenant_chains: int  # honest hot chains the other tenant reads, drops and poisons
    stall_cap_s: float  # the longest the attacker waits for any one answer


QUICK = Scale(tiny_blocks=512, empty_frames=200_000, large_frames=32, leased_lookups=16_384,
              lease_repeat=16, unread_blocks=48, hold_s=2.0, foreign_blocks=64, late_blocks=128,
              tenant_chains=32, stall_cap_s=30.0)
FULL = Scale(tiny_blocks=8192, empty_frames=1_000_000, large_frames=256, leased_lookups=65_536,
             lease_repeat=64, unread_blocks=112, hold_s=10.0, foreign_blocks=256, late_blocks=512,
             tenant_chains=64, stall_cap_s=120.0)


@dataclass
class Env:
    address: str
    ctx: zmq.Context
    scale: Scale
    reserve_s: float  # the daemon's --reserve-timeout
    round: int  # fresh namespace names per round
    curve_dir: Path | None = None  # the attacker's own client keys, when the daemon wants keys


class Raw:
    """A bare DEALER that speaks the wire protocol without the client library."""

    def __init__(self, env: Env, rcvhwm: int | None = None, rcvbuf: int | None = None) -> None:
        self.env = env
        self.sock = env.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
        if rcvhwm is not None:
            self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if rcvbuf is not None:
            self.sock.setsockopt(zmq.RCVBUF, rcvbuf)
        if env.curve_dir is not None:
            _curve_client(self.sock, env.curve_dir)
        self.sock.connect(env.address)
        self.ids = iter(range(1, 1 << 62))
        self.token = b""

    def send(self, op: Op, payload: list[Any] | tuple[Any, ...] = (), **fields: Any) -> int:
        req_id = next(self.ids)
        self.sock.send_multipart([protocol.encode_request(op, req_id, **fields), *payload],
                                 copy=False)
        return req_id

    def wait(self, req_id: int, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The reply to req_id (other replies are skipped), or None past the deadline."""
        wait_s = self.env.scale.stall_cap_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait_s
        while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            if not self.sock.poll(left_ms, zmq.POLLIN):
                break
            frames = self.sock.recv_multipart()
            reply = protocol.decode_header(frames[0])
            if reply.get("id") == req_id or reply.get("id") is None:
                return reply
        return None

    def call(self, op: Op, payload: list[Any] | tuple[Any, ...] = (),
             **fields: Any) -> tuple[dict[str, Any] | None, float]:
        """Send one request and wait for its answer: (reply or None, seconds waited)."""
        start = time.monotonic()
        reply = self.wait(self.send(op, payload, **fields))
        return reply, time.monotonic() - start

    def hello(self) -> None:
        reply, _ = self.call(Op.HELLO, version=protocol.VERSION)
        self.token = bytes(reply["token"]) if reply and reply.get("ok") else b""

    def close(self) -> None:
        self.sock.close(0)


def _curve_client(sock: zmq.Socket, keys: Path) -> None:
    from zmq.auth import load_certificate

    public, secret = load_certificate(keys / "client.key_secret")
    server_public, _ = load_certificate(keys / "server.key")
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_public


def _outcome(reply: dict[str, Any] | None) -> str:
    if reply is None:
        return "no answer"
    return "ok" if reply.get("ok") else f"error:{reply.get('error')}"


def _answer(reply: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    return {"outcome": _outcome(reply), "answer_s": round(seconds, 4)}


def _ns(env: Env, what: str) -> Namespace:
    """A namespace of the attacker's own tenant (its key may write it when tenants are on)."""
    return Namespace(b"attacker/soak-%s-%d" % (what.encode(), env.round))


def _hashes(env: Env, what: str, n: int) -> list[bytes]:
    return [hashlib.sha256(b"%s-%d-%d" % (what.encode(), env.round, i)).digest() for i in range(n)]


# --- one message stalls everyone ---------------------------------------------------------------
def invalidate_tiny(env: Env) -> dict[str, Any]:
    """Store N one-byte blocks in PUTs of the largest size served, then INVALIDATE them in one
    message. A PUT of more rows than HELLO's max_rows is answered too_large (counted)."""
    n, ns, raw = env.scale.tiny_blocks, _ns(env, "tiny"), Raw(env)
    try:
        hashes = _hashes(env, "tiny", n)
        stored, put, put_s = 0, None, 0.0
        for i in range(0, n, protocol.MAX_WRITE_ROWS):
            batch = hashes[i:i + protocol.MAX_WRITE_ROWS]
            put, put_s = raw.call(Op.PUT, [b"x"] * len(batch), ns=ns,
                                  blocks=[[h, None] for h in batch], sizes=[1] * len(batch))
            stored += (put or {}).get("num_stored", 0)
        oversized, _ = raw.call(Op.PUT, [b"x"] * n, ns=ns, sizes=[1] * n,
                                blocks=[[h + b"+", None] for h in hashes])
        inv, inv_s = raw.call(Op.INVALIDATE, name=ns.name, below_epoch=None)
        return {"blocks": n, "stored": stored, "put": _answer(put, put_s),
                "oversized_put": _outcome(oversized),
                "dropped": (inv or {}).get("num_dropped"), "invalidate": _answer(inv, inv_s)}
    finally:
        raw.close()


def reserve_tiny(env: Env) -> dict[str, Any]:
    """RESERVE N one-byte blocks (in RESERVEs of the largest size served) and never finish them:
    the daemon reclaims them at the deadline."""
    n, ns, raw = env.scale.tiny_blocks, _ns(env, "reserve"), Raw(env)
    try:
        raw.hello()
        hashes = _hashes(env, "reserve", n)
        num, res, res_s = 0, None, 0.0
        for i in range(0, n, protocol.MAX_WRITE_ROWS):
            batch = hashes[i:i + protocol.MAX_WRITE_ROWS]
            res, res_s = raw.call(Op.RESERVE, ns=ns, token=raw.token,
                                  blocks=[[h, None, 1] for h in batch])
            num += sum(s is not None for s in (res or {}).get("slots") or [])
        time.sleep(env.reserve_s + 0.5)  # the reclaim runs now, between everyone's messages
        return {"blocks": n, "reserved": num, "reserve": _answer(res, res_s)}
    finally:
        raw.close()


# --- memory grows with what clients send -------------------------------------------------------
def empty_frames(env: Env) -> dict[str, Any]:
    """One PING carrying a very large number of empty frames."""
    n, raw = env.scale.empty_frames, Raw(env)
    try:
        start = time.monotonic()
        req_id = raw.send(Op.PING, [b""] * n)
        sent_s = time.monotonic() - start
        reply = raw.wait(req_id)
        return {"frames": n, "sent_s": round(sent_s, 3),
                **_answer(reply, time.monotonic() - start)}
    finally:
        raw.close()


def large_multipart(env: Env) -> dict[str, Any]:
    """One PING carrying large_frames frames of about CHUNK_BYTES (the per-frame limit)."""
    n, raw = env.scale.large_frames, Raw(env)
    frame = bytes(_LARGE_FRAME_BYTES)
    try:
        start = time.monotonic()
        req_id = raw.send(Op.PING, [frame] * n)
        reply = raw.wait(req_id)
        return {"frames": n, "bytes": n * len(frame), **_answer(reply, time.monotonic() - start)}
    finally:
        raw.close()


# --- one client takes the lease table ----------------------------------------------------------
def lease_flood(env: Env) -> dict[str, Any]:
    """Pipelined leased LOOKUPs of one stored block, each naming it lease_repeat times; the
    leases are held hold_s after the flood, then released (they would expire on their own)."""
    s, ns, raw = env.scale, _ns(env, "lease"), Raw(env)
    block_hash = _hashes(env, "lease", 1)[0]
    try:
        put, _ = raw.call(Op.PUT, [b"L" * 64], ns=ns, blocks=[[block_hash, None]], sizes=[64])
        start = time.monotonic()
        fields = {"ns": ns, "hashes": [block_hash] * s.lease_repeat, "lease_ms": _LEASE_MS}
        replies = _pipeline(raw, [(Op.LOOKUP, fields)] * s.leased_lookups, start + s.stall_cap_s)
        leases = [r["lease"] for r in replies if r.get("lease") is not None]
        took_s = time.monotonic() - start
        time.sleep(s.hold_s)  # every other client's gets and lookups meet a full lease table now
        released = _pipeline(raw, [(Op.RELEASE, {"lease": lease}) for lease in leases],
                             time.monotonic() + s.stall_cap_s)
        return {"lookups": s.leased_lookups, "answered": len(replies),
                "leases_granted": len(leases),
                "outcomes": dict(Counter(_outcome(r) for r in replies)),
                "released": sum(bool(r.get("released")) for r in released),
                "flood_s": round(took_s, 3), "put": _outcome(put)}
    finally:
        raw.close()


def _pipeline(raw: Raw, requests: list[tuple[Op, dict[str, Any]]],
              deadline: float) -> list[dict[str, Any]]:
    """Send requests with up to _PIPELINE in flight; the replies that came before deadline."""
    replies: list[dict[str, Any]] = []
    pending: set[int] = set()
    sent = 0
    while (sent < len(requests) or pending) and time.monotonic() < deadline:
        while sent < len(requests) and len(pending) < _PIPELINE:
            op, fields = requests[sent]
            pending.add(raw.send(op, **fields))
            sent += 1
        if not raw.sock.poll(int(max(0.0, deadline - time.monotonic()) * 1000), zmq.POLLIN):
            break
        reply = protocol.decode_header(raw.sock.recv_multipart()[0])
        pending.discard(reply.get("id"))
        replies.append(reply)
    return replies


# --- pins without a deadline -------------------------------------------------------------------
def unread_tcp_get(env: Env) -> dict[str, Any]:
    """Store 2 MiB blocks, GET them over TCP from a socket that never reads, for hold_s."""
    s, ns, raw = env.scale, _ns(env, "unread"), Raw(env)
    hashes = _hashes(env, "unread", s.unread_blocks)
    frame = bytes(_UNREAD_BLOCK_BYTES)
    reader = Raw(env, rcvhwm=1, rcvbuf=4096)
    try:
        stored = 0
        for i in range(0, len(hashes), 16):  # 32 MiB a message
            batch = hashes[i:i + 16]
            put, _ = raw.call(Op.PUT, [frame] * len(batch), ns=ns,
                              blocks=[[h, None] for h in batch],
                              sizes=[_UNREAD_BLOCK_BYTES] * len(batch))
            stored += (put or {}).get("num_stored", 0)
        for _ in range(4):
            reader.send(Op.GET, ns=ns, hashes=hashes, lease=None, shm=False)
        time.sleep(s.hold_s)
        return {"blocks": len(hashes), "stored": stored, "gets_unread": 4,
                "pinned_bytes_asked": 4 * stored * _UNREAD_BLOCK_BYTES}
    finally:
        reader.close()  # the pins must end with the connection
        raw.call(Op.INVALIDATE, name=ns.name, below_epoch=None)
        raw.close()


# --- writes that corrupt -----------------------------------------------------------------------
def foreign_commit_abort(env: Env) -> dict[str, Any]:
    """COMMIT and ABORT another connection's reservations, then of guessed honest writes."""
    s, ns = env.scale, _ns(env, "foreign")
    owner, other = Raw(env), Raw(env)
    try:
        owner.hello()
        other.hello()
        hashes = _hashes(env, "foreign", s.foreign_blocks)
        res, _ = owner.call(Op.RESERVE, ns=ns, token=owner.token,
                            blocks=[[h, None, BLOCK_SIZES[0]] for h in hashes])
        slots = (res or {}).get("slots") or [None] * len(hashes)
        rows = [[h, slot] for h, slot in zip(hashes, slots) if slot is not None]
        half = len(rows) // 2
        commit, _ = other.call(Op.COMMIT, ns=ns, blocks=rows[:half])
        abort, _ = other.call(Op.ABORT, ns=ns, blocks=rows[half:])
        # Blocks now readable although nobody wrote them (the slot's earlier bytes).
        got, _ = other.call(Op.LOOKUP, ns=ns, hashes=[h for h, _ in rows[:half]], lease_ms=0)
        owner.call(Op.ABORT, ns=ns, blocks=rows)  # the owner gives back what is still its own
        on_honest = _guess_honest(env, other, [slot for _, slot in rows])
        owner.call(Op.INVALIDATE, name=ns.name, below_epoch=None)
        return {"reserved": len(rows), "foreign_commits_accepted": (commit or {}).get("num_done"),
                "foreign_aborts_accepted": (abort or {}).get("num_done"),
                "foreign_answers": [_outcome(commit), _outcome(abort)],
                "unwritten_blocks_readable": (got or {}).get("num_hits"),
                "guessed_honest_accepted": on_honest}
    finally:
        owner.close()
        other.close()


def _guess_honest(env: Env, raw: Raw, slots: list[int]) -> int:
    """COMMIT/ABORT rows of honest hashes x slots just given back, where honest writes land next."""
    rng = random.Random(env.round)
    accepted = 0
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        chains = rng.sample(range(NUM_CHAINS), 4)
        hashes = [h for c in chains for h in chain_hashes(c)]
        rows = [[h, slot] for h in hashes for slot in slots][:protocol.MAX_WRITE_ROWS]
        for op in (Op.COMMIT, Op.ABORT):
            reply, _ = raw.call(op, ns=HONEST_NS, blocks=rows)
            accepted += (reply or {}).get("num_done", 0)
    return accepted


def stalled_writer(env: Env) -> dict[str, Any]:
    """Reserve slots of the honest sizes, stall past --reserve-timeout, then copy in anyway.

    No attacker is needed for this one: a vLLM worker stalled in its copy does the same.
    """
    s = env.scale
    ns = _ns(env, "slow")
    hashes = _hashes(env, "slow", s.late_blocks)
    sizes = [BLOCK_SIZES[i % len(BLOCK_SIZES)] for i in range(len(hashes))]
    client = Client(env.address, timeout_s=s.stall_cap_s, ctx=env.ctx, curve_dir=env.curve_dir)
    try:
        refs, num_full = client.reserve(ns, [(h, None, n) for h, n in zip(hashes, sizes)])
        held = [(h, r) for h, r in zip(hashes, refs) if r is not None]
        time.sleep(env.reserve_s + max(0.5, env.reserve_s))  # stalled: the daemon reclaims them
        assert client.pool is not None, "the stalled writer writes through shared memory"
        for _, ref in held:
            client.pool.view(ref.slot, ref.nbytes)[:] = tagged(LATE_TAG, ref.nbytes)
        committed = client.commit(ns, held) if held else 0
        time.sleep(1.0)  # honest readers read what landed
        return {"reserved": len(held), "full": num_full, "late_commits_accepted": committed}
    except (ServerUnavailable, ServerError) as exc:
        return {"error": str(exc)}
    finally:
        try:
            client.invalidate(ns.name)
        except KVStoreError:
            pass
        client.close()


# --- no tenant boundary ------------------------------------------------------------------------
def tenant(env: Env) -> dict[str, Any]:
    """Another tenant reads the honest namespace's hot chains, drops them (INVALIDATE names only
    a namespace) and stores foreign bytes under their hashes before the honest clients do."""
    client = Client(env.address, timeout_s=env.scale.stall_cap_s, ctx=env.ctx, use_shm=False,
                    curve_dir=env.curve_dir)
    refused: Counter[str] = Counter()
    out = {"chains": env.scale.tenant_chains, "foreign_blocks_read": 0,
           "foreign_blocks_dropped": 0, "foreign_blocks_written": 0}
    chains = [chain_hashes(c) for c in range(min(env.scale.tenant_chains, HOT_CHAINS))]
    steps: list[Callable[[], None]] = [
        *[lambda h=h: _count(out, "foreign_blocks_read", len(client.get(HONEST_NS, h)))
          for h in chains],
        lambda: _count(out, "foreign_blocks_dropped", client.invalidate(HONEST_NS.name)),
        *[lambda h=h: _count(out, "foreign_blocks_written", client.put(HONEST_NS, [
            (b, h[i - 1] if i else None, tagged(POISON_TAG, block_size(b)))
            for i, b in enumerate(h)]).num_stored) for h in chains],
    ]
    try:
        for step in steps:
            try:
                step()
            except ServerError as exc:
                refused[exc.code] += 1
        return {**out, "refused": dict(refused)}
    except ServerUnavailable as exc:
        return {**out, "error": str(exc), "refused": dict(refused)}
    finally:
        client.close()


def _count(out: dict[str, Any], key: str, n: int) -> None:
    out[key] += n


ATTACKS: dict[str, Callable[[Env], dict[str, Any]]] = {
    "invalidate_tiny": invalidate_tiny,
    "reserve_tiny": reserve_tiny,
    "empty_frames": empty_frames,
    "large_multipart": large_multipart,
    "lease_flood": lease_flood,
    "unread_tcp_get": unread_tcp_get,
    "foreign_commit_abort": foreign_commit_abort,
    "stalled_writer": stalled_writer,
    "tenant": tenant,
}


def responsive_after(env: Env, cap_s: float) -> float | None:
    """Seconds until a fresh connection's PING is answered; None past cap_s."""
    raw = Raw(env)
    try:
        start = time.monotonic()
        reply = raw.wait(raw.send(Op.PING), cap_s)
        return round(time.monotonic() - start, 4) if reply is not None else None
    finally:
        raw.close()

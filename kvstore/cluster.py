"""The cluster tier (issue 12): a LOOKUP running past the local pool's prefix asks the directory
(kvstore/directory.py) which peers hold the rest of the chain, and pulls those blocks from them
over the daemon's own TCP protocol (a kvstore Client GET), within the tier's deadline. The bytes
are received straight into local pool slots the loop reserves for them (kvstore/tiers.py
PoolWriter: one pass over each byte, from the socket into the slot), and committed, where the
Store's on_commit registers them: a hot prefix gains a copy on each node that uses it.

Runs on the tier's thread (TierLink); blocking here never blocks the server loop. Faults are
misses: Valkey down (no holders), a holder gone (its pull fails or gets no answer within
PULL_TIMEOUT_S: it is skipped for a while and its entries for the blocks asked are dropped), a
holder that evicted the blocks (a short answer: the entries of the blocks it lacks are dropped).
A pull that outlasts the LOOKUP's deadline is a miss for that LOOKUP; its blocks still land in
the pool, so the next LOOKUP of the prefix finds them locally. A pull that fails gives its slots
back: nothing half-received is ever readable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from kvstore.client import Client
from kvstore.directory import Directory, Member
from kvstore.keys import BlockHash, Namespace
from kvstore.tiers import Block, PoolWriter, Tier

log = logging.getLogger("kvstore.cluster")

SUSPECT_S = 5.0  # a holder whose pull failed is not asked for this long (its heartbeat TTL)
# Pulls that run side by side (TierLink worker threads): a holder that stalls holds up only the
# chains its worker is given (kvstore/tiers.py worker_of), not every LOOKUP past the pool.
CLUSTER_WORKERS = 4
MAX_PEER_CLIENTS = 64  # open connections to peers kept for the next pulls; LRU beyond
# Below this much time left, a pull is not started: it could not finish before the deadline.
MIN_PULL_S = 0.005
# A pull started in time may finish after its asker was answered (a miss then): its blocks still
# go into the pool, for the next LOOKUP of that prefix (a big prefix takes longer than a lookup
# budget to move). Past this, the holder is taken for gone (dead, stopped or cut off).
PULL_TIMEOUT_S = 2.0


class _NoSlots(Exception):
    """This daemon's loop gave a pull no pool slots in time (not the holder's fault)."""


@dataclass
class PullStats:
    """Written by the tier's worker threads (under ClusterTier's lock); read by STATS and the
    /metrics scrape."""

    num_asked: int = 0  # lookups continued past the local pool
    num_hits: int = 0  # of those, how many got at least one block from a peer
    num_blocks: int = 0  # blocks pulled from peers
    num_bytes: int = 0
    num_pulls: int = 0  # GETs sent to peers
    num_pull_failures: int = 0  # GETs that failed or ran out of time
    num_short_pulls: int = 0  # GETs answered with fewer blocks than the directory promised
    pull_seconds: float = 0.0


class ClusterTier(Tier):
    """Pulls blocks past the local pool from the peers the directory names."""

    def __init__(self, directory: Directory, timeout_s: float,
                 curve_dir: Path | None = None) -> None:
        self.directory, self.timeout_s, self.curve_dir = directory, timeout_s, curve_dir
        self.stats = PullStats()
        self._ctx = zmq.Context()
        # address -> an idle connected client, recent last. A pull takes one out (or makes one)
        # and puts it back when done: a socket is never used by two worker threads at once.
        self._clients: dict[str, Client] = {}
        self._suspect: dict[str, float] = {}  # daemon id -> skipped until
        self._lock = threading.Lock()  # guards _clients and stats

    def put(self, ns: Namespace, block: Block) -> None:
        """Evictions are not offered (the server unregisters them instead, no bytes copied)."""

    def get(self, ns: Namespace, hashes: Sequence[BlockHash], deadline_s: float | None = None,
            writer: PoolWriter | None = None) -> list[Block]:
        if writer is None:
            raise ValueError("the cluster tier receives into pool slots: give it a PoolWriter")
        if deadline_s is None:
            deadline_s = time.monotonic() + self.timeout_s
        self._count(num_asked=1)
        holders = self.directory.holders(ns, hashes)
        found: list[Block] = []
        tried: set[str] = set()
        while len(found) < len(holders):
            start = len(found)
            peer, run = self._pick(holders, start, tried)
            left_s = deadline_s - time.monotonic()
            if peer is None or left_s < MIN_PULL_S:
                break
            tried.add(peer.daemon_id)
            wanted = list(hashes[start:start + run])
            num = self._pull(peer, ns, wanted, max(left_s, PULL_TIMEOUT_S), writer)
            if num is None:
                continue  # that holder failed; another may hold the same blocks
            if num < run:
                self._count(num_short_pulls=1)
                self.directory.drop_holder(ns, wanted[num:], peer.daemon_id)
            found += [(h, None, None) for h in wanted[:num]]  # in the pool already: PoolWriter
        if found:
            self._count(num_hits=1, num_blocks=len(found))
        return found

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()
        self.directory.close()
        self._ctx.term()

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {"cluster": {
            **self.directory.snapshot(), "num_asked": s.num_asked, "num_hits": s.num_hits,
            "num_blocks_pulled": s.num_blocks, "bytes_pulled": s.num_bytes,
            "num_pulls": s.num_pulls, "num_pull_failures": s.num_pull_failures,
            "num_short_pulls": s.num_short_pulls, "pull_seconds": round(s.pull_seconds, 6)}}

    # --- helpers ---------------------------------------------------------------------------
    def _pick(self, holders: list[list[Member]], start: int,
              tried: set[str]) -> tuple[Member | None, int]:
        """The untried, unsuspected holder of holders[start] with the longest run from there."""
        now = time.monotonic()
        best, best_run = None, 0
        for member in holders[start]:
            if member.daemon_id in tried or self._suspect.get(member.daemon_id, 0.0) > now:
                continue
            run = 1
            while start + run < len(holders) and any(
                    m.daemon_id == member.daemon_id for m in holders[start + run]):
                run += 1
            if run > best_run:
                best, best_run = member, run
        return best, best_run

    def _pull(self, peer: Member, ns: Namespace, hashes: list[BlockHash], timeout_s: float,
              writer: PoolWriter) -> int | None:
        """How many blocks of the stored prefix of hashes on peer came into the pool, or None
        when the pull failed (peer suspected, its entries for hashes dropped, its connection
        closed). Each block is received straight into a pool slot reserved for it; one the pool
        holds already or has no room for is received into a sink and let go."""
        self._count(num_pulls=1)
        start = time.perf_counter()
        client = self._take_client(peer)
        client.timeout_s = timeout_s
        sizes: list[int] = []  # of the blocks placed so far, in chain order
        sink = bytearray()

        def place(reply_sizes: Sequence[int]) -> list[memoryview]:
            nonlocal sink
            rows = list(zip(hashes[len(sizes):], reply_sizes))
            try:
                views = writer.reserve(rows)
            except TimeoutError as exc:
                raise _NoSlots(str(exc)) from None
            if None in views and len(sink) < max(reply_sizes):
                sink = bytearray(max(reply_sizes))
            sizes.extend(reply_sizes)
            return [memoryview(sink)[:n] if v is None else v for v, n in zip(views, reply_sizes)]

        try:
            num = client.get_placed(ns, hashes, place)
        except _NoSlots as exc:  # this daemon's loop did not answer: not the peer's fault
            writer.abort()
            client.close()  # its reply was read, but the call stopped midway
            log.info("pull of %d blocks from %s: no pool slots (%s)", len(hashes),
                     peer.daemon_id, exc)
            return None
        except Exception as exc:  # unreachable, too slow, refused: a miss
            writer.abort()  # what it received is never read
            self._count(num_pull_failures=1)
            log.info("pull of %d blocks from %s (%s) failed: %s", len(hashes), peer.daemon_id,
                     peer.address, exc)
            self._suspect[peer.daemon_id] = time.monotonic() + SUSPECT_S
            self.directory.drop_holder(ns, hashes, peer.daemon_id)
            client.close()  # not put back: its socket may hold a late reply
            return None
        finally:
            self._count(pull_seconds=time.perf_counter() - start)
        writer.commit()  # the loop runs it before it answers the LOOKUP
        self._count(num_bytes=sum(sizes[:num]))
        self._put_client(peer, client)
        return num

    def _take_client(self, peer: Member) -> Client:
        """An idle client connected to peer, or a new one."""
        with self._lock:
            client = self._clients.pop(peer.address, None)
        if client is not None:
            return client
        client = Client(peer.address, self.timeout_s, ctx=self._ctx, use_shm=False,
                        curve_dir=self.curve_dir)
        if client._curve is not None and peer.curve_key:
            # Our client key, the server key the peer advertises in the directory: each node
            # may have its own (it must admit our client key in its clients/ directory).
            client._curve = (*client._curve[:2], peer.curve_key.encode())
        return client

    def _put_client(self, peer: Member, client: Client) -> None:
        """Keep client for the next pull from peer (one idle client per peer, MAX_PEER_CLIENTS
        peers, least recent out)."""
        extra: list[Client] = []
        with self._lock:
            if peer.address in self._clients:
                extra.append(client)  # another worker's is kept already
            else:
                self._clients[peer.address] = client  # most recent last
                while len(self._clients) > MAX_PEER_CLIENTS:
                    extra.append(self._clients.pop(next(iter(self._clients))))
        for old in extra:
            old.close()

    def _count(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)


def open_cluster(url: str, address: str, timeout_s: float,
                 curve_dir: Path | None) -> ClusterTier:
    """The cluster tier of `kvstore serve --cluster url`: this daemon joins the directory as
    address (with its CURVE server key when it has one) and pulls with the client keys in
    curve_dir when it holds them (`kvstore keygen` writes both)."""
    curve_key, client_keys = None, None
    if curve_dir is not None:
        from zmq.auth import load_certificate

        curve_key = load_certificate(curve_dir / "server.key")[0].decode()
        if (curve_dir / "client.key_secret").exists():
            client_keys = curve_dir
    # Valkey calls of a lookup must leave time for the pull within the same deadline.
    directory = Directory(url, address, curve_key, timeout_s=max(0.01, timeout_s / 2))
    return ClusterTier(directory, timeout_s, client_keys)

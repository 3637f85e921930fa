"""The cluster directory on a Valkey cluster (issue 12): which daemons hold which blocks, and which
daemons are alive and where. Bytes never go into Valkey: a peer pulls them from a holder over the
daemon protocol (kvstore/cluster.py); the directory costs a few bytes per block.

Keys (hex in keys: vLLM's hash bytes could hold a `{` that Valkey reads as a hash tag):
  kvs:b:<name>:<epoch>:<hash>  SET of daemon ids holding the block; TTL BLOCK_TTL_S, refreshed while
                            its holder lives (re-registered every REFRESH_S)
  kvs:m:<daemon id>         JSON {address, curve_key} of a live daemon; TTL MEMBER_TTL_S,
                            re-set every HEARTBEAT_S
  kvs:members               SET of daemon ids ever seen; ids whose kvs:m key is gone are removed

Liveness is per daemon, not per block: a holder whose heartbeat key expired is skipped and its
entries dropped when a lookup meets them, so a dead daemon's millions of entries need no sweep.

Threads: the server loop only appends to a queue (registered/unregistered, O(1), never blocks).
The directory's own thread writes batches, heartbeats and refreshes. holders() runs on the
caller's thread (the tier's). Each thread has its own Valkey client. Any Valkey fault is a miss,
logged once until Valkey answers again; commands are grouped per cluster node so a dead master
costs only the keys in its slots.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from kvstore.keys import BlockHash, Namespace

log = logging.getLogger("kvstore.directory")

BLOCK_TTL_S = 600  # an entry of a daemon gone without unregistering lasts at most this long
REFRESH_S = BLOCK_TTL_S / 4  # re-register held blocks well before their entries expire
MEMBER_TTL_S = 5  # a killed daemon is skipped by peers within this
HEARTBEAT_S = 1.0  # membership key re-set and the live members re-read this often
MAX_BATCH = 2048  # directory writes per pipeline: bounded work per round trip
# Events (registrations, removals) the loop queued and the thread has not written. Past it new
# ones are dropped (counted): a stalled Valkey must not grow the daemon; the refresh repairs adds.
MAX_QUEUED = 1_000_000
MAX_MISSING = 10_000  # holders remembered as seen without a membership key (bounded)
FIRST_WINDOW = 32  # blocks asked of the directory in a lookup's first round trip
NODE_BACKOFF_S = 2.0  # a Valkey node that failed is not asked again for this long (a miss)
CONNECT_BACKOFF_S = 1.0  # a cluster not reachable at all is retried this often

MEMBERS_KEY = "kvs:members"
FAILED: Any = type("Failed", (), {"__repr__": lambda self: "FAILED"})()  # a command without answer


def block_key(ns: Namespace, block_hash: BlockHash) -> str:
    return f"kvs:b:{ns.name.hex()}:{ns.epoch}:{bytes(block_hash).hex()}"


def member_key(daemon_id: str) -> str:
    return f"kvs:m:{daemon_id}"


def parse_url(url: str) -> list[tuple[str, int]]:
    """`valkey://host:port[,host:port...]` -> startup nodes; ValueError when malformed."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("valkey", "redis"):
        raise ValueError(f"expected valkey://HOST:PORT[,HOST:PORT...], got {url!r}")
    nodes = []
    for part in rest.split(","):
        parsed = urlparse(f"//{part.strip()}")
        if not parsed.hostname or parsed.port is None:
            raise ValueError(f"not a HOST:PORT: {part!r} in {url!r}")
        nodes.append((parsed.hostname, parsed.port))
    return nodes


@dataclass(frozen=True, slots=True)
class Member:
    """A live daemon: its id, the TCP address peers pull from, its CURVE public key (z85)."""

    daemon_id: str
    address: str
    curve_key: str | None = None

    def encode(self) -> str:
        return json.dumps({"address": self.address, "curve_key": self.curve_key})

    @classmethod
    def decode(cls, daemon_id: str, raw: bytes | str) -> Member | None:
        try:
            doc = json.loads(raw)
            address, curve_key = doc["address"], doc.get("curve_key")
        except (ValueError, KeyError, TypeError):
            return None  # not one of ours: treated as absent
        if not isinstance(address, str) or not (curve_key is None or isinstance(curve_key, str)):
            return None
        return cls(daemon_id, address, curve_key)


class Valkeys:
    """One thread's client of the Valkey cluster: the slot map read from any startup node that
    answers (CLUSTER SLOTS), a plain connection per node, commands pipelined per node. A node that
    fails is skipped for NODE_BACKOFF_S, so a dead master costs only the keys in its slots (no
    retries, no waiting on it: valkey-py's cluster client stops on one unreachable default node).
    run() never raises: a failed command's result is FAILED (a GET of no key is None)."""

    def __init__(self, nodes: list[tuple[str, int]], timeout_s: float,
                 on_state: Callable[[bool, str], None]) -> None:
        self.nodes, self.timeout_s, self.on_state = nodes, timeout_s, on_state
        self._slots: list[tuple[str, int]] | None = None  # slot -> its master
        self._conns: dict[tuple[str, int], Any] = {}
        self._next_connect_s = 0.0
        self._node_backoff: dict[tuple[str, int], float] = {}  # node -> not asked before then
        self._masters: list[tuple[str, int]] = []  # of the slot map
        self._run_ids: dict[tuple[str, int], str] = {}  # each master's process, last seen
        # Times a node (or the whole cluster) answered again after failing: its keys may be gone
        # (a restarted master is empty), so the directory's thread registers everything again.
        self.num_recoveries = 0
        self._is_lost = False  # no node could be reached: the slot map is to be read again

    def run(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Each command is (name, key, args...); results in order, FAILED where it failed."""
        from valkey.crc import key_slot

        results: list[Any] = [FAILED] * len(commands)
        slots = self._slot_map()
        if slots is None or not commands:
            return results
        by_node: dict[tuple[str, int], list[int]] = {}
        for i, command in enumerate(commands):
            key = command[1]
            by_node.setdefault(slots[key_slot(key.encode() if isinstance(key, str) else key)],
                               []).append(i)
        now, error = time.monotonic(), ""
        # Every node's pipeline is sent before any answer is read: the masters work at once, one
        # round trip in all rather than one per master (a long chain's keys span them all).
        sent: list[tuple[tuple[str, int], list[int], Any]] = []
        for node, indices in by_node.items():
            if self._node_backoff.get(node, 0.0) > now:
                continue  # failed lately: its keys are misses until the backoff ends
            try:
                sent.append((node, indices, self._send(node, [commands[i] for i in indices])))
            except Exception as exc:
                error = self._failed(node, exc)
        for node, indices, pipeline in sent:
            try:
                answers = self._receive(pipeline, [commands[i][0] for i in indices])
            except Exception as exc:
                error = self._failed(node, exc)
                continue
            for i, result in zip(indices, answers):
                if isinstance(result, Exception):
                    if _is_moved(result):
                        self._slots = None  # slots moved (failover, resharding): re-read
                    continue
                results[i] = result
            self._recovered(node)
        # Up once every node asked lately answered: a dead master is logged once, not per call.
        if error or self._node_backoff:
            self.on_state(False, error)
        else:
            self.on_state(True, "")
        return results

    def _send(self, node: tuple[str, int], commands: Sequence[tuple[Any, ...]]) -> Any:
        """Send commands to node as one pipeline (valkey-py's, less its wait for the answers);
        the (client, connection) to read them from with _receive()."""
        client = self._conn(node)
        conn = client.connection_pool.get_connection("pipeline")
        try:
            conn.send_packed_command(conn.pack_commands(commands))
        except BaseException:
            conn.disconnect()
            client.connection_pool.release(conn)
            raise
        return client, conn

    @staticmethod
    def _receive(pipeline: tuple[Any, Any], names: list[str]) -> list[Any]:
        """The answers to _send()'s commands of these names, in order; an error answer as its
        exception (MOVED among them), a broken connection raises."""
        from valkey.exceptions import ResponseError

        client, conn = pipeline
        answers: list[Any] = []
        try:
            for name in names:
                try:
                    answers.append(client.parse_response(conn, name))
                except ResponseError as exc:
                    answers.append(exc)
        except BaseException:
            conn.disconnect()  # answers left unread: it must not serve the next pipeline
            raise
        finally:
            client.connection_pool.release(conn)
        return answers

    def check(self) -> None:
        """Ask every master, those backing off too, for its run id: the directory's health
        (on_state) and its recoveries (num_recoveries: a node that answers again, or answers
        with a new run id, having restarted between two checks), even for nodes no recent
        command touched."""
        if self._slot_map() is None:
            return
        error = ""
        for node in self._masters:
            try:
                run_id = self._conn(node).info("server")["run_id"]
            except Exception as exc:
                error = self._failed(node, exc)
                continue
            self._recovered(node)
            if self._run_ids.setdefault(node, run_id) != run_id:
                self._run_ids[node] = run_id  # restarted between two checks: maybe empty
                self.num_recoveries += 1
        self.on_state(not error, error)

    def _recovered(self, node: tuple[str, int]) -> None:
        if self._node_backoff.pop(node, None) is not None:
            self.num_recoveries += 1

    def _failed(self, node: tuple[str, int], exc: Exception) -> str:
        self._node_backoff[node] = time.monotonic() + NODE_BACKOFF_S
        self._drop_conn(node)
        return f"node {node[0]}:{node[1]}: {exc}"

    def close(self) -> None:
        for node in list(self._conns):
            self._drop_conn(node)

    def _slot_map(self) -> list[tuple[str, int]] | None:
        if self._slots is not None:
            return self._slots
        now = time.monotonic()
        if now < self._next_connect_s:
            return None
        self._next_connect_s = now + CONNECT_BACKOFF_S
        error = "no startup node"
        for node in [*self.nodes, *self._conns]:
            try:
                ranges = self._conn(node).execute_command("CLUSTER", "SLOTS")
            except Exception as exc:
                self._drop_conn(node)
                error = f"{node[0]}:{node[1]}: {exc}"
                continue
            slots: list[tuple[str, int]] = [node] * NUM_SLOTS  # unassigned: any node says so
            for start, end, master, *_ in ranges:
                host = _text(master[0]) or node[0]
                slots[int(start):int(end) + 1] = [(host, int(master[1]))] * (int(end) - int(start) + 1)
            self._slots, self._masters = slots, sorted(set(slots))
            if self._is_lost:  # the cluster answers again after none of it did
                self._is_lost = False
                self.num_recoveries += 1
            return slots
        self._is_lost = True
        self.on_state(False, f"cannot reach any of {self.nodes}: {error}")
        return None

    def _conn(self, node: tuple[str, int]) -> Any:
        conn = self._conns.get(node)
        if conn is None:
            from valkey import Valkey
            from valkey.backoff import NoBackoff
            from valkey.retry import Retry

            conn = self._conns[node] = Valkey(
                node[0], node[1], socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s, retry=Retry(NoBackoff(), 0))
        return conn

    def _drop_conn(self, node: tuple[str, int]) -> None:
        conn = self._conns.pop(node, None)
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


NUM_SLOTS = 16384  # Valkey cluster's hash slots


def _is_moved(exc: Exception) -> bool:
    return type(exc).__name__ in ("MovedError", "AskError", "ClusterDownError", "TryAgainError")


@dataclass
class DirectoryStats:
    """Counts read by STATS and /metrics (plain ints, each written by one thread)."""

    num_registered: int = 0  # block entries written (adds and refreshes)
    num_unregistered: int = 0  # block entries removed because this daemon evicted the block
    num_dropped_stale: int = 0  # peers' entries removed: holder dead or without the block
    num_not_queued: int = 0  # events dropped: MAX_QUEUED were waiting for a stalled Valkey
    num_lookups: int = 0  # holders() calls
    num_lookup_failures: int = 0  # holders() calls Valkey did not (fully) answer
    lookup_seconds: list[float] = field(default_factory=list)  # recent latencies, bounded
    num_members: int = 0


class Directory:
    """This daemon's view of, and entries in, the cluster directory."""

    def __init__(self, url: str, address: str, curve_key: str | None = None,
                 timeout_s: float = 0.5, daemon_id: str | None = None) -> None:
        self.nodes = parse_url(url)
        self.me = Member(daemon_id or uuid.uuid4().hex[:16], address, curve_key)
        self.stats = DirectoryStats()
        self.on_latency: Callable[[float], None] | None = None  # the /metrics histogram, if served
        self.is_up = False
        self._is_down_logged = False
        self._state_lock = threading.Lock()
        self._events: deque[tuple[bool, Namespace, BlockHash]] = deque()  # (add?, ns, hash)
        self._drops: deque[tuple[str, str]] = deque()  # (key, daemon id) stale entries to remove
        self._wake = threading.Event()
        self._stopping = False
        self._members: dict[str, Member] = {}  # live peers (and me), replaced whole each heartbeat
        self._held: set[tuple[Namespace, BlockHash]] = set()  # what we registered (thread only)
        self._is_missing = False  # a registration failed: register all again once Valkey is up
        self._missing_since: dict[str, float] = {}  # holder id -> first seen without its key
        # The writer pings every node each heartbeat: it alone says up or down (the reader's
        # failures are counted, not logged), so the state does not flap between two views.
        self._writer = Valkeys(self.nodes, timeout_s, self._on_state)
        # Lookups come from the tier's worker threads: a reader (its own connections) each.
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._readers: list[Valkeys] = []
        self._readers_lock = threading.Lock()  # also guards the lookup counts in stats
        self._thread = threading.Thread(target=self._work, name="kvstore-directory", daemon=True)
        self._thread.start()

    # --- the loop's side (O(1), never blocks) -----------------------------------------------
    def registered(self, ns: Namespace, block_hash: BlockHash) -> None:
        """A block committed into the local pool (Store.on_commit)."""
        self._queue(True, ns, block_hash)

    def unregistered(self, ns: Namespace, block_hash: BlockHash) -> None:
        """A block gone from the local pool: evicted, invalidated or expired (Store.on_remove)."""
        self._queue(False, ns, block_hash)

    def _queue(self, is_add: bool, ns: Namespace, block_hash: BlockHash) -> None:
        if len(self._events) >= MAX_QUEUED:
            self.stats.num_not_queued += 1
            return
        self._events.append((is_add, ns, block_hash))
        if len(self._events) == 1:
            self._wake.set()

    # --- the tier's thread ------------------------------------------------------------------
    def holders(self, ns: Namespace, hashes: Sequence[BlockHash]) -> list[list[Member]]:
        """The live peers holding each of hashes, root first, up to the first block no live
        peer holds. The first FIRST_WINDOW blocks are asked first, the rest only when every one
        of those is held: most chains past a pool are held nowhere, and then one short round
        trip (per Valkey node) answers. Entries of dead daemons met on the way are queued for
        removal. Any fault: the blocks found before it."""
        start = time.perf_counter()
        out: list[list[Member]] = []
        window, is_failed = FIRST_WINDOW, False
        while len(out) < len(hashes):
            part = hashes[len(out):len(out) + window]
            found, is_part_failed = self._holders_of(ns, part)
            out += found
            is_failed |= is_part_failed
            if len(found) < len(part):
                break
            window = len(hashes)
        self._observe(time.perf_counter() - start, is_failed)
        return out

    def _holders_of(self, ns: Namespace,
                    hashes: Sequence[BlockHash]) -> tuple[list[list[Member]], bool]:
        """holders() of one window: one pipelined round trip per Valkey node (one more only for
        holders not seen at the last heartbeat), and whether Valkey failed to answer."""
        keys = [block_key(ns, h) for h in hashes]
        reader = self._reader()
        sets = reader.run([("SMEMBERS", key) for key in keys])
        is_failed = any(s is FAILED for s in sets)
        ids = [set() if s is FAILED else {_text(x) for x in s} for s in sets]
        members = self._members
        unknown = sorted({i for s in ids for i in s} - members.keys() - {self.me.daemon_id})
        dead: set[str] = set()
        if unknown:  # joined since the last heartbeat, or dead: ask their membership keys
            raw = reader.run([("GET", member_key(i)) for i in unknown])
            members = dict(members)
            now = time.monotonic()
            for daemon_id, value in zip(unknown, raw):
                member = None if value is None or value is FAILED else Member.decode(daemon_id,
                                                                                     value)
                if member is not None:
                    members[daemon_id] = member
                    self._missing_since.pop(daemon_id, None)
                elif value is None and self._is_dead(daemon_id, now):
                    dead.add(daemon_id)
        out: list[list[Member]] = []
        for key, s in zip(keys, ids):
            live = [members[i] for i in sorted(s) if i in members and i != self.me.daemon_id]
            for daemon_id in s & dead:
                self.drop(key, daemon_id)
            if not live:
                break
            out.append(live)
        return out, is_failed

    def _is_dead(self, daemon_id: str, now: float) -> bool:
        """Whether a holder without a membership key has been so for longer than a live one
        could be: a key lost with a restarted or failed-over Valkey node is set again by its
        daemon's next heartbeat, and its entries must not be dropped meanwhile."""
        if len(self._missing_since) > MAX_MISSING:
            self._missing_since.clear()  # bounded; forgetting only delays a drop
        return now - self._missing_since.setdefault(daemon_id, now) > MEMBER_TTL_S

    def drop(self, key: str, daemon_id: str) -> None:
        """Remove a stale entry (a dead holder, or one that no longer has the block): queued for
        the directory's thread, never waited on."""
        if len(self._drops) < MAX_QUEUED:
            self._drops.append((key, daemon_id))
            self._wake.set()

    def drop_holder(self, ns: Namespace, hashes: Sequence[BlockHash], daemon_id: str) -> None:
        for block_hash in hashes:
            self.drop(block_key(ns, block_hash), daemon_id)

    def members(self) -> dict[str, Member]:
        return dict(self._members)

    def snapshot(self) -> dict[str, Any]:
        """The directory's counts for STATS (cluster.py adds the pulls')."""
        s = self.stats
        latencies = sorted(s.lookup_seconds)
        p50 = latencies[len(latencies) // 2] if latencies else 0.0
        return {"daemon_id": self.me.daemon_id, "address": self.me.address, "is_up": self.is_up,
                "num_members": s.num_members, "num_held": len(self._held),
                "num_registered": s.num_registered, "num_unregistered": s.num_unregistered,
                "num_dropped_stale": s.num_dropped_stale, "num_not_queued": s.num_not_queued,
                "num_lookups": s.num_lookups, "num_lookup_failures": s.num_lookup_failures,
                "num_recoveries": self._writer.num_recoveries,
                "lookup_p50_ms": round(p50 * 1000, 3)}

    def close(self) -> None:
        """Stop the thread; the membership key is deleted so peers stop pulling from us now
        (our block entries are then stale: dropped when met, or expired)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=2.0)
        with self._readers_lock:
            for reader in self._readers:
                reader.close()

    # --- the directory's thread -------------------------------------------------------------
    def _work(self) -> None:
        next_heartbeat_s = next_refresh_s = 0.0
        refresh: list[tuple[Namespace, BlockHash]] = []
        num_recoveries = 0
        while not self._stopping:
            self._wake.wait(HEARTBEAT_S / 2)
            self._wake.clear()
            try:
                now = time.monotonic()
                if now >= next_heartbeat_s:
                    next_heartbeat_s = now + HEARTBEAT_S
                    self._writer.check()
                    self._heartbeat()
                self._write_events()
                if (self._writer.num_recoveries != num_recoveries
                        or (self._is_missing and self.is_up and not refresh)):
                    # Entries a node lost (it came back empty) or never took (it was down, or
                    # not serving yet): register everything again now, not at the next refresh.
                    log.info("registering %d held blocks again (a Valkey node came back, or "
                             "some registrations failed)", len(self._held))
                    num_recoveries = self._writer.num_recoveries
                    self._is_missing = False
                    next_refresh_s = now
                if now >= next_refresh_s:
                    next_refresh_s = now + REFRESH_S
                    refresh = list(self._held)
                if refresh:  # a batch per wake: refreshes never delay new registrations long
                    batch, refresh = refresh[:MAX_BATCH], refresh[MAX_BATCH:]
                    self._add([(ns, h) for ns, h in batch if (ns, h) in self._held])
            except Exception:  # a bug here must not stop heartbeats for good
                log.exception("directory thread")
        self._writer.run([("DEL", member_key(self.me.daemon_id))])
        self._writer.close()

    def _heartbeat(self) -> None:
        me = self.me
        self._writer.run([("SET", member_key(me.daemon_id), me.encode(), "EX", MEMBER_TTL_S),
                          ("SADD", MEMBERS_KEY, me.daemon_id)])
        ids = self._writer.run([("SMEMBERS", MEMBERS_KEY)])[0]
        if ids is FAILED:
            return  # keep the last view: a holder that died is caught by a failed pull
        ids = sorted({*(_text(i) for i in ids), *self._members})
        raw = self._writer.run([("GET", member_key(i)) for i in ids])
        members: dict[str, Member] = {}
        gone = []
        for daemon_id, value in zip(ids, raw):
            if value is FAILED:  # its node did not answer: as last seen
                if daemon_id in self._members:
                    members[daemon_id] = self._members[daemon_id]
                continue
            member = Member.decode(daemon_id, value) if value is not None else None
            if member is not None:
                members[daemon_id] = member
            else:
                gone.append(daemon_id)
        if gone:
            self._writer.run([("SREM", MEMBERS_KEY, *gone)])
        self._members = members
        self.stats.num_members = len(members)

    def _write_events(self) -> None:
        while self._events or self._drops:
            adds: list[tuple[Namespace, BlockHash]] = []
            commands: list[tuple[Any, ...]] = []
            while self._events and len(adds) + len(commands) < MAX_BATCH:
                is_add, ns, block_hash = self._events.popleft()
                if is_add:
                    self._held.add((ns, block_hash))
                    adds.append((ns, block_hash))
                elif (ns, block_hash) in self._held:
                    self._held.discard((ns, block_hash))
                    commands.append(("SREM", block_key(ns, block_hash), self.me.daemon_id))
            num_removed = len(commands)
            while self._drops and len(commands) < MAX_BATCH:
                key, daemon_id = self._drops.popleft()
                commands.append(("SREM", key, daemon_id))
            results = self._writer.run(commands)
            self.stats.num_unregistered += sum(r is not FAILED for r in results[:num_removed])
            self.stats.num_dropped_stale += sum(r is not FAILED and r > 0
                                                for r in results[num_removed:])
            self._add(adds)

    def _add(self, blocks: list[tuple[Namespace, BlockHash]]) -> None:
        commands: list[tuple[Any, ...]] = []
        for ns, block_hash in blocks:
            key = block_key(ns, block_hash)
            commands += [("SADD", key, self.me.daemon_id), ("EXPIRE", key, BLOCK_TTL_S)]
        if commands:
            results = self._writer.run(commands)
            num_done = sum(r is not FAILED for r in results[::2])
            self.stats.num_registered += num_done
            self._is_missing |= num_done < len(blocks)

    def _on_state(self, is_up: bool, error: str) -> None:
        with self._state_lock:
            if is_up and not self.is_up:
                if self._is_down_logged:
                    log.warning("cluster directory reachable again")
                self._is_down_logged = False
            elif not is_up and error and not self._is_down_logged:
                log.warning("cluster directory unreachable (%s): lookups past the local pool "
                            "are misses until it answers", error)
                self._is_down_logged = True
            self.is_up = is_up

    def _reader(self) -> Valkeys:
        """The calling thread's reader (made on its first lookup)."""
        reader: Valkeys | None = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = Valkeys(self.nodes, self._timeout_s, lambda *_: None)
            with self._readers_lock:
                self._readers.append(reader)
        return reader

    def _observe(self, seconds: float, is_failed: bool) -> None:
        with self._readers_lock:
            self.stats.num_lookups += 1
            self.stats.num_lookup_failures += is_failed
            latencies = self.stats.lookup_seconds
            latencies.append(seconds)
            if len(latencies) > 1024:
                del latencies[:512]
        if self.on_latency is not None:
            self.on_latency(seconds)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

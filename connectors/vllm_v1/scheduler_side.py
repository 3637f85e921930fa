"""Scheduler-side half of the connector: decides what to load and save. Never touches tensors.

Runs in vLLM's EngineCore process. Daemon calls go through one background thread, so the
scheduler waits at most lookup_wait_ms per attempt; when a lookup is slower it answers "ask me
again" (None), and after lookup_timeout_ms it reports a miss and vLLM recomputes. That thread
never connects itself: a keeper (keeper.py) says HELLO when the connector starts and after every
daemon restart, and hands it a connected client. With tensor parallelism each rank stores its
own shard under its own namespace, and a block is claimed only when every rank holds it: one
LOOKUP per rank, pipelined in one round trip, and the shortest prefix wins. It also counts
prompt tokens per tier (stats.py) and, with vLLM's KV events on, tells routers what the pool
holds (events.py).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

from kvstore.client import Client
from kvstore.errors import KVStoreError
from kvstore.keys import Namespace

from connectors.common import Breaker
from connectors.vllm_v1.config import ConnectorConfig
from connectors.vllm_v1.events import BlockInfo, PoolEvents, block_info
from connectors.vllm_v1.keeper import Keeper, swap
from connectors.vllm_v1.metadata import KVStoreMetadata, KVStoreWorkerMeta, LoadSpec, SaveSpec
from connectors.vllm_v1.stats import KVStoreStats

log = logging.getLogger("kvstore.connector")

# Planned saves remembered until the worker confirms them (for events); the worker answers in the
# step's own output, so only a lost output leaves entries behind, and the oldest go first.
_MAX_UNCONFIRMED_BLOCKS = 1 << 14
# Loads offered to one request: one, plus one after each preemption that followed a whole load,
# up to this many in all (a request preempted over and over still ends up recomputing).
_MAX_LOADS_PER_REQUEST = 4


@dataclass(slots=True, frozen=True)
class _Claim:
    """A lookup's answer over every rank: the prefix all of them hold, and each rank's lease."""

    num_hits: int
    leases: list[int | None]
    # Per rank, with use_shm: (offset, nbytes) of each hit in the segment of token.
    slots: list[list[tuple[int, int]] | None] = field(default_factory=list)
    token: bytes | None = None
    # The segment of token is mapped on this host (the scheduler's client attached it): the
    # workers beside this scheduler can copy the slots.
    is_local: bool = False


@dataclass(slots=True)
class _ReqState:
    request: Any  # vllm.v1.request.Request
    start_block: int  # first block after vLLM's own (VRAM) prefix-cache hit
    lookup: Future[_Claim] | None
    deadline_s: float  # give the lookup up after this
    num_hit_blocks: int = 0
    leases: list[int | None] | None = None  # per rank, held until the load goes to the workers
    claim: _Claim | None = None  # the lookup's answer (its slots go to the workers)
    pool_blocks: tuple[int, int] = (0, 0)  # [start, end) blocks loaded from the pool
    num_saved_blocks: int = 0  # blocks [0, n) already handed to the worker for saving
    is_load_issued: bool = False  # a load was handed to the worker for this lookup
    is_load_whole: bool = False  # ... and it filled every block it was given
    is_load_in_step: bool = False  # ... copied in the step that prefills the request
    num_loads: int = 0  # loads issued for this request so far, across preemptions
    load_block_ids: list[int] | None = None  # vLLM blocks the load fills, until it finishes
    num_loaded_blocks: int = 0  # of load_block_ids, the good prefix (failures reported so far)
    end_block: int = 0  # the lookup asked about blocks [start_block, end_block)
    num_prefill_tokens: int = 0  # tokens to prefill when the lookup was made
    num_vram_tokens: int = 0  # of those, vLLM's own prefix cache held these


class SchedulerSide:
    def __init__(self, config: ConnectorConfig, ns: Namespace, block_size: int,
                 events: PoolEvents | None = None,
                 rank_namespaces: list[Namespace] | None = None, *,
                 load_in_step: bool = False) -> None:
        self.config = config
        # A hit whose slots every rank's worker can copy straight from the segment is loaded in
        # the step that prefills it (a CPU engine: worker_side.py); others load in the background.
        self.load_in_step = load_in_step
        self.ns = ns  # rank 0's: the one KV events and save confirmations speak of
        # Every tensor-parallel rank's namespace, rank 0 first (just ns without TP).
        self.rank_namespaces = list(rank_namespaces) if rank_namespaces else [ns]
        assert self.rank_namespaces[0] == ns, "rank 0's namespace comes first"
        self.block_size = block_size
        self.events = events  # None unless vLLM publishes KV cache events
        self._stats = KVStoreStats()
        self._unconfirmed: OrderedDict[bytes, BlockInfo] = OrderedDict()  # saves, for events
        self._reqs: dict[str, _ReqState] = {}
        self._loads: list[LoadSpec] = []
        self._breaker = Breaker(config.retry_interval_ms / 1000)
        # One thread owns the daemon socket (clients are not thread-safe).
        self._calls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-sched")
        self._lookup_client: Client | None = None  # the calls thread's
        # Connects and says HELLO now, in the background: vLLM's startup never waits for it.
        # The lookup client maps the segment when it can (address space only, no page is
        # touched): whether it could tells if the slots a lookup answers are on this host.
        self._keeper = Keeper(self._make_client, {"lookup": config.use_shm},
                              config.timeout_ms / 1000)
        self._keeper.start()
        self._num_generations_seen = 0
        # Start the calls thread now and let it take the keeper's first connected client.
        self._calls.submit(self._warm_up)

    # --- vLLM hooks --------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._reqs.get(request.request_id)
        # Asked again after a load: vLLM only does that when the load failed (it recomputes from
        # the last good block) or when it preempted the request and freed its blocks. Never
        # offer again after a failure: on a broken daemon that could loop forever.
        if st is not None and st.is_load_issued and (
                not st.is_load_whole or st.num_loads >= _MAX_LOADS_PER_REQUEST):
            return 0, False
        start_block = num_computed_tokens // self.block_size
        # A new lookup for a new start, and after a preemption (the old lease was consumed).
        if st is None or st.is_load_issued or st.start_block != start_block:
            num_loads = 0
            if st is not None:
                num_loads = st.num_loads
                self._release(st)
            st = self._start_lookup(request, start_block, num_computed_tokens)
            st.num_loads = num_loads
            self._reqs[request.request_id] = st
        if st.lookup is not None and not self._resolve(st):
            return None, False  # still waiting; the scheduler asks again next step
        tokens = st.num_hit_blocks * self.block_size
        return tokens, tokens > 0 and not self._loads_in_step(st)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens == 0:
            self._release(st)  # not chosen (or the second call after a finished load)
            return
        num_blocks = num_external_tokens // self.block_size
        start, end = st.start_block, st.start_block + num_blocks
        block_ids = blocks.get_block_ids()[0][start:end]
        hashes = [bytes(h) for h in request.block_hashes[start:end]]
        claim = st.claim
        slots = [None if s is None else s[:num_blocks] for s in claim.slots] if claim else []
        in_step = self._loads_in_step(st)
        self._loads.append(LoadSpec(request.request_id, hashes, list(block_ids),
                                    list(st.leases or []), slots, claim.token if claim else None,
                                    in_step))
        st.is_load_in_step = in_step
        st.claim = None
        st.leases = None  # each rank's worker releases its own after copying
        st.pool_blocks = (start, end)
        st.is_load_issued = True
        st.num_loads += 1
        st.load_block_ids = list(block_ids)
        st.num_loaded_blocks = len(block_ids)

    def build_connector_meta(self, scheduler_output: Any) -> KVStoreMetadata:
        meta = KVStoreMetadata(loads=self._loads, saves=self._saves(scheduler_output))
        self._loads = []
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        """Count only the blocks a finished load really filled (vLLM recomputes the rest)."""
        worker_meta = connector_output.kv_connector_worker_meta
        if isinstance(worker_meta, KVStoreWorkerMeta):
            self._confirm_saves(worker_meta)
            # In-step loads finish in the step that carried them: the worker says how many
            # leading blocks each filled (every rank's least), and nothing comes as finished.
            for req_id, num_loaded in worker_meta.loaded.items():
                st = self._reqs.get(req_id)
                if st is not None and st.load_block_ids is not None and st.is_load_in_step:
                    st.num_loaded_blocks = min(st.num_loaded_blocks, num_loaded)
                    self._settle(st)
        invalid = connector_output.invalid_block_ids
        if invalid:
            # With TP > 1 a rank may report its failed blocks steps before the last rank
            # finishes, so failures are noted on every pending load, not only finished ones.
            for pending in self._reqs.values():
                if pending.load_block_ids is not None:
                    pending.num_loaded_blocks = min(pending.num_loaded_blocks, next(
                        (i for i, b in enumerate(pending.load_block_ids) if b in invalid),
                        len(pending.load_block_ids)))
        for req_id in connector_output.finished_recving or ():
            st = self._reqs.get(req_id)
            if st is not None and st.load_block_ids is not None:
                self._settle(st)

    def _settle(self, st: _ReqState) -> None:
        """st's load has finished: what came from the pool is its good leading blocks."""
        assert st.load_block_ids is not None
        start, _ = st.pool_blocks
        st.pool_blocks = (start, start + st.num_loaded_blocks)
        st.is_load_whole = st.num_loaded_blocks == len(st.load_block_ids)
        st.load_block_ids = None

    def request_finished(self, request: Any) -> tuple[bool, dict[str, Any] | None]:
        st = self._reqs.pop(request.request_id, None)
        if st is None:
            return False, None
        self._release(st)
        start, end = st.pool_blocks
        pool = (end - start) * self.block_size
        recomputed = max(0, st.num_prefill_tokens - st.num_vram_tokens - pool)
        self._stats.add(num_requests=1, vram_tokens=st.num_vram_tokens, pool_tokens=pool,
                        recomputed_tokens=recomputed)
        return False, {"kvstore_pool_tokens": pool, "kvstore_vram_tokens": st.num_vram_tokens,
                       "kvstore_recomputed_tokens": recomputed,
                       "kvstore_num_loads": st.num_loads}

    def take_stats(self) -> KVStoreStats | None:
        """The counters since the last call, or None when nothing happened."""
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, KVStoreStats()
        return stats

    def take_events(self) -> list[Any]:
        return self.events.take() if self.events is not None else []

    def shutdown(self) -> None:
        self._keeper.stop()
        self._calls.shutdown(wait=False, cancel_futures=True)

    @property
    def is_connected(self) -> bool:
        """Whether the daemon answered the keeper's last HELLO."""
        return self._keeper.is_up

    # --- lookups -----------------------------------------------------------------------------
    def _start_lookup(self, request: Any, start_block: int, num_computed_tokens: int) -> _ReqState:
        # Never claim the whole prompt: vLLM must compute at least one token itself.
        end_block = min((request.num_tokens - 1) // self.block_size, len(request.block_hashes))
        now = time.monotonic()
        deadline_s = now + self.config.lookup_timeout_ms / 1000
        if not self._keeper.is_first_try_done:
            # The first HELLO is still on its way (a request right after startup): the lookup
            # waits for it, and the time it takes is not the lookup's.
            deadline_s += self.config.timeout_ms / 1000
        st = _ReqState(request, start_block, None, deadline_s,
                       end_block=end_block, num_prefill_tokens=request.num_tokens,
                       num_vram_tokens=num_computed_tokens)
        if self._keeper.num_generations != self._num_generations_seen:
            # A daemon (re)started and answers: no need to wait out a pause from its downtime.
            self._num_generations_seen = self._keeper.num_generations
            self._breaker.close()
        if end_block <= start_block or self._breaker.is_open():
            return st
        if self._keeper.is_first_try_done and not self._keeper.is_up:
            return st  # the daemon did not answer the keeper's last HELLO: a miss at no cost
        hashes = [bytes(h) for h in request.block_hashes[start_block:end_block]]
        st.lookup = self._calls.submit(self._lookup_call, hashes)
        self._stats.add(num_lookups=1)
        return st

    def _resolve(self, st: _ReqState) -> bool:
        """Settle st's lookup if it has finished or run out of time; False while still pending."""
        assert st.lookup is not None
        # vLLM's whole step waits here: counted, as is each pass the request sits out.
        start = time.perf_counter()
        wait_futures([st.lookup], timeout=self.config.lookup_wait_ms / 1000)
        self._stats.add(lookup_wait_s=time.perf_counter() - start)
        if not st.lookup.done():
            if time.monotonic() < st.deadline_s:
                self._stats.add(num_lookup_waits=1)
                return False
            st.lookup.add_done_callback(self._release_late)  # give a late lease back
            log.warning("kvstore lookup slower than %d ms: treating as a miss",
                        self.config.lookup_timeout_ms)
            self._breaker.failure()
            self._keeper.poke()
            self._stats.add(num_failed_lookups=1)
        else:
            try:
                claim = st.lookup.result()
                st.num_hit_blocks, st.leases, st.claim = claim.num_hits, claim.leases, claim
                self._breaker.success()
                self._learn_from_lookup(st)
            except KVStoreError as exc:
                log.warning("kvstore lookup failed (%s): treating as a miss", exc)
                self._breaker.failure()
                self._keeper.poke()
                self._stats.add(num_failed_lookups=1)
        st.lookup = None
        return True

    def _loads_in_step(self, st: _ReqState) -> bool:
        """Whether st's hit is copied in the step that prefills it: on a CPU engine, when every
        rank's lookup answered slots in a segment mapped on this host; the worker then calls
        the daemon only to release, and a load it cannot do is recomputed in that step. A
        daemon on another host answers slots too, but there they are loaded in the background
        (by GET)."""
        claim = st.claim
        return (self.load_in_step and claim is not None and claim.is_local
                and bool(claim.slots) and all(s is not None for s in claim.slots))

    def _warm_up(self) -> None:
        self._keeper.wait_first_try(self.config.timeout_ms / 1000)
        self._client()

    def _lookup_call(self, hashes: list[bytes]) -> _Claim:
        self._keeper.wait_first_try(self.config.timeout_ms / 1000)
        client = self._client()
        # Same host (use_shm): the answer carries where the hits lie, so each worker copies and
        # releases, with no GET (a load in two round trips; the worker checks the segment).
        with_slots = self.config.use_shm and self.config.lease_ms > 0
        if len(self.rank_namespaces) == 1:
            results = [client.lookup(self.ns, hashes, lease_ms=self.config.lease_ms,
                                     with_slots=with_slots)]
        else:
            results = client.lookup_many([(ns, hashes) for ns in self.rank_namespaces],
                                         lease_ms=self.config.lease_ms, with_slots=with_slots)
        slots = [None if r.slots is None or r.sizes is None else list(zip(r.slots, r.sizes))
                 for r in results]
        token = results[0].token
        return _Claim(min(r.num_hits for r in results), [r.lease for r in results],
                      slots if with_slots else [], token, client.maps(token))

    def _release(self, st: _ReqState) -> None:
        if st.lookup is not None:
            st.lookup.add_done_callback(self._release_late)
            st.lookup = None
        for lease in st.leases or ():
            if lease is not None:
                self._calls.submit(self._release_call, lease)
        st.leases = None

    def _release_late(self, fut: Future[_Claim]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        for lease in fut.result().leases:
            if lease is not None:
                try:
                    self._calls.submit(self._release_call, lease)
                except RuntimeError:  # shut down meanwhile: the lease expires on its own
                    return

    def _release_call(self, lease: int) -> None:
        try:
            self._client().release(lease)
        except KVStoreError:
            pass  # leases expire on their own

    def _client(self) -> Client:
        """The calls thread's client: the keeper's newest connected one, else one of its own."""
        client = swap(self._keeper, "lookup", self._lookup_client)
        if client is None:
            client = self._make_client(self.config.use_shm)  # connects on its first call
        self._lookup_client = client
        return client

    def _make_client(self, use_shm: bool = False) -> Client:
        return Client(self.config.address, self.config.timeout_ms / 1000,
                      curve_dir=self.config.curve_keys, use_shm=use_shm)

    # --- saves -------------------------------------------------------------------------------
    def _saves(self, scheduler_output: Any) -> list[SaveSpec]:
        """Blocks that become full this step and did not come from the pool."""
        block_state = scheduler_output.kv_connector_block_state
        if not self.config.save or block_state is None:
            return []
        saves = []
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            st = self._reqs.get(req_id)
            if st is None:
                continue
            request = st.request
            num_full = min((request.num_computed_tokens + num_scheduled) // self.block_size,
                           len(request.block_hashes))
            pool_start, pool_end = st.pool_blocks
            # Blocks loaded from the pool are there already; blocks from vLLM's own cache may not
            # be (evicted), and the daemon skips the ones it holds without any copy.
            indices = [i for i in range(st.num_saved_blocks, num_full)
                       if not pool_start <= i < pool_end]
            table = block_state.get_block_ids(req_id) if indices else None
            if table is None:
                continue
            hashes = request.block_hashes
            if self.events is not None:
                self._remember_saves(request, indices)
            saves.append(SaveSpec(
                req_id,
                [bytes(hashes[i]) for i in indices],
                [bytes(hashes[i - 1]) if i > 0 else None for i in indices],
                [table[0][i] for i in indices]))
            st.num_saved_blocks = num_full
        return saves

    # --- what the pool holds, for KV events ------------------------------------------------------
    def _learn_from_lookup(self, st: _ReqState) -> None:
        """A lookup says blocks [start, start + hits) are pooled and the rest of what it asked
        about is not: announce the first, retract the second if announced (evicted or dropped)."""
        if self.events is None:
            return
        request, num_hits = st.request, st.num_hit_blocks
        hashes = [bytes(h) for h in request.block_hashes[st.start_block:st.end_block]]
        new = [(h, block_info(request, st.start_block + i, self.block_size))
               for i, h in enumerate(hashes[:num_hits]) if not self.events.touch(h)]
        self._stats.add(announced_blocks=self.events.stored(new),
                        retracted_blocks=self.events.removed(hashes[num_hits:]))

    def _remember_saves(self, request: Any, indices: list[int]) -> None:
        for i in indices:
            block_hash = bytes(request.block_hashes[i])
            self._unconfirmed[block_hash] = block_info(request, i, self.block_size)
        while len(self._unconfirmed) > _MAX_UNCONFIRMED_BLOCKS:
            self._unconfirmed.popitem(last=False)

    def _confirm_saves(self, meta: KVStoreWorkerMeta) -> None:
        """Announce the blocks the worker confirmed in the pool; forget the ones it dropped."""
        for block_hash in meta.dropped:
            self._unconfirmed.pop(block_hash, None)
        if self.events is None:
            return
        saved = [(h, info) for h in meta.saved
                 if (info := self._unconfirmed.pop(h, None)) is not None]
        self._stats.add(announced_blocks=self.events.stored(saved))

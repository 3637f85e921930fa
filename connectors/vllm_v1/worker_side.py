"""Worker-side half of the connector: the only code that copies KV tensors.

On a CPU engine a same-host load runs inside the step that prefills the request (vLLM's
synchronous load): in start_load_kv, before the forward pass, vLLM's worker thread copies the
slots the lookup answered and releases the lease; blocks it could not fill are reported failed in
the same step, and vLLM recomputes them. That spares the two step ends a background load waits
for (bench.ttft). Other loads (CUDA, another host, background_loads) run on a background thread,
and vLLM schedules the request again only after get_finished reports it; on a CPU engine that
thread offers a same-host copy to vLLM's worker thread, which runs it in its next get_finished
(handoff.py). Each load is bounded by load_timeout_ms; whatever happens, every load is reported
finished, with the blocks it could not fill reported as failed so vLLM recomputes them. Saves
run in wait_for_save, after the forward pass has filled the blocks: reserve slots, copy, commit.
It counts what it moves (stats.py) and, for KV events, tells the scheduler which saves landed.
Both threads get connected clients from a keeper (keeper.py) that says HELLO when the connector
starts and again after a daemon restart, so neither pays for connecting inside a request. With
tensor parallelism each rank moves its own shard, in its own namespace, under its own lease.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from kvstore.client import Client, SlotRef
from kvstore.errors import KVStoreError
from kvstore.keys import Namespace, SlotId

from connectors.vllm_v1.blocks import SCATTER_BATCH, PagedKV
from connectors.common import Breaker
from connectors.vllm_v1.config import ConnectorConfig
from connectors.vllm_v1.handoff import Handoff
from connectors.vllm_v1.keeper import Keeper, swap
from connectors.vllm_v1.metadata import KVStoreMetadata, KVStoreWorkerMeta, LoadSpec, SaveSpec
from connectors.vllm_v1.stats import KVStoreStats

log = logging.getLogger("kvstore.connector")

# One TCP GET or PUT moves at most this much: at ~1 GB/s over loopback that is ~30 ms, far inside
# a call's timeout, and a dead daemon is noticed after one batch, not after a whole prefix.
_TCP_BATCH_BYTES = 32 * 1024 * 1024
# A CPU engine's same-host copy waits this long for vLLM's worker thread to run it (handoff.py):
# while a request waits for its KV, that thread calls get_finished every millisecond or two.
_HANDOFF_WAIT_S = 0.02
# After running a copy there, it waits at most this long for the load's RELEASE (~0.5 ms).
_REPORT_WAIT_S = 0.005


class WorkerSide:
    def __init__(self, config: ConnectorConfig, ns: Namespace, block_size: int, *,
                 rank: int = 0, is_first_rank: bool = True, report_saves: bool = False) -> None:
        self.config = config
        self.ns = ns  # this rank's
        self.rank = rank  # TP rank (with PP: pp_rank * tp + tp_rank): which lease of a load is ours
        self.block_size = block_size
        # Token counts come from one rank only (every rank moves its own slice of each block);
        # so do save confirmations, matching the scheduler's lookups in rank 0's namespace.
        self.is_first_rank = is_first_rank
        self.report_saves = report_saves and is_first_rank
        self._stats = KVStoreStats()
        self._stats_lock = threading.Lock()  # the loader thread adds to it too
        self._worker_meta = KVStoreWorkerMeta()
        self.kv: PagedKV | None = None
        # What vLLM registered, to retake the views after sleep mode (restore_kv_caches); the
        # loader holds the lock while it copies, so sleep waits for an in-flight load to end.
        self._kv_caches: dict[str, torch.Tensor] | None = None
        self._kv_lock = threading.Lock()
        self._jobs: queue.Queue[LoadSpec | None] = queue.Queue()
        self._done: queue.Queue[tuple[str, list[int]]] = queue.Queue()
        self._handoff = Handoff()  # a CPU engine's load copies, offered to vLLM's worker thread
        self._failed_block_ids: set[int] = set()
        # vLLM's worker thread's client, for saves and in-step loads; the loader thread takes it
        # once at startup (to map the pool early), hence the lock.
        self._step_client: Client | None = None
        self._step_lock = threading.Lock()
        self._loads_in_step = False  # set when vLLM registers its KV cache (a CPU engine)
        self._save_breaker = Breaker(config.retry_interval_ms / 1000)
        self._loader = threading.Thread(target=self._load_loop, name="kvstore-load", daemon=True)
        self._registered: set[int] = set()  # data_ptrs registered as page-locked (CUDA)
        # (client, segment token) -> the segment as int8; a restarted daemon has a new token
        self._pool_tensors: dict[tuple[int, bytes], torch.Tensor] = {}
        self._pool_lock = threading.Lock()
        # Connects and says HELLO now, in the background: vLLM's startup never waits for it.
        slots = {"load": config.use_shm, "save": config.use_shm}
        self._keeper = Keeper(self._new_client_for, slots, config.timeout_ms / 1000).start()
        self._num_generations_seen = 0

    # --- vLLM hooks --------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        try:
            self.kv = PagedKV(kv_caches)
        except ValueError as exc:
            log.error("kvstore connector disabled: %s", exc)  # vLLM recomputes everything
            return
        self._kv_caches = kv_caches
        # The scheduler half makes the same choice (connector.py): same-host hits load in-step.
        self._loads_in_step = self.kv.device.type == "cpu" and not self.config.background_loads
        log.info("kvstore: %d KV layers, %d bytes per block, namespace %s",
                 len(self.kv.layers), self.kv.block_bytes, self.ns.name.hex())
        self._loader.start()

    def unregister_kv_caches(self) -> None:
        """vLLM's sleep mode (0.33+) is about to unmap the KV cache's device memory: drop the
        views so nothing copies to or from it while asleep. Loads asked for meanwhile are
        reported failed (vLLM recomputes), saves are skipped. The pool's segment and its
        cudaHostRegister are host memory, not the KV cache, and stay as they are. Idempotent."""
        with self._kv_lock:  # an in-flight load (bounded by load_timeout_ms) finishes first
            if self.kv is not None:
                self.kv = None
                log.info("kvstore: KV cache released for vLLM sleep mode; no loads or saves "
                         "until it is restored")

    def restore_kv_caches(self) -> None:
        """vLLM woke up with the KV cache at the same addresses: retake the views. Idempotent."""
        with self._kv_lock:
            if self.kv is None and self._kv_caches is not None:
                self.kv = PagedKV(self._kv_caches)
                log.info("kvstore: KV cache restored after vLLM sleep mode")

    def start_load(self, meta: KVStoreMetadata) -> None:
        for spec in meta.loads:
            if spec.in_step:
                self._load_in_step(spec)
            elif self.kv is None or not self._loader.is_alive():
                self._done.put((spec.req_id, list(spec.block_ids)))
            else:
                self._jobs.put(spec)

    def save(self, meta: KVStoreMetadata) -> None:
        if not meta.saves:
            return
        hashes = [h for s in meta.saves for h in s.hashes]
        saved: list[bytes] = []
        if self._keeper.num_generations != self._num_generations_seen:
            # A daemon (re)started and answers: no need to wait out a pause from its downtime.
            self._num_generations_seen = self._keeper.num_generations
            self._save_breaker.close()
        if self.kv is None or self._save_breaker.is_open():
            self._add_stats(num_failed_saves=1)
        else:
            start = time.perf_counter()
            try:
                saved, num_written = self._save(meta.saves)
                self._save_breaker.success()
                self._add_stats(saved_blocks=num_written, save_s=time.perf_counter() - start,
                                save_bytes=num_written * self.kv.block_bytes)
            except (KVStoreError, OSError) as exc:
                # Best effort: a lost save is a future miss. Skip the daemon for a while.
                log.warning("kvstore save skipped (%s)", exc)
                self._save_breaker.failure()
                self._keeper.poke()
                self._add_stats(num_failed_saves=1)
        if self.report_saves:
            landed = set(saved)
            self._worker_meta.saved.extend(saved)
            self._worker_meta.dropped.extend(h for h in hashes if h not in landed)

    def get_finished(self) -> set[str]:
        # vLLM's worker thread: run the copies the loader offered; after one, give the loader a
        # moment to release its lease and report, so the load finishes in this step, not the next.
        wait_s = _REPORT_WAIT_S if self._handoff.serve() else 0.0
        finished: set[str] = set()
        while True:
            try:
                req_id, failed = self._done.get(timeout=wait_s or None, block=wait_s > 0)
            except queue.Empty:
                return finished
            wait_s = 0.0
            finished.add(req_id)
            self._failed_block_ids.update(failed)

    def take_failed_block_ids(self) -> set[int]:
        failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    def take_stats(self) -> KVStoreStats | None:
        """The counters since the last call, or None when nothing moved."""
        with self._stats_lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, KVStoreStats()
            return stats

    def take_worker_meta(self) -> KVStoreWorkerMeta | None:
        """Which of this step's planned saves the pool now holds and what its in-step loads
        filled, or None when there was neither."""
        meta = self._worker_meta
        if meta.is_empty():
            return None
        self._worker_meta = KVStoreWorkerMeta()
        return meta

    def shutdown(self) -> None:
        self._keeper.stop()
        self._jobs.put(None)
        if self._step_client is not None:
            self._step_client.close()

    # --- loads (background thread) -------------------------------------------------------------
    def _load_loop(self) -> None:
        client = self._map_pool_early()
        while (spec := self._jobs.get()) is not None:
            # The keeper's newest connected client; one of our own only if it has none yet.
            client = swap(self._keeper, "load", client, self._forget_pool) or self._new_client()
            with self._kv_lock:  # sleep mode's unregister_kv_caches waits for this load
                self._load_one(client, spec)
        if client is not None:
            client.close()

    def _map_pool_early(self) -> Client | None:
        """On a CPU engine, map the pool (and start faulting its pages in) when the connector
        starts, not in the first load: the first pool hits after a start otherwise shared
        their core with a prefault of the whole segment (bench.ttft: 0.13-0.43 s against
        0.07 s for a 1k-token hit). The mapping is that of the client that loads: the step
        client's for in-step loads, else this thread's (returned). Under CUDA the mapping is
        cudaHostRegister'ed at the first load, as before."""
        if (not self.config.use_shm or self.kv is None or self.kv.device.type != "cpu"
                or not self._keeper.wait_first_try(self.config.timeout_ms / 1000)):
            return None
        if self._loads_in_step:
            with self._step_lock:  # only if vLLM's thread has no client yet: never one in use
                if self._step_client is None:
                    self._step_client = self._keeper.take("save")
                    if self._step_client is not None and self._step_client.pool is not None:
                        self._pool_of(self._step_client)
            return None
        client = swap(self._keeper, "load", None, self._forget_pool)
        if client is not None and client.pool is not None:
            self._pool_of(client)
        return client

    def _load_one(self, client: Client, spec: LoadSpec) -> None:
        """Load one request's blocks; whatever happens, report it finished."""
        if self.kv is None:  # released for sleep mode after the load was queued
            self._done.put((spec.req_id, list(spec.block_ids)))
            return
        num_loaded = 0
        if self.config.fault_load_delay_ms:
            time.sleep(self.config.fault_load_delay_ms / 1000)
        start = time.perf_counter()
        try:
            num_loaded = self._load(client, spec)
        except Exception as exc:  # anything: report and let vLLM recompute
            log.warning("kvstore load of %s failed (%s): recomputing", spec.req_id, exc)
            self._keeper.poke()
        else:
            if num_loaded < len(spec.block_ids):
                # A warning: the lookup promised these blocks; vLLM now recomputes them.
                log.warning("kvstore: %s loaded %d of %d blocks; recomputing the rest",
                            spec.req_id, num_loaded, len(spec.block_ids))
        # Counted before it is reported finished, so the step that sees it sees its stats;
        # is_local, not has_shm(): counting must never call a daemon that may be gone.
        self._count_load(spec, num_loaded, time.perf_counter() - start, client.is_local)
        self._done.put((spec.req_id, spec.block_ids[num_loaded:]))

    def _count_load(self, spec: LoadSpec, num_loaded: int, seconds: float, is_shm: bool) -> None:
        assert self.kv is not None
        num_failed = len(spec.block_ids) - num_loaded
        counts: dict[str, float] = {"num_loads": 1, "load_s": seconds,
                                    "load_bytes": num_loaded * self.kv.block_bytes}
        if self.is_first_rank:
            transport = "loaded_tokens_shm" if is_shm else "loaded_tokens_tcp"
            counts.update({transport: num_loaded * self.block_size,
                           "num_failed_loads": int(num_failed > 0),
                           "failed_load_tokens": num_failed * self.block_size})
        self._add_stats(**counts)

    def _load(self, client: Client, spec: LoadSpec) -> int:
        """Fill spec's blocks from the pool; returns how many leading blocks are now valid."""
        assert self.kv is not None
        deadline = time.monotonic() + self.config.load_timeout_ms / 1000
        # NOTE: the one transport choice left outside kvstore/client.py, with the save's below
        # (issue 11, item 4). Same host, the blocks go straight from the pool tensor (page-locked
        # for DMA under CUDA) into the KV pages, under the slots the LOOKUP already answered (no
        # GET: two round trips); Client.reading() would hand out memoryviews after its own GET.
        # Another host reads in staging batches of _TCP_BATCH_BYTES, each inside a call's timeout.
        if client.has_shm():
            found = self._found_refs(client, spec)
            if found is not None:
                # The lookup said where the blocks lie: copy, then release (two round trips in
                # all). A lease that ended before the release may have let a slot be reused
                # under the copy: then read again below, under a fresh pin.
                pool = self._pool_of(client)
                num = self._copy(lambda: self._scatter_refs(pool, found, spec.block_ids, deadline))
                _sync(self.kv.device)  # copies must land before the lease lets the slots go
                lease = self._lease(spec)
                assert lease is not None, "slots come with a lease"
                if client.release(lease):
                    return num
                log.info("kvstore: the lease of %s ended during its copy: reading it again",
                         spec.req_id)
            with client.pinned(self.ns, spec.hashes, self._lease(spec)) as refs:
                # Only now: the call may have re-attached a restarted daemon's new segment.
                pool = self._pool_of(client)
                num = self._scatter_refs(pool, refs, spec.block_ids, deadline)
                _sync(self.kv.device)  # copies must land before the lease lets the slots go
            return num
        return self._load_tcp(client, spec, deadline)

    # --- in-step loads (vLLM's worker thread, before the forward pass) --------------------------
    def _load_in_step(self, spec: LoadSpec) -> None:
        """Copy spec's blocks now, from the slots its lookup answered, and release the lease;
        the blocks not filled are reported failed in this very step (vLLM recomputes them)."""
        num_loaded = 0
        if self.kv is None:  # released for sleep mode
            log.warning("kvstore: load of %s while the KV cache is released: recomputing",
                        spec.req_id)
        else:
            is_local = False
            if self.config.fault_load_delay_ms:  # the step waits: a test's fault, never a default
                time.sleep(self.config.fault_load_delay_ms / 1000)
            start = time.perf_counter()
            try:
                client = self._take_step_client()
                num_loaded = self._copy_and_release(client, spec)
                is_local = client.is_local  # after: a first HELLO may have mapped the segment
            except Exception as exc:  # anything: report and let vLLM recompute
                log.warning("kvstore load of %s failed (%s): recomputing", spec.req_id, exc)
                self._keeper.poke()
            if num_loaded < len(spec.block_ids):
                log.warning("kvstore: %s loaded %d of %d blocks; recomputing the rest",
                            spec.req_id, num_loaded, len(spec.block_ids))
            self._count_load(spec, num_loaded, time.perf_counter() - start, is_local)
        self._failed_block_ids.update(spec.block_ids[num_loaded:])
        self._worker_meta.loaded[spec.req_id] = num_loaded

    def _copy_and_release(self, client: Client, spec: LoadSpec) -> int:
        """Copy the lookup's slots into spec's blocks, then RELEASE: the number of leading
        blocks filled, or 0 when the slots cannot be trusted. Unlike a background load this
        never reads again: the forward pass is waiting, and a recompute needs no daemon."""
        assert self.kv is not None
        lease = self._lease(spec)
        found = self._found_refs(client, spec)
        if (found is None and lease is not None and spec.token is not None
                and not client.maps(spec.token)):
            # This client still knows the segment of a daemon that has restarted since (the
            # keeper has not handed out a new client yet): one HELLO attaches the new one.
            self._forget_pool(client)
            client.connect()
            found = self._found_refs(client, spec)
        if found is None or lease is None:
            # Still another segment (the lookup's daemon is gone too) or no slots for this rank.
            log.info("kvstore: the slots of %s are not in this worker's segment: recomputing",
                     spec.req_id)
            return 0
        deadline = time.monotonic() + self.config.load_timeout_ms / 1000
        num = self._scatter_refs(self._pool_of(client), found, spec.block_ids, deadline)
        if not client.release(lease):
            # The lease ended before the release: a slot may have taken other bytes under the
            # copy. Nothing of it is trusted; vLLM recomputes these blocks.
            log.info("kvstore: the lease of %s ended during its copy: recomputing", spec.req_id)
            return 0
        return num

    def _take_step_client(self) -> Client:
        """The client of vLLM's worker thread (saves, in-step loads): the keeper's newest
        connected one, else one of its own that connects on its first call."""
        with self._step_lock:
            client = swap(self._keeper, "save", self._step_client, self._forget_pool)
            if client is None:
                client = self._new_client()
            client.timeout_s = self.config.save_timeout_ms / 1000  # calls inside vLLM's step
            self._step_client = client
            return client

    def _copy(self, scatter: Callable[[], int]) -> int:
        """Run a same-host load's scatter: on a CPU engine preferably on vLLM's worker thread
        (handoff.py); under CUDA here, where each copy only queues a DMA."""
        assert self.kv is not None
        if self.kv.device.type == "cpu":
            return self._handoff.run(scatter, _HANDOFF_WAIT_S)
        return scatter()

    def _load_tcp(self, client: Client, spec: LoadSpec, deadline: float) -> int:
        """Another host: read the prefix in GETs of about _TCP_BATCH_BYTES, each well inside
        one call's timeout, checking the request's deadline between them."""
        assert self.kv is not None
        per_batch, staging = self._staging(len(spec.hashes))
        rows = [row.numpy() for row in staging]
        num = 0
        try:
            while num < len(spec.hashes) and time.monotonic() < deadline:
                hashes = spec.hashes[num:num + per_batch]
                got = client.get_into(self.ns, hashes, rows, self._lease(spec))
                self.kv.scatter_many(spec.block_ids[num:num + got], list(staging[:got]))
                _sync(self.kv.device)  # staging is reused by the next batch
                num += got
                if got < len(hashes):
                    break
        except KVStoreError as exc:
            log.warning("kvstore load of %s stopped after %d blocks (%s)", spec.req_id, num, exc)
        if self._lease(spec) is not None:
            try:
                client.release(self._lease(spec))
            except KVStoreError:
                pass  # it expires on its own
        return num

    def _scatter_refs(self, pool: torch.Tensor, refs: list[SlotRef], block_ids: list[int],
                      deadline: float) -> int:
        assert self.kv is not None
        # Up to the first block of a wrong size, in batches of one torch call each, the deadline
        # checked between them.
        end = min(len(refs), len(block_ids))
        bad = next((i for i, ref in enumerate(refs[:end]) if ref.nbytes != self.kv.block_bytes),
                   None)
        if bad is not None:
            log.error("kvstore: pooled block of %d bytes, expected %d: namespace clash?",
                      refs[bad].nbytes, self.kv.block_bytes)
            end = bad
        num = 0
        while num < end and time.monotonic() <= deadline:
            batch = refs[num:min(end, num + SCATTER_BATCH)]
            self.kv.scatter_many(block_ids[num:num + len(batch)],
                                 [pool[ref.slot:ref.slot + ref.nbytes] for ref in batch])
            num += len(batch)
        return num

    # --- saves (vLLM's worker thread) ------------------------------------------------------------
    def _save(self, saves: list[SaveSpec]) -> tuple[list[bytes], int]:
        """Store the blocks of saves; returns the hashes the pool is known to hold afterwards
        (written now, or already there) and how many blocks were written."""
        assert self.kv is not None
        client = self._take_step_client()
        hashes = [h for s in saves for h in s.hashes]
        parents = [p for s in saves for p in s.parents]
        block_ids = [b for s in saves for b in s.block_ids]
        # NOTE: kept apart from the transport, unlike Client.writing()'s callers: same host, the
        # KV pages are gathered straight into the reserved slots as pool tensors (page-locked for
        # DMA under CUDA); another host reuses one staging buffer of _TCP_BATCH_BYTES per PUT,
        # where writing() would allocate a buffer per block for the whole save at once.
        if client.has_shm():
            # Reserve -> gather into the slots -> commit; an error gives the slots back.
            with client.writing(self.ns, [(h, p, self.kv.block_bytes)
                                          for h, p in zip(hashes, parents)]) as w:
                # Only now: the reserve may have re-attached a restarted daemon's new segment.
                pool = self._pool_of(client)
                for block_id, ref in zip(block_ids, w.refs):
                    if ref is not None:
                        self.kv.gather(block_id, pool[ref.slot:ref.slot + ref.nbytes])
                _sync(self.kv.device)  # the copies land before COMMIT makes them readable
            written = [(h, r) for h, r in zip(hashes, w.refs) if r is not None]
            return _landed_shm(hashes, w.refs, w.num_full, written, w.num_done), w.num_done
        # Another host: gather into a staging buffer and send it as frames, in PUTs of about
        # _TCP_BATCH_BYTES so each one fits a call's timeout.
        per_batch, staging = self._staging(len(block_ids))
        landed: list[bytes] = []
        num_written = 0
        for start in range(0, len(block_ids), per_batch):
            batch = range(start, min(start + per_batch, len(block_ids)))
            for row, i in zip(staging, batch):
                self.kv.gather(block_ids[i], row)
            _sync(self.kv.device)
            result = client.put(self.ns, [(hashes[i], parents[i], row.numpy())
                                          for row, i in zip(staging, batch)])
            num_written += result.num_stored
            if result.num_full == 0:  # else which ones were refused is unknown: claim none
                landed.extend(hashes[i] for i in batch)
        return landed, num_written

    # --- helpers -----------------------------------------------------------------------------
    def _add_stats(self, **counts: float) -> None:
        with self._stats_lock:
            self._stats.add(**counts)

    def _staging(self, num_blocks: int) -> tuple[int, torch.Tensor]:
        """Blocks per TCP batch, and a staging buffer of that many blocks (fewer if num_blocks)."""
        assert self.kv is not None
        per_batch = max(1, _TCP_BATCH_BYTES // self.kv.block_bytes)
        rows = min(per_batch, num_blocks)
        return per_batch, torch.empty((rows, self.kv.block_bytes), dtype=torch.int8)

    def _new_client(self, timeout_ms: int | None = None) -> Client:
        return Client(self.config.address, (timeout_ms or self.config.timeout_ms) / 1000,
                      curve_dir=self.config.curve_keys, use_shm=self.config.use_shm)

    def _new_client_for(self, use_shm: bool) -> Client:
        """The keeper's clients: connected with timeout_ms, then given each slot's own timeout."""
        return Client(self.config.address, self.config.timeout_ms / 1000,
                      curve_dir=self.config.curve_keys, use_shm=use_shm)

    def _found_refs(self, client: Client, spec: LoadSpec) -> list[SlotRef] | None:
        """The slots the lookup found for this rank, when they lie in client's segment."""
        slots = spec.slots[self.rank] if self.rank < len(spec.slots) else None
        if slots is None or self._lease(spec) is None or not client.maps(spec.token):
            return None  # no slots asked, or another daemon (restarted) or host: GET them
        return [SlotRef(SlotId(offset), nbytes) for offset, nbytes in slots[:len(spec.hashes)]]

    def _lease(self, spec: LoadSpec) -> int | None:
        return spec.leases[self.rank] if self.rank < len(spec.leases) else None

    def _forget_pool(self, client: Client) -> None:
        """client is being replaced: drop our view of its segment so the mapping can go."""
        self._pool_tensors = {k: v for k, v in self._pool_tensors.items() if k[0] != id(client)}

    def _pool_of(self, client: Client) -> torch.Tensor:
        """The client's mapped segment as an int8 tensor (page-locked for DMA under CUDA)."""
        assert client.pool is not None
        with self._pool_lock:  # vLLM's worker thread and the loader both come here
            return self._pool_tensor(client)

    def _pool_tensor(self, client: Client) -> torch.Tensor:
        assert client.pool is not None
        key = (id(client), client.pool.token)
        tensor = self._pool_tensors.get(key)
        if tensor is None:
            # Drop this client's view of a previous segment so its mapping can be unmapped.
            self._pool_tensors = {k: v for k, v in self._pool_tensors.items() if k[0] != id(client)}
            tensor = torch.frombuffer(client.pool.buffer, dtype=torch.int8)
            self._pool_tensors[key] = tensor
            if self.kv is not None and self.kv.device.type == "cuda":
                _register_host_memory(tensor, self._registered)  # which maps every page too
            else:
                # The CPU engine copies straight from this mapping, whose pages this process
                # has never touched: fault them all in now, on a thread, rather than ~4,000 read
                # faults inside each 4k-token load (~12 ms of its 254 MiB copy, bench.ttft).
                client.pool.prefault_in_background()
        return tensor


def _landed_shm(hashes: list[bytes], refs: list[SlotRef | None], num_full: int,
                written: list[tuple[bytes, SlotRef]], num_done: int) -> list[bytes]:
    """The hashes a reserve-and-commit left in the pool (in chain order), as far as the replies
    tell: a short commit or a full pool leave some unknown, and unknown means not claimed."""
    landed = {h for h, _ in written} if num_done == len(written) else set()
    if num_full == 0:  # every refused reservation was a block already stored
        landed.update(h for h, ref in zip(hashes, refs) if ref is None)
    return [h for h in hashes if h in landed]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _register_host_memory(tensor: torch.Tensor, registered: set[int]) -> None:
    """cudaHostRegister the mapped segment once, so GPU copies to slots are DMA, not staged."""
    ptr = tensor.data_ptr()
    if ptr in registered:
        return
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(ptr, tensor.numel(), 0)
    if int(err) != 0:
        log.warning("kvstore: cudaHostRegister of the pool failed (%s); copies will be staged", err)
        return
    registered.add(ptr)

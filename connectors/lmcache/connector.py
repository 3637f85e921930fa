"""LMCache's RemoteConnector over the kvstore daemon, and the adapter LMCache's plugin loader builds.

LMCache awaits the async methods on its storage event loop. Every daemon call runs on this
connector's own threads, so the loop never blocks, and every daemon failure (down, slow,
restarted, full) reaches LMCache as a miss: exists False, get None, a put dropped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import lmcache
import torch
import zmq
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_management import MemoryFormat, MemoryObj
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.connector import ConnectorAdapter, ConnectorContext
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

from connectors.lmcache.chunks import ChunkError, chunk_hash, load_chunks, store_chunks
from connectors.lmcache.config import PluginConfig, chunk_identity
from connectors.common import Breaker
from kvstore.client import Client
from kvstore.errors import KVStoreError, ServerUnavailable
from kvstore.keys import Namespace, namespace_digest, with_tenant

logger = logging.getLogger(__name__)

PLUGIN_TYPE = "kvstore"  # plugin names "kvstore" or "kvstore.<instance>" load this adapter
_NUM_THREADS = 2  # so a put in flight never holds a lookup or a load up behind it
_MAX_REMEMBERED_KEYS = 65_536  # keys list() can report; bounded so nothing grows with traffic
_MAX_LEASES = 1024  # pinned lookups awaiting their load; the daemon expires forgotten ones
_SYNC_SLACK_S = 1.0  # scheduling slack over the calls' own deadlines for the sync methods
_PING_FAILED = 1  # LMCache's ping() error code; 0 means healthy

T = TypeVar("T")


class KVStoreConnector(RemoteConnector):
    """LMCache chunks kept in a kvstore daemon, under a namespace of their own."""

    def __init__(self, loop: asyncio.AbstractEventLoop, local_cpu_backend: LocalCPUBackend,
                 config: LMCacheEngineConfig, metadata: LMCacheMetadata,
                 settings: PluginConfig) -> None:
        super().__init__(config, metadata)
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        self.settings = settings
        identity = chunk_identity(lmcache.__version__, config, metadata, settings)
        self.ns = Namespace(with_tenant(settings.tenant, namespace_digest(identity)), settings.epoch)
        self._ctx = zmq.Context()  # private, so close() can prove every socket is gone
        self._executor = ThreadPoolExecutor(_NUM_THREADS, thread_name_prefix="kvstore-lmcache")
        self._local = threading.local()  # a Client per thread: Client is not thread-safe
        self._lock = threading.Lock()  # guards everything below
        self._clients: list[Client] = []
        self._breaker = Breaker(settings.retry_interval_ms / 1000)
        self._is_failing = False
        self._is_closed = False
        self._leases: OrderedDict[str, int] = OrderedDict()  # lookup id -> daemon lease
        self._stored: OrderedDict[bytes, str] = OrderedDict()  # block hash -> key, for list()
        # One operation makes at most three calls (HELLO, the call, RELEASE), each bounded.
        self._sync_wait_s = 3 * settings.timeout_ms / 1000 + _SYNC_SLACK_S
        logger.info("kvstore LMCache plugin: daemon %s, namespace %s epoch %d",
                    settings.address, self.ns.name.hex(), self.ns.epoch)

    # --- lookups ---------------------------------------------------------------------------
    async def exists(self, key: CacheEngineKey) -> bool:
        return await self._run(lambda c: self._count(c, [key]) == 1, False)

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return self._run_sync(lambda c: self._count(c, [key]) == 1, False)

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: list[CacheEngineKey]) -> int:
        """How many of keys are stored as a consecutive prefix (blocking)."""
        return self._run_sync(lambda c: self._count(c, keys), 0)

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(self, lookup_id: str, keys: list[CacheEngineKey],
                                     pin: bool = False) -> int:
        """The stored prefix of keys; with pin, held in the daemon until this lookup's load."""
        if not pin:
            return await self._run(lambda c: self._count(c, keys), 0)
        return await self._run(lambda c: self._count_pinned(c, lookup_id, keys), 0)

    def _count(self, client: Client, keys: list[CacheEngineKey]) -> int:
        return client.lookup(self.ns, [chunk_hash(k) for k in keys]).num_hits

    def _count_pinned(self, client: Client, lookup_id: str, keys: list[CacheEngineKey]) -> int:
        result = client.lookup(self.ns, [chunk_hash(k) for k in keys], self.settings.lease_ms)
        if result.lease is not None:
            with self._lock:
                self._leases[lookup_id] = result.lease
                while len(self._leases) > _MAX_LEASES:
                    self._leases.popitem(last=False)
        return result.num_hits

    # --- loads -----------------------------------------------------------------------------
    async def get(self, key: CacheEngineKey) -> MemoryObj | None:
        loaded = await self._load([key], None)
        return loaded[0] if loaded else None

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: list[CacheEngineKey]) -> list[MemoryObj | None]:
        """The stored prefix of keys, then None for the rest (LMCache's chunks form a chain)."""
        loaded: list[MemoryObj | None] = list(await self._load(keys, None))
        return loaded + [None] * (len(keys) - len(loaded))

    def support_batched_get_non_blocking(self) -> bool:
        return True

    async def batched_get_non_blocking(self, lookup_id: str,
                                       keys: list[CacheEngineKey]) -> list[MemoryObj]:
        """The stored prefix of keys, read under the lease of this lookup's pinned contains."""
        with self._lock:
            lease = self._leases.pop(lookup_id, None)
        return await self._load(keys, lease)

    async def _load(self, keys: list[CacheEngineKey], lease: int | None) -> list[MemoryObj]:
        hashes = [chunk_hash(k) for k in keys]
        none: list[MemoryObj] = []
        future = self._submit(lambda c: load_chunks(c, self.ns, hashes, self._allocate, lease),
                              none)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # LMCache gave up waiting (blocking_timeout_secs): free what arrives after all.
            future.add_done_callback(_free_loaded)
            raise

    def _allocate(self, shapes: list[torch.Size], dtypes: list[torch.dtype],
                  fmt: MemoryFormat) -> MemoryObj | None:
        # busy_loop=False: a full LMCache buffer must not hold a daemon thread forever; the
        # chunk is reported missing instead.
        return self.local_cpu_backend.allocate(shapes, dtypes, fmt, busy_loop=False)

    # --- stores ----------------------------------------------------------------------------
    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        await self.batched_put([key], [memory_obj])

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: list[CacheEngineKey], memory_objs: list[MemoryObj]) -> None:
        """Store chunks; the caller (LMCache's instrumented wrapper) drops its references after."""
        hashes = [chunk_hash(k) for k in keys]
        # LMCache stores one request's new chunks per call, in order: each names the one before
        # as its parent, so the daemon evicts a prompt's tail before the prefix it hangs from.
        chunks = [(h, hashes[i - 1] if i else None, obj)
                  for i, (h, obj) in enumerate(zip(hashes, memory_objs))]
        stored = await self._run(lambda c: store_chunks(c, self.ns, chunks), None)
        if stored is not None:
            self._remember(hashes, keys)

    def _remember(self, hashes: list[bytes], keys: list[CacheEngineKey]) -> None:
        with self._lock:
            for block_hash, key in zip(hashes, keys):
                self._stored[block_hash] = key.to_string()
                self._stored.move_to_end(block_hash)
            while len(self._stored) > _MAX_REMEMBERED_KEYS:
                self._stored.popitem(last=False)

    # --- the rest of RemoteConnector -------------------------------------------------------
    async def list(self) -> list[str]:
        """Keys this connector stored (the latest _MAX_REMEMBERED_KEYS) that are still stored.

        NOTE: the daemon has no listing op, so chunks stored by other LMCache instances are not
        listed. One lookup per remembered key: meant for tools, not for the serving path.
        """
        with self._lock:
            remembered = list(self._stored.items())

        def still_stored(client: Client) -> list[str]:
            return [key for block_hash, key in remembered
                    if client.lookup(self.ns, [block_hash]).num_hits == 1]

        return await self._run(still_stored, [])

    def remove_sync(self, key: CacheEngineKey) -> bool:
        """Always False: the daemon drops single chunks only by eviction or TTL.

        `kvstore invalidate` (or a new epoch) retires the whole namespace at once.
        """
        return False

    def support_ping(self) -> bool:
        return True

    async def ping(self) -> int:
        """0 when the daemon answers (LMCache's health check), an error code otherwise."""
        return await self._run(lambda c: (c.ping(), 0)[1], _PING_FAILED)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close_sync)

    def close_sync(self) -> None:
        """Wait for calls in flight, then close every socket and the context; idempotent."""
        with self._lock:
            if self._is_closed:
                return
            self._is_closed = True
        self._executor.shutdown(wait=True)
        for client in self._clients:  # their threads are gone: safe to touch from here
            client.close()
        self._ctx.term()
        logger.info("kvstore LMCache plugin closed")

    # --- running calls off the event loop --------------------------------------------------
    async def _run(self, fn: Callable[[Client], T], default: T) -> T:
        return await asyncio.wrap_future(self._submit(fn, default))

    def _run_sync(self, fn: Callable[[Client], T], default: T) -> T:
        try:
            return self._submit(fn, default).result(self._sync_wait_s)
        except FutureTimeout:
            return default

    def _submit(self, fn: Callable[[Client], T], default: T) -> Future[T]:
        with self._lock:
            if not self._is_closed:
                return self._executor.submit(self._call, fn, default)
        done: Future[T] = Future()
        done.set_result(default)
        return done

    def _call(self, fn: Callable[[Client], T], default: T) -> T:
        """Run fn with this thread's client; a daemon failure returns default (a miss)."""
        with self._lock:
            if self._breaker.is_open():
                return default  # the daemon failed lately: a miss at no cost
        try:
            result = fn(self._client())
        except ServerUnavailable as exc:
            self._failed(exc, skip_daemon=True)
            return default
        except (KVStoreError, ChunkError) as exc:
            self._failed(exc, skip_daemon=False)
            return default
        self._succeeded()
        return result

    def _client(self) -> Client:
        client: Client | None = getattr(self._local, "client", None)
        if client is None:
            client = Client(self.settings.address, self.settings.timeout_ms / 1000, ctx=self._ctx,
                            curve_dir=self.settings.curve_keys, use_shm=self.settings.use_shm)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _failed(self, exc: Exception, skip_daemon: bool) -> None:
        with self._lock:
            if skip_daemon:
                self._breaker.failure()
            is_first = not self._is_failing
            self._is_failing = True
        if is_first:  # once per burst: a dead daemon must not flood the engine's log
            logger.warning("kvstore daemon %s failed (%s): LMCache gets misses meanwhile",
                           self.settings.address, exc)

    def _succeeded(self) -> None:
        with self._lock:
            self._breaker.success()
            was_failing, self._is_failing = self._is_failing, False
        if was_failing:
            logger.warning("kvstore daemon %s answers again", self.settings.address)

    def __repr__(self) -> str:
        return f"<KVStoreConnector {self.settings.address} ns={self.ns.name.hex()[:8]}>"


def _free_loaded(future: Future[list[MemoryObj]]) -> None:
    if not future.cancelled() and future.exception() is None:
        for obj in future.result():
            obj.ref_count_down()


class KVStoreAdapter(ConnectorAdapter):
    """What LMCache's plugin loader instantiates (extra_config ...class_name): it builds a
    KVStoreConnector for the plugin URL plugin://kvstore or plugin://kvstore.<instance>."""

    def __init__(self) -> None:
        super().__init__(f"plugin://{PLUGIN_TYPE}")

    def can_parse(self, url: str) -> bool:
        return url == self.schema or url.startswith(self.schema + ".")

    def create_connector(self, context: ConnectorContext) -> RemoteConnector:
        config: Any = context.config
        metadata = context.metadata or getattr(context.local_cpu_backend, "metadata", None)
        if config is None or metadata is None:
            raise ValueError("the kvstore plugin needs LMCache's engine config and metadata")
        settings = PluginConfig.from_extra(config.extra_config, context.plugin_name or PLUGIN_TYPE)
        return KVStoreConnector(context.loop, context.local_cpu_backend, config, metadata,
                                settings)

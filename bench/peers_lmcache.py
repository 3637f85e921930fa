"""LMCache's own remote-connector clients, run on the CPU: lm:// (LMCServerConnector, to the
legacy `lmcache_server`), redis:// (RedisConnector, redis-py asyncio) and resp:// (RESPConnector,
LMCache's native C++ RESP client), each driven the way LMCache's RemoteBackend drives it.

LMCache 0.5.6 imports on a CPU-only torch; its LocalCPUBackend allocates the MemoryObjs that
gets land in (plain, not pinned, memory without an accelerator). Import this module only after
LMCACHE_TRACK_USAGE=false is set (bench.peers does), or LMCache reports usage over the network.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.peers_clients import Chain

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")

_TIMEOUT_S = 120.0
_CLOSE_TIMEOUT_S = 5.0
_SYNC_CALL_TIMEOUT_S = 30.0  # a blocking lookup: far above its round trip, under the smoke test's 120 s
# Llama-3-8B KV: 32 layers x (K, V) x 8 KV heads x head dim 128, bf16 = 128 KiB per token, so a
# 2 MiB object is a 16-token block and a 32 MiB object is LMCache's default 256-token chunk.
_LAYERS, _KV_HEADS, _HEAD_DIM, _TOKEN_BYTES = 32, 8, 128, 32 * 2 * 8 * 128 * 2


class LoopThread:
    """The asyncio loop LMCache's connectors run their coroutines on (RemoteBackend has one too)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="lmcache-loop",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout_s: float = _TIMEOUT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def run_all(self, coros: list[Any]) -> list[Any]:
        """Submit all, then wait for each, as RemoteBackend.batched_get_blocking does."""
        futures = [asyncio.run_coroutine_threadsafe(c, self.loop) for c in coros]
        return [f.result(_TIMEOUT_S) for f in futures]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(_CLOSE_TIMEOUT_S)


class LMCacheBackends:
    """One LocalCPUBackend per object size: a connector's chunk shape comes from its metadata."""

    def __init__(self, objects: dict[int, int]) -> None:
        """objects: object bytes -> how many objects of that size a request moves."""
        import torch
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

        self.loop = LoopThread()
        self.by_size: dict[int, Any] = {}
        self._adopted: dict[int, list[Any]] = {}  # id(sources) -> MemoryObjs, shared by connectors
        for nbytes, num in objects.items():
            # Room for the source objects and one request's gets, plus the allocator's slack.
            cpu_bytes = 2 * nbytes * num + 64 * 2**20
            if nbytes % _TOKEN_BYTES:
                raise ValueError(f"object size {nbytes} is not a whole number of Llama-8B tokens")
            tokens = nbytes // _TOKEN_BYTES
            config = LMCacheEngineConfig.from_defaults(
                chunk_size=tokens, local_cpu=False, max_local_cpu_size=cpu_bytes / 2**30)
            metadata = LMCacheMetadata(
                model_name="bench-peers", world_size=1, local_world_size=1, worker_id=0,
                local_worker_id=0, kv_dtype=torch.bfloat16, chunk_size=tokens,
                kv_shape=(_LAYERS, 2, tokens, _KV_HEADS, _HEAD_DIM))
            self.by_size[nbytes] = LocalCPUBackend(config=config, metadata=metadata,
                                                   dst_device="cpu")

    def adopt(self, sources: list[np.ndarray]) -> list[Any]:
        """The sources copied into MemoryObjs of the backend for their size (what put sends)."""
        if id(sources) in self._adopted:
            return self._adopted[id(sources)]
        backend = self.by_size[sources[0].nbytes]
        objs = []
        for src in sources:
            obj = backend.allocate(backend.metadata.get_shapes(), backend.metadata.get_dtypes())
            if obj is None:
                raise RuntimeError("LMCache's LocalCPUBackend is full; raise cpu_bytes")
            np.frombuffer(obj.byte_array, dtype=np.uint8)[:] = src
            objs.append(obj)
        self._adopted[id(sources)] = objs
        return objs

    def close(self) -> None:
        for objs in self._adopted.values():
            for obj in objs:
                obj.ref_count_down()
        self._adopted.clear()
        self.loop.close()


class LMCacheConnector:
    """One of LMCache's RemoteConnector classes, a connector per object size."""

    def __init__(self, scheme: str, backends: LMCacheBackends, port: int) -> None:
        from lmcache.v1.storage_backend.connector.lm_connector import LMCServerConnector
        from lmcache.v1.storage_backend.connector.redis_connector import (
            RedisConnector,
            RESPConnector,
        )

        self.name = f"lmcache_{scheme}"
        self.transport = "tcp"
        self.backends = backends
        loop = backends.loop.loop
        self.conns: dict[int, Any] = {}
        for nbytes, backend in backends.by_size.items():
            if scheme == "lm":
                conn: Any = LMCServerConnector("127.0.0.1", port, loop, backend)
            elif scheme == "redis":
                conn = RedisConnector(f"redis://127.0.0.1:{port}", loop, backend)
            elif scheme == "resp":
                conn = RESPConnector("127.0.0.1", port, loop, backend, num_threads=8)
            else:
                raise ValueError(f"unknown LMCache connector scheme {scheme!r}")
            self.conns[nbytes] = conn
        conn = next(iter(self.conns.values()))
        self.how = (f"{type(conn).__name__}: get "
                    + ("batched_get" if conn.support_batched_get() else "one get() per block, all "
                       "submitted at once")
                    + "; put " + ("batched_put" if conn.support_batched_put() else
                                  "one put() per block" + (" + an EXIST barrier" if scheme == "lm"
                                                           else ""))
                    + "; lookup " + self._lookup_kind(conn))

    @staticmethod
    def _lookup_kind(conn: Any) -> str:
        if conn.support_batched_contains():
            return "batched_contains"
        if conn.support_batched_async_contains():
            return "batched_async_contains"
        return "exists() per block"

    def _key(self, space: str, block_hash: bytes) -> Any:
        import torch
        from lmcache.utils import CacheEngineKey

        # LMCache keys carry a 64-bit chunk hash; the first 8 bytes of the block hash.
        return CacheEngineKey(f"{self.name}-{space}", 1, 0,
                              int.from_bytes(block_hash[:8], "big"), torch.bfloat16)

    def adopt(self, sources: list[np.ndarray]) -> Any:
        return self.backends.adopt(sources)

    def put(self, space: str, chain: Chain, adopted: Any) -> None:
        conn = self.conns[len(adopted[0].byte_array)]
        keys = [self._key(space, h) for h, _ in chain]
        loop = self.backends.loop
        if conn.support_batched_put():
            loop.run(conn.batched_put(keys, adopted))
        else:
            loop.run_all([conn.put(k, obj) for k, obj in zip(keys, adopted)])
        if self.name == "lmcache_lm":
            # lm:// PUT has no reply; the server handles one connection's commands in order, so
            # the answer to an EXIST sent after the last PUT means every PUT has been stored.
            if not loop.run(conn.exists(keys[-1])):
                raise RuntimeError("lmcache_lm: the last block put is not on the server")

    def get(self, space: str, hashes: Sequence[bytes], dests: list[np.ndarray]) -> list[Any]:
        conn = self.conns[dests[0].nbytes]
        keys = [self._key(space, h) for h in hashes]
        loop = self.backends.loop
        if conn.support_batched_get():
            objs = loop.run(conn.batched_get(keys))
        else:
            objs = loop.run_all([conn.get(k) for k in keys])
        n = next((i for i, o in enumerate(objs) if o is None), len(objs))
        self.release(objs[n:])
        return objs[:n]  # MemoryObjs: the bytes are in .byte_array

    def release(self, got: list[Any]) -> None:
        for obj in got:
            if obj is not None:
                obj.ref_count_down()  # back to the LocalCPUBackend allocator

    def lookup(self, space: str, hashes: Sequence[bytes]) -> int:
        conn = next(iter(self.conns.values()))
        keys = [self._key(space, h) for h in hashes]
        loop = self.backends.loop
        if conn.support_batched_contains():
            return int(_bounded(conn.batched_contains, keys))
        if conn.support_batched_async_contains():
            return int(loop.run(conn.batched_async_contains("bench", keys)))
        for i, key in enumerate(keys):
            if not loop.run(conn.exists(key)):
                return i
        return len(keys)

    def clear(self, space: str) -> None:
        pass  # puts overwrite the same keys; lm:// has no delete, and the stores replace values

    def close(self) -> None:
        for conn in self.conns.values():
            _close(conn, self.backends.loop)


def _close(conn: Any, loop: LoopThread) -> None:
    """Close a connector without its close(): in LMCache 0.5.6 RedisConnector.close() and
    RESPConnector.close() call the blocking pq_executor.shutdown() on the event loop it waits
    for, and hang (seen here; bounded by a timeout below)."""
    try:
        executor = getattr(conn, "pq_executor", None)
        if executor is not None:
            loop.run(executor.shutdown_async(wait=False), _CLOSE_TIMEOUT_S)
        if hasattr(conn, "client"):  # RESP: the native client's worker threads
            conn.client.close()
        elif hasattr(conn, "connection"):  # redis-py asyncio
            loop.run(conn.connection.aclose(), _CLOSE_TIMEOUT_S)
        else:
            loop.run(conn.close(), _CLOSE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - best effort at teardown; the process exits next
        pass


class PeerHung(TimeoutError):
    """A peer's own client did not answer within _SYNC_CALL_TIMEOUT_S (not a kvstore failure)."""


def _bounded(call: Any, *args: Any) -> Any:
    """Run a peer's blocking call with a deadline. LMCache 0.5.6's RESP client once never
    completed a first batch_exists_sync (tests/integration/test_peers_smoke.py, CI run of
    2026-12-03); a daemon thread keeps such a hang from holding the benchmark past its budget."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call(*args)
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name="lmcache-call")
    thread.start()
    thread.join(_SYNC_CALL_TIMEOUT_S)
    if thread.is_alive():
        name = getattr(call, "__qualname__", repr(call))
        raise PeerHung(f"{name} gave no answer in {_SYNC_CALL_TIMEOUT_S:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]

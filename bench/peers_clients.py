"""The systems bench.peers compares, behind one small interface: kvstore (shared memory and TCP),
redis-server through redis-py + hiredis (single commands and pipelined), and vLLM's
ExampleConnector storage (safetensors files on disk). LMCache's clients are in bench.peers_lmcache.

Every system stores and reads the same bytes under keys derived from the same chained block
hashes; a `space` string separates key sets (the prefix read every round, the put target).
Only measured code lives in put/get/lookup; adopt/clear/release are untimed bookkeeping.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Chain = Sequence[tuple[bytes, bytes | None]]  # (block hash, parent hash), root first
_TIMEOUT_S = 120.0  # one call moves at most a few hundred MiB; only a hung server takes longer


class System(Protocol):
    """What bench.peers measures; each method moves or checks all blocks of one request."""

    name: str
    transport: str  # "shm", "tcp" or "disk": which goal a ratio against it counts for
    how: str  # one line: the calls measured, for the README

    def adopt(self, sources: list[np.ndarray]) -> Any:
        """Untimed: the same bytes in this system's own source objects."""

    def put(self, space: str, chain: Chain, adopted: Any) -> None:
        """Store every block and return once the store holds them."""

    def get(self, space: str, hashes: Sequence[bytes], dests: list[np.ndarray]) -> list[Any]:
        """Read blocks a lookup found; returns buffers with the bytes (dests, or the system's own
        objects). Callers never ask for a missing key: LMCache's RESP client hangs on one."""

    def release(self, got: list[Any]) -> None:
        """Untimed: free what get returned."""

    def lookup(self, space: str, hashes: Sequence[bytes]) -> int:
        """How many of hashes are stored, as a consecutive prefix."""

    def clear(self, space: str) -> None:
        """Untimed: drop a space, so that the next put writes every block anew."""

    def close(self) -> None: ...


def as_bytes(buf: Any) -> memoryview:
    """A flat byte view of anything get returned, for the correctness check."""
    view = memoryview(getattr(buf, "byte_array", buf))  # LMCache MemoryObjs hold theirs there
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


# --- kvstore -------------------------------------------------------------------------------------
class KVStore:
    """The daemon through kvstore.client: one batched request per prefix."""

    def __init__(self, address: str, use_shm: bool) -> None:
        import zmq

        from kvstore.client import Client

        self.name = "kvstore_shm" if use_shm else "kvstore_tcp"
        self.transport = "shm" if use_shm else "tcp"
        self.how = ("get_into: pin slots, one memcpy per block into the destination; put: "
                    "reserve -> copy into slots -> commit" if use_shm else
                    "get_into: one GET, payload frames received into the destinations; put: one "
                    "PUT with zero-copy frames")
        self._ctx = zmq.Context()
        self.client = Client(address, timeout_s=_TIMEOUT_S, ctx=self._ctx, use_shm=use_shm)
        self.client.connect()
        if use_shm and not self.client.is_local:
            raise RuntimeError("kvstore_shm: could not attach the daemon's shared segment")

    def _ns(self, space: str) -> Any:
        from kvstore.keys import Namespace

        # One namespace per client and space: both clients share one daemon.
        return Namespace(f"bench-peers-{self.name}-{space}".encode(), 0)

    def adopt(self, sources: list[np.ndarray]) -> Any:
        return sources

    def put(self, space: str, chain: Chain, adopted: Any) -> None:
        result = self.client.put(self._ns(space), [(h, p, s) for (h, p), s in zip(chain, adopted)])
        if result.num_stored != len(chain):
            raise RuntimeError(f"{self.name}: put stored {result}, expected {len(chain)} new blocks")

    def get(self, space: str, hashes: Sequence[bytes], dests: list[np.ndarray]) -> list[Any]:
        n = self.client.get_into(self._ns(space), hashes, dests)
        return list(dests[:n])

    def release(self, got: list[Any]) -> None:
        pass

    def lookup(self, space: str, hashes: Sequence[bytes]) -> int:
        return self.client.lookup(self._ns(space), hashes).num_hits

    def clear(self, space: str) -> None:
        self.client.invalidate(self._ns(space).name)

    def close(self) -> None:
        self.client.close()
        self._ctx.term()


# --- redis-server --------------------------------------------------------------------------------
class Redis:
    """redis-py with the hiredis parser: a command per block, or one pipeline per prefix."""

    def __init__(self, port: int, pipelined: bool) -> None:
        import redis
        import redis.utils

        if not redis.utils.HIREDIS_AVAILABLE:
            raise RuntimeError("hiredis is not installed: redis-py would parse replies in Python")
        self.name = "redis_pipelined" if pipelined else "redis"
        self.transport = "tcp"
        self.how = ("one non-transactional pipeline of GET / SET / EXISTS per prefix"
                    if pipelined else "one GET / SET / EXISTS round trip per block")
        self.pipelined = pipelined
        self.r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=_TIMEOUT_S)
        self.r.ping()

    def _key(self, space: str, block_hash: bytes) -> bytes:
        return f"{self.name}:{space}:".encode() + block_hash.hex().encode()

    def adopt(self, sources: list[np.ndarray]) -> Any:
        return [s.data for s in sources]  # memoryviews: redis-py sends them without a copy

    def put(self, space: str, chain: Chain, adopted: Any) -> None:
        keys = [self._key(space, h) for h, _ in chain]
        if self.pipelined:
            pipe = self.r.pipeline(transaction=False)
            for key, value in zip(keys, adopted):
                pipe.set(key, value)
            ok = pipe.execute()
        else:
            ok = [self.r.set(key, value) for key, value in zip(keys, adopted)]
        if not all(ok):
            raise RuntimeError(f"{self.name}: a SET failed")

    def get(self, space: str, hashes: Sequence[bytes], dests: list[np.ndarray]) -> list[Any]:
        # NOTE: the bytes objects redis-py returns are the destination: no copy into dests,
        # which favours redis by one memcpy per block over kvstore and the disk path.
        keys = [self._key(space, h) for h in hashes]
        if self.pipelined:
            pipe = self.r.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
            values = pipe.execute()
        else:
            values = [self.r.get(key) for key in keys]
        return _prefix(values)

    def release(self, got: list[Any]) -> None:
        pass

    def lookup(self, space: str, hashes: Sequence[bytes]) -> int:
        keys = [self._key(space, h) for h in hashes]
        if self.pipelined:
            pipe = self.r.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            found = pipe.execute()
        else:
            found = []
            for key in keys:  # a client that checks one block at a time stops at the first miss
                found.append(self.r.exists(key))
                if not found[-1]:
                    break
        return _prefix(found, count=True)

    def clear(self, space: str) -> None:
        keys = list(self.r.scan_iter(match=f"{self.name}:{space}:*".encode(), count=1000))
        if keys:
            self.r.delete(*keys)

    def close(self) -> None:
        self.r.close()


# --- vLLM's ExampleConnector storage -------------------------------------------------------------
class ExampleDisk:
    """What vLLM's ExampleConnector does per layer: safetensors.torch.save_file of a tensor and
    load_file + copy into the KV cache, one file per block, in a directory on a real disk."""

    def __init__(self, root: str | None = None) -> None:
        self.name = "example_disk"
        self.transport = "disk"
        self.how = ("safetensors.torch.save_file per block; load_file + copy into the destination "
                    "tensor; lookup: os.path.exists per block")
        self.root = Path(tempfile.mkdtemp(prefix="kvstore-peers-disk-", dir=root))

    def _path(self, space: str, block_hash: bytes) -> Path:
        return self.root / space / f"{block_hash.hex()}.safetensors"

    @staticmethod
    def _tensor(buf: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(buf).view(torch.bfloat16)  # KV dtype; the bytes are unchanged

    def adopt(self, sources: list[np.ndarray]) -> Any:
        return [self._tensor(s) for s in sources]

    def put(self, space: str, chain: Chain, adopted: Any) -> None:
        from safetensors.torch import save_file

        (self.root / space).mkdir(parents=True, exist_ok=True)
        for (h, _), tensor in zip(chain, adopted):
            save_file({"kv_cache": tensor}, str(self._path(space, h)))

    def get(self, space: str, hashes: Sequence[bytes], dests: list[np.ndarray]) -> list[Any]:
        from safetensors.torch import load_file

        got = []
        for h, dest in zip(hashes, dests):
            path = self._path(space, h)
            if not path.exists():
                break
            self._tensor(dest).copy_(load_file(str(path))["kv_cache"])
            got.append(dest)
        return got

    def release(self, got: list[Any]) -> None:
        pass

    def lookup(self, space: str, hashes: Sequence[bytes]) -> int:
        return _prefix([os.path.exists(self._path(space, h)) for h in hashes], count=True)

    def clear(self, space: str) -> None:
        shutil.rmtree(self.root / space, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _prefix(values: list[Any], count: bool = False) -> Any:
    """The leading run of hits (truthy values): the values themselves, or how many."""
    n = next((i for i, v in enumerate(values) if not v), len(values))
    return n if count else values[:n]

"""LMCache's remote-storage plugin against a real daemon process and the real lmcache package (CPU).

The connector is built the way LMCache builds it: from an LMCacheEngineConfig naming the plugin in
remote_storage_plugins, through LMCache's CreateConnector, with MemoryObjs from LMCache's own CPU
allocator. The last tests go through LMCache's StorageManager, the layer its cache engine uses.
"""

from __future__ import annotations

import os

os.environ["LMCACHE_TRACK_USAGE"] = "false"  # before lmcache loads: it reports usage by default

import asyncio  # noqa: E402
import logging  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Coroutine, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.event_manager import EventManager  # noqa: E402
from lmcache.v1.memory_management import MemoryObj  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.connector import CreateConnector  # noqa: E402
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402
from lmcache.v1.storage_backend.storage_manager import StorageManager  # noqa: E402

from connectors.lmcache.chunks import chunk_hash  # noqa: E402
from connectors.lmcache.config import PluginConfig  # noqa: E402
from connectors.lmcache.connector import KVStoreConnector  # noqa: E402
from kvstore.client import Client  # noqa: E402
from bench.daemon import Daemon, wait_until  # noqa: E402
from tests.integration.helpers import CALL_S, stats  # noqa: E402

MODEL = "tiny-llama"
CHUNK = 16  # tokens per LMCache chunk
KV_SHAPE = (2, 2, CHUNK, 2, 32)  # (layers, K/V, chunk tokens, KV heads, head size)
DTYPE = torch.bfloat16
TIMEOUT_MS = 500  # one daemon call, in the tests about a dead daemon
SLACK_S = 2.0  # process scheduling on a loaded, shared 2-core machine
RETRY_MS = 200  # short circuit-breaker pause, so recovery tests are quick

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def shared() -> Iterator[Daemon]:
    """One daemon for the tests that never stop it."""
    d = Daemon().start()
    yield d
    d.stop()


def engine_config(address: str, plugin: str = "kvstore", **settings: Any) -> LMCacheEngineConfig:
    prefix = f"remote_storage_plugin.{plugin}."
    extra = {prefix + "module_path": "connectors.lmcache.connector",
             prefix + "class_name": "KVStoreAdapter", prefix + "address": address,
             prefix + "retry_interval_ms": RETRY_MS}
    extra.update({prefix + k: v for k, v in settings.items()})
    return LMCacheEngineConfig.from_dict({
        "chunk_size": CHUNK, "local_cpu": False, "max_local_cpu_size": 0.05,
        "remote_storage_plugins": [plugin], "extra_config": extra})


def engine_metadata(model: str = MODEL) -> LMCacheMetadata:
    return LMCacheMetadata(model_name=model, world_size=1, local_world_size=1, worker_id=0,
                           local_worker_id=0, kv_dtype=DTYPE, kv_shape=KV_SHAPE, chunk_size=CHUNK)


@dataclass
class Plugin:
    """A connector as LMCache's RemoteBackend holds it, with its event loop and CPU buffer."""

    connector: Any  # LMCache's InstrumentedRemoteConnector around ours
    backend: LocalCPUBackend
    loop: asyncio.AbstractEventLoop
    made: list[MemoryObj] = field(default_factory=list)  # freed at close, as LMCache would

    @property
    def ours(self) -> KVStoreConnector:
        inner = self.connector.getWrappedConnector()
        assert isinstance(inner, KVStoreConnector)
        return inner

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = CALL_S) -> Any:
        """Await coro on the plugin's loop from this thread, as RemoteBackend does."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def chunk(self, seed: int, num_tokens: int = CHUNK) -> MemoryObj:
        """A chunk from LMCache's allocator, filled with reproducible random KV."""
        md = self.backend.metadata
        obj = self.backend.allocate(md.get_shapes(num_tokens), md.get_dtypes())
        assert obj is not None and obj.tensor is not None
        gen = torch.Generator().manual_seed(seed)
        obj.tensor.copy_(torch.randn(obj.tensor.shape, generator=gen))
        self.made.append(obj)
        return obj

    def put(self, keys: list[CacheEngineKey], objs: list[MemoryObj]) -> None:
        """Store as RemoteBackend does: the instrumented wrapper drops one reference after."""
        for obj in objs:
            obj.ref_count_up()
        self.run(self.connector.batched_put(keys, objs))


@contextmanager
def plugin(address: str, model: str = MODEL, plugin_name: str = "kvstore",
           **settings: Any) -> Iterator[Plugin]:
    config, metadata = engine_config(address, plugin_name, **settings), engine_metadata(model)
    backend = LocalCPUBackend(config, metadata)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    p = Plugin(CreateConnector(f"plugin://{plugin_name}", loop, backend, config, metadata,
                               plugin_name=plugin_name), backend, loop)
    try:
        yield p
    finally:
        p.run(p.connector.close())
        for obj in p.made:
            obj.ref_count_down()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        assert p.ours._ctx.closed, "close() left the zmq context open"


def key(n: int, model: str = MODEL) -> CacheEngineKey:
    return CacheEngineKey(model, 1, 0, n, DTYPE)


def assert_same_chunk(got: MemoryObj | None, want: MemoryObj) -> None:
    """Same bytes, shape, dtype and memory format as the chunk that was stored."""
    assert got is not None
    assert got.get_shapes() == want.get_shapes()
    assert got.get_dtypes() == want.get_dtypes()
    assert got.get_memory_format() == want.get_memory_format()
    assert bytes(got.byte_array) == bytes(want.byte_array)
    got.ref_count_down()  # the caller owns a loaded chunk; give LMCache's buffer back


# --- configuration ---------------------------------------------------------------------------
def test_plugin_config_keys_resolve_to_the_kvstore_connector(shared: Daemon) -> None:
    """remote_storage_plugins + extra_config module_path/class_name build our connector."""
    with plugin(shared.address, plugin_name="kvstore.primary", timeout_ms=750) as p:
        assert p.ours.settings == PluginConfig(address=shared.address, timeout_ms=750,
                                               retry_interval_ms=RETRY_MS)
        assert p.ours.support_batched_get() and p.ours.support_batched_put()


@pytest.mark.parametrize(("setting", "value", "error"), [
    ("adress", "tcp://x:1", "unknown kvstore plugin settings"),
    ("timeout_ms", "fast", "must be a non-negative integer"),
    ("use_shm", 1, "must be true or false"),
])
def test_bad_settings_are_refused_with_a_clear_error(shared: Daemon, setting: str, value: Any,
                                                     error: str) -> None:
    """A typo or a wrong type in extra_config fails at start, naming the key."""
    with pytest.raises(ValueError, match=error):
        with plugin(shared.address, **{setting: value}):
            pass


# --- round trips -----------------------------------------------------------------------------
@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
def test_full_and_unfull_chunks_round_trip_byte_identical(shared: Daemon, use_shm: bool) -> None:
    """put then exists/get/batched_get return the same bytes, shapes and format, last chunk short."""
    with plugin(shared.address, use_shm=use_shm, namespace=f"rt-{use_shm}") as p:
        full, unfull = p.chunk(1), p.chunk(2, num_tokens=5)
        keys = [key(10), key(11)]
        assert not p.run(p.connector.exists(keys[0]))
        path = "shm" if use_shm else "tcp"
        before = stats(shared.address)["bytes_in"][path]
        p.put(keys, [full, unfull])
        assert stats(shared.address)["bytes_in"][path] - before > 0, f"not stored over {path}"
        assert p.run(p.connector.exists(keys[1])) and p.connector.exists_sync(keys[0])
        assert p.connector.batched_contains(keys) == 2
        assert_same_chunk(p.run(p.connector.get(keys[1])), unfull)
        got = p.run(p.connector.batched_get(keys))
        assert_same_chunk(got[0], full)
        assert got[1].get_shapes()[0][2] == 5, "the unfull chunk keeps its 5 tokens"
        assert_same_chunk(got[1], unfull)


def test_batched_reads_stop_at_the_first_missing_chunk(shared: Daemon) -> None:
    """A chain with a hole: contains counts the prefix, batched_get pads with None."""
    with plugin(shared.address, namespace="holes") as p:
        objs = [p.chunk(3), p.chunk(4)]
        p.put([key(20)], objs[:1])
        p.put([key(22)], objs[1:])
        keys = [key(20), key(21), key(22)]
        assert p.connector.batched_contains(keys) == 1
        assert p.run(p.connector.batched_async_contains("l1", keys)) == 1
        got = p.run(p.connector.batched_get(keys))
        assert got[1:] == [None, None]
        assert_same_chunk(got[0], objs[0])
        assert p.run(p.connector.get(key(21))) is None


def test_pinned_lookup_is_read_under_its_lease_and_released(shared: Daemon) -> None:
    """contains(pin=True) leases the hits; the non-blocking get of that lookup reads and frees it."""
    with plugin(shared.address, namespace="leases") as p:
        objs = [p.chunk(5), p.chunk(6, num_tokens=9)]
        keys = [key(30), key(31)]
        p.put(keys, objs)
        base = stats(shared.address)["num_leases"]
        assert p.run(p.connector.batched_async_contains("req-1", keys, pin=True)) == 2
        assert stats(shared.address)["num_leases"] == base + 1
        got = p.run(p.connector.batched_get_non_blocking("req-1", keys))
        assert len(got) == 2
        for g, want in zip(got, objs):
            assert_same_chunk(g, want)
        assert stats(shared.address)["num_leases"] == base, "the lookup's lease was not released"


def test_list_reports_stored_keys(shared: Daemon) -> None:
    """list() names the keys this plugin stored, in LMCache's string form."""
    with plugin(shared.address, namespace="list") as p:
        keys = [key(40), key(41)]
        p.put(keys, [p.chunk(7), p.chunk(8)])
        assert sorted(p.run(p.connector.list())) == sorted(k.to_string() for k in keys)


# --- isolation -------------------------------------------------------------------------------
def test_namespaces_keep_chunks_apart(shared: Daemon) -> None:
    """Another operator namespace, epoch or model shape sees none of the chunks; the same sees all."""
    with plugin(shared.address, namespace="iso") as writer:
        writer.put([key(50)], [writer.chunk(9)])
        for settings in ({"namespace": "iso-2"}, {"namespace": "iso", "epoch": 1}):
            with plugin(shared.address, **settings) as other:
                assert not other.run(other.connector.exists(key(50)))
                assert other.run(other.connector.get(key(50))) is None
        with plugin(shared.address, namespace="iso") as same:
            assert same.ours.ns == writer.ours.ns
            assert same.run(same.connector.exists(key(50)))


def test_a_corrupt_stored_block_is_a_miss(shared: Daemon) -> None:
    """Bytes that are not a chunk (here: too short for the header) load as None, without raising."""
    with plugin(shared.address, namespace="corrupt") as p:
        with Client(shared.address, CALL_S) as raw:
            raw.put(p.ours.ns, [(chunk_hash(key(60)), None, b"not a chunk")])
        assert p.run(p.connector.exists(key(60)))
        assert p.run(p.connector.get(key(60))) is None


# --- failures --------------------------------------------------------------------------------
def _timed(call: Any) -> tuple[Any, float]:
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
def test_killed_daemon_reads_as_misses_within_the_timeout_then_recovers(
        daemon: Daemon, use_shm: bool, caplog: pytest.LogCaptureFixture) -> None:
    """SIGKILL: every call is a miss (no exception) within its deadline; a restart is rejoined."""
    caplog.set_level(logging.WARNING, logger="connectors.lmcache")
    # retry_interval_ms=0: no circuit breaker, so every call below really meets the dead daemon.
    with plugin(daemon.address, use_shm=use_shm, timeout_ms=TIMEOUT_MS,
                retry_interval_ms=0) as p:
        obj = p.chunk(11)
        p.put([key(70)], [obj])
        daemon.kill()
        calls = {
            "exists": (lambda: p.run(p.connector.exists(key(70))), False),
            "exists_sync": (lambda: p.connector.exists_sync(key(70)), False),
            "batched_contains": (lambda: p.connector.batched_contains([key(70)]), 0),
            "async_contains": (lambda: p.run(p.connector.batched_async_contains(
                "l", [key(70)], pin=True)), 0),
            "get": (lambda: p.run(p.connector.get(key(70))), None),
            "batched_get": (lambda: p.run(p.connector.batched_get([key(70)])), [None]),
            "non_blocking": (lambda: p.run(p.connector.batched_get_non_blocking(
                "l", [key(70)])), []),
            "put": (lambda: p.put([key(71)], [obj]), None),
            "ping": (lambda: p.run(p.connector.ping()), 1),
        }
        for name, (call, miss) in calls.items():
            result, elapsed_s = _timed(call)
            assert result == miss, name
            assert elapsed_s < 3 * TIMEOUT_MS / 1000 + SLACK_S, f"{name} took {elapsed_s:.2f} s"
        daemon.start()
        wait_until(lambda: p.run(p.connector.ping()) == 0, 30, what="plugin rejoins the daemon")
        assert not p.run(p.connector.exists(key(70))), "a restarted daemon starts empty"
        p.put([key(70)], [obj])
        assert_same_chunk(p.run(p.connector.get(key(70))), obj)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("connectors.lmcache")]
    assert sum("misses meanwhile" in m for m in messages) == 1, "one warning per failure burst"
    assert sum("answers again" in m for m in messages) == 1


def test_after_a_failure_the_daemon_is_skipped_without_waiting(daemon: Daemon) -> None:
    """The circuit breaker: once a call timed out, the next ones miss at once, not per timeout."""
    with plugin(daemon.address, timeout_ms=3000, retry_interval_ms=60_000) as p:
        p.put([key(75)], [p.chunk(15)])
        daemon.kill()
        assert not p.run(p.connector.exists(key(75)))  # meets the dead daemon: one timeout
        for call in (lambda: p.run(p.connector.get(key(75))),
                     lambda: p.connector.batched_contains([key(75)])):
            result, elapsed_s = _timed(call)
            assert not result
            assert elapsed_s < 1.5, f"a skipped call took {elapsed_s:.2f} s: it waited"


# --- through LMCache's storage layer ---------------------------------------------------------
@contextmanager
def storage_manager(address: str) -> Iterator[StorageManager]:
    manager = StorageManager(engine_config(address, namespace="sm"), engine_metadata(),
                             EventManager())
    try:
        yield manager
    finally:
        manager.close()


def test_two_lmcache_instances_share_chunks_through_the_storage_manager(shared: Daemon) -> None:
    """One StorageManager's batched_put is found and loaded by another's (the shared tier)."""
    with storage_manager(shared.address) as writer, storage_manager(shared.address) as reader:
        assert any(name.startswith("RemoteBackend") for name in writer.storage_backends)
        objs = []
        for seed, num_tokens in ((12, CHUNK), (13, CHUNK), (14, 3)):
            obj = writer.allocate(engine_metadata().get_shapes(num_tokens), [DTYPE])
            assert obj is not None and obj.tensor is not None
            obj.tensor.copy_(torch.randn(obj.tensor.shape,
                                         generator=torch.Generator().manual_seed(seed)))
            objs.append(obj)
        want = [bytes(o.byte_array) for o in objs]
        keys = [key(80), key(81), key(82)]
        for obj in objs:
            obj.ref_count_up()  # keep them readable here: batched_put drops the caller's reference
        writer.batched_put(keys, objs)  # asynchronous, like LMCache's own stores
        wait_until(lambda: reader.batched_contains(keys)[0] == 3, 30, what="chunks stored")
        # As LMCache's engine retrieves: from the backend that contains() named for the keys.
        _, mapping = reader.batched_contains(keys)
        assert list(mapping) == ["RemoteBackend-kvstore"]
        got = reader.batched_get(keys, location="RemoteBackend-kvstore")
        assert [bytes(g.byte_array) for g in got] == want
        assert [g.get_shapes() for g in got] == [o.get_shapes() for o in objs]
        for obj in [*got, *objs]:
            obj.ref_count_down()

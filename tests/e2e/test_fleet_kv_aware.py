"""End to end: vllm-router's kv_aware policy in front of two real `vllm serve` CPU replicas with the
kvstore connector, fed by their KV events, which include the pool's CPU-medium BlockStored.

Replica A computes a prompt (its blocks go to the pool and are announced), then its VRAM prefix
cache is reset, so only the pool holds the prefix. A prompt sharing that prefix is sent through
the router: it must be served without error, load the prefix from the pool wherever the router
sends it, and generate exactly the tokens (and log-probabilities) of a replica without the
connector.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bench.fleet_model import make_fleet_model, text
from bench.fleet_procs import MODEL_NAME, Replica, Router, http
from bench.daemon import Daemon
from tests.e2e.test_cross_replica import logs_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PREFIX_TOKENS = 8 * 32 + 7  # 8 full blocks, not block-aligned on purpose
NEW_TOKENS = 12
LOGPROB_TOL = 1e-4  # matching KV agreed to ~1e-6 in float32; foreign KV moves it by ~0.27
START_S = 900.0  # three engines starting at once on 2 shared cores


class Events:
    """A SUB socket on a replica's KV event publisher (it binds; routers connect, as here)."""

    def __init__(self, endpoint: str) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt_string(zmq.SUBSCRIBE, "")
        self._sub.connect(endpoint)
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self.cpu_stored: set[Any] = set()

    def wait_cpu_stored(self, count: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.cpu_stored) < count:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise TimeoutError(f"{len(self.cpu_stored)} CPU-medium blocks announced, "
                                   f"expected {count}")
            if self._sub.poll(min(left_ms, 200)):
                *_, payload = self._sub.recv_multipart()
                for event in self._decoder.decode(payload).events:
                    if type(event).__name__ == "BlockStored" and event.medium == "CPU":
                        self.cpu_stored.update(event.block_hashes)

    def close(self) -> None:
        self._sub.close()
        self._ctx.term()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    model = str(make_fleet_model(tmp_path_factory.mktemp("fleet-model")))
    logs = logs_dir()
    daemon = Daemon(pool_size=str(256 << 20)).start()
    replicas = [Replica("fleet-kv-aware-a", model, logs, daemon.address, 160),
                Replica("fleet-kv-aware-b", model, logs, daemon.address, 160),
                Replica("fleet-kv-aware-reference", model, logs, None, 160)]
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready(START_S)
        yield {"a": replicas[0], "b": replicas[1], "reference": replicas[2], "logs": logs}
    finally:
        for r in replicas:
            r.stop()
        daemon.stop()


def complete(url: str, prompt: list[int]) -> dict[str, Any]:
    body = {"model": MODEL_NAME, "prompt": text(prompt), "max_tokens": NEW_TOKENS,
            "temperature": 0.0, "ignore_eos": True, "logprobs": 0}
    with http("POST", url + "/v1/completions", body, timeout_s=600) as response:
        return dict(json.loads(response.read()))


def test_kv_aware_routes_a_pool_only_prefix_with_identical_tokens(fleet: dict[str, Any]) -> None:
    rng = random.Random(13)
    prefix = [rng.randrange(3, 512) for _ in range(PREFIX_TOKENS)]
    first = prefix + [rng.randrange(3, 512) for _ in range(20)]
    second = prefix + [rng.randrange(3, 512) for _ in range(20)]
    a, b = fleet["a"], fleet["b"]
    events = Events(a.events)
    router = Router("kv_aware", [a, b], fleet["logs"], "kv-aware-test")
    try:
        router.start()
        time.sleep(1.0)  # the router's and this test's subscribers join before A publishes
        complete(a.url, first)  # A computes the prefix: the pool gets it, A announces it
        events.wait_cpu_stored(PREFIX_TOKENS // 32)
        a.reset_prefix_cache()  # now only the pool holds the prefix
        got = complete(router.url, second)
        assert router.proc is not None and router.proc.poll() is None, "router died"
    finally:
        router.stop()
        events.close()
    want = complete(fleet["reference"].url, second)
    params = got.get("kv_transfer_params") or {}
    assert params.get("kvstore_pool_tokens", 0) >= (PREFIX_TOKENS // 32) * 32, (
        f"the prefix was not loaded from the pool: {params}; router log {router.log_path}")
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    got_lp = got["choices"][0]["logprobs"]["token_logprobs"]
    want_lp = want["choices"][0]["logprobs"]["token_logprobs"]
    assert max(abs(x - y) for x, y in zip(got_lp, want_lp)) < LOGPROB_TOL
    assert len(got_lp) == NEW_TOKENS

"""End to end with one real vLLM CPU engine: the pool tier reaches routers as vLLM KV cache events
(medium CPU, the GPU tier's hashes), and vLLM's connector stats count prompt tokens per tier.

The test subscribes to the engine's ZeroMQ event publisher the way vLLM's
examples/online_serving/kv_events_subscriber.py does: SUB socket, multipart (topic, seq, payload),
payload decoded with msgspec into vLLM's KVEventBatch. Given a concrete address (not tcp://*),
vLLM's publisher connects, so the subscriber binds it on loopback, as a router would.
Run as a script, this module is the engine:

    python -m tests.e2e.test_events MODEL DAEMON_ADDRESS EVENTS_ENDPOINT
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.models import TEST_MODEL, make_model
from bench.replica import CONNECTOR, ReplicaProcess
from kvstore.client import Client
from bench.daemon import Daemon, free_port
from tests.e2e.test_cross_replica import logs_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

BLOCK = 32  # tokens per vLLM block (the CPU backend needs multiples of 32)
NUM_BLOCKS = 8
PROMPT_TOKENS = NUM_BLOCKS * BLOCK + 4  # with 8 new tokens, no block beyond the 8th fills up
TOPIC = "kvstore-test"
LOGPROB_TOL = 1e-4  # matching KV agreed to ~1e-6 in float32; foreign KV moves it by ~0.27


# --- the engine (run as a script) -----------------------------------------------------------------
def main() -> None:
    model, address, endpoint = sys.argv[1:4]
    out = os.fdopen(os.dup(1), "w")  # results; vLLM's own logging goes to stderr
    os.dup2(2, 1)
    for name, value in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
                        ("HF_HUB_OFFLINE", "1"), ("VLLM_NO_USAGE_STATS", "1")):
        os.environ.setdefault(name, value)
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig

    extra = {"address": address, "timeout_ms": 2000, "lookup_timeout_ms": 1000,
             "save_timeout_ms": 2000}
    llm = LLM(model, skip_tokenizer_init=True, dtype="float32", block_size=BLOCK,
              max_model_len=2048, enforce_eager=True, seed=0, enable_prefix_caching=True,
              disable_log_stats=False,  # vLLM's stats (and our connector's) only flow with it
              kv_transfer_config={**CONNECTOR, "kv_connector_extra_config": extra},
              kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                              endpoint=endpoint, topic=TOPIC))
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("reset_prefix_cache"):
            llm.reset_prefix_cache()
            answer: dict[str, Any] = {"reset": True}
        elif req.get("metrics"):
            answer = {"metrics": [[m.name, m.labels, m.value] for m in llm.get_metrics()
                                  if m.name.startswith("vllm:kvstore_")]}
        else:
            params = SamplingParams(max_tokens=req["max_tokens"], temperature=0.0, logprobs=0,
                                    ignore_eos=True)
            result = llm.generate([{"prompt_token_ids": req["prompt"]}], params, use_tqdm=False)[0]
            completion = result.outputs[0]
            answer = {"tokens": list(completion.token_ids),
                      "logprobs": [float(step[t].logprob) for t, step in
                                   zip(completion.token_ids, completion.logprobs or [])],
                      **(result.kv_transfer_params or {})}
        print(json.dumps(answer), file=out, flush=True)


class EventsEngine(ReplicaProcess):
    """This module run as an engine process, driven like bench.replica's replicas."""

    def __init__(self, model: str, address: str, endpoint: str, log_path: Path) -> None:
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.test_events", model, address, endpoint],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            start_new_session=True)  # its own group: vLLM's processes go down with it

    def metric(self, name: str, **labels: str) -> float:
        """The sum of vllm:kvstore_<name> over the samples with these labels."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"metrics": True}) + "\n")
        self.proc.stdin.flush()
        samples = json.loads(self._read_line(60))["metrics"]
        return sum(value for n, lbl, value in samples if n == f"vllm:kvstore_{name}"
                   and all(lbl.get(k) == v for k, v in labels.items()))


# --- the subscriber -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    kind: str  # "BlockStored", "BlockRemoved", "AllBlocksCleared"
    medium: str | None
    hashes: tuple[Any, ...]
    parent: Any = None
    token_ids: tuple[int, ...] = ()


class Subscriber:
    """A SUB socket the engine's publisher connects to, decoding batches as vLLM's example does."""

    def __init__(self, endpoint: str) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.bind(endpoint)
        self._sub.setsockopt_string(zmq.SUBSCRIBE, TOPIC)
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self.seen: list[Event] = []

    def poll(self, timeout_s: float) -> None:
        """Receive every batch that arrives within timeout_s."""
        deadline = time.monotonic() + timeout_s
        while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            if not self._sub.poll(left_ms):
                return
            topic, seq, payload = self._sub.recv_multipart()
            assert topic == TOPIC.encode() and len(seq) == 8
            for e in self._decoder.decode(payload).events:
                self.seen.append(Event(
                    type(e).__name__, getattr(e, "medium", None),
                    tuple(getattr(e, "block_hashes", ())), getattr(e, "parent_block_hash", None),
                    tuple(getattr(e, "token_ids", ()))))

    def wait_for(self, found: Callable[[list[Event]], bool], timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not found(self.seen):
            if time.monotonic() > deadline:
                raise TimeoutError(f"events not seen within {timeout_s} s: {self.seen}")
            self.poll(0.2)

    def take(self) -> list[Event]:
        seen, self.seen = self.seen, []
        return seen

    def close(self) -> None:
        self._sub.close()
        self._ctx.term()


def stored(events: list[Event], medium: str) -> list[Any]:
    return [h for e in events if e.kind == "BlockStored" and e.medium == medium for h in e.hashes]


def removed(events: list[Event], medium: str) -> list[Any]:
    return [h for e in events if e.kind == "BlockRemoved" and e.medium == medium for h in e.hashes]


@dataclass
class Setup:
    daemon: Daemon
    engine: EventsEngine
    events: Subscriber
    rng: random.Random

    def prompt(self) -> list[int]:
        return [self.rng.randrange(1, TEST_MODEL.vocab_size) for _ in range(PROMPT_TOKENS)]

    def run(self, prompt: list[int]) -> dict[str, Any]:
        """Generate, then collect the events of that request (the pool tier's arrive with the
        step that confirmed the save, so a short poll after the answer gets them)."""
        self.events.take()
        result = self.engine.request(prompt, max_tokens=8)
        self.events.poll(1.0)
        return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("events")
    model = str(make_model(tmp / "model", TEST_MODEL))
    logs = logs_dir()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    events = Subscriber(endpoint)
    daemon = Daemon().start()
    engine = EventsEngine(model, daemon.address, endpoint, logs / "events.log")
    try:
        engine.wait_ready()
        setup = Setup(daemon, engine, events, random.Random(1))
        # PUB/SUB drops what is sent before the subscription lands: prompt until events flow.
        deadline = time.monotonic() + 30
        while not events.seen and time.monotonic() < deadline:
            engine.request(setup.prompt()[:2 * BLOCK + 1], max_tokens=1)
            events.poll(0.5)
        assert events.seen, "no KV events from the engine"
        yield setup
    finally:
        engine.stop()
        daemon.stop()
        events.close()


def test_saved_blocks_are_announced_with_the_gpu_tiers_hashes(setup: Setup) -> None:
    """A computed prompt's full blocks appear twice: BlockStored GPU (vLLM's prefix cache) and
    BlockStored CPU (our pool, once the worker confirmed the save), with the same hashes, parent
    and tokens, so a router merges both tiers under one key."""
    prompt = setup.prompt()
    assert setup.run(prompt)["kvstore_pool_tokens"] == 0
    setup.events.wait_for(lambda seen: len(stored(seen, "CPU")) >= NUM_BLOCKS)
    events = setup.events.take()
    gpu, cpu = stored(events, "GPU"), stored(events, "CPU")
    assert len(gpu) == NUM_BLOCKS and cpu == gpu
    assert all(isinstance(h, int) for h in cpu)  # vLLM's default int encoding
    [cpu_event] = [e for e in events if e.kind == "BlockStored" and e.medium == "CPU"]
    [gpu_event] = [e for e in events if e.kind == "BlockStored" and e.medium == "GPU"]
    assert cpu_event.parent is None and cpu_event.token_ids == gpu_event.token_ids
    assert list(cpu_event.token_ids) == prompt[:NUM_BLOCKS * BLOCK]


def test_pool_hit_is_counted_per_tier_and_not_announced_again(setup: Setup) -> None:
    """With vLLM's own cache emptied the prompt comes from the pool: the request and the
    vllm:kvstore_prompt_tokens counters say so, the tokens match the computed run, and the pool
    blocks, already announced, are not announced again."""
    prompt = setup.prompt()
    first = setup.run(prompt)
    setup.events.wait_for(lambda seen: len(stored(seen, "CPU")) >= NUM_BLOCKS)
    before = {tier: setup.engine.metric("prompt_tokens", tier=tier)
              for tier in ("vram", "pool", "recomputed")}
    setup.engine.reset_prefix_cache()
    hit = setup.run(prompt)
    assert hit["kvstore_pool_tokens"] == NUM_BLOCKS * BLOCK
    assert hit["kvstore_vram_tokens"] == 0 and hit["kvstore_recomputed_tokens"] == 4
    assert hit["tokens"] == first["tokens"]
    assert max(abs(a - b) for a, b in zip(hit["logprobs"], first["logprobs"])) <= LOGPROB_TOL
    after = {tier: setup.engine.metric("prompt_tokens", tier=tier) for tier in before}
    assert after["pool"] - before["pool"] == NUM_BLOCKS * BLOCK
    assert after["recomputed"] - before["recomputed"] == 4
    assert after["vram"] == before["vram"]
    assert setup.engine.metric("loaded_tokens", transport="shm") >= NUM_BLOCKS * BLOCK
    events = setup.events.take()
    assert len(stored(events, "GPU")) == NUM_BLOCKS  # loaded into vLLM's cache
    assert stored(events, "CPU") == []


def test_invalidated_blocks_are_retracted_then_announced_again(setup: Setup) -> None:
    """`kvstore invalidate` drops the namespace; the next lookup misses, so the pool tier's
    blocks come back as BlockRemoved CPU, and once recomputed and saved, as BlockStored CPU."""
    prompt = setup.prompt()
    setup.run(prompt)
    setup.events.wait_for(lambda seen: len(stored(seen, "CPU")) >= NUM_BLOCKS)
    announced = stored(setup.events.take(), "CPU")
    with Client(setup.daemon.address) as client:
        names = list(client.stats()["namespaces"])
        assert sum(client.invalidate(bytes.fromhex(name)) for name in names) > 0
    setup.engine.reset_prefix_cache()
    assert setup.run(prompt)["kvstore_pool_tokens"] == 0
    setup.events.wait_for(lambda seen: len(stored(seen, "CPU")) >= NUM_BLOCKS)
    events = setup.events.take()
    assert removed(events, "CPU") == announced
    assert stored(events, "CPU") == announced
    kinds = [e.kind for e in events if e.medium == "CPU"]
    assert kinds.index("BlockRemoved") < kinds.index("BlockStored")
    assert setup.engine.metric("event_blocks", event="removed") >= NUM_BLOCKS


if __name__ == "__main__":
    main()

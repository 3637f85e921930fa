"""Time to first token end to end on vLLM's CPU backend, where a peer has a connector that runs
there: recompute, kvstore's connector (shared memory) and vLLM's own ExampleConnector (disk).

One replica computes a prompt and saves it; a second replica, which has never seen the prompt,
loads it. Two engines at a time (kvstore's pair, then ExampleConnector's pair). The recompute
baseline is the kvstore loader on fresh prompts with saving off: a pool miss, then a full prefill.

    python -m bench.peers_ttft --model DIR --storage DIR   # the ExampleConnector replica worker
"""

from __future__ import annotations

import argparse
import os
import shutil
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.models import BENCH_MODEL, make_model
from bench.replica import ReplicaProcess, serve

BLOCK_SIZE = 32  # the CPU attention backend needs a multiple of 32
KV_CACHE_GIB = 1  # a 4k-token prompt of the bench model is 256 MiB of float32 KV
_READY_S = 600.0  # two engines starting together on a busy 2-core machine
_REQUEST_S = 600.0

LMCACHE_CPU_REASON = (
    "n/a on CPU: LMCache 0.5.6's vLLM connectors need an accelerator. LMCacheConnectorV1 builds "
    "its KV copy path with lmcache.v1.gpu_connector.CreateGPUConnector, which has paged-memory "
    "connectors for cuda, xpu, musa and hpu only and raises 'No supported cpu connector found.' on "
    "vLLM's CPU backend; LMCacheMPConnector moves KV through CUDA IPC handles.")


class ExampleReplica(ReplicaProcess):
    """A replica with vLLM's ExampleConnector (this module as its worker), driven like any other."""

    def __init__(self, model: str, storage: str, log_path: str, max_model_len: int) -> None:
        args = [sys.executable, "-m", "bench.peers_ttft", "--model", model, "--storage", storage,
                "--max-model-len", str(max_model_len)]
        self.log = open(log_path, "w")
        # Its own process group, as ReplicaProcess does: stop() kills the engine processes too.
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=dict(os.environ),
                                     start_new_session=True)


def measure(sizes: list[int], repeats: int, model_dir: Path, log: Callable[[str], None],
            deadline: float) -> dict[str, Any]:
    """TTFT figures per prompt size; stops adding repeats (keeping one) past the deadline."""
    from bench.daemon import Daemon  # the same daemon process the tests and bench.ttft start

    model = str(make_model(model_dir, BENCH_MODEL))
    logs = Path(tempfile.mkdtemp(prefix="kvstore-peers-ttft-"))
    storage = tempfile.mkdtemp(prefix="kvstore-peers-example-")
    max_model_len = max(sizes) + 2 * BLOCK_SIZE
    samples: dict[str, dict[int, list[float]]] = {}
    checks: list[dict[str, Any]] = []
    rng = random.Random(20240611)
    prompts = {n: [[rng.randrange(1, BENCH_MODEL.vocab_size) for _ in range(n)]
                   for _ in range(2 * repeats)] for n in sizes}
    daemon = Daemon(pool_size="1536MiB").start()  # every saved prompt fits: no eviction
    try:
        log(f"TTFT: kvstore replicas (saver, loader), logs in {logs}")
        kv_extra = {"load_timeout_ms": 60_000}
        pair = [ReplicaProcess(model, daemon.address, extra, log_path=str(logs / f"kv-{role}.log"),
                               max_model_len=max_model_len, kv_cache_gib=KV_CACHE_GIB,
                               block_size=BLOCK_SIZE)
                for role, extra in (("saver", kv_extra), ("loader", {**kv_extra, "save": False}))]
        _run_pair(pair, "kvstore_shm", prompts, repeats, samples, checks, log, deadline)
        log("TTFT: ExampleConnector replicas (saver, loader)")
        pair = [ExampleReplica(model, storage, str(logs / f"example-{role}.log"), max_model_len)
                for role in ("saver", "loader")]
        _run_pair(pair, "example_disk", prompts, repeats, samples, checks, log, deadline)
    finally:
        daemon.stop()
        shutil.rmtree(storage, ignore_errors=True)
    return {
        "seconds": {name: {str(n): statistics.median(v) for n, v in per.items()}
                    for name, per in samples.items()},
        "samples": {name: {str(n): v for n, v in per.items()} for name, per in samples.items()},
        "checks": checks,
        "model": BENCH_MODEL.__dict__,
        "dtype": "float32",
        "block_size": BLOCK_SIZE,
        "repeats": repeats,
        "lmcache": LMCACHE_CPU_REASON,
        "ttft": "wall time of a 1-token generate() inside the replica",
    }


def _run_pair(pair: list[ReplicaProcess], system: str, prompts: dict[int, list[list[int]]],
              repeats: int, samples: dict[str, dict[int, list[float]]],
              checks: list[dict[str, Any]], log: Callable[[str], None], deadline: float) -> None:
    saver, loader = pair
    try:
        for replica in pair:
            replica.wait_ready(_READY_S)
        warm = [random.Random(1).randrange(1, 100) for _ in range(300)]
        for replica in pair:  # first-call costs stay out of the figures
            replica.request(warm, max_tokens=1, timeout_s=_REQUEST_S)
        for n, plist in prompts.items():
            for i in range(repeats):
                if i and time.monotonic() > deadline:
                    log(f"TTFT: time budget spent, {i} repeat(s) at {n} tokens")
                    break
                prompt = plist[2 * i]
                saved = saver.request(prompt, max_tokens=1, timeout_s=_REQUEST_S)
                loader_result = loader.request(prompt, max_tokens=1, timeout_s=_REQUEST_S)
                _add(samples, f"{system}_save", n, saved["seconds"])
                _add(samples, system, n, loader_result["seconds"])
                if system == "kvstore_shm":  # the loader saves nothing: a fresh prompt recomputes
                    fresh = loader.request(plist[2 * i + 1], max_tokens=1, timeout_s=_REQUEST_S)
                    _add(samples, "recompute", n, fresh["seconds"])
                checks.append(_check(system, n, saved, loader_result))
                log(f"TTFT {system:<13} {n:>5} tokens: save {saved['seconds']:.2f} s, load "
                    f"{loader_result['seconds']:.2f} s ({checks[-1]['loaded_tokens']} tokens loaded)"
                    + (f", recompute {samples['recompute'][n][-1]:.2f} s"
                       if system == "kvstore_shm" else ""))
    finally:
        for replica in pair:
            replica.stop()


def _add(samples: dict[str, dict[int, list[float]]], name: str, n: int, value: float) -> None:
    samples.setdefault(name, {}).setdefault(n, []).append(float(value))


def _check(system: str, n: int, saved: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any]:
    """Whether the loader really loaded the prompt and produced the saver's token."""
    loaded_tokens = (loaded["pool_tokens"] if system == "kvstore_shm"
                     else loaded["num_cached_tokens"])
    return {
        "system": system, "tokens": n, "loaded_tokens": int(loaded_tokens),
        "same_token": saved["tokens"] == loaded["tokens"],
        "logprob_diff": abs(saved["logprobs"][0] - loaded["logprobs"][0])
        if saved["logprobs"] and loaded["logprobs"] else None,
    }


def build_example_llm(model: str, storage: str, max_model_len: int) -> Any:
    """The LLM of bench.replica.build_llm, with vLLM's ExampleConnector instead of kvstore's."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # replicas share the cores
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from vllm import LLM

    kv_transfer = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                   "kv_connector_extra_config": {"shared_storage_path": storage}}
    return LLM(model, skip_tokenizer_init=True, dtype="float32", block_size=BLOCK_SIZE,
               max_model_len=max_model_len, enforce_eager=True, seed=0,
               enable_prefix_caching=True, kv_transfer_config=kv_transfer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="an ExampleConnector replica (JSON lines)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--storage", required=True, help="ExampleConnector's shared_storage_path")
    parser.add_argument("--max-model-len", type=int, default=4608)
    args = parser.parse_args(argv)
    # As bench.replica: keep a private stdout for results, send vLLM's logging to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    serve(build_example_llm(args.model, args.storage, args.max_model_len), out)


if __name__ == "__main__":
    main()

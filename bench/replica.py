"""One vLLM CPU replica as a process: JSON requests on stdin, JSON results on stdout.

    python -m bench.replica --model DIR [--kvstore tcp://127.0.0.1:5555] [--extra '{...}']

Each input line {"id", "prompt": [token ids], "max_tokens"} gets one output line with the generated
token ids, their log-probabilities, the prompt tokens served from caches, and the wall time; a line
with "prompts" (a list) runs them in one batch and answers {"id", "results": [one per prompt]}.
A line {"ready": true} is printed once the engine is up. Used by the demo, e2e tests and bench.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

CONNECTOR = {
    "kv_connector": "KVStoreConnector",
    "kv_connector_module_path": "connectors.vllm_v1.connector",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "recompute",
}


def build_llm(model: str, kvstore: str | None, extra: dict[str, Any], block_size: int,
              max_model_len: int, kv_cache_gib: int, prefix_caching: bool,
              num_blocks: int | None = None, tp: int = 1) -> Any:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # replicas share the cores
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from vllm import LLM

    kv_transfer = None
    if kvstore:
        kv_transfer = {**CONNECTOR, "kv_connector_extra_config": {"address": kvstore, **extra}}
    return LLM(model, skip_tokenizer_init=True, dtype="float32", block_size=block_size,
               max_model_len=max_model_len, enforce_eager=True, seed=0,
               enable_prefix_caching=prefix_caching, kv_transfer_config=kv_transfer,
               num_gpu_blocks_override=num_blocks, tensor_parallel_size=tp,
               distributed_executor_backend="mp" if tp > 1 else None)


def serve(llm: Any, out: Any) -> None:
    from vllm import SamplingParams

    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("reset_prefix_cache"):
            llm.reset_prefix_cache()  # drop tier 0 so the next prompt must come from the pool
            print(json.dumps({"id": req.get("id"), "reset": True}), file=out, flush=True)
            continue
        params = SamplingParams(max_tokens=req.get("max_tokens", 8), temperature=0.0,
                                logprobs=0, ignore_eos=True)
        # "prompts": one generate call for all, so the engine batches (and may preempt) them.
        prompts = req["prompts"] if "prompts" in req else [req["prompt"]]
        start = time.perf_counter()
        results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        answers = [_answer(result, len(p), elapsed) for result, p in zip(results, prompts)]
        reply = {"results": answers} if "prompts" in req else answers[0]
        print(json.dumps({"id": req.get("id"), **reply}), file=out, flush=True)


def _answer(result: Any, num_prompt_tokens: int, seconds: float) -> dict[str, Any]:
    completion = result.outputs[0]
    logprobs = [float(step[tok].logprob) for tok, step in
                zip(completion.token_ids, completion.logprobs or [])]
    params_out = result.kv_transfer_params or {}
    return {
        "tokens": list(completion.token_ids), "logprobs": logprobs,
        "num_prompt_tokens": num_prompt_tokens,
        "num_cached_tokens": int(result.num_cached_tokens or 0),
        "pool_tokens": int(params_out.get("kvstore_pool_tokens", 0)),
        "pool_loads": int(params_out.get("kvstore_num_loads", 0)),  # > 1: reloaded after preemption
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--kvstore", default=None, help="daemon address; omit for no connector")
    parser.add_argument("--extra", default="{}", help="kv_connector_extra_config JSON")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--num-blocks", type=int, default=None,
                        help="vLLM KV blocks (num_gpu_blocks_override); default: what "
                             "--kv-cache-gib holds")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    args = parser.parse_args()
    # vLLM logs to stdout (and its engine processes inherit it): keep a private copy of stdout
    # for results and send everything else written to fd 1 to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    llm = build_llm(args.model, args.kvstore, json.loads(args.extra), args.block_size,
                    args.max_model_len, args.kv_cache_gib, not args.no_prefix_caching,
                    args.num_blocks, args.tp)
    serve(llm, out)


if __name__ == "__main__":
    main()


class ReplicaProcess:
    """A replica started as `python -m bench.replica`, driven through its stdin and stdout."""

    def __init__(self, model: str, kvstore: str | None = None, extra: dict[str, Any] | None = None,
                 log_path: str | None = None, env: dict[str, str] | None = None,
                 wrap: list[str] | None = None, **flags: Any) -> None:
        import subprocess

        # wrap: run under this, e.g. `ip netns exec NS` (a replica on another node's network)
        args = [*(wrap or []), sys.executable, "-m", "bench.replica", "--model", model]
        if kvstore:
            args += ["--kvstore", kvstore, "--extra", json.dumps(extra or {})]
        for name, value in flags.items():
            flag = "--" + name.replace("_", "-")
            args += [flag] if value is True else [flag, str(value)]
        self.log = open(log_path, "w") if log_path else subprocess.DEVNULL
        # Its own process group: vLLM's engine and worker processes go down with it.
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env={**os.environ, **(env or {})},
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        """The replica's own process (vLLM's engine and worker processes are its children)."""
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        line = self._read_line(timeout_s)
        if not json.loads(line).get("ready"):
            raise RuntimeError(f"replica did not start: {line!r}")

    def request(self, prompt: list[int], max_tokens: int = 8, timeout_s: float = 120.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompt": prompt, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        return dict(json.loads(self._read_line(timeout_s)))

    def request_batch(self, prompts: list[list[int]], max_tokens: int = 8,
                      timeout_s: float = 300.0) -> list[dict[str, Any]]:
        """Generate for all prompts in one engine call (batched; preemption can happen)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        return list(json.loads(self._read_line(timeout_s))["results"])

    def reset_prefix_cache(self) -> None:
        """Empty the replica's own VRAM prefix cache (tier 0)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"reset_prefix_cache": True}) + "\n")
        self.proc.stdin.flush()
        self._read_line(60.0)

    def stop(self) -> None:
        """Close stdin (a clean engine shutdown), then kill whatever of the group is left."""
        import signal
        import subprocess

        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def _read_line(self, timeout_s: float) -> str:
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"replica gave no answer within {timeout_s} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"replica exited with {self.proc.wait()}")
        return line

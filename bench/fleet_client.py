"""Send a workload trace through the router as real OpenAI /v1/completions requests.

Closed loop with `concurrency` requests in flight; requests start in trace order, and a session's
turn starts only after its previous turn finished (a user reads the reply before typing).
Each request streams, so the time to its first chunk is the TTFT; the final chunk carries usage
(prompt tokens, cached tokens: VRAM + pool). Each carries X-Session-ID (consistent_hash routes on
it) and a request_id naming its trace id, which vLLM logs on the replica that served it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from bench.fleet_model import text
from bench.fleet_procs import HTTP_TIMEOUT_S, MODEL_NAME, http


@dataclass
class Result:
    """One request's outcome, in trace order."""

    id: int
    session: str
    kind: str
    request_id: str
    prompt_tokens: int
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = float("nan")
    latency_s: float = float("nan")
    start_s: float = 0.0  # since the run started
    ok: bool = False
    error: str = ""

    def row(self) -> dict[str, Any]:
        return asdict(self)


def send_trace(router_url: str, trace: Sequence[dict[str, Any]], concurrency: int,
               max_tokens: int, tag: str,
               on_done: Callable[[Result], None] | None = None) -> tuple[list[Result], float]:
    """Every request of trace through the router; (results in trace order, wall seconds)."""
    finished = {request["id"]: threading.Event() for request in trace}
    previous: dict[int, threading.Event] = {}  # each turn waits for the one before it
    last: dict[str, int] = {}
    for request in trace:
        if request["session"] in last:
            previous[request["id"]] = finished[last[request["session"]]]
        last[request["session"]] = request["id"]
    results: dict[int, Result] = {}
    lock = threading.Lock()
    start = time.perf_counter()

    def one(request: dict[str, Any]) -> None:
        before = previous.get(request["id"])
        if before is not None:
            before.wait(HTTP_TIMEOUT_S)
        result = _stream(router_url, request, max_tokens, f"fleet-{tag}-{request['id']}", start)
        results[request["id"]] = result
        finished[request["id"]].set()
        if on_done:
            with lock:  # one callback at a time, in completion order
                on_done(result)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, trace))
    return [results[r["id"]] for r in trace], time.perf_counter() - start


def _stream(router_url: str, request: dict[str, Any], max_tokens: int, request_id: str,
            start: float) -> Result:
    result = Result(request["id"], request["session"], request["kind"], request_id,
                    len(request["prompt"]))
    body = {"model": MODEL_NAME, "prompt": text(request["prompt"]), "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "request_id": request_id}
    sent = time.perf_counter()
    result.start_s = sent - start
    try:
        with http("POST", router_url + "/v1/completions", body, timeout_s=HTTP_TIMEOUT_S,
                  headers={"X-Session-ID": request["session"],
                           "X-Request-Id": request_id}) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if chunk.get("choices") and result.ttft_s != result.ttft_s:  # still NaN
                    result.ttft_s = time.perf_counter() - sent
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = int(usage["prompt_tokens"])
                    result.completion_tokens = int(usage["completion_tokens"])
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = int(details.get("cached_tokens") or 0)
        result.latency_s = time.perf_counter() - sent
        result.ok = result.completion_tokens == max_tokens
        if not result.ok:
            result.error = f"{result.completion_tokens} of {max_tokens} tokens"
    except Exception as exc:  # noqa: BLE001 - a failed request is a figure (the failure run)
        result.latency_s = time.perf_counter() - sent
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    return result

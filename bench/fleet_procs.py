"""Processes of the fleet benchmark: real `vllm serve` CPU replicas (OpenAI server) and vllm-router.

A replica is vLLM's OpenAI API server on loopback with the fleet model (bench/fleet_model.py),
optionally the kvstore connector, and vLLM's KV events published on a ZeroMQ port of its own
(what kv_aware routing consumes). The router is the `vllm-router` launcher from PyPI
(vllm-router 0.1.17) with one policy. Both log to files; errors name the log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


MODEL_NAME = "tiny"
OMP_THREADS = 1  # per replica (Replica.start says why)
BLOCK_SIZE = 32  # the CPU attention backend needs multiples of 32
MAX_MODEL_LEN = 2048
CONNECTOR = {
    "kv_connector": "KVStoreConnector",
    "kv_connector_module_path": "connectors.vllm_v1.connector",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "recompute",
}
# Generous: on 2 shared, loaded cores a slow daemon reply must not read as a miss.
CONNECTOR_EXTRA = {"timeout_ms": 5000, "lookup_timeout_ms": 5000, "load_timeout_ms": 60000,
                   "retry_interval_ms": 50}
HTTP_TIMEOUT_S = 600.0  # one request on a loaded 2-core machine, queued behind others
POLL_S = 0.5  # health probe interval while a process starts


# Below Linux's ephemeral range (32768-60999): a port picked here and bound minutes later by a
# starting engine is not handed out meanwhile as the source port of some other connection.
QUIET_PORTS = (20000, 32000)


# Ports this process already handed out. Replicas start side by side and bind late, and vLLM's
# server binds with SO_REUSEPORT, so two picks of the same port would both "succeed": two
# replicas behind one URL (a CI run saw it: the router refused a duplicate worker URL).
_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback TCP port outside the ephemeral range that nothing holds now, never the same twice."""
    import random
    import socket

    rng = random.SystemRandom()
    while True:
        port = rng.randrange(*QUIET_PORTS)
        if port in _GIVEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port


class StartError(RuntimeError):
    """A replica or the router did not come up; the message names its log."""


def router_binary() -> str:
    """The vllm-router launcher beside this Python, or on PATH; a clear error if missing."""
    beside = Path(sys.executable).with_name("vllm-router")
    found = str(beside) if beside.exists() else shutil.which("vllm-router")
    if not found:
        raise StartError("vllm-router not found: install the dev extra (pip install "
                         "'vllm-router==0.1.17'); bench.fleet puts it in front of the replicas")
    return found


def http(method: str, url: str, body: Any = None, timeout_s: float = 10.0,
         headers: dict[str, str] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    return urllib.request.urlopen(request, timeout=timeout_s)


def _healthy(url: str) -> bool:
    try:
        with http("GET", url, timeout_s=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class Replica:
    """One `vllm serve` CPU process (python -m vllm.entrypoints.openai.api_server)."""

    def __init__(self, name: str, model: str, log_dir: Path, kvstore: str | None,
                 num_blocks: int, extra: dict[str, Any] | None = None) -> None:
        self.name, self.model, self.kvstore, self.num_blocks = name, model, kvstore, num_blocks
        self.extra = {**CONNECTOR_EXTRA, **(extra or {})}
        self.port, self.events_port = free_port(), free_port()
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def events(self) -> str:
        return f"tcp://127.0.0.1:{self.events_port}"

    def start(self) -> Replica:
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                "--dtype", "float32", "--block-size", str(BLOCK_SIZE),
                "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--seed", "0",
                "--num-gpu-blocks-override", str(self.num_blocks),
                "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens
                "--enable-scale-out",  # /v1/completions/render, which cache_aware asks
                "--enable-log-requests", "--max-log-len", "0",  # "Received request <id>": who served
                "--kv-events-config", json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                                                  "endpoint": f"tcp://*:{self.events_port}"})]
        if self.kvstore:
            args += ["--kv-transfer-config", json.dumps(
                {**CONNECTOR, "kv_connector_extra_config": {"address": self.kvstore, **self.extra}})]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # replicas share the cores
               # One OpenMP thread each: with torch's default (one per core) the replicas'
               # threads spin against each other, and two prefills at once took 4-5x as long as
               # one alone (0.68-0.86 s vs 0.10-0.14 s for 1,500 tokens here; 0.17 s with one
               # thread), so the figures measured oversubscription, not the caches.
               "OMP_NUM_THREADS": str(OMP_THREADS),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "VLLM_SERVER_DEV_MODE": "1"}  # /reset_prefix_cache between configurations
        log = open(self.log_path, "wb")
        # Its own process group: vLLM's engine process goes down with it.
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not _healthy(self.url + "/health"):
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise StartError(f"replica {self.name} exited with {self.proc.returncode} while "
                                 f"starting; log: {self.log_path}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise StartError(f"replica {self.name} not ready within {timeout_s:.0f} s; "
                                 f"log: {self.log_path}\n{self.tail()}")
            time.sleep(POLL_S)

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def reset_prefix_cache(self) -> None:
        """Empty the VRAM tier (vLLM's dev endpoint; the server runs with VLLM_SERVER_DEV_MODE)."""
        http("POST", self.url + "/reset_prefix_cache", {}, timeout_s=120).close()

    def metrics(self) -> dict[str, float]:
        """Counters of /metrics: name{labels} -> value (kvstore and prefix-cache ones)."""
        with http("GET", self.url + "/metrics", timeout_s=30) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(("vllm:kvstore_", "vllm:prefix_cache", "vllm:prompt_tokens",
                                "vllm:request_success")) and "_created" not in line:
                key, _, value = line.rpartition(" ")
                key = re.sub(r'(engine|model_name)="[^"]*",?', "", key).replace(",}", "}")
                out[key.replace("{}", "")] = out.get(key.replace("{}", ""), 0.0) + float(value)
        return out

    def served_ids(self) -> set[str]:
        """Request ids this replica's engine accepted so far (from --enable-log-requests)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return set(re.findall(r"Received request (cmpl-\S+)-\d+:", text))  # -<choice index>

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole group, as a crashed node would go."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        self.kill()


class Router:
    """vllm-router in front of the given replicas with one policy."""

    def __init__(self, policy: str, replicas: list[Replica], log_dir: Path, tag: str,
                 options: list[str] | None = None) -> None:
        self.policy, self.replicas, self.options = policy, replicas, list(options or [])
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = log_dir / f"router-{tag}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> Router:
        args = [router_binary(), "--host", "127.0.0.1", "--port", str(self.port),
                "--prometheus-port", str(self.metrics_port), "--policy", self.policy,
                "--worker-urls", *[r.url for r in self.replicas],
                "--worker-startup-check-interval", "1",
                # A dead replica leaves the rotation within seconds (the failure run).
                "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
                "--request-timeout-secs", str(int(HTTP_TIMEOUT_S)), *self.options]
        if self.policy == "kv_aware":
            for r in self.replicas:
                args += ["--kv-event-source", f"{r.url}={r.events}"]
            args += ["--kv-event-block-size", str(BLOCK_SIZE), "--kv-event-model", MODEL_NAME]
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "NO_COLOR": "1"}, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while not _healthy(self.url + "/health"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise StartError(f"vllm-router ({self.policy}) did not start; log: "
                                 f"{self.log_path}\n{text}")
            time.sleep(POLL_S)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.proc = None

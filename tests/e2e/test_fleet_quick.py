"""`python -m bench.fleet --quick` as a CI test: a daemon, two real `vllm serve` CPU replicas with
the connector, vllm-router (round_robin, then kv_aware) in front, the seeded workload through it.

Asserts behaviour, never timings: every request completed with its tokens, round-robin spread the
requests over both replicas, and under round-robin some prompt tokens came from the pool (a
replica reused a prefix the other one computed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import fleet

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_fleet_quick(tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    assert fleet.main(["--quick", "--out", str(out), "--no-plots"]) == 0
    res = json.loads(out.read_text())
    trace_requests = res["parameters"]["trace"]["num_requests"]
    for run in res["runs"]:
        where = f"{run['policy']} (logs in {res['logs']})"
        assert run["summary"]["completed"] == trace_requests, (
            f"{where}: {[r['error'] for r in run['requests'] if not r['ok']]}")
        assert all(r["replica"] for r in run["requests"]), f"{where}: a request no replica logged"
    per_replica = res["per_replica"]["pool"]["round_robin"]["2"]
    assert len(per_replica) == 2 and min(per_replica.values()) > 0, per_replica
    assert res["pool_hit_rate"]["pool"]["round_robin"]["2"] > 0, "no prompt token from the pool"
    assert res["hit_rate"]["pool"]["kv_aware"]["2"] > 0

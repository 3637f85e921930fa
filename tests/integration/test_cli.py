"""`kvstore` as an operator sees it: startup lines, signals, startup errors, put/get, versions."""

from __future__ import annotations

import os
import signal
import time

import msgpack
import pytest

from kvstore import protocol
from kvstore.client import Client
from kvstore.errors import VersionMismatch
from kvstore.keys import Namespace
from kvstore.protocol import Op
from bench.daemon import Daemon, free_port
from tests.integration.helpers import (
    CALL_S, MiB, random_blocks, raw_dealer, run_cli, stats)


def _exit_code(d: Daemon, timeout_s: float = 30.0) -> int:
    assert d.proc is not None
    return d.proc.wait(timeout_s)


def _one_line_error(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvstore: error: "), text
    return lines[0]


@pytest.mark.timeout(90)
def test_serve_prints_its_addresses_and_segment(daemon):
    """serve announces where it listens and which segment it created, with its size."""
    out = daemon.output()
    assert f"kvstore: listening on {daemon.address}\n" in out
    assert f"segment /dev/shm/{daemon.segment} (256.0 MiB, 8 pages of 32.0 MiB)" in out


@pytest.mark.timeout(90)
def test_serve_without_flags_uses_the_documented_defaults(make_daemon):
    """With no --pool-size the daemon reserves its documented default (2 GiB in 64 MiB pages)."""
    d = make_daemon(pool_size=None).start()
    assert "(2.0 GiB, 32 pages of 64.0 MiB), policy freq-lru" in d.output()
    with Client(d.address, 10.0) as client:
        assert client.stats()["num_pages"] == 32


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_daemon_with_exit_0_and_removes_segment(make_daemon, ctx, sig):
    """SIGTERM and SIGINT end serve cleanly: exit 0, segment gone, a last line saying so."""
    d = make_daemon().start()
    with Client(d.address, CALL_S, ctx=ctx) as client:
        client.put(Namespace(b"m"), [(b"k", None, bytes(3 * MiB))])
        assert client.get(Namespace(b"m"), [b"k"]) == [bytes(3 * MiB)]
        assert d.segment_path.exists()
        d.proc.send_signal(sig)
        assert _exit_code(d) == 0
    assert not d.segment_path.exists()
    assert "kvstore: stopped, segment removed" in d.output()
    assert "Traceback" not in d.output()


@pytest.mark.timeout(90)
def test_taken_port_fails_with_one_line_error_and_leaves_no_segment(daemon, make_daemon):
    """A second daemon on a port in use exits non-zero with one line and removes its segment."""
    second = make_daemon(port=daemon.port).start(wait=False)
    assert _exit_code(second) != 0
    line = _one_line_error(second.output())
    assert f"127.0.0.1:{daemon.port}" in line and "already in use" in line
    assert not second.segment_path.exists()
    assert stats(daemon.address)["num_pages"] == 8, "the first daemon stopped answering"


@pytest.mark.timeout(90)
def test_segment_name_of_a_running_daemon_is_refused(daemon, make_daemon):
    """A second daemon given a live daemon's segment name fails and leaves that segment alone."""
    second = make_daemon(segment=daemon.segment).start(wait=False)
    assert _exit_code(second) != 0
    assert "in use by a running daemon" in _one_line_error(second.output())
    assert daemon.segment_path.exists()
    with Client(daemon.address, CALL_S) as client:
        assert client.put(Namespace(b"m"), [(b"k", None, b"v")]).num_stored == 1
        assert client.get(Namespace(b"m"), [b"k"]) == [b"v"]


@pytest.mark.timeout(90)
def test_pool_larger_than_shm_fails_with_one_line_error(make_daemon):
    """A pool that /dev/shm cannot hold is refused at start, saying how much is free."""
    st = os.statvfs("/dev/shm")
    too_big = 2 * st.f_blocks * st.f_frsize
    d = make_daemon(pool_size=str(too_big)).start(wait=False)
    assert _exit_code(d) != 0
    line = _one_line_error(d.output())
    assert "cannot reserve" in line and "GiB free" in line, line
    assert not d.segment_path.exists()


@pytest.mark.timeout(120)
def test_cli_put_and_get_round_trip_a_file_between_processes(daemon, tmp_path):
    """`kvstore put` in one process and `kvstore get` in another return the same bytes."""
    data = random_blocks(9, [MiB + 3])[0]
    address = ["--address", daemon.address]
    put = run_cli("put", *address, "--namespace", "demo", "--hash", "block-1", stdin=data)
    assert put.returncode == 0, put.stderr
    assert b"stored 1 block of 1048579 bytes over shared memory" in put.stderr
    got = run_cli("get", *address, "--namespace", "demo", "--hash", "block-1")
    assert got.returncode == 0, got.stderr
    assert got.stdout == data
    other_ns = run_cli("get", *address, "--namespace", "other", "--hash", "block-1")
    assert (other_ns.returncode, other_ns.stdout) == (1, b"")
    assert other_ns.stderr == b"kvstore: not found\n"


@pytest.mark.timeout(90)
def test_cli_ping_and_stats_answer_and_fail_fast_without_daemon(daemon):
    """ping and stats print the daemon's answer; against no daemon they fail within --timeout."""
    ping = run_cli("ping", "--address", daemon.address)
    assert ping.returncode == 0 and b"answered in" in ping.stdout
    st = run_cli("stats", "--address", daemon.address)
    assert st.returncode == 0 and b"0 blocks, 0 reserved, 0 leases" in st.stdout
    start = time.monotonic()
    dead = run_cli("ping", "--address", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert time.monotonic() - start < 10
    assert dead.returncode != 0
    line = _one_line_error(dead.stderr.decode())
    assert "cannot reach tcp://127.0.0.1:" in line and "within 0.5 s" in line, line


@pytest.mark.timeout(90)
def test_hello_of_another_protocol_version_gets_a_version_error(daemon, ctx):
    """A raw HELLO with another version is answered with error "version" naming both versions."""
    with raw_dealer(ctx, daemon.address) as sock:
        sock.send_multipart([msgpack.packb({"v": protocol.VERSION + 1, "op": Op.HELLO, "id": 7,
                                            "version": protocol.VERSION + 1})])
        reply = protocol.decode_header(sock.recv_multipart()[0])
    assert (reply["ok"], reply["id"], reply["error"]) == (False, 7, "version")
    assert f"protocol {protocol.VERSION}, client {protocol.VERSION + 1}" in reply["msg"]


@pytest.mark.timeout(90)
def test_client_of_another_protocol_version_raises_version_mismatch(daemon, ctx, monkeypatch):
    """A client built for another protocol version raises VersionMismatch, not a timeout."""
    monkeypatch.setattr(protocol, "VERSION", protocol.VERSION + 1)
    with Client(daemon.address, CALL_S, ctx=ctx) as client:
        with pytest.raises(VersionMismatch) as err:
            client.lookup(Namespace(b"m"), [b"k"])
    assert err.value.code == "version"
    assert "install the same kvstore version" in err.value.message

"""CURVE keys, the refusal to listen unencrypted beyond loopback, and the segment's file mode."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import msgpack
import pytest
import zmq.auth

from kvstore.client import Client
from kvstore.errors import ServerUnavailable
from kvstore.keys import Namespace
from kvstore.protocol import CHUNK_BYTES, VERSION, Op
from bench.daemon import free_port
from tests.integration.helpers import CALL_S, MiB, random_blocks, run_cli, stats

NS = Namespace(b"model-a")


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    done = run_cli("keygen", str(directory))
    assert done.returncode == 0, done.stderr
    return directory


@pytest.fixture
def curve_daemon(make_daemon, keys):  # type: ignore[no-untyped-def]
    return make_daemon(extra_args=["--curve-keys", str(keys)], client_keys=keys).start()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.timeout(90)
def test_keygen_writes_daemon_and_client_keys_readable_only_by_owner(keys):
    """keygen makes server and client keypairs, authorizes the client, and hides the secrets."""
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret",
                 "clients/client.key"):
        assert (keys / name).is_file(), name
    assert _mode(keys) == 0o700
    assert _mode(keys / "server.key_secret") == 0o600
    assert _mode(keys / "client.key_secret") == 0o600
    assert zmq.auth.load_certificate(keys / "server.key_secret")[1] is not None


@pytest.mark.timeout(90)
@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
def test_client_with_authorized_keys_round_trips(curve_daemon, keys, ctx, use_shm):
    """A client holding the keygen'd client keypair stores and reads blocks through CURVE."""
    with Client(curve_daemon.address, CALL_S, ctx=ctx, curve_dir=keys, use_shm=use_shm) as client:
        assert client.put(NS, [(b"secret", None, b"s" * 5000)]).num_stored == 1
        assert client.get(NS, [b"secret"]) == [b"s" * 5000]
        assert client.is_local is use_shm
    assert "CURVE on" in curve_daemon.output()


@pytest.mark.timeout(90)
def test_client_with_unknown_keypair_gets_nothing(curve_daemon, keys, tmp_path, ctx):
    """A keypair the daemon never authorized gets no answer: ServerUnavailable, nothing stored."""
    rogue = tmp_path / "rogue"
    rogue.mkdir()
    zmq.auth.create_certificates(rogue, "client")
    shutil.copy(keys / "server.key", rogue / "server.key")  # it even knows the daemon's key
    with Client(curve_daemon.address, 0.5, ctx=ctx, curve_dir=rogue) as client:
        for call in (client.ping, lambda: client.put(NS, [(b"x", None, b"x")])):
            with pytest.raises(ServerUnavailable):
                call()
    assert stats(curve_daemon.address, keys)["num_blocks"] == 0


@pytest.mark.timeout(90)
def test_client_without_keys_gets_nothing_from_a_curve_daemon(curve_daemon, keys, ctx):
    """A plaintext client cannot talk to a daemon started with --curve-keys."""
    before = stats(curve_daemon.address, keys)["requests"]
    with Client(curve_daemon.address, 0.5, ctx=ctx) as client:
        with pytest.raises(ServerUnavailable):
            client.ping()
    after = stats(curve_daemon.address, keys)["requests"]
    assert after["ping"] == before["ping"], "a plaintext ping reached the daemon"


@pytest.mark.timeout(90)
def test_client_expecting_another_daemon_key_gets_nothing(curve_daemon, keys, tmp_path, ctx):
    """A client whose server.key is not this daemon's refuses it: ServerUnavailable."""
    other = tmp_path / "other"
    assert run_cli("keygen", str(other)).returncode == 0
    shutil.copy(keys / "client.key_secret", other / "client.key_secret")  # authorized client
    with Client(curve_daemon.address, 0.5, ctx=ctx, curve_dir=other) as client:
        with pytest.raises(ServerUnavailable):
            client.ping()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("address", ["tcp://0.0.0.0:{port}", "tcp://*:{port}"])
def test_non_loopback_tcp_without_keys_is_refused_before_binding(address):
    """serve refuses a non-loopback --tcp without keys: one-line error, exit != 0, no segment."""
    segment = f"kvstore-test-refused-{free_port()}"
    done = run_cli("serve", "--tcp", address.format(port=free_port()), "--segment", segment,
                   "--pool-size", "32MiB")
    err = done.stderr.decode()
    assert done.returncode != 0
    assert err.count("\n") == 1 and err.startswith("kvstore: error: refusing to listen on"), err
    assert "--curve-keys" in err and "--insecure" in err
    assert b"listening" not in done.stdout
    assert not Path("/dev/shm", segment).exists()


@pytest.mark.timeout(90)
def test_insecure_flag_lets_a_non_loopback_address_pass_the_check():
    """With --insecure the address check passes; an invalid segment name then stops it, unbound."""
    done = run_cli("serve", "--tcp", f"tcp://0.0.0.0:{free_port()}", "--insecure",
                   "--segment", "no/such name", "--pool-size", "32MiB")
    err = done.stderr.decode()
    assert done.returncode != 0
    assert "refusing" not in err and "segment name" in err, err
    assert b"listening" not in done.stdout


@pytest.mark.timeout(90)
def test_segment_file_is_readable_only_by_its_owner(daemon):
    """The shared-memory segment is created with mode 0600."""
    assert _mode(daemon.segment_path) == 0o600
    assert daemon.segment_path.stat().st_size > 256 * 1024 * 1024 - 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nbytes", [CHUNK_BYTES, CHUNK_BYTES + 1, 9 * MiB],
                         ids=["chunk", "chunk+1", "9MiB"])
def test_full_chunk_frames_pass_curve_both_ways(curve_daemon, keys, ctx, nbytes):
    """Payload frames of a whole CHUNK_BYTES, CURVE-encrypted, fit both ends' frame limit. The
    bytes stay on the encrypted connection: no plain side stream is offered (kvstore/bulk.py)."""
    data = random_blocks(nbytes, [nbytes])[0]
    with Client(curve_daemon.address, CALL_S, ctx=ctx, curve_dir=keys, use_shm=False) as client:
        assert client.put(NS, [(b"big", None, data)]).num_stored == 1
        assert client.get(NS, [b"big"]) == [data]
        assert client.stats()["bulk"]["offered"] == 0


@pytest.mark.timeout(90)
def test_curve_still_cuts_off_a_frame_one_byte_past_a_chunk(curve_daemon, keys, ctx):
    """The CURVE allowance covers encryption only: a CHUNK_BYTES + 1 frame still drops its sender."""
    public, secret = zmq.auth.load_certificate(keys / "client.key_secret")
    server_public, _ = zmq.auth.load_certificate(keys / "server.key")
    header = msgpack.packb({"v": VERSION, "op": Op.PING, "id": 1})
    for nbytes, answered in ((CHUNK_BYTES, True), (CHUNK_BYTES + 1, False)):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 2000)
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = (
            public, secret, server_public)
        sock.connect(curve_daemon.address)
        try:
            sock.send_multipart([header, bytes(nbytes)])
            if answered:
                assert sock.recv_multipart(), nbytes
            else:
                with pytest.raises(zmq.Again):
                    sock.recv_multipart()
        finally:
            sock.close(0)
    assert stats(curve_daemon.address, keys)["num_blocks"] == 0

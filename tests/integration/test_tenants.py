"""Tenants: namespaces bound to client keys, and who may reach a daemon on its own host.

A real daemon with CURVE keys and DIR/tenants.toml; each client has its own key pair. A namespace
belongs to the tenant named before its first '/' (the connector's `tenant` setting puts it there).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq.auth

from kvstore.client import Client
from kvstore.errors import ServerError, ServerUnavailable
from kvstore.keys import Namespace
from bench.daemon import Daemon, wait_until
from tests.integration.helpers import CALL_S, run_cli

NS_A = Namespace(b"a/" + bytes(range(16)))
NS_B = Namespace(b"b/" + bytes(range(16)))
NOBODY_UID = 65534

TENANTS_TOML = """\
[tenants.a]
keys = ["alice.key"]

[tenants.b]
keys = ["bob.key"]

[tenants.audit]
keys = ["carol.key"]
read = ["a"]

[tenants.ops]
keys = ["client.key"]
admin = true
"""


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A keygen directory, a client directory per user, their keys admitted, tenants.toml."""
    root = tmp_path_factory.mktemp("tenants")
    directory = root / "keys"
    assert run_cli("keygen", str(directory)).returncode == 0
    for user in ("alice", "bob", "carol"):
        own = root / user
        own.mkdir()
        zmq.auth.create_certificates(own, "client")
        shutil.copy(directory / "server.key", own / "server.key")
        shutil.copy(own / "client.key", directory / "clients" / f"{user}.key")
    (directory / "tenants.toml").write_text(TENANTS_TOML)
    return directory


@pytest.fixture(scope="module")
def tenant_daemon(keys: Path):  # type: ignore[no-untyped-def]
    d = Daemon(extra_args=["--curve-keys", str(keys)], client_keys=keys).start()
    yield d
    d.stop()


def _client(d: Daemon, keys: Path, user: str, use_shm: bool = False) -> Client:
    directory = keys if user == "ops" else keys.parent / user
    return Client(d.address, CALL_S, curve_dir=directory, use_shm=use_shm)


def _forbidden(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ServerError) as info:
        call()
    assert info.value.code == "forbidden", info.value
    return info.value.message


@pytest.mark.timeout(120)
@pytest.mark.parametrize("use_shm", [False, True], ids=["tcp", "shm"])
def test_tenant_cannot_read_or_overwrite_another_tenants_blocks(tenant_daemon, keys, use_shm):
    """Bob's key can neither look up, read nor write tenant a's namespace; alice's bytes stay."""
    block = f"alice-{use_shm}".encode()
    with _client(tenant_daemon, keys, "alice", use_shm) as alice:
        assert alice.put(NS_A, [(block, None, b"A" * 4096)]).num_stored == 1
    with _client(tenant_daemon, keys, "bob", use_shm) as bob:
        message = _forbidden(lambda: bob.lookup(NS_A, [block]))
        assert "may not read" in message and "'a'" in message, message
        _forbidden(lambda: bob.lookup(NS_A, [block], lease_ms=1000))
        _forbidden(lambda: bob.get(NS_A, [block]))
        message = _forbidden(lambda: bob.put(NS_A, [(block, None, b"B" * 4096),
                                                    (block + b"-new", block, b"B" * 4096)]))
        assert "may not write" in message and "'a'" in message, message
        _forbidden(lambda: bob.invalidate(NS_A.name))
    with _client(tenant_daemon, keys, "alice", use_shm) as alice:
        assert alice.get(NS_A, [block]) == [b"A" * 4096]
        assert alice.lookup(NS_A, [block, block + b"-new"]).num_hits == 1


@pytest.mark.timeout(120)
def test_tenant_uses_its_own_namespace_and_needs_a_tenant_prefix(tenant_daemon, keys):
    """A key writes and reads its own tenant's namespaces; a name without a tenant is refused."""
    with _client(tenant_daemon, keys, "bob") as bob:
        assert bob.put(NS_B, [(b"bob-0", None, b"b" * 100)]).num_stored == 1
        assert bob.get(NS_B, [b"bob-0"]) == [b"b" * 100]
        message = _forbidden(lambda: bob.lookup(Namespace(b"untenanted"), [b"x"]))
        assert "tenant" in message, message


@pytest.mark.timeout(120)
def test_read_grant_reads_but_cannot_write(tenant_daemon, keys):
    """A tenant granted read of another may look up and read its blocks, never write them."""
    with _client(tenant_daemon, keys, "alice") as alice:
        alice.put(NS_A, [(b"shared-0", None, b"s" * 100)])
    with _client(tenant_daemon, keys, "carol") as carol:
        assert carol.lookup(NS_A, [b"shared-0"]).num_hits == 1
        assert carol.get(NS_A, [b"shared-0"]) == [b"s" * 100]
        _forbidden(lambda: carol.put(NS_A, [(b"carol-0", None, b"c")]))
        _forbidden(lambda: carol.lookup(NS_B, [b"bob-0"]))


@pytest.mark.timeout(120)
def test_stats_list_only_namespaces_the_key_may_read(tenant_daemon, keys):
    """STATS names a tenant's namespaces to its own keys and to admins, not to other tenants."""
    with _client(tenant_daemon, keys, "alice") as alice:
        alice.put(NS_A, [(b"stats-a", None, b"a")])
    with _client(tenant_daemon, keys, "bob") as bob:
        bob.put(NS_B, [(b"stats-b", None, b"b")])
        assert set(bob.stats()["namespaces"]) == {NS_B.name.hex()}
    with _client(tenant_daemon, keys, "ops") as ops:
        assert {NS_A.name.hex(), NS_B.name.hex()} <= set(ops.stats()["namespaces"])


@pytest.mark.timeout(90)
def test_tenants_file_naming_an_unknown_key_refuses_the_start(make_daemon, keys, tmp_path):
    """A tenants.toml naming a key that is not in clients/ stops the start with one line."""
    bad = tmp_path / "keys"
    shutil.copytree(keys, bad)
    (bad / "tenants.toml").write_text('[tenants.a]\nkeys = ["mallory.key"]\n')
    d = make_daemon(extra_args=["--curve-keys", str(bad)], client_keys=bad).start(wait=False)
    assert d.proc is not None
    code = d.proc.wait(40)
    assert code == 2, d.output()
    line = d.output().strip().splitlines()[-1]
    assert line.startswith("kvstore: error: ") and "mallory.key" in line and "tenants.toml" in line


# --- who may reach a daemon on its host ------------------------------------------------------------
@pytest.mark.timeout(90)
def test_loopback_tcp_without_keys_needs_insecure(make_daemon):
    """Loopback TCP without CURVE keys would let every local user in: refused unless --insecure."""
    d = make_daemon(insecure=False).start(wait=False)
    assert d.proc is not None

    def settled() -> bool:
        return d.proc is not None and (d.proc.poll() is not None or "listening" in d.output())

    wait_until(settled, 40, what="daemon exit or listening")
    assert d.proc.poll() == 2, f"daemon listens on {d.address} without keys: {d.output()!r}"
    line = d.output().strip().splitlines()[-1]
    assert line.startswith("kvstore: error: refusing to listen on tcp://127.0.0.1"), line
    assert "--insecure" in line and "--curve-keys" in line and "ipc" in line, line
    make_daemon(insecure=True).start()  # and --insecure lets it listen


@pytest.mark.timeout(90)
def test_default_daemon_listens_on_an_ipc_socket_only_its_user_can_open(make_daemon):
    """With no address given the daemon listens on an ipc socket in a directory private to its
    uid (mode 0700, socket 0600): the same user's clients connect, another uid cannot."""
    d = make_daemon(listen_tcp=False).start()
    sock = Path(d.address.removeprefix("ipc://"))
    assert sock.parent == Path(f"/dev/shm/kvstore-sockets-{os.geteuid()}")
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    with Client(d.address, CALL_S) as client:
        client.put(Namespace(b"m"), [(b"k", None, b"v")])
        assert client.is_local
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(3)\n")
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    done = subprocess.run([python, "-c", probe, str(sock)], capture_output=True,
                          preexec_fn=lambda: (os.setgid(NOBODY_UID), os.setuid(NOBODY_UID)))
    assert done.returncode == 3, f"uid {NOBODY_UID} could connect: {done.stderr!r}"
    assert d.stop() == 0
    assert not sock.exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("owner, mode", [(None, 0o777), (NOBODY_UID, 0o700)],
                         ids=["open-to-all", "another-owner"])
def test_client_refuses_a_default_socket_directory_another_user_could_have_made(
        tmp_path, owner, mode):
    """A kvstore-sockets-UID directory not owned by UID with mode 0700 is not the daemon's:
    the client refuses to connect there (another user could listen in it) and says why."""
    directory = tmp_path / f"kvstore-sockets-{os.geteuid()}"
    directory.mkdir()
    directory.chmod(mode)
    if owner is not None:
        os.chown(directory, owner, owner)
    with Client(f"ipc://{directory}/kvstore.sock", 1.0) as client:
        with pytest.raises(ServerUnavailable, match="not private to uid"):
            client.ping()


@pytest.mark.timeout(90)
def test_sighup_revokes_a_key_and_applies_a_changed_tenants_file(make_daemon, keys, tmp_path):
    """After SIGHUP a removed key's open connection is refused from its next request, and a
    tenant granted read in the new tenants.toml reads at once."""
    shutil.copytree(keys.parent, tmp_path / "copy")  # the users' key directories too
    own = tmp_path / "copy" / "keys"
    d = make_daemon(extra_args=["--curve-keys", str(own)], client_keys=own).start()
    with _client(d, own, "alice") as alice, _client(d, own, "bob") as bob:
        alice.put(NS_A, [(b"hup-0", None, b"a")])
        _forbidden(lambda: bob.lookup(NS_A, [b"hup-0"]))
        (own / "tenants.toml").write_text(TENANTS_TOML.replace(
            'keys = ["bob.key"]\n', 'keys = ["bob.key"]\nread = ["a"]\n').replace(
            'keys = ["alice.key"]\n', 'keys = []\n'))
        (own / "clients" / "alice.key").unlink()
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded" in d.output(), 20, what="reload in the log")
        assert bob.lookup(NS_A, [b"hup-0"]).num_hits == 1
        assert "no longer admitted" in _forbidden(alice.ping)

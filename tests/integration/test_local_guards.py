"""What guards a daemon's local resources: its segment name, its ipc socket, its CURVE clients.

Each test starts real `kvstore serve` processes and checks the one line an operator sees
(issue 10, "smaller ones").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import zmq.auth

from kvstore.client import Client
from kvstore.keys import Namespace
from kvstore.pool import _HEADER
from bench.daemon import Daemon, wait_until
from tests.integration.helpers import CALL_S, run_cli

NS = Namespace(b"m")
NOBODY_UID = 65534  # a uid other than ours: the owner of a file "another user" made


def _settle(d: Daemon, timeout_s: float = 40.0) -> int | None:
    """The exit code once the daemon exits, or None once it says it is listening."""
    assert d.proc is not None

    def settled() -> tuple[str, int | None] | None:
        assert d.proc is not None
        if d.proc.poll() is not None:
            return ("exit", d.proc.returncode)
        if "kvstore: listening on" in d.output():
            return ("up", None)
        return None

    return wait_until(settled, timeout_s, what="daemon exit or listening")[1]


def _error_line(d: Daemon) -> str:
    lines = [line for line in d.output().splitlines() if line.startswith("kvstore: error: ")]
    assert len(lines) == 1, d.output()
    return lines[0]


# --- segment names and owners ----------------------------------------------------------------
@pytest.mark.timeout(90)
def test_segment_name_ending_in_a_newline_is_refused(make_daemon):
    """A segment name with a trailing newline is refused with one line, before anything starts."""
    d = make_daemon(segment="kvstore-test-nl\n").start(wait=False)
    try:
        code = _settle(d)
        assert code == 2, f"the daemon started on segment 'kvstore-test-nl\\n': {d.output()!r}"
        assert "segment name" in _error_line(d)
    finally:
        Path("/dev/shm/kvstore-test-nl\n").unlink(missing_ok=True)


@pytest.mark.timeout(90)
def test_segment_file_of_another_user_is_not_called_a_running_daemon(make_daemon):
    """A file another uid made at the segment's path is named as such, not as a live daemon."""
    d = make_daemon()
    d.segment_path.write_bytes(b"\0" * 4096)
    os.chown(d.segment_path, NOBODY_UID, NOBODY_UID)
    d.start(wait=False)
    assert _settle(d) == 1
    line = _error_line(d)
    assert "running daemon" not in line, line
    assert f"uid {NOBODY_UID}" in line and "--segment" in line, line
    assert d.segment_path.stat().st_uid == NOBODY_UID, "another user's file was replaced"


@pytest.mark.timeout(90)
def test_segment_path_holding_a_foreign_file_is_named_as_such(make_daemon):
    """Our own file at the segment's path that is not a kvstore segment is left alone, and said."""
    d = make_daemon()
    d.segment_path.write_bytes(b"not a segment")
    d.start(wait=False)
    assert _settle(d) == 1
    line = _error_line(d)
    assert "not a kvstore segment" in line and "running daemon" not in line, line
    assert d.segment_path.read_bytes() == b"not a segment"


@pytest.mark.timeout(120)
def test_live_segment_whose_owner_pid_is_invisible_is_not_taken(make_daemon):
    """A live daemon's segment whose header pid this process cannot see (another pid namespace)
    is still refused: liveness is the owner's lock, not its pid."""
    first = make_daemon().start()
    with Client(first.address, CALL_S, use_shm=False) as client:
        client.put(NS, [(b"k", None, b"v" * 100)])
    inode = first.segment_path.stat().st_ino
    with open(first.segment_path, "r+b") as f:  # as a daemon in another pid namespace writes it
        magic, _, token = _HEADER.unpack(f.read(_HEADER.size))
        f.seek(0)
        f.write(_HEADER.pack(magic, 2**22 + 4321, token))  # above pid_max: no process here
    second = make_daemon(segment=first.segment).start(wait=False)
    code = _settle(second)
    assert first.segment_path.stat().st_ino == inode, "the live daemon's segment was replaced"
    assert code == 1, second.output()
    assert "in use by a running daemon" in _error_line(second)
    with Client(first.address, CALL_S) as client:
        assert client.get(NS, [b"k"]) == [b"v" * 100]


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True)
    return done.returncode == 0


@pytest.mark.timeout(120)
@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare --pid` (root)")
def test_daemons_in_two_pid_namespaces_do_not_unlink_each_other(tmp_path):
    """Two daemons, each pid 1 of its own pid namespace, one /dev/shm: the second is refused."""
    segment = f"kvstore-test-pidns-{os.getpid()}"
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    try:
        for log in logs:
            port = Daemon().port
            args = ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-m", "kvstore.cli", "serve",
                    "--pool-size", "32MiB", "--segment", segment, "--metrics-port", "0",
                    "--tcp", f"tcp://127.0.0.1:{port}", "--insecure"]
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT))
            if len(procs) == 1:
                wait_until(lambda: "listening on" in logs[0].read_text(), 40, what="first up")
                inode = Path("/dev/shm", segment).stat().st_ino

        def second_settled() -> bool:
            return procs[1].poll() is not None or "listening on" in logs[1].read_text()

        wait_until(second_settled, 40, what="second daemon exit or listening")
        assert Path("/dev/shm", segment).stat().st_ino == inode, (
            f"the second daemon replaced the first's live segment: {logs[1].read_text()!r}")
        assert procs[1].poll() == 1, logs[1].read_text()
        assert "in use by a running daemon" in logs[1].read_text()
    finally:
        for proc in procs:  # unshare does not pass SIGTERM on: stop the daemon, its child
            if proc.poll() is None:
                children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
                for pid in children.split():
                    os.kill(int(pid), signal.SIGTERM)
                proc.wait(20)
        Path("/dev/shm", segment).unlink(missing_ok=True)


# --- the ipc socket ----------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_ipc_socket_file_is_removed_on_sigterm(make_daemon, tmp_path):
    """SIGTERM removes the daemon's ipc socket file along with its segment."""
    sock = tmp_path / "kv.sock"
    d = make_daemon(extra_args=["--ipc", str(sock)]).start()
    with Client(f"ipc://{sock}", CALL_S) as client:
        client.ping()
    assert sock.exists()
    assert d.stop() == 0
    assert not sock.exists(), "the ipc socket file outlived the daemon"


@pytest.mark.timeout(90)
def test_ipc_socket_of_a_live_daemon_is_not_taken_over(make_daemon, tmp_path):
    """A second daemon on a live daemon's ipc path is refused; the first keeps its socket."""
    sock = tmp_path / "kv.sock"
    make_daemon(extra_args=["--ipc", str(sock)]).start()
    inode = sock.stat().st_ino
    second = make_daemon(extra_args=["--ipc", str(sock)]).start(wait=False)
    assert _settle(second) == 1
    assert "in use" in _error_line(second) and str(sock) in _error_line(second)
    assert sock.stat().st_ino == inode
    with Client(f"ipc://{sock}", CALL_S) as client:
        client.ping()


# --- CURVE client keys ---------------------------------------------------------------------------
@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    assert run_cli("keygen", str(directory)).returncode == 0
    return directory


@pytest.mark.timeout(90)
@pytest.mark.parametrize("text", ["garbage\n", 'public-key = "not-z85!"\n'],
                         ids=["no-public-key", "not-z85"])
def test_malformed_client_key_stops_the_start_naming_the_file(make_daemon, keys, text):
    """One malformed *.key in clients/ refuses the start with a line naming it, instead of a
    daemon that says CURVE on and answers no client (or holds a key nobody can match)."""
    (keys / "clients" / "broken.key").write_text(text)
    d = make_daemon(extra_args=["--curve-keys", str(keys)], client_keys=keys).start(wait=False)
    code = _settle(d)
    if code is None:  # started: show what its authorized client gets
        with Client(d.address, 1.0, curve_dir=keys) as client:
            try:
                client.ping()
                seen = "an answer"
            except Exception as exc:  # noqa: BLE001 - the message is the finding
                seen = repr(exc)
        pytest.fail(f"daemon started with a malformed key (authorized client got {seen})")
    assert code == 2
    line = _error_line(d)
    assert "broken.key" in line and "public key" in line, line


@pytest.mark.timeout(90)
def test_reload_with_a_malformed_key_keeps_the_previous_keys(make_daemon, keys, tmp_path):
    """SIGHUP re-reads clients/: a bad file is named in the log and the keys in force stay."""
    d = make_daemon(extra_args=["--curve-keys", str(keys)], client_keys=keys).start()
    (keys / "clients" / "broken.key").write_text("garbage\n")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "broken.key" in d.output(), 20, what="reload error in the log")
    with Client(d.address, CALL_S, curve_dir=keys) as client:
        client.ping()
    # A fixed directory then loads, and a newly admitted key is served without a restart.
    (keys / "clients" / "broken.key").unlink()
    other = tmp_path / "other"
    other.mkdir()
    zmq.auth.create_certificates(other, "client")
    shutil.copy(keys / "server.key", other / "server.key")
    shutil.copy(other / "client.key", keys / "clients" / "other.key")
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: d.output().count("reloaded") >= 1, 20, what="reload in the log")
    with Client(d.address, CALL_S, curve_dir=other) as client:
        client.ping()

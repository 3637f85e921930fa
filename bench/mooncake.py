"""Mooncake Store over TCP, the peer bench.cluster compares its cross-node pulls with (issue 12):
the same bytes (N blocks of 2 MiB) put by one process and read by another.

    bash bench/mooncake_setup.sh          # once: the non-CUDA wheel and its libraries, in .cache/
    python -m bench.mooncake [--blocks 64] [--rounds 6]

Mooncake's split is ours: a master keeps the metadata (which node holds which object), the bytes
move peer to peer. Here mooncake_master (with its built-in HTTP metadata server, no etcd) and two
client processes on 127.0.0.2 (the writer, the only one that mounts a segment: every object
lands in its memory) and 127.0.0.3 (the reader), over Mooncake's TCP transport. Each round
writes fresh keys from a registered buffer (batch_put_from) and reads them on the other
process, zero-copy into a registered, prefaulted buffer (batch_get_into: its best case) and as
copies (get_batch); every read is checked byte for byte. Round 0 (new connections) is left out
of the medians. Prints one JSON object (GB/s = bytes / s / 1e9, as bench.store); bench.cluster
runs this as a subprocess when the setup is there.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".cache" / "mooncake"  # bench/mooncake_setup.sh installs here
SITE = HOME / "site"
LIB_DIRS = [HOME / "deb/usr/lib/x86_64-linux-gnu", HOME / "deb/lib/x86_64-linux-gnu"]
BLOCK_BYTES = 2 * 1024 * 1024
WRITER_HOST, READER_HOST = "127.0.0.2", "127.0.0.3"
CALL_S = 120.0  # one round of 128 MiB on a loaded 2-core machine takes well under a second


def is_installed() -> bool:
    return (SITE / "mooncake" / "mooncake_master").exists()


def environment() -> dict[str, str]:
    """This process's environment with the setup's site and libraries first (the dynamic loader
    reads LD_LIBRARY_PATH only when a process starts)."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join([*map(str, LIB_DIRS), env.get("LD_LIBRARY_PATH", "")])
    env["PYTHONPATH"] = ":".join([str(SITE), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def measure(blocks: int, rounds: int, timeout_s: float = 600.0) -> dict[str, Any]:
    """Run this module in a process with the setup's environment; its JSON, or why not."""
    if not is_installed():
        return {"ok": False, "reason": "not installed: run bash bench/mooncake_setup.sh"}
    proc = subprocess.run([sys.executable, "-m", "bench.mooncake", "--blocks", str(blocks),
                           "--rounds", str(rounds)], env=environment(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)
    try:
        return dict(json.loads(proc.stdout))
    except json.JSONDecodeError:
        return {"ok": False, "reason": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}


def _data(seed: int, nbytes: int) -> Any:
    import numpy as np

    return np.frombuffer(np.random.default_rng(seed).bytes(nbytes), dtype=np.uint8)


def _node(role: str, conn: Connection, cfg: dict[str, Any]) -> None:
    """One Mooncake client process: the writer mounts the segment, the reader none."""
    log = os.open(cfg["log_dir"] + f"/{role}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)  # the C++ side logs to stdout and stderr
    os.dup2(log, 2)
    import numpy as np
    from mooncake.store import MooncakeDistributedStore

    nbytes = cfg["blocks"] * BLOCK_BYTES
    store = MooncakeDistributedStore()
    host = WRITER_HOST if role == "writer" else READER_HOST
    segment = cfg["segment_bytes"] if role == "writer" else 0
    if store.setup(host, cfg["metadata"], segment, cfg["local_buffer_bytes"], "tcp", "",
                   cfg["master"]) != 0:
        conn.send({"error": f"{role}: setup failed (see {role}.log)"})
        return
    buf = np.ones(nbytes, dtype=np.uint8)  # written: no page faults timed
    if store.register_buffer(buf.ctypes.data, nbytes) != 0:
        conn.send({"error": f"{role}: register_buffer failed"})
        return
    ptrs = [buf.ctypes.data + i * BLOCK_BYTES for i in range(cfg["blocks"])]
    sizes = [BLOCK_BYTES] * cfg["blocks"]
    conn.send({"ready": True})
    while (msg := conn.recv())["op"] != "quit":
        try:
            if msg["op"] == "put":
                buf[:] = _data(msg["seed"], nbytes)
                for keys in (msg["keys"], msg["copy_keys"]):
                    if any(rc != 0 for rc in store.batch_put_from(keys, ptrs, sizes)):
                        raise RuntimeError("batch_put_from failed")
                conn.send({})
            elif msg["op"] == "get":
                expected = _data(msg["seed"], nbytes)
                buf[:] = 0  # stale bytes must not pass the check
                start = time.perf_counter()
                rcs = store.batch_get_into(msg["keys"], ptrs, sizes)
                into_s = time.perf_counter() - start
                is_ok = all(rc == BLOCK_BYTES for rc in rcs) and np.array_equal(buf, expected)
                start = time.perf_counter()
                values = store.get_batch(msg["copy_keys"])
                copy_s = time.perf_counter() - start
                want = expected.tobytes()
                is_ok &= all(v == want[i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES]
                             for i, v in enumerate(values)) and len(values) == cfg["blocks"]
                conn.send({"get_into_s": into_s, "get_copy_s": copy_s, "is_ok": is_ok})
            elif msg["op"] == "remove":
                store.batch_remove(msg["keys"], True)
                conn.send({})
        except Exception as exc:
            conn.send({"error": f"{role} {msg['op']}: {exc!r}"})
    store.unregister_buffer(buf.ctypes.data)
    store.close()


def _recv(conn: Connection) -> dict[str, Any]:
    if not conn.poll(CALL_S):
        raise TimeoutError(f"no answer within {CALL_S} s")
    reply: dict[str, Any] = conn.recv()
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return reply


def _run(blocks: int, rounds: int, log_dir: Path) -> dict[str, Any]:
    from bench.daemon import free_port, wait_until
    from importlib.metadata import version

    nbytes = blocks * BLOCK_BYTES
    rpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    cfg = {"blocks": blocks, "log_dir": str(log_dir),
           "metadata": f"http://127.0.0.1:{http_port}/metadata",
           "master": f"127.0.0.1:{rpc_port}",
           "segment_bytes": max(1 << 30, 4 * nbytes),  # two sets a round, removed after it
           "local_buffer_bytes": 2 * nbytes}  # get_batch stages a whole batch there
    master = subprocess.Popen(
        [str(SITE / "mooncake" / "mooncake_master"), f"--rpc_port={rpc_port}",
         "--rpc_thread_num=2", "--enable_http_metadata_server=true",
         "--http_metadata_server_host=127.0.0.1", f"--http_metadata_server_port={http_port}",
         f"--metrics_port={metrics_port}", "--metrics_host=127.0.0.1",
         "--default_kv_lease_ttl=1000"],
        stdout=open(log_dir / "master.log", "wb"), stderr=subprocess.STDOUT)
    ctx = mp.get_context("spawn")
    procs, conns = [], {}
    runs: list[dict[str, float]] = []
    try:
        import socket

        def listening(port: int) -> bool:
            if master.poll() is not None:
                raise RuntimeError(f"mooncake_master exited with {master.returncode}")
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(lambda: listening(rpc_port) and listening(http_port), 30,
                   what="mooncake_master")
        for role in ("writer", "reader"):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_node, args=(role, child, cfg), daemon=True)
            proc.start()
            procs.append(proc)
            conns[role] = parent
            _recv(parent)
        for r in range(rounds):
            nonce = uuid.uuid4().hex[:8]
            keys = [f"into-{nonce}-{i}" for i in range(blocks)]
            copy_keys = [f"copy-{nonce}-{i}" for i in range(blocks)]
            conns["writer"].send({"op": "put", "seed": r, "keys": keys, "copy_keys": copy_keys})
            _recv(conns["writer"])
            conns["reader"].send({"op": "get", "seed": r, "keys": keys, "copy_keys": copy_keys})
            got = _recv(conns["reader"])
            if not got["is_ok"]:
                raise RuntimeError(f"round {r}: the bytes read differ from those written")
            conns["writer"].send({"op": "remove", "keys": keys + copy_keys})
            _recv(conns["writer"])
            runs.append({"get_into": nbytes / got["get_into_s"] / 1e9,
                         "get_copy": nbytes / got["get_copy_s"] / 1e9})
    finally:
        for conn in conns.values():
            conn.send({"op": "quit"})
        for proc in procs:
            proc.join(20)
            if proc.is_alive():
                proc.kill()
        master.terminate()
        master.wait(10)
    timed = runs[1:] or runs
    return {"ok": True,
            "gbps_median": {k: round(statistics.median(x[k] for x in timed), 3)
                            for k in ("get_into", "get_copy")},
            "gbps_runs": {k: [round(x[k], 3) for x in runs] for k in ("get_into", "get_copy")},
            "version": version("mooncake-transfer-engine-non-cuda"),
            "which": "get_into: batch_get_into into a registered prefaulted buffer (zero-copy); "
                     "get_copy: get_batch -> bytes; writer 127.0.0.2 holds every object, the "
                     "reader 127.0.0.3 reads over Mooncake's TCP transport; round 0 (new "
                     "connections) left out of the medians"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mooncake",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="the first one left out")
    args = parser.parse_args(argv)
    if str(LIB_DIRS[0]) not in os.environ.get("LD_LIBRARY_PATH", "").split(":") and argv is None:
        os.execve(sys.executable, [sys.executable, "-m", "bench.mooncake", *sys.argv[1:]],
                  environment())  # the loader reads LD_LIBRARY_PATH at exec only
    if not is_installed():
        print(json.dumps({"ok": False, "reason": "not installed: bash bench/mooncake_setup.sh"}))
        return 2
    log_dir = HOME / "logs"
    log_dir.mkdir(exist_ok=True)
    try:
        result = _run(args.blocks, args.rounds, log_dir)
    except Exception as exc:
        result = {"ok": False, "reason": f"{exc!r} (logs in {log_dir})"}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Soak of the daemon under attack (issue 10): honest clients check every byte they read while the
attack classes run in rotation, with one daemon SIGKILL and restart; for a fixed time.

    python -m bench.soak [--quick] [--seconds N] [--out PATH] [--serve-arg=ARG ...]
    python -m bench.soak --quick --only empty_frames --scale full   # one attack, full size

Against a real `kvstore serve` subprocess (pool 256 MiB, pages of 32 MiB, so a page of 64-byte
slots holds 524,288 of them as in the issue; --reserve-timeout 2 s, 1 s in --quick):
  honest    2 clients through shared memory and 2 over TCP (1 + 1 in --quick), each its own
            process, reading random chains of 8 content-addressed blocks (bytes = shake_256 of the
            hash) out of 1024 chains (~320 MiB, more than the pool) and storing what is missing;
            every byte read is checked: wrong_bytes must be 0
  pinger    its own process, a PING every 20 ms (1 s deadline): the daemon's responsiveness.
            Its p99 counts the pings it could not send while one call waited (each at what it
            would have waited), so a stalled daemon does not get fewer samples than a fast one.
            Each PING is also split (`split` per attack): how late the pinger sent it (the
            machine's share: it shares the CPUs), the time from its send to the daemon answering
            (the reply's `at_s`: the daemon's share) and the way back; and the daemon's loop
            thread's CPU time and its wait for a CPU while runnable (`daemon_loop_cpu`, schedstat)
  focused   --only NAME (repeatable) runs just those attacks, --scale full their full size:
            `python -m bench.soak --quick --only large_multipart --scale full --seconds 30`
  listeners the honest clients and the pinger use the daemon's main listener; the attacker has
            one of its own (its tenant's `listen` address in tenants.toml, or a second --tcp
            without tenants): the listener is the unit of isolation (kvstore/listeners.py). A
            second pinger on the attacker's listener measures what a client sharing it gets
            (ping_same_listener: still stalled while a million-frame message is read)
  attacks   bench/soak_attacks.py, in rotation from the parent process, each bounded in count and
            time, each window ending when a fresh connection's PING is answered again
  restart   once, at half time: SIGKILL, then the same daemon command again
  tenants   when the daemon has kvstore/tenants.py (--tenants auto): CURVE keys for both sides and
            a tenants.toml binding the honest key to namespaces "honest/..." and the attacker's
            to "attacker/..."; without it every client may use every namespace, and the tenant
            attack's foreign bytes reach the honest clients (counted as wrong bytes by cause)

Writes bench/results/soak.json (top level: wrong_bytes, ping_p99_ms_under_attack,
rss_max_over_pool_mib; then the budgets, per-attack ping p99, honest clients' latency, errors and
timeouts, daemon RSS over time, the daemon's arguments and the machine) and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import zmq

from bench import soak_attacks as attacks
from bench.machine import summary
from bench.soak_clients import PING_TIMEOUT_S, honest_client, pinger
from bench.soak_report import analyse, render
from bench.daemon import Daemon, free_port  # the tests' launcher of the real daemon process

MiB = 1024 * 1024
POOL = "256MiB"  # POOL_BYTES in soak_report; pages of 32 MiB (pool/8): 524,288 slots of 64 B
OUT = Path(__file__).parent / "results" / "soak.json"
RSS_SAMPLE_S = 0.25  # daemon VmRSS sampling period
_WORKER_START_S = 120.0  # a spawned worker imports numpy and zmq: slow on a loaded machine


def progress(start: float, msg: str) -> None:
    print(f"[{time.monotonic() - start:7.1f}s] {msg}", flush=True)


def rss_of(pid: int) -> tuple[int, int] | None:
    """(VmRSS, RssAnon) of pid in bytes, from /proc; None when it is gone."""
    fields: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                fields[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return None
    return (fields["VmRSS"], fields["RssAnon"]) if len(fields) == 2 else None


def loop_cpu_of(pid: int) -> tuple[int, int] | None:
    """(ns run on a CPU, ns waiting for one while runnable) of pid's main thread, the daemon's
    loop (/proc schedstat); None when it is gone or the kernel keeps no schedstats."""
    try:
        run_ns, wait_ns, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
        return int(run_ns), int(wait_ns)
    except (OSError, ValueError):
        return None


class Sampler(threading.Thread):
    """Samples the daemon's memory and prints a progress line while the soak runs."""

    def __init__(self, daemon: Daemon, start_s: float, progress_s: float) -> None:
        super().__init__(daemon=True)
        self.daemon_proc = daemon
        self.start_s, self.progress_s = start_s, progress_s
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, VmRSS, RssAnon)
        self.loop_cpu: list[tuple[float, int, int, int]] = []  # (monotonic, pid, run, wait ns)
        self.window = "starting"
        self.stop_event = threading.Event()

    def run(self) -> None:
        next_print = self.start_s
        while not self.stop_event.wait(RSS_SAMPLE_S):
            proc = self.daemon_proc.proc
            rss = rss_of(proc.pid) if proc is not None else None
            now = time.monotonic()
            if rss is not None:
                self.samples.append((now, *rss))
            cpu = loop_cpu_of(proc.pid) if proc is not None else None
            if cpu is not None and proc is not None:
                self.loop_cpu.append((now, proc.pid, *cpu))
            if now >= next_print:
                next_print = now + self.progress_s
                shown = (f"rss {rss[0] / MiB:.0f} MiB (anon {rss[1] / MiB:.0f})" if rss
                         else "no daemon")
                progress(self.start_s, f"{self.window}; daemon {shown}")


def has_tenants() -> bool:
    """Whether this daemon can bind namespaces to client keys (kvstore/tenants.py)."""
    return importlib.util.find_spec("kvstore.tenants") is not None


def tenant_keys(root: Path, attacker_address: str) -> tuple[Path, Path, Path]:
    """CURVE keys for the daemon and two tenants, "honest" and "attacker", each key bound to its
    own tenant's namespaces, the attacker on a listener of its own: (daemon --curve-keys dir,
    honest client dir, attacker client dir)."""
    import zmq.auth

    server = root / "daemon"
    (server / "clients").mkdir(parents=True)
    zmq.auth.create_certificates(server, "server")
    dirs = []
    for who in ("honest", "attacker"):
        mine = root / who
        mine.mkdir()
        public, _ = zmq.auth.create_certificates(mine, "client")
        shutil.copy(server / "server.key", mine / "server.key")
        shutil.copy(public, server / "clients" / f"{who}.key")
        dirs.append(mine)
    (server / "tenants.toml").write_text(
        '[tenants.honest]\nkeys = ["honest.key"]\n\n[tenants.attacker]\nkeys = ["attacker.key"]\n'
        f'listen = "{attacker_address}"\n')
    for path in root.rglob("*"):
        path.chmod(0o700 if path.is_dir() else 0o600)
    root.chmod(0o700)
    return server, dirs[0], dirs[1]


def start_workers(procs: list[Any], address: str, curve_dir: Path | None, num_shm: int,
                  num_tcp: int, stop: Any, results: Any,
                  attacker: tuple[str, Path | None]) -> None:
    """The honest clients and the pinger, each in a fresh (spawned) process, added to procs,
    and a pinger on the attacker's listener (address, keys); returns once every one has
    connected."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    procs.append(ctx.Process(target=pinger, args=(address, curve_dir, stop, ready, results),
                             name="pinger"))
    procs.append(ctx.Process(target=pinger, args=(*attacker, stop, ready, results, "pinger-same"),
                             name="pinger-same"))
    for i in range(num_shm + num_tcp):
        use_shm = i < num_shm
        name = f"{'shm' if use_shm else 'tcp'}-{i}"
        procs.append(ctx.Process(target=honest_client, name=name,
                                 args=(name, address, curve_dir, use_shm, 1000 + i, stop,
                                       ready, results)))
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=_WORKER_START_S)


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    seconds = args.seconds or (20.0 if quick else 600.0)
    scale = {"quick": attacks.QUICK, "full": attacks.FULL}.get(
        args.scale, attacks.QUICK if quick else attacks.FULL)
    chosen = {n: a for n, a in attacks.ATTACKS.items() if not args.only or n in args.only}
    reserve_s = 1.0 if quick else 2.0
    quiet_s = 0.5 if quick else 3.0
    tenants = has_tenants() if args.tenants == "auto" else args.tenants == "on"
    keys_root = Path(tempfile.mkdtemp(prefix="kvstore-soak-keys-"))
    attacker_address = f"tcp://127.0.0.1:{free_port()}"
    server_keys, honest_keys, attacker_keys = (tenant_keys(keys_root, attacker_address)
                                               if tenants else (None, None, None))
    serve_args = ["--reserve-timeout", str(reserve_s),
                  *(["--curve-keys", str(server_keys)] if server_keys
                    else ["--tcp", attacker_address]), *args.serve_arg]
    # Without keys, bench/daemon.py adds --insecure where the daemon wants it for loopback TCP.
    daemon = Daemon(pool_size=POOL, extra_args=serve_args, client_keys=honest_keys)
    daemon.start()
    start_s = time.monotonic()
    sampler = Sampler(daemon, start_s, 2.0 if quick else 10.0)
    sampler.start()
    mp = multiprocessing.get_context("spawn")
    stop, results = mp.Event(), mp.Queue()
    procs: list[Any] = []
    ctx = zmq.Context()
    windows: list[dict[str, Any]] = []
    try:
        start_workers(procs, daemon.address, honest_keys, *((1, 1) if quick else (2, 2)), stop,
                      results, (attacker_address, attacker_keys))
        run_start = time.monotonic()
        windows.append(_quiet(sampler, "baseline", 2.0 if quick else 10.0))
        restarted, done, rnd = False, Counter[str](), 0
        while time.monotonic() - run_start < seconds or len(done) < len(chosen):
            rnd += 1
            for name, attack in chosen.items():
                if time.monotonic() - run_start >= seconds and len(done) == len(chosen):
                    break
                if not restarted and time.monotonic() - run_start >= seconds / 2:
                    windows.append(_restart(sampler, daemon))
                    restarted = True
                env = attacks.Env(attacker_address, ctx, scale, reserve_s, rnd, attacker_keys)
                windows.append(_attack(sampler, name, attack, env))
                done[name] += 1
                windows.append(_quiet(sampler, "quiet", quiet_s))
        if not restarted:
            windows.append(_restart(sampler, daemon))
        windows.append(_quiet(sampler, "quiet", 2.0 if quick else 10.0))  # late reads of damage
    finally:
        stop.set()
        workers = _collect(procs, results)
        sampler.stop_event.set()
        sampler.join()
        sigterm_s = time.monotonic()
        code = daemon.stop()
        sigterm_s = time.monotonic() - sigterm_s
        ctx.term()
        shutil.rmtree(keys_root, ignore_errors=True)
    params = {"seconds": seconds, "quick": quick, "pool": POOL,
              "page": "32MiB (the default, pool/8)",
              "reserve_timeout_s": reserve_s, "quiet_s": quiet_s, "scale": asdict(scale),
              "attacks": list(chosen),
              "honest_clients": {"shm": 1 if quick else 2, "tcp": 1 if quick else 2},
              "daemon_args": [a if a != str(server_keys) else "DIR" for a in serve_args],
              "listeners": {"honest_and_pinger": "the main --tcp address",
                            "attacker_and_pinger_same": ("the attacker tenant's own listen "
                                                         "address" if tenants
                                                         else "a second --tcp address")},
              "tenants": ("CURVE keys, tenants.toml binding 'honest' and 'attacker' keys to their "
                          "own namespaces" if tenants else "off: every client may use every "
                          "namespace (no kvstore/tenants.py in this daemon)"),
              "daemon_exit_code_on_sigterm": code,
              "daemon_sigterm_exit_s": round(sigterm_s, 3)}
    return analyse(windows, workers, sampler.samples, start_s, params, sampler.loop_cpu)


def _quiet(sampler: Sampler, kind: str, seconds: float) -> dict[str, Any]:
    sampler.window = kind
    start = time.monotonic()
    time.sleep(seconds)
    return {"kind": kind, "start": start, "end": time.monotonic()}


def _attack(sampler: Sampler, name: str, attack: Any, env: attacks.Env) -> dict[str, Any]:
    sampler.window = f"attack {name} (round {env.round})"
    start = time.monotonic()
    try:
        details = attack(env)
    except Exception as exc:  # an attack that breaks must not end the soak
        details = {"exception": f"{type(exc).__name__}: {exc}"}
    details["responsive_after_s"] = attacks.responsive_after(env, env.scale.stall_cap_s)
    return {"kind": "attack", "attack": name, "round": env.round, "start": start,
            "end": time.monotonic(), "details": details}


def _restart(sampler: Sampler, daemon: Daemon) -> dict[str, Any]:
    sampler.window = "daemon SIGKILL and restart"
    start = time.monotonic()
    daemon.stop(signal.SIGKILL)
    daemon.start()
    up = time.monotonic()
    # A PING sent to the killed daemon is answered by nobody: the pinger waits out its deadline,
    # then reconnects. That wait belongs to the restart, not to the window after it.
    time.sleep(PING_TIMEOUT_S + 0.2)
    return {"kind": "restart", "start": start, "up": up, "end": time.monotonic()}


def _collect(procs: list[Any], results: Any) -> list[dict[str, Any]]:
    workers = []
    for _ in procs:
        try:
            workers.append(results.get(timeout=60))
        except Exception:
            break
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    return workers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every attack once, small (CI)")
    parser.add_argument("--seconds", type=float, default=None, help="run time (600; 20 quick)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"result file (default {OUT})")
    parser.add_argument("--only", action="append", choices=list(attacks.ATTACKS), default=[],
                        help="run only this attack (repeatable): a focused run")
    parser.add_argument("--scale", choices=("auto", "quick", "full"), default="auto",
                        help="how hard each attack pushes (auto: quick with --quick, else full)")
    parser.add_argument("--tenants", choices=("auto", "on", "off"), default="auto",
                        help="bind each side's key to its own namespaces (auto: when supported)")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="extra argument for `kvstore serve` (repeatable)")
    args = parser.parse_args(argv)
    res = run_soak(args)
    given = argv if argv is not None else sys.argv[1:]
    res["command"] = " ".join(["python -m bench.soak", *(shlex.quote(a) for a in given)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nmachine: {summary(res['machine'])}")
    print(render(res))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

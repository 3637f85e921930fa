"""Soak of the daemon under attack (issue 10): honest clients check every byte they read while the
attack classes run in rotation, with one daemon SIGKILL and restart; for a fixed time.

    python -m bench.soak [--quick] [--seconds N] [--out PATH] [--serve-arg=ARG ...]

Against a real `kvstore serve` subprocess (pool 256 MiB, pages of 32 MiB, so a page of 64-byte
slots holds 524,288 of them as in the issue; --reserve-timeout 2 s, 1 s in --quick):
  honest    2 clients through shared memory and 2 over TCP (1 + 1 in --quick), each its own
            process, reading random chains of 8 content-addressed blocks (bytes = shake_256 of the
            hash) out of 1024 chains (~320 MiB, more than the pool) and storing what is missing;
            every byte read is checked: wrong_bytes must be 0
  pinger    its own process, a PING every 20 ms (1 s deadline): the daemon's responsiveness.
            Its p99 counts the pings it could not send while one call waited (each at what it
            would have waited), so a stalled daemon does not get fewer samples than a fast one
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
import math
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
from bench.machine import describe, summary
from bench.soak_clients import PING_PERIOD_S, honest_client, pinger
from tests.daemon import Daemon  # the integration tests' launcher of the real daemon process

MiB = 1024 * 1024
POOL = "256MiB"
POOL_BYTES = 256 * MiB
OUT = Path(__file__).parent / "results" / "soak.json"
BEFORE = OUT.with_name("soak_before.json")  # the same soak on the code before issue 10's fixes
BUDGET_PING_P99_MS = 50.0  # issue 10: during each attack, another client's PING at p99
BUDGET_WRONG_BYTES = 0
RSS_SAMPLE_S = 0.25  # daemon VmRSS sampling period


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


class Sampler(threading.Thread):
    """Samples the daemon's memory and prints a progress line while the soak runs."""

    def __init__(self, daemon: Daemon, start_s: float, progress_s: float) -> None:
        super().__init__(daemon=True)
        self.daemon_proc = daemon
        self.start_s, self.progress_s = start_s, progress_s
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, VmRSS, RssAnon)
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
            if now >= next_print:
                next_print = now + self.progress_s
                shown = (f"rss {rss[0] / MiB:.0f} MiB (anon {rss[1] / MiB:.0f})" if rss
                         else "no daemon")
                progress(self.start_s, f"{self.window}; daemon {shown}")


def has_tenants() -> bool:
    """Whether this daemon can bind namespaces to client keys (kvstore/tenants.py)."""
    return importlib.util.find_spec("kvstore.tenants") is not None


def tenant_keys(root: Path) -> tuple[Path, Path, Path]:
    """CURVE keys for the daemon and two tenants, "honest" and "attacker", each key bound to its
    own tenant's namespaces: (daemon --curve-keys dir, honest client dir, attacker client dir)."""
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
        '[tenants.honest]\nkeys = ["honest.key"]\n\n[tenants.attacker]\nkeys = ["attacker.key"]\n')
    for path in root.rglob("*"):
        path.chmod(0o700 if path.is_dir() else 0o600)
    root.chmod(0o700)
    return server, dirs[0], dirs[1]


def start_workers(address: str, curve_dir: Path | None, num_shm: int, num_tcp: int, stop: Any,
                  results: Any) -> list[Any]:
    """The honest clients and the pinger, each in a fresh (spawned) process."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=pinger, args=(address, curve_dir, stop, results), name="pinger")]
    for i in range(num_shm + num_tcp):
        use_shm = i < num_shm
        name = f"{'shm' if use_shm else 'tcp'}-{i}"
        procs.append(ctx.Process(target=honest_client, name=name,
                                 args=(name, address, curve_dir, use_shm, 1000 + i, stop,
                                       results)))
    for p in procs:
        p.start()
    return procs


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    seconds = args.seconds or (20.0 if quick else 600.0)
    scale = attacks.QUICK if quick else attacks.FULL
    reserve_s = 1.0 if quick else 2.0
    quiet_s = 0.5 if quick else 3.0
    tenants = has_tenants() if args.tenants == "auto" else args.tenants == "on"
    keys_root = Path(tempfile.mkdtemp(prefix="kvstore-soak-keys-"))
    server_keys, honest_keys, attacker_keys = (tenant_keys(keys_root) if tenants
                                               else (None, None, None))
    serve_args = ["--reserve-timeout", str(reserve_s),
                  *(["--curve-keys", str(server_keys)] if server_keys else []), *args.serve_arg]
    # Without keys, tests/daemon.py adds --insecure where the daemon wants it for loopback TCP.
    daemon = Daemon(pool_size=POOL, extra_args=serve_args, client_keys=honest_keys)
    daemon.start()
    start_s = time.monotonic()
    sampler = Sampler(daemon, start_s, 2.0 if quick else 10.0)
    sampler.start()
    mp = multiprocessing.get_context("spawn")
    stop, results = mp.Event(), mp.Queue()
    procs = start_workers(daemon.address, honest_keys, *((1, 1) if quick else (2, 2)), stop,
                          results)
    ctx = zmq.Context()
    windows: list[dict[str, Any]] = []
    try:
        time.sleep(2.0 if quick else 5.0)  # the workers import and connect
        run_start = time.monotonic()
        windows.append(_quiet(sampler, "baseline", 2.0 if quick else 10.0))
        restarted, done, rnd = False, Counter[str](), 0
        while time.monotonic() - run_start < seconds or len(done) < len(attacks.ATTACKS):
            rnd += 1
            for name, attack in attacks.ATTACKS.items():
                if time.monotonic() - run_start >= seconds and len(done) == len(attacks.ATTACKS):
                    break
                if not restarted and time.monotonic() - run_start >= seconds / 2:
                    windows.append(_restart(sampler, daemon))
                    restarted = True
                env = attacks.Env(daemon.address, ctx, scale, reserve_s, rnd, attacker_keys)
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
              "honest_clients": {"shm": 1 if quick else 2, "tcp": 1 if quick else 2},
              "daemon_args": [a if a != str(server_keys) else "DIR" for a in serve_args],
              "tenants": ("CURVE keys, tenants.toml binding 'honest' and 'attacker' keys to their "
                          "own namespaces" if tenants else "off: every client may use every "
                          "namespace (no kvstore/tenants.py in this daemon)"),
              "daemon_exit_code_on_sigterm": code,
              "daemon_sigterm_exit_s": round(sigterm_s, 3)}
    return analyse(windows, workers, sampler.samples, start_s, params)


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
    return {"kind": "restart", "start": start, "end": time.monotonic()}


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


# --- analysis ----------------------------------------------------------------------------------
def p99(values: list[float]) -> float | None:
    """Nearest-rank 99th percentile."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def _inside(rows: list[Any], windows: list[dict[str, Any]]) -> list[Any]:
    return [r for r in rows if any(w["start"] <= r[0] <= w["end"] for w in windows)]


def with_missed_pings(rows: list[Any], period_s: float) -> list[Any]:
    """rows plus the pings the pinger would have sent while one call waited (coordinated omission:
    a stalled daemon must not get fewer samples). A call of L seconds adds the scheduled pings at
    +k*period, each waiting L - k*period: what a client asking at that moment would have waited."""
    out = list(rows)
    for t0, op, seconds, outcome in rows:
        k = 1
        while seconds - k * period_s > 0:
            out.append((t0 + k * period_s, op, seconds - k * period_s, "missed"))
            k += 1
    return out


def _ping_figures(pings: list[Any], windows: list[dict[str, Any]]) -> dict[str, Any]:
    sent = _inside(pings, windows)
    rows = with_missed_pings(sent, PING_PERIOD_S)
    longest = 0.0  # per window, from its start to its end: a stall at either edge counts
    for w in windows:
        answered = sorted(r[0] + r[2] for r in _inside(rows, [w]) if r[3] == "ok")
        marks = [w["start"], *answered, w["end"]]
        longest = max(longest, *(b - a for a, b in zip(marks, marks[1:])))
    return {"pings": len(sent), "p99_ms": _ms(p99([r[2] for r in rows])),
            "p99_ms_sent_only": _ms(p99([r[2] for r in sent])),
            "max_ms": _ms(max((r[2] for r in rows), default=None)),
            "timeouts": sum(r[3] == "timeout" for r in sent),
            "longest_without_answer_s": round(longest, 3),
            "seconds": round(sum(w["end"] - w["start"] for w in windows), 2)}


def analyse(windows: list[dict[str, Any]], workers: list[dict[str, Any]],
            rss: list[tuple[float, int, int]], start_s: float,
            params: dict[str, Any]) -> dict[str, Any]:
    pings = [r for w in workers if w["name"] == "pinger" for r in w["rows"]]
    honest = [w for w in workers if w["name"] != "pinger"]
    attack_windows = [w for w in windows if w["kind"] == "attack"]
    per_attack = {}
    for name in attacks.ATTACKS:
        mine = [w for w in attack_windows if w["attack"] == name]
        per_attack[name] = {**_ping_figures(pings, mine),
                            "honest_hit_rate": _hit_rate(honest, mine),
                            "honest_errors": _outcomes(honest, mine),
                            "rounds": [w["details"] for w in mine]}
    under_attack = _ping_figures(pings, attack_windows)
    quiet = [w for w in windows if w["kind"] in ("baseline", "quiet")]
    restarts = [w for w in windows if w["kind"] == "restart"]
    wrong = sum(w["wrong_bytes"] for w in honest)
    by_cause: Counter[str] = Counter()
    for w in honest:
        by_cause.update(w["wrong_by_cause"])
    pool_mib = POOL_BYTES / MiB
    rss_max = max((s[1] for s in rss), default=0) / MiB
    violations = sorted(n for n, a in per_attack.items()
                        if a["p99_ms"] is not None and a["p99_ms"] > BUDGET_PING_P99_MS)
    return {
        "wrong_bytes": wrong,
        "ping_p99_ms_under_attack": under_attack["p99_ms"],
        "rss_max_over_pool_mib": round(rss_max - pool_mib, 1),
        "budgets": {
            "ping_p99_ms_under_attack": {"max": BUDGET_PING_P99_MS,
                                         "met": (under_attack["p99_ms"] or 0) <= BUDGET_PING_P99_MS,
                                         "attacks_over_budget": violations},
            "wrong_bytes": {"max": BUDGET_WRONG_BYTES, "met": wrong <= BUDGET_WRONG_BYTES},
        },
        "wrong": {"bytes": wrong, "blocks": sum(w["wrong_blocks"] for w in honest),
                  "bytes_by_cause": dict(by_cause),
                  "checked_blocks": sum(w["checked_blocks"] for w in honest),
                  "checked_bytes": sum(w["checked_bytes"] for w in honest)},
        "ping": {"under_attack": under_attack, "quiet": _ping_figures(pings, quiet),
                 "restart": _ping_figures(pings, restarts)},
        "attacks": per_attack,
        "honest": {w["name"]: _client_figures(w, attack_windows, quiet, restarts) for w in honest},
        "restart": {"count": len(restarts),
                    "downtime_s": [round(w["end"] - w["start"], 2) for w in restarts],
                    "honest_errors": _outcomes(honest, restarts)},
        "rss": {"pool_mib": pool_mib, "max_mib": round(rss_max, 1),
                "max_anon_mib": round(max((s[2] for s in rss), default=0) / MiB, 1),
                "samples_every_1s": _thin(rss, start_s)},
        "windows": [{**{k: v for k, v in w.items() if k not in ("start", "end", "details")},
                     "start_s": round(w["start"] - start_s, 2),
                     "end_s": round(w["end"] - start_s, 2)} for w in windows],
        "parameters": params,
        "command": "python -m bench.soak" + (" --quick" if params["quick"] else ""),
        "machine": describe(),
    }


def _client_figures(worker: dict[str, Any], attack: list[dict[str, Any]],
                    quiet: list[dict[str, Any]], restarts: list[dict[str, Any]]) -> dict[str, Any]:
    rows = worker["rows"]
    out: dict[str, Any] = {"calls": len(rows), "outcomes": dict(Counter(r[3] for r in rows)),
                           "wrong_bytes": worker["wrong_bytes"],
                           "checked_blocks": worker["checked_blocks"]}
    for op in ("get", "put"):
        mine = [r for r in rows if r[1] == op]
        out[op] = {"calls": len(mine), "p99_ms": _ms(p99([r[2] for r in mine])),
                   "p99_ms_under_attack": _ms(p99([r[2] for r in _inside(mine, attack)])),
                   "p99_ms_quiet": _ms(p99([r[2] for r in _inside(mine, quiet)])),
                   "timeouts": sum(r[3] == "timeout" for r in mine),
                   "errors": sum(r[3].startswith("error") for r in mine),
                   "full": sum(r[3] == "full" for r in mine)}
    after = [r for r in rows if restarts and r[0] >= restarts[0]["end"] and r[3] == "ok"]
    out["first_ok_after_restart_s"] = (round(after[0][0] + after[0][2] - restarts[0]["end"], 3)
                                       if after else None)
    return out


def _hit_rate(honest: list[dict[str, Any]], windows: list[dict[str, Any]]) -> float | None:
    rows = [r for w in honest for r in _inside(w["hits"], windows)]
    asked = sum(r[2] for r in rows)
    return round(sum(r[1] for r in rows) / asked, 3) if asked else None


def _outcomes(honest: list[dict[str, Any]], windows: list[dict[str, Any]]) -> dict[str, int]:
    return dict(Counter(r[3] for w in honest for r in _inside(w["rows"], windows) if r[3] != "ok"))


def _thin(rss: list[tuple[float, int, int]], start_s: float) -> list[list[float]]:
    """[seconds, VmRSS MiB, RssAnon MiB], at most one sample a second (the max of that second)."""
    out: dict[int, list[float]] = {}
    for t, vm, anon in rss:
        sec = int(t - start_s)
        row = out.setdefault(sec, [sec, 0.0, 0.0])
        row[1], row[2] = max(row[1], round(vm / MiB, 1)), max(row[2], round(anon / MiB, 1))
    return list(out.values())


# --- report ------------------------------------------------------------------------------------
def table(res: dict[str, Any]) -> str:
    lines = ["| attack | rounds | ping p99 ms | ping max ms | ping timeouts | longest stall s "
             "| honest hit rate | honest errors |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, a in res["attacks"].items():
        errors = ", ".join(f"{k} {v}" for k, v in sorted(a["honest_errors"].items())) or "-"
        lines.append(f"| {name} | {len(a['rounds'])} | {a['p99_ms']} | {a['max_ms']} | "
                     f"{a['timeouts']} | {a['longest_without_answer_s']} | {a['honest_hit_rate']} "
                     f"| {errors} |")
    q = res["ping"]["quiet"]
    lines.append(f"| (quiet) | - | {q['p99_ms']} | {q['max_ms']} | {q['timeouts']} | "
                 f"{q['longest_without_answer_s']} | - | - |")
    return "\n".join(lines)


def render(res: dict[str, Any]) -> str:
    """The bench/README.md section for a soak.json result."""
    b, w, p = res["budgets"], res["wrong"], res["parameters"]
    honest = res["honest"]
    clients = ", ".join(
        f"{name}: get p99 {c['get']['p99_ms']} ms, put p99 {c['put']['p99_ms']} ms, "
        f"{c['get']['timeouts'] + c['put']['timeouts']} timeouts, "
        f"{c['get']['errors'] + c['put']['errors']} errors" for name, c in honest.items())
    return "\n".join([
        f"{p['seconds']:.0f} s against a real daemon (pool {p['pool']}): honest clients "
        f"({p['honest_clients']['shm']} shared-memory, {p['honest_clients']['tcp']} TCP) check "
        "every byte they read while the attacks of issue 10 run in rotation, with one SIGKILL and "
        "restart.",
        "",
        f"- wrong bytes: **{res['wrong_bytes']}** of {w['checked_bytes']} checked "
        f"(budget 0: {'met' if b['wrong_bytes']['met'] else 'NOT met'}; by cause: "
        f"{w['bytes_by_cause'] or 'none'})",
        f"- PING p99 under attack: **{res['ping_p99_ms_under_attack']} ms** (budget "
        f"{b['ping_p99_ms_under_attack']['max']:.0f} ms: "
        f"{'met' if b['ping_p99_ms_under_attack']['met'] else 'NOT met'}"
        + (f"; over budget: {', '.join(b['ping_p99_ms_under_attack']['attacks_over_budget'])}"
           if b["ping_p99_ms_under_attack"]["attacks_over_budget"] else "") + ")",
        f"- daemon RSS: max {res['rss']['max_mib']} MiB, **{res['rss_max_over_pool_mib']} MiB** "
        f"over the pool (anonymous memory max {res['rss']['max_anon_mib']} MiB)",
        f"- honest clients: {clients}",
        f"- restart downtime: {res['restart']['downtime_s']} s; daemon exit on SIGTERM in "
        f"{p['daemon_sigterm_exit_s']} s",
        *_before_line(),
        "",
        table(res),
    ])


def _before_line() -> list[str]:
    """One line comparing with bench/results/soak_before.json, when it exists."""
    try:
        before = json.loads(BEFORE.read_text())
    except (OSError, ValueError):
        return []
    return [f"- before issue 10's fixes (`bench/results/soak_before.json`, "
            f"{before['parameters']['seconds']:.0f} s): wrong bytes {before['wrong_bytes']} "
            f"({before['wrong']['bytes_by_cause'] or 'none'}), PING p99 under attack "
            f"{before['ping_p99_ms_under_attack']} ms, RSS {before['rss_max_over_pool_mib']} MiB "
            f"over the pool; {before.get('note', '')}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every attack once, small (CI)")
    parser.add_argument("--seconds", type=float, default=None, help="run time (600; 20 quick)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"result file (default {OUT})")
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

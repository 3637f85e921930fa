"""The soak's figures: PING and honest-client latency per window kind and per attack class, wrong
bytes by cause, daemon RSS; and its bench/README.md section. Pure functions of what bench/soak.py
recorded (rows of (monotonic start, op, seconds, outcome) and the attack windows)."""

from __future__ import annotations

import bisect
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from bench.machine import describe
from bench.soak_attacks import ATTACKS
from bench.soak_clients import PING_PERIOD_S

MiB = 1024 * 1024
POOL_BYTES = 256 * MiB  # bench/soak.py's pool
BEFORE = Path(__file__).parent / "results" / "soak_before.json"  # the soak before the fixes
BUDGET_PING_P99_MS = 50.0  # issue 10: during each attack, another client's PING at p99
BUDGET_WRONG_BYTES = 0

def p99(values: list[float]) -> float | None:
    """Nearest-rank 99th percentile."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def _inside(rows: list[Any], windows: list[dict[str, Any]]) -> list[Any]:
    """The rows that start inside one of windows (which never overlap)."""
    ordered = sorted(windows, key=lambda w: w["start"])
    starts = [w["start"] for w in ordered]
    out = []
    for r in rows:
        i = bisect.bisect_right(starts, r[0]) - 1
        if i >= 0 and r[0] <= ordered[i]["end"]:
            out.append(r)
    return out


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
    """pings: every ping sent plus those missed (with_missed_pings), all windows."""
    sent = [r for r in _inside(pings, windows) if r[3] != "missed"]
    rows = _inside(pings, windows)  # a ping missed inside a window counts there
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


def _parts(workers: list[dict[str, Any]], name: str) -> list[Any]:
    """A pinger's answered PINGs as (t0, sent late by, to the daemon's handling, back) rows."""
    return [tuple(r) for w in workers if w["name"] == name for r in w.get("ping_parts", [])]


def _split_figures(parts: list[Any], windows: list[dict[str, Any]]) -> dict[str, Any]:
    """The daemon's share of the PINGs' latency apart from the pinger's own: p99 of the time
    from sending to the daemon answering (what the daemon did, and the CPU it got), of how late
    the pinger sent, and of the way back to the pinger (its wakeup). The daemon's share is also
    given with the pings a client would have sent while one waited for it (with_missed_pings)."""
    mine = _inside(parts, windows)
    to_daemon = [(r[0], "ping", r[2], "ok") for r in mine]
    return {"pings": len(mine),
            "daemon_p99_ms": _ms(p99([r[2] for r in with_missed_pings(to_daemon,
                                                                      PING_PERIOD_S)])),
            "daemon_p99_ms_sent_only": _ms(p99([r[2] for r in mine])),
            "daemon_max_ms": _ms(max((r[2] for r in mine), default=None)),
            "pinger_late_p99_ms": _ms(p99([r[1] for r in mine])),
            "way_back_p99_ms": _ms(p99([r[3] for r in mine]))}


def loop_cpu(samples: list[tuple[float, int, int, int]],
             windows: list[dict[str, Any]]) -> dict[str, Any]:
    """How the daemon's loop thread fared for CPU in windows: ms run and ms spent runnable but
    waiting for a CPU, per second of window (from /proc schedstat samples: (t, pid, run ns,
    wait ns)). A high wait means the machine, not the daemon's work, delayed its answers."""
    run_ns = wait_ns = 0
    seconds = 0.0
    for w in windows:
        mine = [x for x in samples if w["start"] <= x[0] <= w["end"]]
        for a, b in zip(mine, mine[1:]):
            if a[1] == b[1]:  # the same daemon process (not across the restart)
                run_ns, wait_ns = run_ns + b[2] - a[2], wait_ns + b[3] - a[3]
                seconds += b[0] - a[0]
    if not seconds:
        return {"run_ms_per_s": None, "wait_ms_per_s": None, "seconds": 0.0}
    return {"run_ms_per_s": round(run_ns / 1e6 / seconds, 1),
            "wait_ms_per_s": round(wait_ns / 1e6 / seconds, 1), "seconds": round(seconds, 2)}


def analyse(windows: list[dict[str, Any]], workers: list[dict[str, Any]],
            rss: list[tuple[float, int, int]], start_s: float,
            params: dict[str, Any],
            cpu: list[tuple[float, int, int, int]] | None = None) -> dict[str, Any]:
    pings = with_missed_pings([r for w in workers if w["name"] == "pinger" for r in w["rows"]],
                              PING_PERIOD_S)
    # The attacker's own listener: a client sharing it waits while a long message is read.
    same = with_missed_pings([r for w in workers if w["name"] == "pinger-same"
                              for r in w["rows"]], PING_PERIOD_S)
    parts, same_parts = _parts(workers, "pinger"), _parts(workers, "pinger-same")
    honest = [w for w in workers if not w["name"].startswith("pinger")]
    attack_windows = [w for w in windows if w["kind"] == "attack"]
    per_attack = {}
    for name in ATTACKS:
        mine = [w for w in attack_windows if w["attack"] == name]
        if not mine:
            continue  # a focused run (--only) left it out
        per_attack[name] = {**_ping_figures(pings, mine),
                            "split": _split_figures(parts, mine),
                            "daemon_loop_cpu": loop_cpu(cpu or [], mine),
                            "same_listener": _ping_figures(same, mine),
                            "same_listener_split": _split_figures(same_parts, mine),
                            "honest_hit_rate": _hit_rate(honest, mine),
                            "honest_errors": _outcomes(honest, mine),
                            "rounds": [w["details"] for w in mine]}
    under_attack = _ping_figures(pings, attack_windows)
    under_attack_same = _ping_figures(same, attack_windows)
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
    split = _split_figures(parts, attack_windows)
    over_daemon_side = sorted(n for n, a in per_attack.items()
                              if (a["split"]["daemon_p99_ms"] or 0) > BUDGET_PING_P99_MS)
    return {
        "wrong_bytes": wrong,
        "ping_p99_ms_under_attack": under_attack["p99_ms"],
        # The same PINGs counting only the time from their send to the daemon's answer: what the
        # daemon does, without the pinger's own lateness (it shares the CPUs with everyone).
        "ping_p99_ms_under_attack_daemon_side": split["daemon_p99_ms"],
        "ping_p99_ms_under_attack_same_listener": under_attack_same["p99_ms"],
        "rss_max_over_pool_mib": round(rss_max - pool_mib, 1),
        "budgets": {
            "ping_p99_ms_under_attack": {"max": BUDGET_PING_P99_MS,
                                         "met": (under_attack["p99_ms"] or 0) <= BUDGET_PING_P99_MS,
                                         "attacks_over_budget": violations,
                                         "attacks_over_budget_daemon_side": over_daemon_side},
            "wrong_bytes": {"max": BUDGET_WRONG_BYTES, "met": wrong <= BUDGET_WRONG_BYTES},
        },
        "wrong": {"bytes": wrong, "blocks": sum(w["wrong_blocks"] for w in honest),
                  "bytes_by_cause": dict(by_cause),
                  "checked_blocks": sum(w["checked_blocks"] for w in honest),
                  "checked_bytes": sum(w["checked_bytes"] for w in honest)},
        "ping": {"under_attack": under_attack, "under_attack_same_listener": under_attack_same,
                 "under_attack_split": split,
                 "under_attack_same_listener_split": _split_figures(same_parts, attack_windows),
                 "quiet": _ping_figures(pings, quiet),
                 "quiet_split": _split_figures(parts, quiet),
                 "daemon_loop_cpu_under_attack": loop_cpu(cpu or [], attack_windows),
                 "daemon_loop_cpu_quiet": loop_cpu(cpu or [], quiet),
                 "restart": _ping_figures(pings, restarts)},
        "attacks": per_attack,
        "honest": {w["name"]: _client_figures(w, attack_windows, quiet, restarts) for w in honest},
        "restart": {"count": len(restarts),
                    "downtime_s": [round(w.get("up", w["end"]) - w["start"], 2) for w in restarts],
                    "honest_errors": _outcomes(honest, restarts)},
        "rss": {"pool_mib": pool_mib, "max_mib": round(rss_max, 1),
                "max_anon_mib": round(max((s[2] for s in rss), default=0) / MiB, 1),
                "samples_every_1s": _thin(rss, start_s)},
        "windows": [{**{k: v for k, v in w.items() if k not in ("start", "up", "end", "details")},
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
    up = restarts[0].get("up", restarts[0]["end"]) if restarts else 0.0  # the daemon started
    after = [r for r in rows if restarts and r[0] >= up and r[3] == "ok"]
    out["first_ok_after_restart_s"] = (round(after[0][0] + after[0][2] - up, 3)
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
def _v(value: Any) -> Any:
    return "-" if value is None else value


def _cpu(figures: dict[str, Any] | None) -> str:
    figures = figures or {}
    if figures.get("run_ms_per_s") is None:
        return "-"
    return f"{figures['run_ms_per_s']} / {figures['wait_ms_per_s']}"


def table(res: dict[str, Any]) -> str:
    lines = ["| attack | rounds | ping p99 ms | p99 of pings sent ms | daemon's share p99 ms "
             "| pinger late p99 ms | way back p99 ms | daemon loop: CPU run / wait ms per s "
             "| ping max ms | ping timeouts "
             "| longest stall s | same listener: p99 / daemon's share p99 / max ms "
             "| honest hit rate | honest errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, a in res["attacks"].items():
        errors = ", ".join(f"{k} {v}" for k, v in sorted(a["honest_errors"].items())) or "-"
        same, split = a.get("same_listener") or {}, a.get("split") or {}
        same_split = a.get("same_listener_split") or {}
        lines.append(f"| {name} | {len(a['rounds'])} | {a['p99_ms']} | {a.get('p99_ms_sent_only')} "
                     f"| {_v(split.get('daemon_p99_ms'))} | {_v(split.get('pinger_late_p99_ms'))} "
                     f"| {_v(split.get('way_back_p99_ms'))} | {_cpu(a.get('daemon_loop_cpu'))} "
                     f"| {a['max_ms']} | {a['timeouts']} | {a['longest_without_answer_s']} | "
                     f"{same.get('p99_ms')} / {_v(same_split.get('daemon_p99_ms'))} / "
                     f"{same.get('max_ms')} | {a['honest_hit_rate']} | {errors} |")
    q, qs = res["ping"]["quiet"], res["ping"].get("quiet_split") or {}
    lines.append(f"| (no attack) | - | {q['p99_ms']} | {q.get('p99_ms_sent_only')} "
                 f"| {_v(qs.get('daemon_p99_ms'))} | {_v(qs.get('pinger_late_p99_ms'))} "
                 f"| {_v(qs.get('way_back_p99_ms'))} "
                 f"| {_cpu(res['ping'].get('daemon_loop_cpu_quiet'))} | {q['max_ms']} "
                 f"| {q['timeouts']} | {q['longest_without_answer_s']} | - | - | - |")
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
        f"- PING p99 under attack, pinger on another listener than the attacker's: "
        f"**{res['ping_p99_ms_under_attack']} ms** (budget "
        f"{b['ping_p99_ms_under_attack']['max']:.0f} ms: "
        f"{'met' if b['ping_p99_ms_under_attack']['met'] else 'NOT met'}"
        + (f"; over budget: {', '.join(b['ping_p99_ms_under_attack']['attacks_over_budget'])}"
           if b["ping_p99_ms_under_attack"]["attacks_over_budget"] else "") + "); "
        f"{res['ping']['under_attack'].get('p99_ms_sent_only')} ms counting only the pings sent; "
        + (f"the daemon's share (from the send to the daemon's answer, its `at_s`) "
           f"{_split(res, 'under_attack_split')} ms, the pinger sent late by "
           f"{_split(res, 'under_attack_split', 'pinger_late_p99_ms')} ms at p99 (daemon's share "
           f"over budget: {_over_daemon_side(b)}); "
           if _split(res, "under_attack_split") is not None else "") +
        (f"the daemon's loop thread ran {_cpu_text(res, 'daemon_loop_cpu_under_attack')} under "
           f"attack, {_cpu_text(res, 'daemon_loop_cpu_quiet')} with none; "
           if (res["ping"].get("daemon_loop_cpu_under_attack") or {}).get("run_ms_per_s")
           is not None else "") +
        f"with no attack running {res['ping']['quiet']['p99_ms']} ms "
        f"({res['ping']['quiet'].get('p99_ms_sent_only')} ms sent only): the machine's own share "
        f"(load average {_load(res)}); a pinger on the attacker's own listener: "
        f"{res.get('ping_p99_ms_under_attack_same_listener')} ms (a client sharing a listener "
        f"waits while a message of a million frames is read)",
        f"- daemon RSS: max {res['rss']['max_mib']} MiB, **{res['rss_max_over_pool_mib']} MiB** "
        f"over the pool (anonymous memory max {res['rss']['max_anon_mib']} MiB)",
        f"- honest clients: {clients}",
        f"- restart downtime: {res['restart']['downtime_s']} s; daemon exit on SIGTERM in "
        f"{p['daemon_sigterm_exit_s']} s",
        *_before_line(),
        "",
        table(res),
    ])


def _cpu_text(res: dict[str, Any], key: str) -> str:
    figures = res["ping"].get(key) or {}
    return (f"{figures.get('run_ms_per_s')} ms and waited {figures.get('wait_ms_per_s')} ms for "
            "a CPU per second")


def _over_daemon_side(budgets: dict[str, Any]) -> str:
    over = budgets["ping_p99_ms_under_attack"].get("attacks_over_budget_daemon_side") or []
    return ", ".join(over) or "none"


def _split(res: dict[str, Any], key: str, figure: str = "daemon_p99_ms") -> Any:
    return (res["ping"].get(key) or {}).get(figure)


def _load(res: dict[str, Any]) -> str:
    load = res.get("machine", {}).get("load_avg") or []
    return " / ".join(f"{x:.1f}" for x in load) or "?"


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
            f"over the pool (its `note` says how it was run)"]



"""What a LOOKUP costs by its number of hashes and by the daemon's busy-poll window, against bare
ZeroMQ round trips measured in the same run. bench.store gives one figure (256 hashes at the
default window, `lookup_vs_rtt`); this shows where that figure comes from on the machine at hand.

    python -m bench.lookup_cost [--rounds N] [--out PATH]

Series, interleaved round by round (a busy moment on the machine hits every series); each round's
value is the median of CALLS calls made after WARM untimed ones:
  echo/B        a DEALER -> ROUTER round trip of a B-byte request and a 2-byte reply, the ROUTER
                (bench.store's raw peer) in its own process, polling without sleeping for the
                daemon's default window after each message (as the daemon does). B = 16, 8000,
                8300, 16400: a request past 8192 bytes, libzmq's write batch (out_batch_size),
                reaches the ROUTER in two writes, and one that polls can wake between them (a
                step, where it shows).
  rtt           the same 16-byte echo, its ROUTER sleeping in poll: bench.store's bare round trip
                (the `rtt` every ratio below divides by).
  ping/W        kvstore ping, against a daemon run with --busy-poll-us W (0: off, 100, 300, 1000
                and the daemon's default)
  lookupN/W     Client.lookup of the first N hashes of a stored 512-block chain with a lease, then
                a RELEASE (untimed); N = 1, 64, 128, 250, 256, 512. From 64 hashes on, this
                same-host client writes them into its hash file and names it in the request
                (kvstore/hashfiles.py), so no LOOKUP of these crosses the 8,192-byte batch.

  raw_ping, raw_lookup256, raw_lookup256_inline
                the same PING, and LOOKUP of 256 hashes with a lease (then a RELEASE, untimed):
                by hash file as the Client sends it, and inline (8.3 KB, two writes), against the
                default window's daemon, encoded once before the timing (the file written once)
                and sent by a bare DEALER, each right after the Client's own series: the daemon
                and the wire without the Client's Python, so ping and lookup256 minus the first
                two are what the client costs (encode, send, decode), and inline minus by file
                is what the file saves.

Also per window, the daemon's CPU (/proc, every thread, busy polling included):
  per LOOKUP + RELEASE, over all the sizes above (a back-to-back conversation), and
  per PING of a conversation paced PACE_US apart (a client's reply to its next send): what a
                window costs a client that talks slower than it. The loop polls only while each
                message comes within the window of its wait starting (kvstore/server.py), so
                such a conversation should cost no more than with --busy-poll-us 0.

Writes bench/results/lookup_cost.json (figures, ratios, parameters, machine) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from bench.daemon import Daemon
from bench.machine import CLOCK_TICKS, describe, proc_jiffies, summary
from bench.store import RawPeer, chain
from kvstore import protocol
from kvstore.client import Client
from kvstore.config import DEFAULT_BUSY_POLL_US
from kvstore.hashfiles import HashFile
from kvstore.keys import Namespace
from kvstore.messages import Lookup, Ping, Release

ECHO_BYTES = (16, 8000, 8300, 16400)
NUM_HASHES = (1, 64, 128, 250, 256, 512)
BARE_HASHES = 256  # bench.store's prompt
WINDOWS_US = tuple(sorted({0, 100, 300, 1000, DEFAULT_BUSY_POLL_US}))  # 0: never polls
WARM, CALLS = 50, 200
# Idle before each series: every process that polls after its last message (the daemons, the
# echo) has stopped by then, so no series runs next to another's spinning.
SETTLE_S = 0.02
LEASE_MS = 10_000
BLOCK_BYTES = 4096  # the blocks' size does not enter a LOOKUP; small keeps the pool small
NS = Namespace(b"lookup-cost")
PACE_US = 500  # the paced conversation's gap between one reply and the next send
PACED_CALLS = 1000


class Bare:
    """A DEALER sending requests encoded beforehand to a daemon: no Client code in the timing."""

    def __init__(self, address: str, hashes: list[bytes]) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 10_000)
        self.sock.connect(address)
        self.ping_frame = protocol.encode(Ping(), 1)
        self.inline_frame = protocol.encode(Lookup(ns=NS, hashes=tuple(hashes),
                                                   lease_ms=LEASE_MS), 2)
        # The daemon takes the file (its name) at the first LOOKUP and reads it on every one.
        self.hash_file = HashFile()
        if not self.hash_file.put(hashes, len(hashes[0]), 0):
            raise RuntimeError("the hashes do not fit a hash file")
        self.file_frame = protocol.encode(Lookup(
            ns=NS, hashes=tuple(hashes), lease_ms=LEASE_MS,
            hashes_file=(self.hash_file.name, 0, len(hashes[0]))), 2)

    def call(self, frame: bytes) -> dict[str, Any]:
        self.sock.send(frame)
        reply = protocol.decode_header(self.sock.recv())
        if not reply.get("ok"):
            raise AssertionError(f"bare request refused: {reply}")
        return reply

    def release(self, reply: dict[str, Any], num: int) -> None:
        if reply.get("num_hits") != num:
            raise AssertionError(f"bare lookup of {num} stored hashes: {reply}")
        if not self.call(protocol.encode(Release(lease=reply["lease"]), 3)).get("released"):
            raise AssertionError("bare release of a fresh lease failed")

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
        self.hash_file.close()


def median_us(call: Callable[[], Any], after: Callable[[Any], None] | None = None) -> float:
    """The median of CALLS timed calls after WARM untimed ones; after(result) runs untimed."""
    time.sleep(SETTLE_S)
    samples = []
    for i in range(WARM + CALLS):
        t0 = time.perf_counter()
        result = call()
        dt = time.perf_counter() - t0
        if after is not None:
            after(result)
        if i >= WARM:
            samples.append(dt)
    return statistics.median(samples) * 1e6


def paced_median_us(call: Callable[[], Any]) -> float:
    """The median of PACED_CALLS calls, each sent PACE_US after the last one's reply."""
    time.sleep(SETTLE_S)
    samples = []
    for _ in range(PACED_CALLS):
        resume = time.perf_counter() + PACE_US / 1e6
        while time.perf_counter() < resume:
            time.sleep(0)  # yields the core: a sleep() of 0.5 ms overshoots by ~0.1 ms here
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


class Bench:
    def __init__(self) -> None:
        self.chain = chain(b"lookup-cost", max(NUM_HASHES))  # (hash, parent), root first
        self.hashes = [h for h, _ in self.chain]
        self.series: dict[str, list[float]] = {}
        self.cpu: dict[int, list[int]] = {w: [0, 0] for w in WINDOWS_US}  # jiffies, calls
        self.paced_cpu: dict[int, list[int]] = {w: [0, 0] for w in WINDOWS_US}

    def setup(self) -> None:
        print("starting the echo peers and one daemon per busy-poll window", flush=True)
        self.echo_busy = RawPeer()  # bench.store's raw peer, answering with two bytes
        self.echo_busy.busy_poll(DEFAULT_BUSY_POLL_US)
        self.echo_sleeping = RawPeer()  # the same as bench.store's rtt
        self.daemons: dict[int, Daemon] = {}
        self.clients: dict[int, Client] = {}
        blocks = [(h, parent, bytes(BLOCK_BYTES)) for h, parent in self.chain]
        for window in WINDOWS_US:
            daemon = Daemon(pool_size="64MiB", extra_args=["--busy-poll-us", str(window)])
            self.daemons[window] = daemon.start()
            daemon.wait_prefaulted()
            client = self.clients[window] = Client(daemon.address, timeout_s=10)
            if client.put(NS, blocks).num_stored != len(blocks):
                raise RuntimeError("the chain did not fit the pool")
        self.bare = Bare(self.daemons[DEFAULT_BUSY_POLL_US].address, self.hashes[:BARE_HASHES])

    def record(self, name: str, value_us: float) -> None:
        self.series.setdefault(name, []).append(value_us)

    def round(self) -> None:
        self.record("rtt", median_us(lambda: self.echo_sleeping.call(b"p" * 16)))
        for nbytes in ECHO_BYTES:
            request = b"p" * nbytes
            self.record(f"echo/{nbytes}", median_us(lambda: self.echo_busy.call(request)))
        bare = self.bare
        for window, client in self.clients.items():
            is_default = window == DEFAULT_BUSY_POLL_US
            self.record(f"ping/{window}", median_us(client.ping))
            if is_default:  # right after the Client's own, so both meet the daemon alike
                self.record("raw_ping", median_us(lambda: bare.call(bare.ping_frame)))
            pid = self.daemons[window].proc.pid  # type: ignore[union-attr]
            for n in NUM_HASHES:
                hashes = self.hashes[:n]
                before = proc_jiffies(pid)
                self.record(f"lookup{n}/{window}", median_us(
                    lambda: client.lookup(NS, hashes, lease_ms=LEASE_MS),
                    lambda found: self._release(client, found, n)))
                self.cpu[window][0] += proc_jiffies(pid) - before
                self.cpu[window][1] += WARM + CALLS
                if is_default and n == BARE_HASHES:
                    self.record(f"raw_lookup{n}", median_us(
                        lambda: bare.call(bare.file_frame), lambda r: bare.release(r, n)))
                    self.record(f"raw_lookup{n}_inline", median_us(
                        lambda: bare.call(bare.inline_frame), lambda r: bare.release(r, n)))
            before = proc_jiffies(pid)
            self.record(f"paced_ping/{window}", paced_median_us(client.ping))
            self.paced_cpu[window][0] += proc_jiffies(pid) - before
            self.paced_cpu[window][1] += PACED_CALLS

    @staticmethod
    def _release(client: Client, found: Any, num: int) -> None:
        if found.num_hits != num or not client.release(found.lease):
            raise AssertionError(f"lookup of {num} stored hashes: {found}")

    def close(self) -> None:
        if hasattr(self, "bare"):
            self.bare.close()
        for client in getattr(self, "clients", {}).values():
            client.close()
        for daemon in getattr(self, "daemons", {}).values():
            daemon.stop()
        for echo in ("echo_busy", "echo_sleeping"):
            if hasattr(self, echo):
                getattr(self, echo).close()


def results(bench: Bench, rounds: int, command: str, wall_s: float) -> dict[str, Any]:
    series = {name: {"median_us": round(statistics.median(v), 1), "min_us": round(min(v), 1),
                     "max_us": round(max(v), 1), "rounds_us": [round(x, 1) for x in v]}
              for name, v in bench.series.items()}
    rtt = bench.series["rtt"]
    # Each ratio is taken per round (the same moment's rtt), then the median over rounds.
    ratios = {f"{name}_vs_rtt": round(statistics.median(a / b for a, b in zip(v, rtt)), 3)
              for name, v in bench.series.items() if name != "rtt"}
    med = {name: s["median_us"] for name, s in series.items()}
    default = DEFAULT_BUSY_POLL_US
    derived = {
        "echo_step_us_8000_to_8300": round(med["echo/8300"] - med["echo/8000"], 1),
        "lookup_step_us_250_to_256": round(med[f"lookup256/{default}"]
                                           - med[f"lookup250/{default}"], 1),
        "lookup_us_per_hash_1_to_250": round((med[f"lookup250/{default}"]
                                              - med[f"lookup1/{default}"]) / 249, 3),
        "lookup1_minus_ping_us": round(med[f"lookup1/{default}"] - med[f"ping/{default}"], 1),
        "client_us_ping": round(med[f"ping/{default}"] - med["raw_ping"], 1),
        f"client_us_lookup{BARE_HASHES}": round(med[f"lookup{BARE_HASHES}/{default}"]
                                                - med[f"raw_lookup{BARE_HASHES}"], 1),
        f"file_saves_us_lookup{BARE_HASHES}": round(med[f"raw_lookup{BARE_HASHES}_inline"]
                                                    - med[f"raw_lookup{BARE_HASHES}"], 1),
        "daemon_cpu_us_per_lookup_release": {
            str(w): round(j / CLOCK_TICKS / calls * 1e6, 1) for w, (j, calls) in bench.cpu.items()},
        "daemon_cpu_us_per_paced_ping": {
            str(w): round(j / CLOCK_TICKS / calls * 1e6, 1)
            for w, (j, calls) in bench.paced_cpu.items()},
    }
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": command,
            "machine": describe(extra_packages=("kvstore",)), "wall_s": round(wall_s, 1),
            "parameters": {"rounds": rounds, "warm_calls": WARM, "calls": CALLS,
                           "echo_bytes": ECHO_BYTES, "num_hashes": NUM_HASHES,
                           "busy_poll_windows_us": WINDOWS_US, "pace_us": PACE_US,
                           "paced_calls": PACED_CALLS,
                           "default_busy_poll_us": DEFAULT_BUSY_POLL_US},
            "series": series, "ratios": ratios, "derived": derived}


def render(res: dict[str, Any]) -> str:
    """bench/README.md's section: LOOKUP latency by hashes and window, over the bare rtt."""
    p, s, r = res["parameters"], res["series"], res["ratios"]
    windows = p["busy_poll_windows_us"]
    lines = [f"`{res['command']}` on {summary(res['machine'])}, {res['date']}: median of "
             f"{p['rounds']} rounds, each the median of {p['calls']} calls. Bare round trip "
             f"(`rtt`, its echo sleeping in poll): {s['rtt']['median_us']:.0f} us.", "",
             "| request | " + " | ".join(
                 (f"busy-poll {w} us" if w else "no busy poll")
                 + (" (default)" if w == p["default_busy_poll_us"] else "")
                 for w in windows) + " |",
             "|---|" + "---|" * len(windows)]
    for name in ["ping", "paced_ping"] + [f"lookup{n}" for n in p["num_hashes"]]:
        cells = [f"{s[f'{name}/{w}']['median_us']:.0f} us ({r[f'{name}/{w}_vs_rtt']:.2f}x)"
                 for w in windows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    echoes = ", ".join(f"{b} B {s[f'echo/{b}']['median_us']:.0f} us" for b in p["echo_bytes"])
    d = res["derived"]
    cpu, paced = (", ".join(f"{w} us: {us:.0f} us" for w, us in d[key].items())
                  for key in ("daemon_cpu_us_per_lookup_release", "daemon_cpu_us_per_paced_ping"))
    lines += ["", f"Echo polling like the daemon, by request size: {echoes} (8,000 -> 8,300 B, "
              f"past libzmq's 8,192-byte write batch: {d['echo_step_us_8000_to_8300']:+.0f} us). "
              f"LOOKUP 250 -> 256 hashes (the same boundary, now by hash file): "
              f"{d['lookup_step_us_250_to_256']:+.0f} us; "
              f"{d['lookup_us_per_hash_1_to_250']:.2f} us per hash from 1 to 250. "
              f"Daemon CPU per LOOKUP + RELEASE (all sizes) by window: {cpu}; per PING paced "
              f"{p['pace_us']} us apart (what a longer window costs): {paced}.", "",
              f"The same requests encoded beforehand and sent by a bare DEALER (default window): "
              f"PING {s['raw_ping']['median_us']:.0f} us "
              f"({r['raw_ping_vs_rtt']:.2f}x), LOOKUP of {BARE_HASHES} hashes "
              f"{s[f'raw_lookup{BARE_HASHES}']['median_us']:.0f} us "
              f"({r[f'raw_lookup{BARE_HASHES}_vs_rtt']:.2f}x) by hash file, "
              f"{s[f'raw_lookup{BARE_HASHES}_inline']['median_us']:.0f} us "
              f"({r[f'raw_lookup{BARE_HASHES}_inline_vs_rtt']:.2f}x) inline (the file saves "
              f"{d[f'file_saves_us_lookup{BARE_HASHES}']:.0f} us): the Client's Python costs "
              f"{d['client_us_ping']:.0f} us of a PING and "
              f"{d[f'client_us_lookup{BARE_HASHES}']:.0f} us of that LOOKUP."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lookup_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12, help="measured rounds (default 12)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "lookup_cost.json")
    args = parser.parse_args(argv)
    command = shlex.join([Path(sys.executable).name, "-m", "bench.lookup_cost",
                          *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    bench = Bench()
    try:
        bench.setup()
        for i in range(max(1, args.rounds)):
            bench.round()
            print(f"round {i + 1}/{args.rounds}: rtt {bench.series['rtt'][-1]:.0f} us, lookup256 "
                  f"{bench.series[f'lookup256/{DEFAULT_BUSY_POLL_US}'][-1]:.0f} us", flush=True)
    finally:
        bench.close()
    res = results(bench, max(1, args.rounds), command, time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(render(res))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What one row of each block-listing message costs the daemon: the figures that chose the
per-message row caps (protocol.MAX_WRITE_ROWS, MAX_READ_ROWS; issue 10: one message must cost well under the
50 ms PING budget).

Each op is sent from a raw DEALER to a real daemon at several row counts (4 KiB blocks, the
default --min-block-size); the daemon's time is the round trip less a PING's. Rows above the
daemon's caps are refused (too_large), so the large counts only measure on code without caps,
or with --rows given explicitly against such a daemon. Writes bench/results/row_costs.json.

    python -m bench.row_costs                 # 128 and 512 rows (512: the write cap)
    python -m bench.row_costs --rows 1024 8192
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from bench.hostile import RESULTS, call, dealer, header, hello_token
from kvstore.protocol import Op

BLOCK_BYTES = 4096
REPEATS = 3


def _timed(sock: zmq.Socket, frames: list[Any]) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    reply = call(sock, frames)
    return time.perf_counter() - start, reply


def _ping_s(sock: zmq.Socket) -> float:
    return statistics.median(_timed(sock, [header(Op.PING)])[0] for _ in range(20))


def measure_rows(address: str, n: int, tag: str) -> dict[str, float]:
    """Milliseconds of daemon time per op for messages of n rows (median of REPEATS)."""
    ctx = zmq.Context()
    a, b = dealer(ctx, address, 60_000), dealer(ctx, address, 60_000)
    try:
        token = hello_token(a)
        hello_token(b)
        base = _ping_s(a)
        times: dict[str, list[float]] = {}

        def record(op: str, frames: list[Any], sock: zmq.Socket = a) -> dict[str, Any]:
            elapsed, reply = _timed(sock, frames)
            assert reply.get("ok"), (op, reply)
            times.setdefault(op, []).append(max(0.0, elapsed - base))
            return reply

        ns = [f"rows-{tag}".encode(), 0]
        payload = b"x" * BLOCK_BYTES
        for r in range(REPEATS):
            hashes = [f"{tag}-{r}-{i}".encode() for i in range(n)]
            rows = [[h, hashes[i - 1] if i else None] for i, h in enumerate(hashes)]
            record("put", [header(Op.PUT, ns=ns, blocks=rows, sizes=[BLOCK_BYTES] * n),
                           *[payload] * n])
            record("lookup", [header(Op.LOOKUP, ns=ns, hashes=hashes, lease_ms=0)])
            reply = record("lookup_leased", [header(Op.LOOKUP, ns=ns, hashes=hashes,
                                                    lease_ms=60_000)])
            call(a, [header(Op.RELEASE, lease=reply["lease"])])
            reply = record("get_shm", [header(Op.GET, ns=ns, hashes=hashes, shm=True,
                                              token=token)])
            call(a, [header(Op.RELEASE, lease=reply["lease"])])
            fresh = [f"{tag}-{r}-res-{i}".encode() for i in range(n)]
            blocks = [[h, fresh[i - 1] if i else None, BLOCK_BYTES] for i, h in enumerate(fresh)]
            reply = record("reserve", [header(Op.RESERVE, ns=ns, token=token, blocks=blocks)])
            done = [[h, s] for h, s in zip(fresh, reply["slots"]) if s is not None]
            record("commit_foreign", [header(Op.COMMIT, ns=ns, blocks=done)], b)
            record("abort_foreign", [header(Op.ABORT, ns=ns, blocks=done)], b)
            record("commit", [header(Op.COMMIT, ns=ns, blocks=done)])
            fresh = [f"{tag}-{r}-ab-{i}".encode() for i in range(n)]
            blocks = [[h, fresh[i - 1] if i else None, BLOCK_BYTES] for i, h in enumerate(fresh)]
            reply = call(a, [header(Op.RESERVE, ns=ns, token=token, blocks=blocks)])
            record("abort", [header(Op.ABORT, ns=ns, blocks=[[h, s] for h, s in
                                                             zip(fresh, reply["slots"])])])
        return {op: round(1000 * statistics.median(v), 2) for op, v in times.items()}
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.row_costs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[128, 512])
    parser.add_argument("--out", default=str(RESULTS / "row_costs.json"))
    args = parser.parse_args(argv)
    from bench.machine import describe
    from bench.daemon import Daemon

    d = Daemon(pool_size="2GiB").start()
    results = []
    try:
        for n in args.rows:
            ms = measure_rows(d.address, n, f"n{n}")
            row = {"rows": n, "ms": ms, "us_per_row": {op: round(1000 * v / n, 1)
                                                       for op, v in ms.items()}}
            print(json.dumps(row), flush=True)
            results.append(row)
    finally:
        d.stop()
    out = {"block_bytes": BLOCK_BYTES, "results": results, "machine": describe(),
           "command": " ".join(["python", "-m", "bench.row_costs", *(argv or sys.argv[1:])])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

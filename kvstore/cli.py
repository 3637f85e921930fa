"""`kvstore` command line: serve, keygen, stats, invalidate, ping, put, get."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from kvstore import gcpolicy
from kvstore.config import (CONFIG_ENV, OPTIONS, ConfigError, Resolved, ServeConfig, resolve,
                            to_toml)
from kvstore.errors import KVStoreError
from kvstore.ipc import default_address
from kvstore.keys import BlockHash, Namespace
from kvstore.units import format_size

_SERVE_EPILOG = f"""\
Every option can also be set in the environment as KVSTORE_<OPTION> (e.g. KVSTORE_POOL_SIZE=8GiB)
or in the [serve] table of a TOML file named by --config or {CONFIG_ENV} (e.g. pool_size = "8GiB").
Precedence, highest first: flags > environment > file > defaults. --print-config shows the
result and where each value came from. Bad settings exit with code 2."""
_CLEAR = "\x1b[H\x1b[2J"  # ANSI: cursor home, clear screen (--watch redraws in place)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, KVStoreError, ValueError, OSError) as exc:
        print(f"kvstore: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon", epilog=_SERVE_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _serve_args(serve)
    serve.set_defaults(func=_serve)

    keygen = sub.add_parser("keygen", help="make CURVE keys for the daemon and its clients")
    keygen.add_argument("dir", type=Path)
    keygen.set_defaults(func=_keygen)

    stats = sub.add_parser("stats", help="show per-namespace blocks, hit rates, hottest prefixes")
    _client_args(stats)
    shown = stats.add_mutually_exclusive_group()
    shown.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                       help="redraw every SECONDS with rates since the last draw, until Ctrl-C")
    shown.add_argument("--json", action="store_true", help="print the raw STATS reply once")
    stats.set_defaults(func=_stats)

    ping = sub.add_parser("ping", help="check the daemon answers")
    _client_args(ping)
    ping.set_defaults(func=_ping)

    inval = sub.add_parser("invalidate", help="drop a namespace's blocks")
    _client_args(inval)
    inval.add_argument("namespace", nargs="?", default=None,
                       help="namespace as hex, or a unique prefix of it (from `kvstore stats`)")
    inval.add_argument("--all", action="store_true", help="drop the blocks of every namespace")
    inval.add_argument("--below-epoch", type=int, default=None,
                       help="drop only epochs lower than this")
    inval.set_defaults(func=_invalidate)

    put = sub.add_parser("put", help="store stdin as one block (for trying the daemon out)")
    get = sub.add_parser("get", help="write one stored block to stdout")
    for p, func in ((put, _put), (get, _get)):
        _client_args(p)
        p.add_argument("--namespace", default="demo", help="namespace name (text)")
        p.add_argument("--hash", required=True, help="block hash (text or hex)")
        p.set_defaults(func=func)
    return parser


def _serve_args(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--config", type=Path, default=None,
                       help=f"TOML file with a [serve] table of these options [env {CONFIG_ENV}]")
    serve.add_argument("--print-config", action="store_true",
                       help="print the resolved settings as TOML, with the source of each, and exit")
    defaults = ServeConfig()
    for option in OPTIONS:
        default = getattr(defaults, option.field)
        shown = (format_size(default) if option.name == "pool_size"
                 else ", ".join(default) if isinstance(default, tuple) else default)
        text = option.help if "default" in option.help or default in (None, False) \
            else f"{option.help} (default {shown})"
        text += f" [env {option.env}]"
        if option.is_switch:
            serve.add_argument(option.flag, dest=option.name, action="store_const", const=True,
                               default=None, help=text)
        else:  # parsed by config.resolve, so every source gets the same checks and messages
            serve.add_argument(option.flag, dest=option.name, default=None, help=text,
                               action="append" if option.name == "tcp" else "store")
    serve.add_argument("--no-tcp", action="store_true",
                       help="listen on no TCP address (overrides the environment and --config)")


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=default_address(),
                   help=f"daemon address (default {default_address()}: the default daemon of "
                        f"this uid on this host)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an answer")
    p.add_argument("--curve-keys", type=Path, default=None, help="client keys from `kvstore keygen`")


def _serve(args: argparse.Namespace) -> int:
    from kvstore.malloc import keep_large_buffers
    from kvstore.pool import HEADER_BYTES, Pool, PoolError
    from kvstore.server import AddressInUse, Server
    from kvstore.tenants import AccessError

    flags = {option.name: getattr(args, option.name) for option in OPTIONS}
    if args.no_tcp:
        flags["tcp"] = []
    resolved = resolve(flags, os.environ, args.config)
    if args.print_config:
        print(to_toml(resolved), end="")
        return 0
    config = resolved.config
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keep_large_buffers()  # before any socket: TCP PUT frames reuse memory (kvstore/malloc.py)
    page = config.effective_page_bytes()
    try:
        pool = Pool.create(config.segment, HEADER_BYTES + (config.pool_bytes // page) * page)
    except PoolError as exc:
        print(f"kvstore: error: {exc}", file=sys.stderr)
        return 1
    try:
        server = Server(config, pool)
    except AddressInUse as exc:
        pool.close()
        print(f"kvstore: error: {exc}", file=sys.stderr)
        return 1
    except AccessError as exc:  # a bad CURVE key file or tenants.toml: a setting, exit 2
        pool.close()
        print(f"kvstore: error: {exc}", file=sys.stderr)
        return 2
    if not _serve_metrics(server, resolved):
        server.close()
        return 1
    server.install_signal_handlers()
    # Startup is done: Python's full GC passes leave the loop's way (kvstore/gcpolicy.py).
    server.full_passes = gcpolicy.settle()
    slabs = server.store.slabs
    print(f"kvstore: listening on {', '.join(_described(x) for x in server.listeners)}",
          flush=True)
    print(f"kvstore: segment {pool.path} ({format_size(pool.size_bytes)}, {slabs.num_pages} pages "
          f"of {format_size(slabs.page_bytes)}), policy {config.policy}"
          f"{_curve_note(server)}", flush=True)
    server.serve_forever()
    print("kvstore: stopped, segment removed", flush=True)
    return 0


def _described(listener: Any) -> str:
    """A listener's address, and the tenant it is for when it is one's own."""
    return listener.address + (f" (tenant {listener.tenant} only)" if listener.tenant else "")


def _curve_note(server: Any) -> str:
    if server.gate is None:
        return ""
    access = server.gate.access
    tenants = (f", {access.num_tenants} tenants from {server.gate.keys_dir / 'tenants.toml'}"
               if access.grants is not None else "")
    return f", CURVE on ({len(access.keys)} client keys{tenants}; SIGHUP reloads them)"


def _serve_metrics(server: Any, resolved: Resolved) -> bool:
    """Start /metrics; False when a port the operator chose is taken.

    The default port being taken (a second daemon on the node) only costs the metrics: the
    daemon serves on and says so.
    """
    config = resolved.config
    if not config.metrics_port:
        return True
    where = f"{config.metrics_host}:{config.metrics_port}"
    try:
        server.metrics.serve(config.metrics_host, config.metrics_port)
    except OSError as exc:
        if resolved.sources["metrics_port"] != "default":
            print(f"kvstore: error: cannot serve metrics on {where}: {exc.strerror} "
                  f"(set by {resolved.sources['metrics_port']})", file=sys.stderr)
            return False
        print(f"kvstore: warning: no metrics: {where} {exc.strerror}; choose a free "
              f"--metrics-port, or 0 to turn metrics off", file=sys.stderr, flush=True)
        return True
    print(f"kvstore: metrics on http://{where}/metrics", flush=True)
    return True


def _keygen(args: argparse.Namespace) -> int:
    import zmq.auth

    directory: Path = args.dir
    (directory / "clients").mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    zmq.auth.create_certificates(directory, "server")
    zmq.auth.create_certificates(directory, "client")
    # The daemon authorizes the public keys found in clients/; copy more there for more clients.
    (directory / "clients" / "client.key").write_bytes((directory / "client.key").read_bytes())
    for secret in directory.glob("*.key_secret"):
        secret.chmod(0o600)
    print(f"kvstore: wrote {directory}/server.key_secret (daemon: --curve-keys {directory}), "
          f"client.key_secret + server.key (clients), clients/client.key (authorized)")
    return 0


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from kvstore.client import Client

    return Client(args.address, args.timeout, curve_dir=args.curve_keys)


def _stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stats = client.stats()  # unreachable: ServerUnavailable, exit code 2
        if args.json:
            print(json.dumps(stats, indent=2, sort_keys=True))
            return 0
        if args.watch is None:
            print(render_stats(stats, args.address), end="")
            return 0
        if args.watch <= 0:
            raise ValueError(f"--watch must be a positive number of seconds, got {args.watch}")
        return _watch(client, args.address, args.watch, stats)


def _watch(client: Any, address: str, interval_s: float, stats: dict[str, Any]) -> int:
    """Redraw the table every interval_s until Ctrl-C; a lost daemon is shown, not fatal."""
    previous: tuple[dict[str, Any], float] | None = None
    taken_s = time.monotonic()
    # Ctrl-C is how --watch ends. A shell that starts us in the background ignores SIGINT, and
    # Python then installs no KeyboardInterrupt handler: `kill -INT` would be ignored for good.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            rates = None if previous is None else (previous[0], taken_s - previous[1])
            print(_CLEAR + render_stats(stats, address, rates), end="", flush=True)
            previous = (stats, taken_s)
            time.sleep(interval_s)
            try:
                stats, taken_s = client.stats(), time.monotonic()
            except KVStoreError as exc:
                print(f"kvstore: {exc}; retrying", flush=True)
                previous = None
    except KeyboardInterrupt:
        return 0


def render_stats(stats: dict[str, Any], address: str,
                 rates: tuple[dict[str, Any], float] | None = None) -> str:
    """The `kvstore stats` table; rates = (earlier stats, seconds since) adds per-second columns."""
    used, capacity = stats["used_bytes"], stats["capacity_bytes"]
    lines = [
        f"kvstore {address}: pool {format_size(used)} of {format_size(capacity)} used "
        f"({100 * used / max(capacity, 1):.1f}%), {stats['num_blocks']} blocks, "
        f"{stats['num_reserved']} reserved, {stats['num_leases']} leases, "
        f"{stats['num_evictions']} evictions, {stats['errors']} errors",
        "",
        f"{'NAMESPACE':<14}{'BLOCKS':>8}{'BYTES':>12}{'LOOKUPS':>9}{'HIT RATE':>10}"
        f"{'EVICTIONS':>11}" + (f"{'LOOKUPS/S':>11}{'HIT RATE NOW':>14}" if rates else ""),
    ]
    namespaces = sorted(stats["namespaces"].values(), key=lambda n: (-n["blocks"], n["label"]))
    for ns in namespaces:
        line = (f"{ns['label']:<14}{ns['blocks']:>8}{format_size(ns['bytes']):>12}"
                f"{ns['lookups']:>9}{_hit_rate(ns['hits'], ns['misses']):>10}{ns['evictions']:>11}")
        if rates:
            before = {n["label"]: n for n in rates[0]["namespaces"].values()}.get(ns["label"], {})
            delta = {k: ns[k] - before.get(k, 0) for k in ("lookups", "hits", "misses")}
            now_rate = _hit_rate(delta["hits"], delta["misses"])
            line += f"{delta['lookups'] / max(rates[1], 1e-9):>11.1f}{now_rate:>14}"
        lines.append(line)
    if not namespaces:
        lines.append("(no namespaces yet)")
    hot = [(ns["label"], p) for ns in namespaces for p in ns["hottest"]]
    if hot:
        lines += ["", "hottest prefixes", f"{'NAMESPACE':<14}{'READS':>8}{'BLOCKS':>8}  LAST BLOCK"]
        for label, prefix in sorted(hot, key=lambda x: -x[1]["hits"]):
            lines.append(f"{label:<14}{prefix['hits']:>8}{prefix['blocks']:>8}  {prefix['hash']}")
    cluster = stats.get("tier", {}).get("cluster")
    if cluster:  # `kvstore serve --cluster`: what the other nodes gave this one
        state = "up" if cluster["is_up"] else "DOWN (lookups past the pool are misses)"
        lines += ["", f"cluster: directory {state}, {cluster['num_members']} daemons, "
                      f"{cluster['num_held']} blocks registered here; "
                      f"{cluster['num_hits']} of {cluster['num_asked']} lookups past the pool hit, "
                      f"{cluster['num_blocks_pulled']} blocks "
                      f"({format_size(cluster['bytes_pulled'])}) pulled in {cluster['num_pulls']} "
                      f"pulls, {cluster['num_pull_failures']} failed; directory lookup p50 "
                      f"{cluster['lookup_p50_ms']:.2f} ms"]
    if rates:
        seconds = max(rates[1], 1e-9)
        moved = [f"{d} {path} {format_size((stats[k][path] - rates[0][k][path]) / seconds)}/s"
                 for d, k in (("in", "bytes_in"), ("out", "bytes_out")) for path in ("shm", "tcp")]
        lines += ["", "bytes " + ", ".join(moved) + f" over the last {rates[1]:.1f} s"]
    return "\n".join(lines) + "\n"


def _hit_rate(num_hits: int, num_misses: int) -> str:
    """Hit blocks over asked blocks, or '-' when nothing was asked."""
    asked = num_hits + num_misses
    return f"{100 * num_hits / asked:.1f}%" if asked else "-"


def _ping(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(f"kvstore: {args.address} answered in {client.ping() * 1000:.2f} ms")
    return 0


def _invalidate(args: argparse.Namespace) -> int:
    if (args.namespace is None) == (not args.all):
        raise ValueError("give a NAMESPACE (hex, or a unique prefix of it) or --all, not both")
    with _client(args) as client:
        if args.all:
            dropped = client.invalidate_all(args.below_epoch)
        else:
            known = [name for name in client.stats()["namespaces"] if name]
            name = _match_namespace(args.namespace, known)
            dropped = {name: client.invalidate(bytes.fromhex(name), args.below_epoch)}
    for name, num in dropped.items():
        print(f"kvstore: dropped {num} blocks of namespace {name}")
    if args.all:
        print(f"kvstore: dropped {sum(dropped.values())} blocks of {len(dropped)} namespaces")
    return 0


def _match_namespace(prefix: str, known: list[str]) -> str:
    """The one known namespace name starting with prefix (hex); ValueError naming the choices."""
    text = prefix.strip().lower()
    if not text or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"namespace must be hex as `kvstore stats` shows it, got {prefix!r}")
    matches = [name for name in known if name.startswith(text)]
    if len(matches) == 1:
        return matches[0]
    listed = ", ".join(n[:12] for n in sorted(known)) or "none"
    if not matches:
        raise ValueError(f"unknown namespace {prefix!r}: the daemon knows {listed}")
    raise ValueError(f"namespace {prefix!r} is ambiguous: it starts "
                     f"{', '.join(sorted(matches))}; give more digits")


def _block_key(args: argparse.Namespace) -> tuple[Namespace, BlockHash]:
    return Namespace(args.namespace.encode()), BlockHash(args.hash.encode())


def _put(args: argparse.Namespace) -> int:
    ns, block_hash = _block_key(args)
    data = sys.stdin.buffer.read()
    with _client(args) as client:
        result = client.put(ns, [(block_hash, None, data)])
        path = "shared memory" if client.is_local else "tcp"
    print(f"kvstore: stored {result.num_stored} block of {len(data)} bytes over {path} "
          f"({result.num_present} already present)", file=sys.stderr)
    return 0


def _get(args: argparse.Namespace) -> int:
    ns, block_hash = _block_key(args)
    with _client(args) as client:
        blocks = client.get(ns, [block_hash])
    if not blocks:
        print("kvstore: not found", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(blocks[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`kvstore` command line: serve, keygen, stats, invalidate, ping, put, get."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kvstore.config import DEFAULT_POOL_BYTES, DEFAULT_TCP, ConfigError, ServeConfig
from kvstore.errors import KVStoreError
from kvstore.keys import BlockHash, Namespace
from kvstore.policy import DEFAULT_POLICY, POLICIES
from kvstore.units import format_size, parse_size


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

    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--pool-size", type=parse_size, default=DEFAULT_POOL_BYTES,
                       help="shared-memory pool size, e.g. 8GiB (default 2GiB)")
    serve.add_argument("--page-size", type=parse_size, default=None,
                       help="size-class page, must hold one block (default min(64MiB, pool/8))")
    serve.add_argument("--tcp", action="append", default=None,
                       help=f"tcp://HOST:PORT to listen on, repeatable (default {DEFAULT_TCP})")
    serve.add_argument("--no-tcp", action="store_true", help="listen only on --ipc")
    serve.add_argument("--ipc", default=None, help="ipc:// path to listen on as well")
    serve.add_argument("--segment", default="kvstore", help="shared-memory name under /dev/shm")
    serve.add_argument("--policy", default=DEFAULT_POLICY, choices=sorted(POLICIES))
    serve.add_argument("--lease", type=float, default=10.0, help="seconds a lookup pins its hits")
    serve.add_argument("--reserve-timeout", type=float, default=10.0,
                       help="seconds before an unfinished write is reclaimed")
    serve.add_argument("--ttl", type=float, default=None, help="seconds a block lives (default forever)")
    serve.add_argument("--curve-keys", type=Path, default=None,
                       help="directory from `kvstore keygen`: encrypt and authenticate clients")
    serve.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback --tcp address without CURVE keys")
    serve.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=_serve)

    keygen = sub.add_parser("keygen", help="make CURVE keys for the daemon and its clients")
    keygen.add_argument("dir", type=Path)
    keygen.set_defaults(func=_keygen)

    for name, func, text in (("stats", _stats, "print the daemon's counters"),
                             ("ping", _ping, "check the daemon answers")):
        p = sub.add_parser(name, help=text)
        _client_args(p)
        p.set_defaults(func=func)

    inval = sub.add_parser("invalidate", help="drop a namespace's blocks")
    _client_args(inval)
    inval.add_argument("namespace", help="namespace name as hex (from `kvstore stats`)")
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


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=DEFAULT_TCP, help=f"daemon address (default {DEFAULT_TCP})")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an answer")
    p.add_argument("--curve-keys", type=Path, default=None, help="client keys from `kvstore keygen`")


def _serve(args: argparse.Namespace) -> int:
    from kvstore.pool import HEADER_BYTES, Pool, PoolError
    from kvstore.server import AddressInUse, Server

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServeConfig(
        pool_bytes=args.pool_size, page_bytes=args.page_size,
        tcp=() if args.no_tcp else tuple(args.tcp or [DEFAULT_TCP]), ipc=args.ipc,
        segment=args.segment, log_level=args.log_level, curve_dir=args.curve_keys,
        insecure=args.insecure, policy=args.policy, lease_s=args.lease,
        reserve_s=args.reserve_timeout, ttl_s=args.ttl)
    config.validate()
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
    server.install_signal_handlers()
    slabs = server.store.slabs
    print(f"kvstore: listening on {', '.join(config.bind_addresses())}", flush=True)
    print(f"kvstore: segment {pool.path} ({format_size(pool.size_bytes)}, {slabs.num_pages} pages "
          f"of {format_size(slabs.page_bytes)}), policy {config.policy}"
          f"{', CURVE on' if config.curve_dir else ''}", flush=True)
    server.serve_forever()
    print("kvstore: stopped, segment removed", flush=True)
    return 0


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
        stats = client.stats()
    for key, value in stats.items():
        print(f"{key:>16}: {value}")
    return 0


def _ping(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(f"kvstore: {args.address} answered in {client.ping() * 1000:.2f} ms")
    return 0


def _invalidate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        num = client.invalidate(bytes.fromhex(args.namespace), args.below_epoch)
    print(f"kvstore: dropped {num} blocks")
    return 0


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

"""Settings of `kvstore serve`: where each comes from, and their validation, in one place.

Every option has one name, used as the TOML key, the flag and the environment variable:
pool_size is `pool_size = "8GiB"` in the [serve] table of the config file, `--pool-size 8GiB`
on the command line and KVSTORE_POOL_SIZE=8GiB in the environment.

Precedence, highest first: command-line flags > environment variables (KVSTORE_<OPTION>) > the
TOML file (--config PATH, or KVSTORE_CONFIG) > built-in defaults. resolve() applies it and
records where each value came from; `kvstore serve --print-config` shows the result. An empty
environment variable counts as unset. A bad value, an unknown key in the file or an unusable
combination raises ConfigError naming the option and where it was set.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kvstore.directory import parse_url
from kvstore.ipc import default_ipc_path
from kvstore.policy import DEFAULT_POLICY, POLICIES
from kvstore.tiers import make_tier
from kvstore.pool import SEGMENT_NAME_RE
from kvstore.units import format_size, parse_size

DEFAULT_TCP = "tcp://127.0.0.1:5555"  # the customary TCP address; listened on only when given
DEFAULT_POOL_BYTES = 2 * 1024**3
MAX_PAGE_BYTES = 64 * 1024 * 1024  # a page holds 32 Llama-8B blocks of 2 MiB; see slabs.py
MIN_PAGES = 8  # small pools still get several pages, so two models can share them
# The smallest slot a block takes. The index costs ~700 B a block: at 4 KiB slots that is under
# a fifth of the pool's bytes, whatever blocks clients send (one-byte blocks once cost ten times
# the pool). Real vLLM blocks are tens of KiB and more (docs/operating.md, Memory).
DEFAULT_MIN_BLOCK_BYTES = 4096
DEFAULT_METRICS_PORT = 9400  # Prometheus exporters' customary range; 0 turns the endpoint off
# After a message the loop polls without sleeping this long, while the talk is tight (server.py):
# a core that went idle takes tens of microseconds to wake (a VM's, a halt exit), more than a
# lookup's own work. 300, not 100: a client's turnaround between a reply and its next request
# (LOOKUP -> RELEASE -> LOOKUP) takes 100-200 us on the AMD VM, past a 100 us window
# (bench/results/lookup_cost.json).
DEFAULT_BUSY_POLL_US = 300
MAX_BUSY_POLL_US = 10_000
DEFAULT_METRICS_HOST = "127.0.0.1"  # docker passes 0.0.0.0; metrics name models and traffic
ENV_PREFIX = "KVSTORE_"
CONFIG_ENV = "KVSTORE_CONFIG"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A setting is invalid; the message names it and says what is allowed."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option  # the option at fault, so resolve() can say where it was set


@dataclass(slots=True, frozen=True)
class ServeConfig:
    pool_bytes: int = DEFAULT_POOL_BYTES
    page_bytes: int | None = None  # None: min(64 MiB, pool / 8)
    min_block_bytes: int = DEFAULT_MIN_BLOCK_BYTES
    tcp: tuple[str, ...] = ()
    ipc: str | None = None  # None: kvstore/ipc.py default_ipc_path(segment) when tcp is empty
    segment: str = "kvstore"
    log_level: str = "INFO"
    curve_dir: Path | None = None
    insecure: bool = False
    policy: str = DEFAULT_POLICY
    lease_s: float = 10.0
    reserve_s: float = 10.0
    ttl_s: float | None = None
    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_host: str = DEFAULT_METRICS_HOST
    busy_poll_us: int = DEFAULT_BUSY_POLL_US
    tier: str = ""  # "": no tier below the pool (kvstore/tiers.py; only test tiers exist yet)
    tier_timeout_s: float = 0.1  # under the connector's 200 ms lookup budget, pool time included
    cluster: str = ""  # "": one node; valkey://HOST:PORT[,...]: the cluster tier (kvstore/cluster.py)
    cluster_address: str = ""  # "": the first --tcp address; what peers pull from

    def effective_page_bytes(self) -> int:
        if self.page_bytes is not None:
            return self.page_bytes
        return max(4096, min(MAX_PAGE_BYTES, self.pool_bytes // MIN_PAGES) // 4096 * 4096)

    def ipc_path(self) -> Path | None:
        """The ipc socket to listen on: --ipc, or the private default when no TCP is given."""
        if self.ipc:
            return Path(self.ipc.removeprefix("ipc://"))
        return None if self.tcp else default_ipc_path(self.segment)

    def bind_addresses(self) -> list[str]:
        path = self.ipc_path()
        return [*self.tcp, *([f"ipc://{path}"] if path is not None else [])]

    def validate(self) -> None:
        """Raise ConfigError with an operator-facing message when a setting is unusable."""
        page = self.effective_page_bytes()
        if page < 4096 or page % 4096:
            raise ConfigError(f"--page-size must be a positive multiple of 4 KiB, got {page}",
                              "page_size")
        if not 64 <= self.min_block_bytes <= page:
            raise ConfigError(f"--min-block-size must be 64 bytes to one page ({page}), got "
                              f"{self.min_block_bytes}", "min_block_size")
        if self.pool_bytes < page:
            raise ConfigError(f"--pool-size {format_size(self.pool_bytes)} is smaller than one "
                              f"page ({format_size(page)})", "pool_size")
        if not SEGMENT_NAME_RE.fullmatch(self.segment):  # fullmatch: no trailing newline
            raise ConfigError(f"--segment: segment name {self.segment!r} must be 1-200 characters "
                              f"of A-Z a-z 0-9 . _ -, starting with a letter or digit", "segment")
        if self.policy not in POLICIES:
            raise ConfigError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}",
                              "policy")
        for addr in self.tcp:
            if not addr.startswith("tcp://"):
                raise ConfigError(f"--tcp address must look like tcp://HOST:PORT, got {addr!r}",
                                  "tcp")
            if self.curve_dir is None and not self.insecure:
                # Loopback too: every local user can connect to it, whatever their uid.
                who = "every local user" if is_loopback(addr) else "anyone who reaches it"
                raise ConfigError(
                    f"refusing to listen on {addr} without encryption: {who} could read and "
                    f"overwrite every block; same-host clients can use the default ipc socket "
                    f"(no --tcp), or pass --curve-keys DIR (make one with `kvstore keygen DIR`) "
                    f"or --insecure", "tcp")
        for name, value in (("lease", self.lease_s), ("reserve_timeout", self.reserve_s)):
            if value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}", name)
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ConfigError(f"--ttl must be positive, got {self.ttl_s}", "ttl")
        if not 0 <= self.busy_poll_us <= MAX_BUSY_POLL_US:
            raise ConfigError(f"--busy-poll-us must be 0..{MAX_BUSY_POLL_US} (0: off), got "
                              f"{self.busy_poll_us}", "busy_poll_us")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port must be a port number 0..65535 (0: off), "
                              f"got {self.metrics_port}", "metrics_port")
        if self.tier:
            try:
                make_tier(self.tier)
            except ValueError as exc:
                raise ConfigError(f"--tier: {exc}", "tier") from None
        if self.cluster:
            self._validate_cluster()
        if self.tier_timeout_s <= 0:
            raise ConfigError(f"--tier-timeout must be positive, got {self.tier_timeout_s}",
                              "tier_timeout")
        if not self.metrics_host:
            raise ConfigError("--metrics-host must not be empty", "metrics_host")

    def _validate_cluster(self) -> None:
        try:
            parse_url(self.cluster)
        except ValueError as exc:
            raise ConfigError(f"--cluster: {exc}", "cluster") from None
        if self.tier:
            raise ConfigError("--cluster and --tier are exclusive: the cluster is the tier below "
                              "the pool", "cluster")
        if not self.tcp:
            raise ConfigError("--cluster needs a --tcp address: peers pull blocks over TCP",
                              "cluster")
        address = self.advertised_address()
        host = urlparse(address.replace("tcp://", "//", 1)).hostname or ""
        if not address.startswith("tcp://") or host in ("", "*", "0.0.0.0", "::"):
            raise ConfigError(f"--cluster-address must be a tcp://HOST:PORT peers can reach, "
                              f"got {address!r} (set it when --tcp listens on a wildcard)",
                              "cluster_address")

    def advertised_address(self) -> str:
        """The TCP address peers pull this daemon's blocks from (--cluster-address, else the
        first --tcp address)."""
        return self.cluster_address or (self.tcp[0] if self.tcp else "")


def is_loopback(addr: str) -> bool:
    """Whether a tcp:// address binds only the loopback interface."""
    host = urlparse(addr).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', interface names and host names may reach other machines


# --- where settings come from ----------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class Option:
    """One setting of `kvstore serve`: its name (TOML key), ServeConfig field and parser."""

    name: str
    field: str
    parse: Callable[[Any], Any]  # TOML value or text (flag, environment) -> field value
    help: str
    is_switch: bool = False  # a flag without a value (--insecure)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"not a size: {value!r} (examples: 8GiB, 512MiB, 1073741824)")
    return parse_size(value)


def _seconds(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        raise ValueError(f"not a number of seconds: {value!r}") from None


def _port(value: Any) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not text.isdigit() \
            or int(text) > 65535:
        raise ValueError(f"not a port number 0..65535: {value!r}")
    return int(text)


def _count(value: Any) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not text.isdigit():
        raise ValueError(f"not a whole number: {value!r}")
    return int(text)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r} (true/false, 1/0, yes/no, on/off)")


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"not a string: {value!r}")
    return value


def _addresses(value: Any) -> tuple[str, ...]:
    """A TOML list of addresses, or a comma-separated string (flags and environment)."""
    if isinstance(value, str):
        return tuple(a.strip() for a in value.split(",") if a.strip())
    if isinstance(value, list) and all(isinstance(a, str) for a in value):
        return tuple(value)
    raise ValueError(f"not a list of addresses: {value!r}")


def _path(value: Any) -> Path:
    return Path(_text(value)).expanduser()


def _log_level(value: Any) -> str:
    level = _text(value).upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"not a log level: {value!r} (one of {', '.join(LOG_LEVELS)})")
    return level


OPTIONS: tuple[Option, ...] = (
    Option("pool_size", "pool_bytes", _size, "shared-memory pool size, e.g. 8GiB"),
    Option("page_size", "page_bytes", _size,
           "size-class page, must hold one block (default min(64MiB, pool/8))"),
    Option("min_block_size", "min_block_bytes", _size,
           "smallest slot a block takes; bounds the index to pool / this many blocks"),
    Option("tcp", "tcp", _addresses,
           "tcp://HOST:PORT addresses to listen on, none by default (flag repeatable; env "
           "comma-separated); needs --curve-keys or --insecure"),
    Option("ipc", "ipc", _text, "ipc:// path to listen on (default without --tcp: "
           "/dev/shm/kvstore-sockets-UID/SEGMENT.sock, private to the daemon's uid)"),
    Option("segment", "segment", _text, "shared-memory name under /dev/shm"),
    Option("policy", "policy", _text, f"eviction policy: {', '.join(sorted(POLICIES))}"),
    Option("lease", "lease_s", _seconds, "seconds a lookup pins its hits"),
    Option("reserve_timeout", "reserve_s", _seconds,
           "seconds before an unfinished write is reclaimed"),
    Option("ttl", "ttl_s", _seconds, "seconds a block lives (default forever)"),
    Option("curve_keys", "curve_dir", _path,
           "directory from `kvstore keygen`: encrypt and authenticate clients"),
    Option("insecure", "insecure", _bool, "allow a tcp address (loopback too) without CURVE keys",
           is_switch=True),
    Option("log_level", "log_level", _log_level, f"one of {', '.join(LOG_LEVELS)}"),
    Option("metrics_port", "metrics_port", _port,
           "port of the Prometheus /metrics endpoint; 0 turns it off"),
    Option("metrics_host", "metrics_host", _text,
           "address the metrics endpoint listens on"),
    Option("busy_poll_us", "busy_poll_us", _count,
           "microseconds the loop keeps polling after a message before it sleeps, while "
           "each message comes within that long of the loop starting to wait (0: off); costs "
           "up to that much CPU per message, saves a sleeping core's wake-up on the next one"),
    Option("tier", "tier", _text, "a tier below the pool (FOR TESTS ONLY so far: memory, "
           "memory-slow:300ms, memory-failing; default none)"),
    Option("tier_timeout", "tier_timeout_s", _seconds,
           "seconds a LOOKUP waits on the tier before the pool's prefix is answered"),
    Option("cluster", "cluster", _text,
           "valkey://HOST:PORT[,HOST:PORT...]: find and pull blocks held by the other daemons "
           "registered on this Valkey cluster (default: one node)"),
    Option("cluster_address", "cluster_address", _text,
           "tcp://HOST:PORT the other daemons pull from (default: the first --tcp address)"),
)
_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(slots=True, frozen=True)
class Resolved:
    """The settings to run with, and where each came from (option name -> source)."""

    config: ServeConfig
    sources: dict[str, str]


def resolve(flags: Mapping[str, Any], env: Mapping[str, str] | None = None,
            config_path: str | Path | None = None) -> Resolved:
    """Merge defaults < TOML file < environment < flags into a validated ServeConfig.

    flags maps option names to values given on the command line (absent or None: not given).
    config_path is --config; without it KVSTORE_CONFIG names the file, if set.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources = {o.name: "default" for o in OPTIONS}
    if config_path is None and env.get(CONFIG_ENV):
        config_path = env[CONFIG_ENV]
    layers: list[tuple[dict[str, Any], Callable[[Option], str]]] = []
    if config_path is not None:
        path = Path(config_path).expanduser()
        layers.append((_read_toml(path), lambda o: f"file {path}"))
    layers.append(({o.name: env[o.env] for o in OPTIONS if env.get(o.env)},
                   lambda o: f"env {o.env}"))
    layers.append(({k: v for k, v in flags.items() if v is not None}, lambda o: f"flag {o.flag}"))
    for given, where in layers:
        for name, raw in given.items():
            option = _BY_NAME[name]
            try:
                values[option.field] = option.parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{_describe(option, where(option), raw)}: {exc}",
                                  name) from None
            sources[name] = where(option)
    config = replace(ServeConfig(), **values)
    try:
        config.validate()
    except ConfigError as exc:
        source = sources.get(exc.option or "", "default")
        if source == "default":
            raise
        raise ConfigError(f"{exc} (set by {source})", exc.option) from None
    return Resolved(config, sources)


def _read_toml(path: Path) -> dict[str, Any]:
    """The [serve] table of a config file, its keys checked against OPTIONS."""
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown_tables = sorted(set(document) - {"serve"})
    if unknown_tables:
        raise ConfigError(f"config file {path}: unknown key {unknown_tables[0]!r} at the top "
                          f"level (settings go in a [serve] table)")
    table = document.get("serve", {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: 'serve' must be a table ([serve])")
    for key in table:
        if key not in _BY_NAME:
            raise ConfigError(f"config file {path}: unknown key {key!r} in [serve] (known: "
                              f"{', '.join(sorted(_BY_NAME))})", key)
    return table


def _describe(option: Option, source: str, raw: Any) -> str:
    if source.startswith("flag"):
        return f"{option.flag} {raw!r}"
    if source.startswith("env"):
        return f"{option.env}={raw!r} (environment)"
    return f"{option.name} = {raw!r} in {source.removeprefix('file ')}"


def to_toml(resolved: Resolved) -> str:
    """The resolved settings as a [serve] table, each with its source as a comment.

    Valid TOML that resolve() reads back to the same config; unset options are commented out.
    """
    lines = ["# kvstore serve: resolved settings (flags > environment > file > defaults)",
             "[serve]"]
    for option in OPTIONS:
        value = getattr(resolved.config, option.field)
        source = resolved.sources[option.name]
        if value is None:
            lines.append(f"# {option.name} is not set  # {source}")
            continue
        note = f"{format_size(value)}; " if option.parse is _size else ""
        lines.append(f"{option.name} = {_toml_value(value)}  # {note}{source}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


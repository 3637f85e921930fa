"""Settings of `kvstore serve`, validated in one place."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from kvstore.policy import DEFAULT_POLICY, POLICIES
from kvstore.units import format_size

DEFAULT_TCP = "tcp://127.0.0.1:5555"
DEFAULT_POOL_BYTES = 2 * 1024**3
MAX_PAGE_BYTES = 64 * 1024 * 1024  # a page holds 32 Llama-8B blocks of 2 MiB; see slabs.py
MIN_PAGES = 8  # small pools still get several pages, so two models can share them


class ConfigError(ValueError):
    """A setting is invalid; the message names it and says what is allowed."""


@dataclass(slots=True, frozen=True)
class ServeConfig:
    pool_bytes: int = DEFAULT_POOL_BYTES
    page_bytes: int | None = None  # None: min(64 MiB, pool / 8)
    tcp: tuple[str, ...] = (DEFAULT_TCP,)
    ipc: str | None = None
    segment: str = "kvstore"
    log_level: str = "INFO"
    curve_dir: Path | None = None
    insecure: bool = False
    policy: str = DEFAULT_POLICY
    lease_s: float = 10.0
    reserve_s: float = 10.0
    ttl_s: float | None = None

    def effective_page_bytes(self) -> int:
        if self.page_bytes is not None:
            return self.page_bytes
        return max(4096, min(MAX_PAGE_BYTES, self.pool_bytes // MIN_PAGES) // 4096 * 4096)

    def bind_addresses(self) -> list[str]:
        addresses = list(self.tcp)
        if self.ipc:
            addresses.append(self.ipc if self.ipc.startswith("ipc://") else f"ipc://{self.ipc}")
        return addresses

    def validate(self) -> None:
        """Raise ConfigError with an operator-facing message when a setting is unusable."""
        page = self.effective_page_bytes()
        if page < 4096 or page % 4096:
            raise ConfigError(f"--page-size must be a positive multiple of 4 KiB, got {page}")
        if self.pool_bytes < page:
            raise ConfigError(f"--pool-size {format_size(self.pool_bytes)} is smaller than one "
                              f"page ({format_size(page)})")
        if self.policy not in POLICIES:
            raise ConfigError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not self.tcp and not self.ipc:
            raise ConfigError("give at least one of --tcp or --ipc to listen on")
        for addr in self.tcp:
            if not addr.startswith("tcp://"):
                raise ConfigError(f"--tcp address must look like tcp://HOST:PORT, got {addr!r}")
            if not is_loopback(addr) and self.curve_dir is None and not self.insecure:
                raise ConfigError(
                    f"refusing to listen on {addr} without encryption: pass --curve-keys DIR "
                    f"(make one with `kvstore keygen DIR`) or --insecure")
        for name, value in (("--lease", self.lease_s), ("--reserve-timeout", self.reserve_s)):
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ConfigError(f"--ttl must be positive, got {self.ttl_s}")


def is_loopback(addr: str) -> bool:
    """Whether a tcp:// address binds only the loopback interface."""
    host = urlparse(addr).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', interface names and host names may reach other machines

"""Sizes on the command line, and `kvstore serve` settings validated before anything starts."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import given

from kvstore.config import DEFAULT_TCP, MAX_PAGE_BYTES, ConfigError, ServeConfig, is_loopback
from kvstore.ipc import default_address
from kvstore.policy import POLICIES
from kvstore.units import format_size, parse_size

KiB, MiB, GiB = 1024, 1024**2, 1024**3


# --- parse_size / format_size ----------------------------------------------------------------
@pytest.mark.parametrize(("text", "num_bytes"), [
    ("8GiB", 8 * GiB), ("512MiB", 512 * MiB), ("1.5G", 1_500_000_000), ("4k", 4000),
    ("4 KiB", 4 * KiB), ("2tib", 2 * 1024**4), ("1073741824", GiB), (" 64 mb ", 64_000_000),
    ("10B", 10), ("3Ki", 3 * KiB), (4096, 4096), (0, 0),
])
def test_parse_size_reads_decimal_and_binary_units(text: str | int, num_bytes: int) -> None:
    """Decimal (k, MB) and binary (Ki, MiB) units, any case, spaces allowed around them."""
    assert parse_size(text) == num_bytes


@pytest.mark.parametrize("text", ["", "GiB", "-5", "1e9", "8 G i B", "8PB", "8ib", "8i", "abc", -1])
def test_parse_size_refuses_what_is_not_a_size_with_value_error(text: str | int) -> None:
    """Bad sizes raise ValueError (which argparse reports as a usage error), never KeyError."""
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(("num_bytes", "text"), [
    (0, "0 B"), (1023, "1023 B"), (KiB, "1.0 KiB"), (1536, "1.5 KiB"), (64 * MiB, "64.0 MiB"),
    (8 * GiB, "8.0 GiB"), (3 * 1024**4, "3.0 TiB"), (5 * 1024**5, "5120.0 TiB"),
])
def test_format_size_uses_the_largest_binary_unit_below_1024(num_bytes: int, text: str) -> None:
    """format_size picks B, KiB, MiB, GiB or TiB and one decimal."""
    assert format_size(num_bytes) == text


@given(st.integers(0, 2**50))
def test_format_size_parses_back_within_rounding(num_bytes: int) -> None:
    """parse_size(format_size(n)) is n up to the 0.05-unit rounding of one decimal."""
    parsed = parse_size(format_size(num_bytes))
    assert abs(parsed - num_bytes) <= max(1, num_bytes * 0.05)


# --- ServeConfig.validate --------------------------------------------------------------------
def test_default_config_is_valid() -> None:
    """The defaults listen on no TCP address, only on the ipc socket private to this uid."""
    config = ServeConfig()
    config.validate()
    assert config.tcp == ()
    assert config.bind_addresses() == [default_address()]  # segment "kvstore": the clients' default


@pytest.mark.parametrize("addr", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555",
                                  "tcp://eth0:5555", "tcp://example.com:5555", "tcp://[::]:5555"])
def test_non_loopback_tcp_without_curve_keys_is_refused_clearly(addr: str) -> None:
    """Listening beyond loopback unencrypted is refused; the message names the fixes."""
    with pytest.raises(ConfigError) as info:
        ServeConfig(tcp=(addr,)).validate()
    message = str(info.value)
    assert addr in message and "--curve-keys" in message and "--insecure" in message


def test_insecure_flag_or_curve_keys_allow_non_loopback_tcp(tmp_path: Path) -> None:
    """--insecure, or a curve key directory, lets the daemon listen on every interface."""
    ServeConfig(tcp=("tcp://0.0.0.0:5555",), insecure=True).validate()
    ServeConfig(tcp=("tcp://0.0.0.0:5555",), curve_dir=tmp_path).validate()


@pytest.mark.parametrize("addr", [DEFAULT_TCP, "tcp://127.8.9.10:1", "tcp://localhost:1",
                                  "tcp://[::1]:1"])
def test_loopback_addresses_need_keys_or_insecure(addr: str) -> None:
    """Every local user can connect to a loopback port: without keys it needs --insecure."""
    assert is_loopback(addr)
    with pytest.raises(ConfigError, match="every local user") as info:
        ServeConfig(tcp=(addr,)).validate()
    assert "--insecure" in str(info.value) and "ipc" in str(info.value)
    ServeConfig(tcp=(addr,), insecure=True).validate()


@pytest.mark.parametrize(("changes", "needle"), [
    ({"tcp": ("127.0.0.1:5555",)}, "tcp://HOST:PORT"),
    ({"policy": "fifo"}, "--policy must be one of"),
    ({"page_bytes": 5000}, "--page-size"),
    ({"page_bytes": 0}, "--page-size"),
    ({"pool_bytes": 8 * KiB, "page_bytes": 64 * KiB}, "smaller than one page"),
    ({"lease_s": 0.0}, "--lease"),
    ({"reserve_s": -1.0}, "--reserve-timeout"),
    ({"ttl_s": 0.0}, "--ttl"),
])
def test_unusable_settings_are_refused_naming_the_flag(changes: dict[str, object],
                                                       needle: str) -> None:
    """Each bad setting raises ConfigError whose message names the flag to fix."""
    with pytest.raises(ConfigError, match=re.escape(needle)):
        replace(ServeConfig(), **changes).validate()


def test_policy_message_lists_every_policy() -> None:
    """An unknown --policy lists the choices."""
    with pytest.raises(ConfigError) as info:
        ServeConfig(policy="nope").validate()
    assert all(name in str(info.value) for name in POLICIES)


def test_ipc_alone_is_enough_and_gets_a_scheme(tmp_path: Path) -> None:
    """With no TCP address an ipc path is a valid config and binds as ipc://PATH."""
    config = ServeConfig(tcp=(), ipc=str(tmp_path / "kv.sock"))
    config.validate()
    assert config.bind_addresses() == [f"ipc://{tmp_path / 'kv.sock'}"]


@pytest.mark.parametrize(("pool_bytes", "page_bytes"), [
    (2 * GiB, MAX_PAGE_BYTES), (64 * MiB, 8 * MiB), (1 * MiB, 128 * KiB), (10 * KiB, 4 * KiB),
])
def test_default_page_size_is_an_eighth_of_the_pool_capped_and_4k_aligned(
        pool_bytes: int, page_bytes: int) -> None:
    """Without --page-size a pool gets at least eight pages of at most MAX_PAGE_BYTES."""
    assert ServeConfig(pool_bytes=pool_bytes).effective_page_bytes() == page_bytes

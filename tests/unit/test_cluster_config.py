"""`kvstore serve --cluster` settings (flag, environment, TOML) and their checks, and the pieces of
the Valkey directory that need no Valkey: the URL and the membership record."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.config import ConfigError, ServeConfig, resolve
from kvstore.directory import Member, block_key, parse_url
from kvstore.keys import BlockHash, Namespace

URL = "valkey://10.0.0.1:7000,10.0.0.2:7000"
TCP = {"tcp": "tcp://10.0.0.5:5555", "insecure": True}


def test_off_by_default() -> None:
    assert ServeConfig().cluster == "" and resolve({}, {}).config.cluster == ""


def test_set_by_flag_environment_or_file(tmp_path: Path) -> None:
    assert resolve({**TCP, "cluster": URL}, {}).config.cluster == URL
    assert resolve(TCP, {"KVSTORE_CLUSTER": URL}).sources["cluster"] == "env KVSTORE_CLUSTER"
    path = tmp_path / "kvstore.toml"
    path.write_text(f'[serve]\ncluster = "{URL}"\ncluster_address = "tcp://10.0.0.5:5555"\n')
    config = resolve(TCP, {}, path).config
    assert (config.cluster, config.advertised_address()) == (URL, "tcp://10.0.0.5:5555")


def test_the_advertised_address_is_the_first_tcp_one_unless_set() -> None:
    assert resolve({**TCP, "cluster": URL}, {}).config.advertised_address() == TCP["tcp"]
    config = resolve({"tcp": "tcp://0.0.0.0:5555", "insecure": True, "cluster": URL,
                      "cluster_address": "tcp://node-5:5555"}, {}).config
    assert config.advertised_address() == "tcp://node-5:5555"


@pytest.mark.parametrize("flags, needle", [
    ({**TCP, "cluster": "redis-cluster://a:1"}, "--cluster: expected valkey://"),
    ({**TCP, "cluster": "valkey://a"}, "not a HOST:PORT"),
    ({"cluster": URL}, "needs a --tcp address"),
    ({**TCP, "cluster": URL, "tier": "memory"}, "exclusive"),
    ({"tcp": "tcp://0.0.0.0:5555", "insecure": True, "cluster": URL}, "--cluster-address"),
])
def test_unusable_cluster_settings_are_refused(flags: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        resolve(flags, {})


def test_parse_url_gives_every_startup_node() -> None:
    assert parse_url(URL) == [("10.0.0.1", 7000), ("10.0.0.2", 7000)]
    assert parse_url("redis://127.0.0.1:6379") == [("127.0.0.1", 6379)]


def test_block_keys_are_hex_so_hash_bytes_never_make_a_hash_tag() -> None:
    key = block_key(Namespace(b"{m}", 3), BlockHash(b"{x}"))
    assert key == "kvs:b:7b6d7d:3:7b787d" and "{" not in key


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"curve_key": "k"}', b'{"address": 5}'])
def test_a_membership_record_that_is_not_ours_reads_as_absent(raw: bytes) -> None:
    assert Member.decode("id", raw) is None


def test_a_membership_record_reads_back() -> None:
    member = Member("id", "tcp://10.0.0.5:5555", "k" * 40)
    assert Member.decode("id", member.encode()) == member

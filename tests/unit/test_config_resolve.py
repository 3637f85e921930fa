"""`kvstore serve` settings from flags, environment and a TOML file: precedence and errors."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from kvstore.config import (
    DEFAULT_METRICS_PORT, OPTIONS, ConfigError, ServeConfig, resolve, to_toml)

MiB, GiB = 1024**2, 1024**3


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvstore.toml"
    path.write_text(text)
    return path


def test_every_setting_has_one_option() -> None:
    """Each ServeConfig field can be set from all three sources, under exactly one name."""
    assert sorted(o.field for o in OPTIONS) == sorted(f.name for f in fields(ServeConfig))
    assert len({o.name for o in OPTIONS}) == len(OPTIONS)


def test_nothing_given_yields_the_defaults_from_default() -> None:
    """With no file, environment or flags the config is ServeConfig() and every source default."""
    resolved = resolve({}, {})
    assert resolved.config == ServeConfig()
    assert set(resolved.sources.values()) == {"default"}
    assert resolved.config.metrics_port == DEFAULT_METRICS_PORT
    assert resolved.config.metrics_host == "127.0.0.1"


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path) -> None:
    """One option per layer shows who wins where several set the same option."""
    path = write(tmp_path, '[serve]\npool_size = "1GiB"\nsegment = "from-file"\n'
                           'lease = 3\nttl = 60\n')
    env = {"KVSTORE_POOL_SIZE": "512MiB", "KVSTORE_SEGMENT": "from-env", "KVSTORE_LEASE": "4.5"}
    flags = {"pool_size": "256MiB", "segment": None}  # None: flag not given
    resolved = resolve(flags, env, path)
    config, sources = resolved.config, resolved.sources
    assert (config.pool_bytes, sources["pool_size"]) == (256 * MiB, "flag --pool-size")
    assert (config.segment, sources["segment"]) == ("from-env", "env KVSTORE_SEGMENT")
    assert (config.lease_s, sources["lease"]) == (4.5, "env KVSTORE_LEASE")
    assert (config.ttl_s, sources["ttl"]) == (60.0, f"file {path}")
    assert (config.policy, sources["policy"]) == (ServeConfig().policy, "default")


def test_config_file_can_be_named_by_the_environment(tmp_path: Path) -> None:
    """KVSTORE_CONFIG names the file when --config is not given; --config wins over it."""
    env_file = write(tmp_path, "[serve]\nmetrics_port = 9500\n")
    flag_file = tmp_path / "flag.toml"
    flag_file.write_text("[serve]\nmetrics_port = 9600\n")
    env = {"KVSTORE_CONFIG": str(env_file)}
    assert resolve({}, env).config.metrics_port == 9500
    assert resolve({}, env, flag_file).config.metrics_port == 9600


def test_empty_environment_variable_counts_as_unset() -> None:
    """KVSTORE_TTL= (empty) leaves the default in place."""
    resolved = resolve({}, {"KVSTORE_TTL": "", "KVSTORE_METRICS_PORT": "0"})
    assert resolved.config.ttl_s is None and resolved.sources["ttl"] == "default"
    assert resolved.config.metrics_port == 0


def test_values_take_their_natural_form_in_each_source(tmp_path: Path) -> None:
    """TOML lists, booleans and numbers; comma lists and 'yes' in the environment."""
    path = write(tmp_path, '[serve]\ntcp = ["tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002"]\n'
                           'insecure = true\npool_size = 1073741824\nreserve_timeout = 2.5\n'
                           f'curve_keys = "{tmp_path}"\n')
    config = resolve({}, {}, path).config
    assert config.tcp == ("tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002")
    assert config.insecure is True and config.pool_bytes == GiB and config.reserve_s == 2.5
    assert config.curve_dir == tmp_path
    env = {"KVSTORE_TCP": "tcp://127.0.0.1:1, tcp://127.0.0.1:2", "KVSTORE_INSECURE": "yes",
           "KVSTORE_LOG_LEVEL": "debug"}
    config = resolve({}, env).config
    assert config.tcp == ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    assert config.insecure is True and config.log_level == "DEBUG"
    assert resolve({"tcp": [], "ipc": "kv.sock"}, env).config.tcp == ()  # --no-tcp: empty


def test_print_config_is_toml_that_reads_back_to_the_same_config(tmp_path: Path) -> None:
    """to_toml() output is valid TOML, comments each value's source, and resolves back."""
    path = write(tmp_path, '[serve]\nttl = 30\npage_size = "4MiB"\n')
    resolved = resolve({"pool_size": "64MiB", "tcp": ["tcp://127.0.0.1:7"], "insecure": True},
                       {"KVSTORE_METRICS_HOST": "0.0.0.0"}, path)
    text = to_toml(resolved)
    assert "pool_size = 67108864  # 64.0 MiB; flag --pool-size" in text
    assert 'metrics_host = "0.0.0.0"  # env KVSTORE_METRICS_HOST' in text
    assert f"ttl = 30.0  # file {path}" in text
    assert "# ipc is not set  # default" in text
    assert set(tomllib.loads(text)) == {"serve"}
    again = write(tmp_path, text)
    assert resolve({}, {}, again).config == resolved.config


# --- errors: each names the option and where it came from ---------------------------------------
@pytest.mark.parametrize(("source", "needle"), [
    ("flag", "--pool-size '8 GB?': not a size"),
    ("env", "KVSTORE_POOL_SIZE='8 GB?' (environment): not a size"),
    ("file", "pool_size = '8 GB?' in "),
])
def test_bad_size_names_the_option_and_its_source(tmp_path: Path, source: str,
                                                  needle: str) -> None:
    """A size that does not parse is reported with where it was written."""
    flags = {"pool_size": "8 GB?"} if source == "flag" else {}
    env = {"KVSTORE_POOL_SIZE": "8 GB?"} if source == "env" else {}
    path = write(tmp_path, '[serve]\npool_size = "8 GB?"\n') if source == "file" else None
    with pytest.raises(ConfigError) as info:
        resolve(flags, env, path)
    assert needle in str(info.value)
    assert info.value.option == "pool_size"


@pytest.mark.parametrize(("env", "needle"), [
    ({"KVSTORE_METRICS_PORT": "70000"}, "KVSTORE_METRICS_PORT='70000' (environment): not a port"),
    ({"KVSTORE_METRICS_PORT": "-1"}, "not a port number 0..65535"),
    ({"KVSTORE_LEASE": "soon"}, "KVSTORE_LEASE='soon' (environment): not a number of seconds"),
    ({"KVSTORE_INSECURE": "maybe"}, "KVSTORE_INSECURE='maybe' (environment): not a boolean"),
    ({"KVSTORE_LOG_LEVEL": "LOUD"}, "not a log level: 'LOUD'"),
    ({"KVSTORE_BUSY_POLL_US": "-5"}, "KVSTORE_BUSY_POLL_US='-5' (environment): not a whole number"),
    ({"KVSTORE_BUSY_POLL_US": "20000"}, "--busy-poll-us must be 0..10000 (0: off), got 20000"),
])
def test_unparseable_environment_values_are_refused(env: dict[str, str], needle: str) -> None:
    """Ports out of range, non-numbers, non-booleans and unknown levels each get a message."""
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        resolve({}, env)


def test_file_values_of_the_wrong_type_are_refused(tmp_path: Path) -> None:
    """A TOML boolean where a port belongs is an error naming the key and the file."""
    path = write(tmp_path, "[serve]\nmetrics_port = true\n")
    with pytest.raises(ConfigError) as info:
        resolve({}, {}, path)
    assert f"metrics_port = True in {path}: not a port number" in str(info.value)


def test_validation_errors_say_which_source_set_the_value(tmp_path: Path) -> None:
    """A value that parses but is unusable (lease 0, unknown policy) names its source."""
    with pytest.raises(ConfigError, match=r"--lease must be positive, got 0.0 \(set by env "
                                          r"KVSTORE_LEASE\)"):
        resolve({}, {"KVSTORE_LEASE": "0"})
    path = write(tmp_path, '[serve]\npolicy = "fifo"\n')
    with pytest.raises(ConfigError, match=rf"--policy must be one of .* \(set by file {path}\)"):
        resolve({}, {}, path)
    with pytest.raises(ConfigError, match=r"without encryption.*\(set by flag --tcp\)"):
        resolve({"tcp": ["tcp://0.0.0.0:5555"]}, {})


@pytest.mark.parametrize(("text", "needle"), [
    ("[serve]\npool_sise = 1\n", "unknown key 'pool_sise' in [serve] (known: "),
    ("pool_size = 1\n", "unknown key 'pool_size' at the top level"),
    ("[connector]\nx = 1\n", "unknown key 'connector' at the top level"),
    ("serve = 3\n", "'serve' must be a table"),
    ("[serve\n", "is not valid TOML"),
])
def test_malformed_config_files_are_refused_naming_the_file(tmp_path: Path, text: str,
                                                            needle: str) -> None:
    """Unknown keys, settings outside [serve] and broken TOML are errors naming the file."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        resolve({}, {}, path)
    assert needle in str(info.value) and str(path) in str(info.value)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    """A --config path that does not exist says so."""
    with pytest.raises(ConfigError, match="does not exist"):
        resolve({}, {}, tmp_path / "nope.toml")

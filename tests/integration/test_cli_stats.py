"""`kvstore stats` (table, --json, --watch), `kvstore invalidate` and `kvstore serve` settings,
each run as its own process against a real daemon."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pytest

from kvstore.client import Client
from kvstore.keys import Namespace, namespace_digest
from bench.daemon import free_port, wait_until
from tests.integration.helpers import CALL_S, REPO, chain_hashes, run_cli, stats

NS_A = Namespace(namespace_digest({"model": "a"}))
NS_B = Namespace(namespace_digest({"model": "b"}))
BLOCK = 4096


def fill(address: str) -> list[bytes]:
    """NS_A: a 3-block chain looked up three times (9 of 10 asked blocks found) and read twice;
    NS_B: 2 blocks never looked up. Returns NS_A's hashes."""
    hashes = chain_hashes("a", 3)
    with Client(address, CALL_S) as client:
        client.put(NS_A, [(h, hashes[i - 1] if i else None, bytes([i]) * BLOCK)
                          for i, h in enumerate(hashes)])
        client.put(NS_B, [(b"b0", None, b"b" * BLOCK), (b"b1", b"b0", b"b" * BLOCK)])
        assert client.lookup(NS_A, [*hashes, b"nope"]).num_hits == 3  # 3 hits, 1 miss
        for _ in range(2):
            lease = client.lookup(NS_A, hashes, lease_ms=5000).lease  # 3 hits each
            assert lease is not None and len(client.get(NS_A, hashes, lease=lease)) == 3
            client.release(lease)
    return hashes


def cli_ok(*args: str) -> str:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def cli_error(*args: str, code: int = 2) -> str:
    """Run a command expected to fail with code; returns its one-line error."""
    result = run_cli(*args)
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvstore: error: "), lines
    return lines[0]


@pytest.mark.timeout(90)
def test_stats_table_shows_namespaces_hit_rate_and_hottest_prefixes(daemon):
    """One row per namespace (blocks, bytes, lookups, hit rate) and the most-read prefix."""
    hashes = fill(daemon.address)
    out = cli_ok("stats", "--address", daemon.address)
    table, hottest = out.split("hottest prefixes")
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line[:1].isalnum()}
    label_a, label_b = NS_A.name.hex()[:12], NS_B.name.hex()[:12]
    # NAMESPACE BLOCKS BYTES(2 words) LOOKUPS HIT RATE EVICTIONS
    assert rows[label_a][1:] == ["3", "12.0", "KiB", "3", "90.0%", "0"]  # 9 of 10 asked blocks
    assert rows[label_b][1:] == ["2", "8.0", "KiB", "0", "-", "0"]
    assert "5 blocks, 0 reserved, 0 leases, 0 evictions, 0 errors" in out
    hot = hottest.splitlines()
    # The chain was read together twice: one prefix of 3 blocks ending at its last hash.
    assert hot[2].split() == [label_a, "2", "3", hashes[-1].hex()]


@pytest.mark.timeout(90)
def test_stats_json_is_the_raw_stats_reply(daemon):
    """--json prints the STATS map as JSON, the same numbers a client reads."""
    fill(daemon.address)
    printed = json.loads(cli_ok("stats", "--address", daemon.address, "--json"))
    direct = stats(daemon.address)
    ns_a = NS_A.name.hex()
    assert printed["namespaces"][ns_a] == direct["namespaces"][ns_a]
    assert printed["namespaces"][ns_a]["hottest"] == [
        {"hash": chain_hashes("a", 3)[-1].hex(), "hits": 2, "blocks": 3}]
    assert (printed["num_blocks"], printed["used_bytes"]) == (5, direct["used_bytes"])


@pytest.mark.timeout(90)
def test_stats_watch_redraws_with_rates_until_ctrl_c(daemon, tmp_path):
    """--watch redraws in place, adds per-second columns from the second draw, exits 0 on ^C."""
    out_path = tmp_path / "watch.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kvstore.cli", "stats", "--address",
                                 daemon.address, "--watch", "0.2"], stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_until(lambda: out_path.read_bytes().count(b"\x1b[2J") >= 1, 30.0, what="first draw")
        fill(daemon.address)
        wait_until(lambda: b"HIT RATE NOW" in out_path.read_bytes().split(b"\x1b[2J")[-1]
                   and NS_A.name.hex()[:12].encode() in out_path.read_bytes().split(b"\x1b[2J")[-1],
                   30.0, what="a draw with rates and the new namespace")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    frames = out_path.read_text().split("\x1b[H\x1b[2J")
    assert len(frames) >= 3 and "LOOKUPS/S" not in frames[1], "the first draw has no rates"
    assert "Traceback" not in out_path.read_text()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra", [[], ["--json"], ["--watch", "1"]], ids=["table", "json", "watch"])
def test_stats_without_a_daemon_fails_with_exit_2_within_the_timeout(extra):
    """An unreachable daemon is one clear line and exit code 2, whatever the output mode."""
    line = cli_error("stats", "--address", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.5",
                     *extra)
    assert "cannot reach tcp://127.0.0.1:" in line and "within 0.5 s" in line


@pytest.mark.timeout(90)
def test_invalidate_by_prefix_drops_only_that_namespace(daemon):
    """A unique hex prefix names a namespace; its blocks go, the other's stay."""
    fill(daemon.address)
    prefix = NS_A.name.hex()[:6]
    out = cli_ok("invalidate", "--address", daemon.address, prefix)
    assert out == f"kvstore: dropped 3 blocks of namespace {NS_A.name.hex()}\n"
    s = stats(daemon.address)
    assert (s["namespaces"][NS_A.name.hex()]["blocks"], s["num_blocks"]) == (0, 2)
    full = cli_ok("invalidate", "--address", daemon.address, NS_B.name.hex().upper())
    assert full == f"kvstore: dropped 2 blocks of namespace {NS_B.name.hex()}\n"
    assert stats(daemon.address)["num_blocks"] == 0


@pytest.mark.timeout(90)
def test_invalidate_all_drops_every_namespace(daemon):
    """--all drops each namespace and reports the total."""
    fill(daemon.address)
    out = cli_ok("invalidate", "--address", daemon.address, "--all")
    assert "kvstore: dropped 5 blocks of 2 namespaces" in out
    assert stats(daemon.address)["num_blocks"] == 0


@pytest.mark.timeout(90)
def test_invalidate_refuses_unknown_ambiguous_and_malformed_namespaces(daemon):
    """Unknown, ambiguous, non-hex or missing namespaces are errors (exit 2) that drop nothing."""
    fill(daemon.address)
    with Client(daemon.address, CALL_S) as client:  # two names sharing the prefix "abab"
        for tail in (b"\x01", b"\x02"):
            client.put(Namespace(b"\xab\xab" + tail), [(b"k", None, b"v")])
    address = ["--address", daemon.address]
    unknown = cli_error("invalidate", *address, "ffffffff")
    assert "unknown namespace 'ffffffff': the daemon knows" in unknown
    assert NS_A.name.hex()[:12] in unknown
    assert "is ambiguous: it starts abab01, abab02" in cli_error("invalidate", *address, "abab")
    assert "must be hex" in cli_error("invalidate", *address, "model-a")
    assert "NAMESPACE" in cli_error("invalidate", *address)
    assert "not both" in cli_error("invalidate", *address, "abab01", "--all")
    assert stats(daemon.address)["num_blocks"] == 7


# --- serve: settings from a file, the environment and flags ----------------------------------
@pytest.mark.timeout(90)
def test_serve_reads_its_config_file_and_flags_win_over_it(make_daemon, tmp_path):
    """A [serve] file sets the metrics port and policy; the --pool-size flag beats the file's."""
    metrics_port = free_port()
    config = tmp_path / "kvstore.toml"
    config.write_text(f'[serve]\npool_size = "1GiB"\nmetrics_port = {metrics_port}\n'
                      f'policy = "lru"\n')
    d = make_daemon(extra_args=["--config", str(config)]).start()  # passes --pool-size 256MiB
    assert "(256.0 MiB, 8 pages of 32.0 MiB), policy lru" in d.output()
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=CALL_S) as reply:
        assert b"kvstore_pool_capacity_bytes 2.68435456e+08" in reply.read()


@pytest.mark.timeout(60)
def test_print_config_shows_each_value_and_its_source(tmp_path):
    """--print-config resolves file < environment < flags, prints TOML with sources, exits 0."""
    config = tmp_path / "kvstore.toml"
    config.write_text('[serve]\npool_size = "1GiB"\nsegment = "from-file"\nttl = 30\n')
    env = {"KVSTORE_SEGMENT": "from-env", "KVSTORE_CONFIG": str(config)}
    result = subprocess.run([sys.executable, "-m", "kvstore.cli", "serve", "--print-config",
                             "--pool-size", "64MiB"], capture_output=True, timeout=30, cwd=REPO,
                            env={**_base_env(), **env})
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "pool_size = 67108864  # 64.0 MiB; flag --pool-size" in out
    assert 'segment = "from-env"  # env KVSTORE_SEGMENT' in out
    assert f"ttl = 30.0  # file {config}" in out
    assert "metrics_port = 9400  # default" in out
    assert not (tmp_path / "from-env").exists() and "listening" not in out


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("args", "env", "needle"), [
    (["--metrics-port", "70000"], {}, "--metrics-port '70000': not a port number 0..65535"),
    ([], {"KVSTORE_POOL_SIZE": "8 GB?"}, "KVSTORE_POOL_SIZE='8 GB?' (environment): not a size"),
    ([], {"KVSTORE_LEASE": "0"}, "--lease must be positive, got 0.0 (set by env KVSTORE_LEASE)"),
    (["--config", "/nonexistent/kvstore.toml"], {}, "does not exist"),
], ids=["port", "size", "lease", "file"])
def test_bad_settings_exit_2_with_one_line_naming_option_and_source(args, env, needle):
    """Each bad setting stops serve before anything starts: exit 2, one line naming it."""
    result = subprocess.run([sys.executable, "-m", "kvstore.cli", "serve", "--segment",
                             f"kvstore-test-bad-{free_port()}", *args], capture_output=True,
                            timeout=30, cwd=REPO, env={**_base_env(), **env})
    assert result.returncode == 2, result
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvstore: error: ") and needle in lines[0], lines


def _base_env() -> dict[str, str]:
    """This process's environment without any KVSTORE_ setting that would leak into a test."""
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}

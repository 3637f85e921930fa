"""put/get/lookup between separate client processes, over shared memory and over TCP frames."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvstore import protocol
from kvstore.client import Client
from kvstore.errors import ServerError
from kvstore.keys import Namespace
from tests.integration.helpers import (
    CALL_S, MiB, REPO, as_chain, chain_hashes, random_blocks, stats)

CHUNK = protocol.CHUNK_BYTES
# One exact chunk, one just past it (2 frames), one of 3 frames with a short tail, and a small one.
SIZES = [CHUNK, CHUNK + 1, 2 * CHUNK + 7, 1000]


def _peer(*args: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-m", "tests.integration.peer", *args],
                          capture_output=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return json.loads(done.stdout)


def _write_manifest(directory: Path, ns: str, hashes: list[bytes], datas: list[bytes]) -> None:
    rows = []
    for i, (h, parent, data) in enumerate(as_chain(hashes, datas)):
        (directory / f"block-{i}.bin").write_bytes(data)
        parent_hex = None if parent is None else parent.hex()
        rows.append([h.hex(), parent_hex, f"block-{i}.bin", len(data)])
    (directory / "manifest.json").write_text(json.dumps({"ns": ns, "blocks": rows}))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("writer,reader", [("shm", "shm"), ("tcp", "tcp"), ("shm", "tcp"),
                                           ("tcp", "shm")])
def test_blocks_put_by_one_process_read_back_byte_identical_by_another(daemon, tmp_path, writer,
                                                                       reader):
    """Multi-chunk blocks put by one process come back byte-identical in another (get, get_into)."""
    datas = random_blocks(1, SIZES)
    hashes = chain_hashes("xproc", len(datas))
    _write_manifest(tmp_path, "model-a", hashes, datas)
    out = tmp_path / "out"
    out.mkdir()

    put = _peer("put", daemon.address, writer, str(tmp_path))
    got = _peer("get", daemon.address, reader, str(tmp_path), str(out))

    assert put == {"num_stored": len(datas), "num_present": 0, "num_full": 0,
                   "is_local": writer == "shm"}
    assert got == {"num_hits": len(datas), "num_into": len(datas), "is_local": reader == "shm"}
    for i, data in enumerate(datas):
        assert (out / f"get-{i}.bin").read_bytes() == data, f"get() block {i} differs"
        assert (out / f"into-{i}.bin").read_bytes() == data, f"get_into() block {i} differs"
    total = sum(SIZES)
    s = stats(daemon.address)
    # The bytes took the path each process asked for, and only that one.
    assert s["bytes_in"] == {"shm": total if writer == "shm" else 0,
                             "tcp": total if writer == "tcp" else 0}
    assert s["bytes_out"] == {"shm": 2 * total if reader == "shm" else 0,
                              "tcp": 2 * total if reader == "tcp" else 0}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
def test_lookup_counts_only_the_consecutive_stored_prefix(daemon, ctx, use_shm):
    """lookup counts stored blocks from the root up to the first gap, per namespace."""
    ns, other = Namespace(b"model-a"), Namespace(b"model-b")
    hashes = chain_hashes("prefix", 4)
    with Client(daemon.address, CALL_S, ctx=ctx, use_shm=use_shm) as client:
        assert client.put(ns, as_chain(hashes[:3], random_blocks(2, [4096] * 3))).num_stored == 3
        assert client.lookup(ns, hashes).num_hits == 3
        assert client.lookup(ns, [hashes[0], hashes[1], b"gap", hashes[2]]).num_hits == 2
        assert client.lookup(ns, [b"gap", *hashes]).num_hits == 0
        assert client.lookup(other, hashes).num_hits == 0
        assert client.lookup(Namespace(b"model-a", epoch=1), hashes).num_hits == 0
        # lookup without a lease changes nothing: no lease is held afterwards.
        assert client.lookup(ns, hashes).lease is None
        assert client.stats()["num_leases"] == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
def test_get_of_missing_blocks_returns_nothing(daemon, ctx, use_shm):
    """get and get_into of blocks never stored return no blocks instead of failing."""
    ns = Namespace(b"model-a")
    dest = np.zeros(4096, dtype=np.uint8)
    with Client(daemon.address, CALL_S, ctx=ctx, use_shm=use_shm) as client:
        assert client.get(ns, [b"never-stored"]) == []
        assert client.get_into(ns, [b"never-stored"], [dest]) == 0
        assert not dest.any()
        client.put(ns, [(b"root", None, b"r" * 100)])
        assert client.get(ns, [b"root", b"never-stored"]) == [b"r" * 100]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
def test_put_of_stored_blocks_reports_them_present(daemon, ctx, use_shm):
    """Putting blocks again stores nothing and keeps the first bytes."""
    ns = Namespace(b"model-a")
    hashes = chain_hashes("dup", 2)
    first, second = random_blocks(3, [2048, 2048]), random_blocks(4, [2048, 2048])
    with Client(daemon.address, CALL_S, ctx=ctx, use_shm=use_shm) as client:
        assert client.put(ns, as_chain(hashes, first)).num_stored == 2
        result = client.put(ns, as_chain(hashes, second))
        assert (result.num_stored, result.num_present, result.num_full) == (0, 2, 0)
        assert client.get(ns, hashes) == first
        assert client.stats()["num_slots_used"] == 2


@pytest.mark.timeout(90)
@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
def test_block_larger_than_a_page_is_refused_as_too_large(make_daemon, ctx, use_shm):
    """A block that cannot fit one page is refused with too_large and takes no slot."""
    d = make_daemon(pool_size="32MiB", page_size="4MiB").start()
    with Client(d.address, CALL_S, ctx=ctx, use_shm=use_shm) as client:
        with pytest.raises(ServerError) as err:
            client.put(Namespace(b"m"), [(b"big", None, bytes(4 * MiB + 1))])
        assert err.value.code == "too_large"
        assert client.stats()["num_slots_used"] == 0
        assert client.put(Namespace(b"m"), [(b"ok", None, bytes(4 * MiB))]).num_stored == 1


@pytest.mark.timeout(90)
@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
def test_lease_of_one_namespace_never_reads_another(daemon, ctx, use_shm):
    """A GET under a lease taken in namespace A returns nothing for namespace B's same hashes."""
    a, b = Namespace(b"model-a"), Namespace(b"model-b")
    with Client(daemon.address, CALL_S, ctx=ctx, use_shm=use_shm) as client:
        client.put(a, [(b"shared-hash", None, b"A" * 512)])
        lease = client.lookup(a, [b"shared-hash"], lease_ms=5000).lease
        assert lease is not None
        assert client.get(b, [b"shared-hash"], lease=lease) == []
        lease = client.lookup(a, [b"shared-hash"], lease_ms=5000).lease
        assert client.get(a, [b"shared-hash"], lease=lease) == [b"A" * 512]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
def test_a_leased_prefix_can_be_read_in_batches_and_stays_leased(daemon, ctx, use_shm):
    """GETs under one lease may start anywhere in the leased prefix; the lease holds until
    RELEASE (a large prefix is loaded in several calls, each inside its timeout), on both
    transports alike (issue 11: a shared-memory get used to end the caller's lease)."""
    ns = Namespace(b"batches")
    hashes = chain_hashes("batch", 6)
    datas = random_blocks(7, [4096] * 6)
    with Client(daemon.address, CALL_S, ctx=ctx, use_shm=use_shm) as client:
        client.put(ns, as_chain(hashes, datas))
        lease = client.lookup(ns, hashes, lease_ms=10_000).lease
        assert lease is not None
        assert client.get(ns, hashes[2:4], lease=lease) == datas[2:4]
        assert client.get(ns, hashes[4:], lease=lease) == datas[4:]
        assert stats(daemon.address)["num_leases"] == 1
        assert client.release(lease)
        assert stats(daemon.address)["num_leases"] == 0


@pytest.mark.timeout(90)
def test_get_into_fills_numpy_destinations_in_place_over_both_paths(daemon, ctx):
    """get_into writes each block into the front of its numpy array and leaves the rest alone."""
    ns = Namespace(b"model-a")
    hashes = chain_hashes("into", 2)
    datas = random_blocks(5, [CHUNK + 4096, 6000])
    with Client(daemon.address, CALL_S, ctx=ctx) as writer:
        writer.put(ns, as_chain(hashes, datas))
    for use_shm in (True, False):
        dests = [np.full(CHUNK + 8192, 7, dtype=np.uint8), np.full((50, 64), 7, dtype=np.int16)]
        before = [d.tobytes() for d in dests]
        with Client(daemon.address, CALL_S, ctx=ctx, use_shm=use_shm) as reader:
            assert reader.get_into(ns, hashes, dests) == 2
        for dest, data, old in zip(dests, datas, before):
            raw = dest.tobytes()
            assert raw[:len(data)] == data
            assert raw[len(data):] == old[len(data):], "bytes past the block were overwritten"

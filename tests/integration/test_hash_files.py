"""A same-host LOOKUP's hashes through the client's own file (kvstore/hashfiles.py): the same
answers as inline, nothing left behind, and no file name a client sends can stall or fool the
daemon."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from bench.daemon import wait_until
from bench.hostile import call, header
from kvstore import pool as pool_module
from kvstore import protocol
from kvstore.client import Client
from kvstore.hashfiles import FILE_BYTES, PREFIX, HashFile, HashFiles, record_bytes
from kvstore.keys import Namespace
from kvstore.protocol import MAX_BLOCKS, Op
from tests.integration.helpers import CALL_S, as_chain, random_blocks, run_cli, stats

NS = Namespace(b"hash-files")
BLOCK_BYTES = 4096


def sha_chain(tag: str, n: int) -> list[bytes]:
    """n chained 32-byte hashes, as vLLM's sha256 block hashes are (one length: packable)."""
    out, parent = [], tag.encode()
    for i in range(n):
        parent = hashlib.sha256(parent + i.to_bytes(4, "little")).digest()
        out.append(parent)
    return out


def own_hash_files() -> set[str]:
    return {p.name for p in pool_module.SHM_DIR.glob(PREFIX + "*")}


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(60)
def test_lookups_by_file_answer_as_inline_ones(daemon):
    """Hits, partial prefixes, misses, leases, slot references and lookup_many: the same answers
    from a same-host client (hashes by file) as from a TCP one (inline), and the daemon took
    the file (it removes the name once it holds it open)."""
    hashes = sha_chain("answers", 300)
    stored = 200
    before = own_hash_files()
    with Client(daemon.address, timeout_s=CALL_S) as local, \
            Client(daemon.address, timeout_s=CALL_S, use_shm=False) as remote:
        local.put(NS, as_chain(hashes[:stored], random_blocks(1, [BLOCK_BYTES] * stored)))
        cases = [hashes, hashes[:stored], hashes[:90], hashes[250:], sha_chain("other", 100)]
        for case in cases:
            assert local.lookup(NS, case) == remote.lookup(NS, case)
        assert local._hash_file is not None, "a 300-hash lookup on the daemon's host went inline"
        assert local._hash_file.name not in own_hash_files(), "the daemon did not take the file"

        leased = local.lookup(NS, hashes, lease_ms=5000, with_slots=True)
        inline = remote.lookup(NS, hashes, lease_ms=5000)
        assert leased.num_hits == inline.num_hits == stored
        assert len(leased.slots) == stored and local.release(leased.lease)
        assert remote.release(inline.lease)

        queries = [(NS, hashes), (Namespace(b"hash-files-2"), hashes), (NS, hashes[:150])]
        assert [r.num_hits for r in local.lookup_many(queries)] == [stored, 0, 150]
        assert stats(daemon.address)["errors_by_kind"].get("hashes_gone", 0) == 0
    assert own_hash_files() <= before, "a closed client left its hash file behind"


@pytest.mark.timeout(60)
def test_a_closed_connection_closes_its_file(daemon):
    """The daemon holds one descriptor per connection and lets it go when the connection
    closes: clients that come and go leave no descriptors behind."""
    hashes = sha_chain("fds", 256)
    pid = daemon.proc.pid
    with Client(daemon.address, timeout_s=CALL_S) as warm:
        warm.lookup(NS, hashes[:10])  # the daemon's own sockets and pages are set up
    baseline = open_fds(pid)
    clients = [Client(daemon.address, timeout_s=CALL_S) for _ in range(5)]
    for client in clients:
        assert client.lookup(NS, hashes).num_hits == 0
        assert client._hash_file is not None
    assert open_fds(pid) >= baseline + 5
    for client in clients:
        client.close()
    wait_until(lambda: open_fds(pid) <= baseline, 10, what="the files' descriptors closed")


@pytest.mark.timeout(90)
def test_a_restarted_daemon_answers_hashes_gone_once_and_the_client_goes_on(make_daemon):
    """The new daemon cannot open the file the old one took (its name is gone): it answers
    hashes_gone, the client sends that lookup inline and starts a new file, and the caller
    sees only the right answer."""
    d = make_daemon().start()
    hashes = sha_chain("restart", 256)
    with Client(d.address, timeout_s=2.0) as client:
        assert client.lookup(NS, hashes).num_hits == 0
        first = client._hash_file
        assert first is not None
        d.restart()
        with Client(d.address, timeout_s=2.0) as writer:  # the first client's next call: LOOKUP
            writer.put(NS, as_chain(hashes[:100], random_blocks(2, [BLOCK_BYTES] * 100)))
        found = client.lookup(NS, hashes, lease_ms=5000, with_slots=True)  # then stale_segment
        assert found.num_hits == 100 and client.maps(found.token) and client.release(found.lease)
        assert stats(d.address)["errors_by_kind"].get("hashes_gone") == 1
        assert client._hash_file is not None and client._hash_file is not first
        assert client.lookup(NS, hashes).num_hits == 100  # by the new file, no error
        assert stats(d.address)["errors_by_kind"].get("hashes_gone") == 1


@pytest.mark.timeout(90)
def test_lookup_many_with_slots_goes_on_across_a_daemon_restart(make_daemon):
    """After a restart a tensor-parallel lookup meets both refusals in turn (hashes_gone for the
    old file, stale_segment for the old segment's token): it must answer, not fail."""
    d = make_daemon().start()
    hashes = sha_chain("restart-many", 128)
    ranks = [Namespace(b"hash-files-r0"), Namespace(b"hash-files-r1")]
    with Client(d.address, timeout_s=2.0) as client:
        assert [r.num_hits for r in client.lookup_many([(ns, hashes) for ns in ranks])] == [0, 0]
        d.restart()
        with Client(d.address, timeout_s=2.0) as writer:  # the first client's next call: LOOKUP
            for ns in ranks:
                writer.put(ns, as_chain(hashes[:50], random_blocks(3, [BLOCK_BYTES] * 50)))
        found = client.lookup_many([(ns, hashes) for ns in ranks], lease_ms=5000,
                                   with_slots=True)
        assert [r.num_hits for r in found] == [50, 50]
        assert all(client.maps(r.token) and len(r.slots) == 50 for r in found)
        assert all(client.release(r.lease) for r in found)


def _lookup_by_file(sock, name: str, offset: int = 0,  # type: ignore[no-untyped-def]
                    count: int = 256, size: int = 32):
    return call(sock, [header(Op.LOOKUP, ns=[NS.name, 0], lease_ms=0,
                              hashes_file=[name, offset, count, size])])


def _fake_name() -> str:
    return PREFIX + os.urandom(16).hex()


@pytest.mark.timeout(60)
def test_names_that_are_no_client_file_are_refused_and_the_daemon_serves_on(daemon,
                                                                            open_dealer):
    """A path outside /dev/shm, a link, a FIFO (opening one for reading would wait for a
    writer), a file too short for the hashes named, a name that does not exist, hashes sent
    both ways, and counts past the cap: each a clear error, none a wait, and a well-formed
    lookup answers right after."""
    sock = open_dealer(daemon.address)
    shm = pool_module.SHM_DIR
    target = shm / _fake_name()
    target.write_bytes(bytes(8192))
    link, fifo, short = shm / _fake_name(), shm / _fake_name(), shm / _fake_name()
    link.symlink_to(target)
    os.mkfifo(fifo)
    short.write_bytes(bytes(100))
    try:
        for bad in ("../../etc/passwd", "kvstore-test-x", PREFIX + "AB" * 16, 7):
            reply = _lookup_by_file(sock, bad)  # type: ignore[arg-type]
            assert reply.get("error") == "bad_request", (bad, reply)
        for gone in (link.name, fifo.name, short.name, _fake_name()):
            start = time.monotonic()
            reply = _lookup_by_file(sock, gone)
            assert reply.get("error") == "hashes_gone", (gone, reply)
            assert time.monotonic() - start < CALL_S
        for fields in ([target.name, 0, MAX_BLOCKS + 1, 32], [target.name, 0, 1, 65],
                       [target.name, -1, 1, 32], [target.name, 0, 1], "x"):
            reply = call(sock, [header(Op.LOOKUP, ns=[NS.name, 0], lease_ms=0,
                                       hashes_file=fields)])
            assert reply.get("error") == "bad_request", (fields, reply)
        reply = call(sock, [header(Op.LOOKUP, ns=[NS.name, 0], lease_ms=0, hashes=[b"h"],
                                   hashes_file=[target.name, 0, 1, 32])])
        assert reply.get("error") == "bad_request", reply
        assert link.is_symlink() and target.exists(), "the daemon removed what is no file of it"
        assert _lookup_by_file(sock, target.name, count=8192 // 34).get("num_hits") == 0
        assert not target.exists(), "a file it reads is one it takes: its name is removed"
        with Client(daemon.address, timeout_s=CALL_S) as client:
            assert client.lookup(NS, sha_chain("after", 256)).num_hits == 0
    finally:
        for path in (target, link, fifo, short):
            path.unlink(missing_ok=True)


@pytest.mark.timeout(60)
def test_under_curve_no_file_is_offered_or_read(make_daemon, tmp_path):
    """With CURVE a remote client has no file and a name must not reach local files: HELLO
    offers none, and the same-host client sends its hashes inline."""
    keys = tmp_path / "keys"
    done = run_cli("keygen", str(keys))
    assert done.returncode == 0, done.stderr
    d = make_daemon(extra_args=["--curve-keys", str(keys)], client_keys=keys).start()
    with Client(d.address, timeout_s=CALL_S, curve_dir=keys) as client:
        assert client.connect().hash_files is False
        assert client.is_local
        assert client.lookup(NS, sha_chain("curve", 256)).num_hits == 0
        assert client._hash_file is None


def test_a_hash_file_takes_only_hashes_of_its_size_that_fit():
    """The client's file: hashes written at an offset while they fit and share the size named;
    one shorter or longer (which a plain pack would pad or cut silently) sends them inline."""
    hash_file = HashFile()
    size = 32
    try:
        assert hash_file.put([b"x" * size] * 64, size, 0)
        room = FILE_BYTES - record_bytes(64, size)
        assert hash_file.put([b"y" * size] * 64, size, room)
        assert not hash_file.put([b"z" * size] * 64, size, room + 1)
        for odd in (b"a" * (size - 1), b"a" * (size + 1), b"a" * (size + 40), b""):
            assert not hash_file.put([b"x" * size] * 10 + [odd], size, 0), len(odd)
        assert not hash_file.put([memoryview(b"x" * size)], size, 0)
        assert (pool_module.SHM_DIR / hash_file.name).stat().st_mode & 0o777 == 0o600
    finally:
        hash_file.close()
    assert not (pool_module.SHM_DIR / hash_file.name).exists()


def test_the_daemon_reads_back_what_the_client_wrote():
    """Records written by HashFile, read by HashFiles as the exact hashes; the name is taken."""
    hashes = sha_chain("records", 300)
    hash_file, files = HashFile(), HashFiles()
    try:
        assert hash_file.put(hashes[:100], 32, 0)
        assert hash_file.put(hashes[100:], 32, record_bytes(100, 32))
        assert files.read(b"o", hash_file.name, 0, 100, 32) == tuple(hashes[:100])
        assert files.read(b"o", hash_file.name, record_bytes(100, 32), 200, 32) == \
            tuple(hashes[100:])
        assert not (pool_module.SHM_DIR / hash_file.name).exists()
        with pytest.raises(protocol.HashesGone):
            files.read(b"o", hash_file.name, FILE_BYTES - 10, 1, 32)
    finally:
        hash_file.close()
        files.close()


def test_the_daemon_holds_a_bounded_number_of_files():
    """Past max_open the least recently used file is closed; its owner's next read says
    hashes_gone (its name went when it was opened), the others' still read."""
    hashes = tuple(sha_chain("bounded", 64))
    made = [HashFile() for _ in range(3)]
    files = HashFiles(max_open=2)
    try:
        for i, hash_file in enumerate(made):
            assert hash_file.put(hashes, 32, 0)
            assert files.read(bytes([i]), hash_file.name, 0, 64, 32) == hashes
        assert len(files) == 2
        with pytest.raises(protocol.HashesGone):
            files.read(b"\x00", made[0].name, 0, 64, 32)
        assert files.read(b"\x02", made[2].name, 0, 64, 32) == hashes
        files.end(b"\x02")
        assert len(files) == 1
    finally:
        for hash_file in made:
            hash_file.close()
        files.close()


def test_a_lookup_naming_a_file_decodes_only_where_files_are_read():
    """Without the daemon's reader (another host's decode, or CURVE) a LOOKUP that names a file
    is a clear protocol error, never a lookup of nothing."""
    frame = protocol.encode(protocol.Lookup(ns=NS, hashes=tuple(sha_chain("x", 64)),
                                            hashes_file=(_fake_name(), 0, 32)), 9)
    with pytest.raises(protocol.ProtocolError, match="hashes_file"):
        protocol.decode_request([frame])

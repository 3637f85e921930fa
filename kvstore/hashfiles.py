"""A same-host LOOKUP's hashes through a small file in /dev/shm instead of inside the message.

A prompt's 256 hashes of 32 bytes make a LOOKUP of ~8.3 KB: past libzmq's 8,192-byte write batch,
so it crosses the socket in two writes, and the 2-core bench machine paid 9 us more for it than
for the same LOOKUP naming a file (bench.lookup_cost, file_saves_us_lookup256; the round trip is
~113 us). A client on the daemon's host instead writes the hashes into a file of its own and
names it in the request (`hashes_file`: name, offset, count, size); the daemon reads them with
one pread.

In the file each hash is a record of size + 2 bytes: a length byte, the hash, a zero. The client
writes all of them with one struct pack (a Pascal string field one byte longer than a hash) and
checks the length bytes: a hash of another length shows there (a longer one is cut to size + 1,
which its length byte says), so no join and no len() per hash is needed to prove they share one
length; the daemon reads the records' hashes with one struct unpack.

The file is the client's (HashFile: mode 0600, a random name, its memory reserved up front so a
full /dev/shm fails here and never as SIGBUS mid-write). The daemon (HashFiles) opens the name
on a connection's first use, without following links or blocking, only a regular file, and
unlinks it at once: from then on the open descriptor, kept per connection, is the only way to it,
and nothing is left behind when either process dies. A later request naming a file the daemon no
longer holds (restarted, connection replaced, evicted) answers "hashes_gone" and the client sends
that lookup again by a new file (inline if /dev/shm refuses one). Off under CURVE: a remote
client has no file.

Safety: the daemon copies the bytes out with pread, so a client rewriting its file can only
change its own lookup's answer, as sending other hashes would; the client never writes while a
request naming the file is unanswered on that connection (it drops the file when it drops the
socket).
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import stat
import struct
import weakref
from collections.abc import Sequence
from pathlib import Path

from kvstore import pool as pool_module
from kvstore.errors import ProtocolError
from kvstore.keys import MAX_HASH_BYTES
from kvstore.protocol import HashesGone, repeated

PREFIX = "kvstore-hashes-"
_NAME = re.compile(re.escape(PREFIX) + r"[0-9a-f]{32}")
# A client's file: 8,192 records of 32-byte hashes (a 128k-token prompt, or tensor-parallel
# lookups of several namespaces side by side). A lookup that does not fit goes inline.
FILE_BYTES = 8192 * 34
# Below this many hashes a lookup goes inline: a small request gains nothing from the file.
MIN_HASHES = 64
# Files the daemon holds open at once, one per connection; past it the least recently used is
# closed (its client gets "hashes_gone" once and starts a new file).
MAX_OPEN = 128


# --- client side ------------------------------------------------------------------------------
class HashFile:
    """A client's file of hashes: each lookup's hashes written at an offset, then named."""

    def __init__(self) -> None:
        self.name = PREFIX + secrets.token_hex(16)
        path = pool_module.SHM_DIR / self.name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            # Reserve the memory: a full /dev/shm raises OSError here, not SIGBUS at a write.
            os.posix_fallocate(fd, 0, FILE_BYTES)
            self._map: mmap.mmap | None = mmap.mmap(fd, FILE_BYTES)
        except BaseException:
            _unlink(path)
            raise
        finally:
            os.close(fd)
        # The daemon unlinks the name when it opens it; until then (or if it never does) ours.
        self._unlink = weakref.finalize(self, _unlink, path)

    def put(self, hashes: Sequence[bytes], size: int, offset: int) -> bool:
        """Write hashes, each of size bytes, as records at offset; False when they do not fit or
        are not all bytes of that size (they then go inline)."""
        end = offset + record_bytes(len(hashes), size)
        if self._map is None or end > FILE_BYTES or not 0 < size <= MAX_HASH_BYTES:
            return False
        try:
            repeated("{}p", len(hashes), size + 2).pack_into(self._map, offset, *hashes)
        except struct.error:  # not bytes (a memoryview, say)
            return False
        return self._map[offset:end:size + 2] == bytes((size,)) * len(hashes)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._unlink()


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:  # already unlinked by the daemon (the usual case)
        pass


# --- daemon side ------------------------------------------------------------------------------
class HashFiles:
    """The daemon's open hash files, one per connection (its Store owner key)."""

    def __init__(self, max_open: int = MAX_OPEN) -> None:
        self.max_open = max_open
        self._open: dict[bytes, tuple[str, int]] = {}  # owner -> (name, fd); oldest use first

    def read(self, owner: bytes, name: str, offset: int, count: int,
             size: int) -> tuple[bytes, ...]:
        """count hashes of size bytes at offset in owner's file name; raises HashesGone."""
        held = self._open.pop(owner, None)  # re-inserted below: the dict's order is recency
        if held is not None and held[0] != name:
            os.close(held[1])  # a new file for this connection replaces the old
            held = None
        if held is None:
            held = (name, _open(name))
            while len(self._open) >= self.max_open:
                os.close(self._open.pop(next(iter(self._open)))[1])
        self._open[owner] = held
        nbytes = record_bytes(count, size)
        data = os.pread(held[1], nbytes, offset)
        if len(data) != nbytes:
            raise HashesGone(f"hash file {name} holds no {count} hashes at offset {offset}")
        return repeated("x{}sx", count, size).unpack(data)  # type: ignore[no-any-return]

    def end(self, owner: bytes) -> None:
        """owner's connection closed: its file goes too."""
        held = self._open.pop(owner, None)
        if held is not None:
            os.close(held[1])

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        for _, fd in self._open.values():
            os.close(fd)
        self._open.clear()


def _open(name: str) -> int:
    """An fd of the client's file name, whose name is then removed; raises HashesGone."""
    if not _NAME.fullmatch(name):
        raise ProtocolError(f"hash file name must be {PREFIX} and 32 hex digits, got {name!r}")
    path = pool_module.SHM_DIR / name
    try:  # no link followed, no FIFO waited on: only a regular file is read
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise HashesGone(f"hash file {name}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HashesGone(f"hash file {name} is not a regular file")
    _unlink(path)
    return fd


def record_bytes(count: int, size: int) -> int:
    """Bytes of count records of size-byte hashes in a hash file."""
    return count * (size + 2)


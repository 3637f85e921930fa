"""The shared-memory segment that holds every slot: created by the daemon, attached by clients.

Memory only: no bookkeeping of what is stored where (that is store.py). The first page is a header
(magic, owner pid, a random token) so a client can prove it mapped the daemon's live segment.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import struct
from pathlib import Path

SHM_DIR = Path("/dev/shm")
HEADER_BYTES = 4096  # one page; slots start page-aligned after it
_MAGIC = b"KVSTORE1"
_HEADER = struct.Struct("<8sQ16s")  # magic, owner pid, token
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


class PoolError(Exception):
    """The segment cannot be created or attached; the message is meant for an operator."""


def segment_path(name: str) -> Path:
    if not _NAME_RE.match(name):
        raise PoolError(f"segment name {name!r} must be 1-200 characters of A-Z a-z 0-9 . _ -")
    return SHM_DIR / name


class Pool:
    """A mapped segment: a header page followed by slot memory."""

    def __init__(self, path: Path, fd: int, size_bytes: int, token: bytes, is_owner: bool) -> None:
        self.path = path
        self.size_bytes = size_bytes
        self.token = token
        self.is_owner = is_owner
        self._fd = fd
        self._map = mmap.mmap(fd, size_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.buffer = memoryview(self._map)

    @classmethod
    def create(cls, name: str, size_bytes: int) -> Pool:
        """Create the segment with mode 0600 and reserve all of its memory up front."""
        path = segment_path(name)
        _remove_if_stale(path)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except FileExistsError:
            raise PoolError(f"segment {path} is in use by a running daemon "
                            f"(choose another --segment name)") from None
        except OSError as exc:
            raise PoolError(f"cannot create segment {path}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)  # the umask cannot widen it, but be explicit
            # Reserve the memory now: a full /dev/shm fails here, not with SIGBUS mid-write.
            os.posix_fallocate(fd, 0, size_bytes)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            free = _shm_free_bytes()
            raise PoolError(f"cannot reserve {size_bytes / 2**30:.1f} GiB in {SHM_DIR} "
                            f"({free / 2**30:.1f} GiB free): {exc.strerror}") from None
        token = secrets.token_bytes(16)
        pool = cls(path, fd, size_bytes, token, is_owner=True)
        _HEADER.pack_into(pool.buffer, 0, _MAGIC, os.getpid(), token)
        _CREATED_HERE.add(path)
        return pool

    @classmethod
    def attach(cls, name: str, token: bytes) -> Pool | None:
        """Map an existing segment if it carries token; None when it is not this daemon's."""
        try:
            path = segment_path(name)
            fd = os.open(path, os.O_RDWR)
        except (OSError, PoolError):
            return None  # another host, another user, or gone: use TCP frames instead
        size_bytes = os.fstat(fd).st_size
        if size_bytes < HEADER_BYTES:
            os.close(fd)
            return None
        pool = cls(path, fd, size_bytes, token, is_owner=False)
        magic, _, found = _HEADER.unpack_from(pool.buffer, 0)
        if magic != _MAGIC or found != token:
            pool.close()
            return None
        return pool

    def view(self, offset: int, nbytes: int) -> memoryview:
        """A zero-copy view of nbytes at offset."""
        return self.buffer[offset:offset + nbytes]

    def close(self) -> None:
        """Let the mapping go; the owner also unmaps it and removes the segment's name.

        A client never unmaps explicitly: tensors made with torch.frombuffer point into the
        mapping without holding a buffer export, so an explicit unmap could leave them dangling.
        The mapping is freed when the last view of it is garbage collected.
        """
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        if not self.is_owner:
            return
        try:
            self.buffer.release()
            self._map.close()
        except BufferError:
            pass  # a view is still exported (e.g. a frame in flight); the OS unmaps at exit
        self.path.unlink(missing_ok=True)
        _CREATED_HERE.discard(self.path)


def _shm_free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


_CREATED_HERE: set[Path] = set()  # segments this process created (a same-pid owner that is live)


def _remove_if_stale(path: Path) -> None:
    """Remove a segment left by a daemon that died without cleaning up (its pid is gone)."""
    try:
        with open(path, "rb") as f:
            magic, pid, _ = _HEADER.unpack(f.read(_HEADER.size))
    except (OSError, struct.error):
        return
    if magic != _MAGIC:
        return
    if pid == os.getpid() and path not in _CREATED_HERE:
        # In a container the daemon is usually pid 1 (or the same small pid) on every start, so a
        # segment left by a killed predecessor on a shared /dev/shm names our own pid.
        path.unlink(missing_ok=True)
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
    except PermissionError:
        pass  # alive, owned by someone else

"""The shared-memory segment that holds every slot: created by the daemon, attached by clients.

Memory only: no bookkeeping of what is stored where (that is store.py). The first page is a header
(magic, owner pid, a random token) so a client can prove it mapped the daemon's live segment. The
daemon holds an flock on the segment while it lives; that lock is how another daemon tells a live
segment from one a killed daemon left behind.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import re
import secrets
import stat
import struct
import threading
import time
from pathlib import Path

log = logging.getLogger("kvstore.pool")

SHM_DIR = Path("/dev/shm")
HEADER_BYTES = 4096  # one page; slots start page-aligned after it
_MAGIC = b"KVSTORE1"
_HEADER = struct.Struct("<8sQ16s")  # magic, owner pid, token
# madvise(2) advice (Linux 5.14+; Python 3.11's mmap lacks the name): fault the pages of a range
# in for writing, page tables included, without changing their bytes.
_MADV_POPULATE_WRITE = 23
# Prefaulted per madvise call: a few ms each, so close() stops the thread soon.
_PREFAULT_CHUNK_BYTES = 16 * 1024 * 1024
# Not "." or "..", nor a leading dot (the daemon's temporary names): a letter or digit first.
SEGMENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class PoolError(Exception):
    """The segment cannot be created or attached; the message is meant for an operator."""


def segment_path(name: str) -> Path:
    if not SEGMENT_NAME_RE.fullmatch(name):  # match() with $ would accept a trailing newline
        raise PoolError(f"segment name {name!r} must be 1-200 characters of A-Z a-z 0-9 . _ -, "
                        f"starting with a letter or digit")
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
        self.prefaulted_bytes = 0  # of this process's mapping, by prefault_in_background()
        self._prefault: threading.Thread | None = None
        self._is_closing = False

    @classmethod
    def create(cls, name: str, size_bytes: int) -> Pool:
        """Create the segment with mode 0600, reserve all of its memory up front, and hold its
        lock for the pool's lifetime: the lock, not a pid, tells other daemons it is live."""
        path = segment_path(name)
        _remove_if_stale(path)
        # Built under a temporary name, locked, then linked into place: the segment never
        # appears without its header and its lock, so no other daemon can judge it stale.
        tmp = SHM_DIR / f".kvstore-new-{secrets.token_hex(8)}"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError as exc:
            raise PoolError(f"cannot create segment {path}: {exc.strerror}") from None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
        try:
            os.fchmod(fd, 0o600)  # the umask cannot widen it, but be explicit
            # Reserve the memory now: a full /dev/shm fails here, not with SIGBUS mid-write.
            os.posix_fallocate(fd, 0, size_bytes)
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            free = _shm_free_bytes()
            raise PoolError(f"cannot reserve {size_bytes / 2**30:.1f} GiB in {SHM_DIR} "
                            f"({free / 2**30:.1f} GiB free): {exc.strerror}") from None
        token = secrets.token_bytes(16)
        pool = cls(tmp, fd, size_bytes, token, is_owner=True)
        _HEADER.pack_into(pool.buffer, 0, _MAGIC, os.getpid(), token)
        try:
            _link_into_place(tmp, path)
        except BaseException:
            pool.close()  # removes the temporary name
            raise
        pool.path = path
        tmp.unlink()
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

    def prefault_in_background(self) -> None:
        """Map every page of the segment into this process's page tables, on a thread, a chunk
        at a time (the GIL let go in each madvise). posix_fallocate reserved the memory, but
        each page this process first writes still costs it a fault: receiving a pull into
        pages only clients had written ran at a third of the speed of mapped ones (2.4 vs 7.3
        GB/s for a 128 MiB copy here). Page tables cost about 2 MiB per GiB of pool, which a
        daemon that has run a while holds anyway. Where the kernel lacks the advice, nothing."""
        self._prefault = threading.Thread(target=self._prefault_all, name="kvstore-prefault",
                                          daemon=True)
        self._prefault.start()

    def _prefault_all(self) -> None:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        anchor = ctypes.c_char.from_buffer(self._map)  # an export: close() waits for this thread
        address = ctypes.addressof(anchor)
        started = time.perf_counter()
        try:
            while self.prefaulted_bytes < self.size_bytes and not self._is_closing:
                num = min(_PREFAULT_CHUNK_BYTES, self.size_bytes - self.prefaulted_bytes)
                if madvise(address + self.prefaulted_bytes, num, _MADV_POPULATE_WRITE) != 0:
                    log.info("pool pages not prefaulted: %s (first writes fault them in)",
                             os.strerror(ctypes.get_errno()))
                    return
                self.prefaulted_bytes += num
            log.debug("pool prefaulted in %.2f s", time.perf_counter() - started)
        finally:
            del anchor

    def close(self) -> None:
        """Let the mapping go; the owner also unmaps it and removes the segment's name.

        A client never unmaps explicitly: tensors made with torch.frombuffer point into the
        mapping without holding a buffer export, so an explicit unmap could leave them dangling.
        The mapping is freed when the last view of it is garbage collected.
        """
        if self._fd < 0:
            return
        self._is_closing = True
        if self._prefault is not None:
            self._prefault.join()  # one chunk: milliseconds
        fd, self._fd = self._fd, -1
        if self.is_owner:
            # Remove the name while still holding the lock: once the lock goes, another daemon
            # may create a new segment under this name, which must not be unlinked here.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.path.unlink()
            except FileNotFoundError:
                pass
            try:
                self.buffer.release()
                self._map.close()
            except BufferError:
                pass  # a view is still exported (e.g. a frame in flight); the OS unmaps at exit
        os.close(fd)


def _shm_free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def _link_into_place(tmp: Path, path: Path) -> None:
    """Give the ready, locked segment at tmp its name; PoolError when the name is taken."""
    for _ in range(3):  # a stale segment removed between tries can only be replaced so often
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            _remove_if_stale(path)
        except OSError as exc:
            raise PoolError(f"cannot create segment {path}: {exc.strerror}") from None
    raise PoolError(f"segment {path} keeps being created by another process: choose another "
                    f"--segment name")


def _remove_if_stale(path: Path) -> None:
    """Remove a segment no live daemon holds; PoolError saying why when it may not be removed.

    A daemon holds an exclusive flock on its segment for its lifetime, and the kernel drops it
    when the process dies. Unlike a pid in the header, the lock is seen the same from every pid
    namespace that shares /dev/shm (two containers each running their daemon as pid 1).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError as exc:
        owner = _owner(path)
        if owner is not None and owner != os.geteuid():
            raise PoolError(_not_ours(path, owner)) from None
        raise PoolError(f"cannot open existing segment {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _header_pid(fd)
            raise PoolError(f"segment {path} is in use by a running daemon"
                            f"{f' (pid {pid} in its pid namespace)' if pid else ''}: choose "
                            f"another --segment name") from None
        if st.st_uid != os.geteuid():
            raise PoolError(_not_ours(path, st.st_uid))
        if not stat.S_ISREG(st.st_mode) or _header_pid(fd) is None:
            raise PoolError(f"{path} exists and is not a kvstore segment: choose another "
                            f"--segment name, or remove the file")
        # Stale. Unlink only if the name still means this file: a daemon that removed it first
        # may have linked its own live segment there since.
        try:
            if os.stat(path).st_ino == st.st_ino:
                path.unlink()
        except FileNotFoundError:
            pass
    finally:
        os.close(fd)


def _header_pid(fd: int) -> int | None:
    """The owner pid in a kvstore segment's header; None when the file is not a segment."""
    try:
        magic, pid, _ = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
    except (OSError, struct.error):
        return None
    return int(pid) if magic == _MAGIC else None


def _owner(path: Path) -> int | None:
    try:
        return os.lstat(path).st_uid
    except OSError:
        return None


def _not_ours(path: Path, uid: int) -> str:
    return (f"{path} exists and belongs to uid {uid}, not to this daemon's uid {os.geteuid()}: "
            f"choose another --segment name, or have its owner remove it")

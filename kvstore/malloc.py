"""glibc malloc settings that let the daemon reuse the memory of large TCP frames.

libzmq receives each large frame of a PUT into a buffer of its own, malloc'd on its I/O thread,
and frees it once the bytes are in the pool. With glibc's defaults a batch of such buffers is
returned to the kernel when freed (mmap'd chunks are unmapped; a heap whose free top passes the
dynamic trim threshold, twice the largest chunk, is trimmed), so the next batch page-faults
every page in again: in bench.store that kernel work, not the copy, bounded a TCP put. Fixing
the mmap threshold at its maximum and raising the trim threshold keeps up to trim_bytes of freed
memory for reuse: the daemon's private memory may stay that much larger after a burst of PUTs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Any

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
DEFAULT_TRIM_BYTES = 256 << 20  # several 32 MiB PUT batches in flight, each frame reused


def glibc_mallopt() -> Any:
    """glibc's mallopt, or None (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return None
    if mallopt is not None:
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt


def keep_large_buffers(trim_bytes: int = DEFAULT_TRIM_BYTES) -> bool:
    """Apply the settings above to this process; False (and nothing changed) without glibc."""
    mallopt = glibc_mallopt()
    if mallopt is None:
        log.info("no glibc mallopt here; large TCP frames use the default allocator settings")
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_bytes))


def give_back() -> bool:
    """Return the process's free heap memory to the kernel (glibc malloc_trim); False without
    glibc. For after a message far larger than any PUT batch: glibc would otherwise keep its
    memory (a dropped 2 GiB message left the daemon 2 GB larger for good; issue 10)."""
    malloc_trim = _malloc_trim()
    return malloc_trim is not None and bool(malloc_trim(0))


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None; looked up once: find_library runs `ldconfig -p` in a
    subprocess, which cost the loop up to 0.5 s after each dropped message on a loaded host."""
    name = ctypes.util.find_library("c")
    try:
        malloc_trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if malloc_trim is not None:
        malloc_trim.argtypes = [ctypes.c_size_t]
    return malloc_trim

"""One LMCache chunk as one kvstore block, and the blocking daemon calls that move chunks.

A stored block is LMCache's own RemoteMetadata header (byte length, memory format, and a dtype and
shape per layer group: what its Redis connector stores beside each chunk) followed by the
MemoryObj's bytes, so a load rebuilds the object exactly, an unfull last chunk included. These
functions block on the daemon: the connector runs them on its own threads, never on LMCache's
event loop.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryFormat, MemoryObj
from lmcache.v1.protocol import RemoteMetadata, get_remote_metadata_bytes

from kvstore.client import Client
from kvstore.keys import Namespace

# LocalCPUBackend.allocate(shapes, dtypes, fmt), or None when LMCache's buffer is full.
Allocate = Callable[[list[torch.Size], list[torch.dtype], MemoryFormat], MemoryObj | None]
# (kvstore block hash, parent block hash or None, the chunk)
Chunk = tuple[bytes, bytes | None, MemoryObj]


class ChunkError(ValueError):
    """A stored block is not a chunk this plugin wrote (truncated, corrupt or foreign)."""


def chunk_hash(key: CacheEngineKey) -> bytes:
    """kvstore's block hash of an LMCache key: a 32-byte digest of the key's string form.

    The string carries model name, world size, worker id, chunk hash, dtype and tags; a digest
    keeps it within kvstore's hash limit (keys.MAX_HASH_BYTES) whatever the model name's length.
    """
    return hashlib.sha256(key.to_string().encode()).digest()


def payload(obj: MemoryObj) -> memoryview:
    """The chunk's bytes, as a flat byte view of LMCache's buffer (no copy)."""
    view = memoryview(obj.byte_array)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def encode_header(obj: MemoryObj) -> bytes:
    return RemoteMetadata(len(payload(obj)), obj.get_shapes(), obj.get_dtypes(),
                          obj.get_memory_format()).serialize()


def decode_chunk(stored: memoryview, allocate: Allocate) -> MemoryObj | None:
    """Rebuild the MemoryObj of a stored block; None when LMCache has no room for it.

    Raises ChunkError when the block is not a whole chunk as encode_header() describes it.
    """
    header_bytes = get_remote_metadata_bytes()
    if len(stored) < header_bytes:
        raise ChunkError(f"stored block of {len(stored)} bytes is shorter than its header")
    try:
        meta = RemoteMetadata.deserialize(stored[:header_bytes])
    except (struct.error, ValueError, KeyError) as exc:
        raise ChunkError(f"unreadable chunk header: {exc}") from None
    if meta.length != len(stored) - header_bytes:
        raise ChunkError(f"chunk header says {meta.length} bytes, block holds "
                         f"{len(stored) - header_bytes}")
    obj = allocate(meta.shapes, meta.dtypes, meta.fmt)
    if obj is None:
        return None
    dest = payload(obj)
    if len(dest) != meta.length:
        obj.ref_count_down()
        raise ChunkError(f"shapes {meta.shapes} of {meta.dtypes} take {len(dest)} bytes, "
                         f"the header says {meta.length}")
    dest[:] = stored[header_bytes:]
    return obj


def store_chunks(client: Client, ns: Namespace, chunks: Sequence[Chunk]) -> int:
    """Write chunks to the daemon; returns how many were newly stored.

    Chunks already stored, being written by another writer, or refused by a full pool are
    skipped: a cache may drop a write.
    """
    headers = [encode_header(obj) for _, _, obj in chunks]
    datas = [payload(obj) for _, _, obj in chunks]
    with client.writing(ns, [(h, p, len(head) + len(data)) for (h, p, _), head, data
                             in zip(chunks, headers, datas)]) as w:
        for head, data, dest in zip(headers, datas, w.dests):
            if dest is not None:  # the pool slot itself on this host: the only copy
                dest[:len(head)] = head
                dest[len(head):] = data
    assert w.result is not None
    return w.result.num_stored


def load_chunks(client: Client, ns: Namespace, hashes: Sequence[bytes], allocate: Allocate,
                lease: int | None = None) -> list[MemoryObj]:
    """The stored prefix of hashes as MemoryObjs, up to the first chunk LMCache has no room for.

    On the daemon's host each chunk is copied once, from its pinned pool slot into LMCache's
    buffer. With a lease from a pinned lookup, reads those blocks and gives the lease back.
    """
    loaded: list[MemoryObj] = []
    try:
        with client.reading(ns, hashes, lease) as blocks:  # the lease ends with the block
            for block in blocks:
                obj = decode_chunk(block, allocate)
                if obj is None:
                    break
                loaded.append(obj)
        return loaded
    except BaseException:
        for obj in loaded:  # nobody else holds them: give LMCache's buffer back
            obj.ref_count_down()
        raise

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

from kvstore.client import Client, SlotRef
from kvstore.errors import ServerUnavailable
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
    if not client.has_shm():
        # PUT sends each block as one buffer: header and bytes are joined here (one copy).
        blocks = []
        for block_hash, parent, obj in chunks:
            header, data = encode_header(obj), payload(obj)
            joined = bytearray(len(header) + len(data))
            joined[:len(header)], joined[len(header):] = header, data
            blocks.append((block_hash, parent, joined))
        return client.put(ns, blocks).num_stored
    headers = [encode_header(obj) for _, _, obj in chunks]
    datas = [payload(obj) for _, _, obj in chunks]
    refs, _ = client.reserve(ns, [(h, p, len(head) + len(data)) for (h, p, _), head, data
                                  in zip(chunks, headers, datas)])
    reserved = [(h, ref) for (h, _, _), ref in zip(chunks, refs) if ref is not None]
    assert client.pool is not None, "has_shm() attached the segment"
    try:
        for head, data, ref in zip(headers, datas, refs):
            if ref is not None:  # straight into the pool slot: the only copy on this path
                _write_slot(client, ref, head, data)
    except BaseException:
        try:
            client.abort(ns, reserved)
        except ServerUnavailable:
            pass  # the daemon reclaims abandoned reservations after their deadline
        raise
    return client.commit(ns, reserved) if reserved else 0


def _write_slot(client: Client, ref: SlotRef, header: bytes, data: memoryview) -> None:
    assert client.pool is not None
    slot = client.pool.view(ref.slot, ref.nbytes)
    slot[:len(header)] = header
    slot[len(header):] = data


def load_chunks(client: Client, ns: Namespace, hashes: Sequence[bytes], allocate: Allocate,
                lease: int | None = None) -> list[MemoryObj]:
    """The stored prefix of hashes as MemoryObjs, up to the first chunk LMCache has no room for.

    On the daemon's host each chunk is copied once, from its pinned pool slot into LMCache's
    buffer. With a lease from a pinned lookup, reads those blocks and gives the lease back.
    """
    loaded: list[MemoryObj] = []
    try:
        if client.has_shm():
            with client.pinned(ns, hashes, lease) as refs:
                assert client.pool is not None
                for ref in refs:
                    obj = decode_chunk(client.pool.view(ref.slot, ref.nbytes), allocate)
                    if obj is None:
                        break
                    loaded.append(obj)
            return loaded
        blocks = client.get(ns, hashes, lease)
        if lease is not None:
            client.release(lease)  # a TCP GET leaves a client's lease held (protocol.py, GET)
        for block in blocks:
            obj = decode_chunk(memoryview(block), allocate)
            if obj is None:
                break
            loaded.append(obj)
        return loaded
    except BaseException:
        for obj in loaded:  # nobody else holds them: give LMCache's buffer back
            obj.ref_count_down()
        raise

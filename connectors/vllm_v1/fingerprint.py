"""A cheap, host-independent fingerprint of a checkpoint's weight files (part of the namespace).

Reads each safetensors header whole and a bounded sample of pages of tensor data, never a whole
file; remembers each file's digest by path, size, mtime, ctime and inode so a restart reads
nothing. The digest itself covers only names, sizes and content: two hosts with the same bytes
agree. A change confined to bytes no sample touches is missed (docs/operating.md, Namespace).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("kvstore.connector")

FINGERPRINT_VERSION = 1  # bump when the sampling changes: old digests and cache entries retire
SAMPLE_BYTES = 4096  # one page per sample: a cold read costs a seek, not bandwidth
BYTES_PER_SAMPLE = 4 * 2**20  # one sample per 4 MiB of a file: 4096 pages (16 MiB) for 16 GiB
MIN_SAMPLES_PER_FILE = 64  # small files: still several pages per tensor
SAMPLES_PER_TENSOR = 3  # start, middle and end of every tensor, budget permitting
GENERIC_SAMPLES = 256  # pages of a .bin/.pt/.gguf file, spread evenly, plus its head and tail
GENERIC_EDGE_BYTES = 64 * 1024  # head and tail of a non-safetensors file (pickle/zip directories)
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
CACHE_MAX_ENTRIES = 4096  # a host seldom holds more weight files than this
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".tensors")


@dataclass(slots=True, frozen=True)
class Fingerprint:
    """The digest of a checkpoint's weight files and what computing it cost."""

    digest: str  # hex; depends on file names, sizes and sampled content only
    num_files: int
    num_bytes: int  # total size of the weight files
    num_files_read: int  # files not found in the cache (0 on a warm start)
    num_bytes_read: int  # tensor and header bytes read for those files


def weight_files(path: Path) -> list[Path]:
    """The weight files vLLM would look at: path itself if a file, else the top-level weight
    files of the directory (vLLM globs the top level only; original/ etc. are not loaded)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def fingerprint(path: Path, cache_dir: Path | None = None) -> Fingerprint | None:
    """The fingerprint of the weights at path (a directory or one file), None if it holds none."""
    files = weight_files(path)
    if not files:
        return None
    cache = _Cache(cache_dir) if cache_dir is not None else None
    outer = hashlib.sha256(f"kvstore-weights-v{FINGERPRINT_VERSION}".encode())
    num_bytes = num_files_read = num_bytes_read = 0
    for file in files:
        st = file.stat()
        key = _cache_key(file, st)
        digest = cache.get(key) if cache else None
        if digest is None:
            digest, read = file_digest(file, st.st_size)
            num_files_read += 1
            num_bytes_read += read
            if cache:
                cache.put(key, digest)
        # The name matters (a shard index maps tensors to file names); the directory does not.
        outer.update(json.dumps([file.name, st.st_size, digest]).encode())
        num_bytes += st.st_size
    if cache and num_files_read:
        cache.save()
    return Fingerprint(outer.hexdigest(), len(files), num_bytes, num_files_read, num_bytes_read)


def file_digest(file: Path, size: int) -> tuple[str, int]:
    """(hex digest, bytes read) of one weight file from its header and sampled pages."""
    with open(file, "rb") as f:
        fd = f.fileno()
        parsed = _safetensors_layout(fd, size) if file.name.endswith(".safetensors") else None
        h = hashlib.sha256()
        if parsed is not None:
            header, spans = parsed
            h.update(header)  # names, dtypes, shapes and offsets of every tensor
            ranges = tensor_samples(spans)
            read = len(header) + 8
        else:
            ranges = generic_samples(size)
            read = 0
        h.update(struct.pack("<Q", size))
        _prefetch(fd, ranges)
        for offset, length in ranges:
            chunk = os.pread(fd, length, offset)
            h.update(struct.pack("<Q", offset))
            h.update(chunk)
            read += len(chunk)
    return h.hexdigest(), read


def _prefetch(fd: int, ranges: list[tuple[int, int]]) -> None:
    """Ask the kernel for every sampled page at once: a cold start then waits for the device's
    queue depth, not for one seek per sample in turn (the preads that follow hit the cache)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for offset, length in ranges:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


def tensor_samples(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) pages to read: every tensor's start, middle and end while the budget
    allows, the rest of the budget spread over tensors by size; overlapping pages merged.

    The budget depends on this file alone (its cached digest must not depend on other files):
    one page per BYTES_PER_SAMPLE of data, at least one per tensor."""
    spans = [(start, end) for start, end in spans if end > start]
    if not spans:
        return []
    total = sum(end - start for start, end in spans)
    budget = sample_budget(total, len(spans))
    per_tensor = max(1, min(SAMPLES_PER_TENSOR, budget // len(spans)))
    spare = max(0, budget - per_tensor * len(spans))
    ranges: list[tuple[int, int]] = []
    for start, end in spans:
        length = end - start
        n = per_tensor + spare * length // total
        n = max(1, min(n, -(-length // SAMPLE_BYTES)))
        ranges += _spread(start, length, n)
    return _merge(ranges)


def sample_budget(data_bytes: int, num_tensors: int) -> int:
    """Pages to sample from a file holding data_bytes of tensor data in num_tensors tensors."""
    return max(num_tensors, MIN_SAMPLES_PER_FILE, -(-data_bytes // BYTES_PER_SAMPLE))


def generic_samples(size: int) -> list[tuple[int, int]]:
    """Head, tail and evenly spread pages of a file whose layout we do not parse."""
    edge = min(GENERIC_EDGE_BYTES, size)
    ranges = [(0, edge), (size - edge, edge)]
    ranges += _spread(0, size, min(GENERIC_SAMPLES, max(1, size // SAMPLE_BYTES)))
    return _merge([r for r in ranges if r[1] > 0])


def _spread(start: int, length: int, n: int) -> list[tuple[int, int]]:
    """n pages evenly spaced over [start, start + length): the first at its start, the last
    ending at its end (n == 1: the middle)."""
    take = min(SAMPLE_BYTES, length)
    if n == 1:
        return [(start + (length - take) // 2, take)]
    step = (length - take) / (n - 1)
    return [(start + int(i * step), take) for i in range(n)]


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            last_offset, last_length = merged[-1]
            merged[-1] = (last_offset, max(last_length, offset + length - last_offset))
        else:
            merged.append((offset, length))
    return merged


def _safetensors_layout(fd: int, size: int) -> tuple[bytes, list[tuple[int, int]]] | None:
    """(raw header, absolute byte spans of each tensor), or None if it is not a safetensors file."""
    if size < 8:
        return None
    (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        return None
    header = os.pread(fd, header_len, 8)
    try:
        meta = json.loads(header)
    except ValueError:
        return None
    base = 8 + header_len
    spans = []
    for name, info in meta.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        begin, end = info.get("data_offsets", (0, 0))
        spans.append((base + int(begin), min(size, base + int(end))))
    return header, spans


def _cache_key(file: Path, st: os.stat_result) -> str:
    """Local only: ctime changes on any rewrite, also one that restores the old mtime."""
    return (f"v{FINGERPRINT_VERSION}|{os.path.realpath(file)}|{st.st_size}|{st.st_mtime_ns}|"
            f"{st.st_ctime_ns}|{st.st_dev}|{st.st_ino}")


def default_cache_dir() -> Path:
    """$KVSTORE_CACHE_DIR, else $XDG_CACHE_HOME/kvstore, else ~/.cache/kvstore."""
    if os.environ.get("KVSTORE_CACHE_DIR"):
        return Path(os.environ["KVSTORE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvstore"


class _Cache:
    """File digests by local file identity, in one JSON file; written atomically (replicas on one
    host start together), and any failure to read or write it only costs a re-read."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "fingerprints.json"
        self.entries: dict[str, str] = {}
        try:
            loaded = json.loads(self.path.read_text())
            if isinstance(loaded, dict):
                self.entries = {k: v for k, v in loaded.items() if isinstance(v, str)}
        except (OSError, ValueError):
            pass

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, digest: str) -> None:
        self.entries.pop(key, None)
        self.entries[key] = digest  # newest last; the oldest go first below

    def save(self) -> None:
        entries = dict(list(self.entries.items())[-CACHE_MAX_ENTRIES:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".fingerprints.")
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.info("kvstore: weights fingerprint not cached (%s): the next start reads again", exc)

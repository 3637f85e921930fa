"""vllm-router's consistent_hash ring, reproduced so the simulator routes sessions as it does.

vllm-router 0.1.17 hashes a request's key ("header:x-session-id:<id>" when that header is set)
with mcrouter's furc_hash over 2^23 - 1 buckets, re-hashed to 64 bits with MurmurHash64A, and
sends it to the first of 160 virtual nodes per worker ("<worker url>:<i>", hashed the same way) at
or after that point of the ring, wrapping around. So where a session lands depends on the worker
URLs, ports included: one hash of our own (the simulator's first model) agreed with the real
router on 9-18 of 32 sessions, chance. This one made all 2,520 choices logged by the routers of
28 consistent_hash runs without a failure (bench.fleet and its N = 2 repeats, 2026-12-03 and -04);
tests/integration/test_router_hash.py checks it against the real router.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

_M = 0xC6A4A7935BD1E995
_R = 47
_MASK = (1 << 64) - 1
_SEED = 4193360111
_FURC_SHIFT = 23
_FURC_BUCKETS = (1 << 23) - 1
VIRTUAL_NODES = 160


def murmur64a(key: bytes, seed: int) -> int:
    """MurmurHash64A of key (little-endian words, as on x86)."""
    h = (seed ^ (len(key) * _M)) & _MASK
    whole = len(key) // 8 * 8
    for at in range(0, whole, 8):
        k = int.from_bytes(key[at:at + 8], "little") * _M & _MASK
        k = (k ^ (k >> _R)) * _M & _MASK
        h = (h ^ k) * _M & _MASK
    if whole < len(key):  # the tail's bytes, xored in little-endian
        h = (h ^ int.from_bytes(key[whole:], "little")) * _M & _MASK
    h = (h ^ (h >> _R)) * _M & _MASK
    return h ^ (h >> _R)


def _rehash(k: int) -> int:
    """MurmurHash64A of one 64-bit word: the next 64 bits of furc_hash's bit stream."""
    return murmur64a(k.to_bytes(8, "little"), _SEED)


def furc(key: bytes, buckets: int) -> int:
    """mcrouter's furc_hash: key's bucket in [0, buckets), from a stream of hash bits."""
    if buckets <= 1:
        return 0
    words: list[int] = []

    def bit(index: int) -> int:
        while len(words) <= index >> 6:
            words.append(_rehash(words[-1]) if words else murmur64a(key, _SEED))
        return (words[index >> 6] >> (index & 63)) & 1

    depth = (buckets - 1).bit_length()  # ceil(log2(buckets))
    at = depth
    for _ in range(32):
        while not bit(at):  # the first 1 bit, coming down from depth, sets the number's length
            if depth == 0:
                return 0
            depth -= 1
            at = depth
        at += _FURC_SHIFT
        num = 1
        for _ in range(max(depth - 1, 0)):
            num = (num << 1) | bit(at)
            at += _FURC_SHIFT
        if num < buckets:
            return num
    return 0  # gave up: 0 is always a bucket


def point(key: str) -> int:
    """Where key sits on the ring."""
    return murmur64a(furc(key.encode(), _FURC_BUCKETS).to_bytes(4, "little"), _SEED)


def session_key(session: str) -> str:
    """The key vllm-router hashes for a request with the header X-Session-ID: session."""
    return f"header:x-session-id:{session}"


class HashRing:
    """The ring of the workers' URLs: owner(key) is the index in urls vllm-router picks."""

    def __init__(self, urls: Sequence[str], virtual_nodes: int = VIRTUAL_NODES) -> None:
        nodes = {point(f"{url}:{i}"): index for index, url in enumerate(urls)
                 for i in range(virtual_nodes)}  # a later worker's equal point wins, as in a map
        self._points = sorted(nodes)
        self._owners = [nodes[p] for p in self._points]

    def owner(self, key: str) -> int:
        at = bisect.bisect_left(self._points, point(key))
        return self._owners[at % len(self._owners)]


def loopback_urls(n: int, rng: random.Random) -> list[str]:
    """Worker URLs as bench.fleet's replicas get them (free ports on loopback, drawn at random):
    for fleets the real runs did not have, each seed of the simulator routes with its own ports."""
    from bench.fleet_procs import QUIET_PORTS

    ports = rng.sample(range(*QUIET_PORTS), n)
    return [f"http://127.0.0.1:{port}" for port in ports]

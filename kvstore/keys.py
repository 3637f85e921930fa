"""Identity of a stored block: a namespace (model identity + epoch) and vLLM's block hash.

Pure values only; no I/O. Everything that changes a block's bytes but not vLLM's hash belongs in
the namespace digest (DESIGN.md, Keys).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import NewType

BlockHash = NewType("BlockHash", bytes)
SlotId = NewType("SlotId", int)  # byte offset of a slot inside the shared segment

MAX_HASH_BYTES = 64  # vLLM's sha256 digests are 32 bytes; leave room, refuse anything larger
MAX_NAME_BYTES = 64


@dataclass(slots=True, frozen=True)
class Namespace:
    """Which model's bytes a block holds: a digest of the model identity plus an operator epoch."""

    name: bytes
    epoch: int = 0


def namespace_digest(identity: dict[str, object]) -> bytes:
    """Digest a model identity (strings, numbers, booleans) into a 16-byte namespace name.

    Keys are sorted so two processes that build the same dict in a different order agree.
    """
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).digest()[:16]


Key = tuple[Namespace, BlockHash]

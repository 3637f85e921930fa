"""Identity of a stored block: a namespace (model identity + epoch) and vLLM's block hash.

Pure values only; no I/O. Everything that changes a block's bytes but not vLLM's hash belongs in
the namespace digest (DESIGN.md, Keys).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import NamedTuple, NewType

BlockHash = NewType("BlockHash", bytes)
SlotId = NewType("SlotId", int)  # byte offset of a slot inside the shared segment

MAX_HASH_BYTES = 64  # vLLM's sha256 digests are 32 bytes; leave room, refuse anything larger
MAX_NAME_BYTES = 64
TENANT_SEP = b"/"  # a namespace name b"<tenant>/<digest>" belongs to tenant (kvstore/tenants.py)
TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")  # 32 + 1 + a 16-byte digest fit


class Namespace(NamedTuple):
    """Which model's bytes a block holds: a digest of the model identity plus an operator epoch.

    A tuple, not a dataclass: every index lookup hashes and compares (namespace, hash) keys, and a
    tuple does both in C (a frozen dataclass's Python __hash__/__eq__ were a quarter of a PUT's
    daemon time: bench/row_costs.py, issue 10)."""

    name: bytes
    epoch: int = 0


def namespace_digest(identity: dict[str, object]) -> bytes:
    """Digest a model identity (strings, numbers, booleans) into a 16-byte namespace name.

    Keys are sorted so two processes that build the same dict in a different order agree.
    """
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).digest()[:16]


Key = tuple[Namespace, BlockHash]


def with_tenant(tenant: str, name: bytes) -> bytes:
    """name inside tenant's namespaces (unchanged for tenant ""); ValueError for a bad tenant."""
    if not tenant:
        return name
    if not TENANT_RE.fullmatch(tenant):
        raise ValueError(f"tenant {tenant!r} must be 1-32 characters of A-Z a-z 0-9 . _ -, "
                         f"starting with a letter or digit")
    return tenant.encode() + TENANT_SEP + name


def tenant_of(name: bytes) -> str | None:
    """The tenant a namespace name starts with, or None when it names none."""
    head, sep, _ = name.partition(TENANT_SEP)
    tenant = head.decode("ascii", "replace")
    return tenant if sep and TENANT_RE.fullmatch(tenant) else None


"""Stale-segment recovery: a segment left by a killed daemon must not block the next start."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from kvstore.pool import _HEADER, _MAGIC, Pool, PoolError, segment_path


def _leave_segment(name: str, pid: int) -> None:
    """Write what a daemon killed with SIGKILL leaves behind: a segment naming its owner pid."""
    with open(segment_path(name), "wb") as f:
        f.write(_HEADER.pack(_MAGIC, pid, b"\0" * 16))


@pytest.fixture
def name() -> Iterator[str]:
    name = f"kvstore-test-{uuid.uuid4().hex[:8]}"
    yield name
    segment_path(name).unlink(missing_ok=True)


def test_segment_naming_our_own_pid_is_stale(name: str) -> None:
    # In a container the daemon gets the same pid on every start: its predecessor's segment on a
    # shared /dev/shm names the new process's own pid, and must be taken over, not refused.
    _leave_segment(name, os.getpid())
    pool = Pool.create(name, 1 << 20)
    try:
        assert pool.size_bytes == 1 << 20
    finally:
        pool.close()
    assert not segment_path(name).exists()


def test_segment_of_a_live_daemon_is_refused(name: str) -> None:
    pool = Pool.create(name, 1 << 20)  # created by this very process: live, not stale
    try:
        with pytest.raises(PoolError, match="in use by a running daemon"):
            Pool.create(name, 1 << 20)
    finally:
        pool.close()


def test_segment_of_a_dead_pid_is_removed(name: str) -> None:
    _leave_segment(name, 2**22 + 12345)  # above the default pid_max: no such process
    Pool.create(name, 1 << 20).close()

"""Shared fixtures: a real daemon process per test (or per module) on a random loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.daemon import Daemon


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    d = Daemon().start()
    yield d
    d.stop()


@pytest.fixture
def make_daemon() -> Iterator[type[Daemon]]:
    """Build daemons with custom flags; every one started is stopped at teardown."""
    started: list[Daemon] = []

    def factory(**kwargs):  # type: ignore[no-untyped-def]
        d = Daemon(**kwargs)
        started.append(d)
        return d

    yield factory  # type: ignore[misc]
    for d in started:
        d.stop()
        d.segment_path.unlink(missing_ok=True)  # left by a test that killed its daemon

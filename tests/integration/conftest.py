"""Fixtures of the integration tests: a private zmq context whose termination is checked."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from tests.integration.helpers import assert_terminates


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    """A private context for the test's clients; teardown fails if a socket was left open."""
    context = zmq.Context()
    yield context
    assert_terminates(context)


@pytest.fixture
def open_dealer(ctx: zmq.Context):  # type: ignore[no-untyped-def]
    """Raw DEALERs on the test's context (bench.hostile.dealer), closed at teardown even when the
    test fails. Shared by the hostile-client tests."""
    from bench.hostile import dealer

    socks: list[zmq.Socket] = []

    def make(address: str) -> zmq.Socket:
        socks.append(dealer(ctx, address))
        return socks[-1]

    yield make
    for sock in socks:
        sock.close(0)

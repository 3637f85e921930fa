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

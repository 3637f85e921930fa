"""kvstore/inbox.py over real ZeroMQ sockets (inproc): a message is read in slices of frames, kept
in part between calls, and one over the frame cap is read off and reported, never kept whole."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from kvstore.inbox import Inbox, Oversized
from bench.daemon import wait_until


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.bind("inproc://inbox")
    dealer.connect("inproc://inbox")
    yield router, dealer
    router.close(0)
    dealer.close(0)
    ctx.term()


def _next_ready(inbox: Inbox):  # type: ignore[no-untyped-def]
    """The first call's answer once a message has arrived (inproc delivers it whole)."""
    return wait_until(lambda: inbox.next() or inbox.is_reading, 5.0, 0.001, "a message")


def test_a_long_message_is_read_in_slices_and_kept_between_calls(pair) -> None:  # type: ignore[no-untyped-def]
    router, dealer = pair
    inbox = Inbox(router, max_frames=20_000, slice_frames=4096)
    dealer.send_multipart([b"head", *[b""] * 9_999])
    dealer.send_multipart([b"next"])
    assert _next_ready(inbox) is True  # the first slice ended inside the message
    assert inbox.next() is None and inbox.is_reading
    message = inbox.next()
    assert isinstance(message, list) and len(message) == 10_001  # identity + 10,000 frames
    assert message[1].bytes == b"head" and not inbox.is_reading
    assert [f.bytes for f in inbox.next()[1:]] == [b"next"]  # type: ignore[index]
    assert inbox.next() is None and not inbox.is_reading


def test_a_message_over_the_cap_is_read_off_and_reported(pair) -> None:  # type: ignore[no-untyped-def]
    router, dealer = pair
    inbox = Inbox(router, max_frames=100, slice_frames=4096)
    dealer.send_multipart([b"head", *[b""] * 9_999])
    assert _next_ready(inbox) is True
    dropped = inbox.next()
    while dropped is None:
        dropped = inbox.next()
    assert isinstance(dropped, Oversized)
    assert dropped.header == b"head" and dropped.num_frames == 10_001
    assert not inbox.is_reading

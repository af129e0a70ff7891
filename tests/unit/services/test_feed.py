"""A feed's handling of delivery messages, without NATS: the session's
subscription would call ``on_frames`` with what ``split_frames`` made of a message."""

from __future__ import annotations

from typing import cast

from nats.aio.client import Client as NATS

from services.gateway.feed import SessionFeed
from services.gateway.subscriptions import SessionSubscriptions, split_frames
from shared.protocol import Chunk, Done, encode
from shared.session import Delivery, LiveFrame, Send


def _frames(*seqs: int) -> list[bytes]:
    return [
        encode(Done(seq=s, turn=1, reason="stop")) if s == 4 else encode(Chunk(seq=s, turn=1, text=f"t{s}"))
        for s in seqs
    ]


def _feed(sent: list[Send], *, started: bool = True) -> SessionFeed:
    nc = cast(NATS, None)  # never used: nothing here subscribes or asks for a replay
    feed = SessionFeed(
        nc=nc,
        subscriptions=SessionSubscriptions(nc),
        session="s1",
        delivery=Delivery(delivered=0, paused=False),
        emit=sent.append,
        inbox_frames=2,
        gap_timeout_s=1.0,
        replay_timeout_s=1.0,
    )
    feed.started = started
    return feed


def test_a_message_splits_into_its_frames_in_order() -> None:
    """One frame, or several joined by newlines (a trailing one too); a malformed one is dropped alone."""
    frames = _frames(1, 2, 3)
    assert split_frames(frames[0], "s1") == [(1, frames[0])]
    assert split_frames(b"\n".join(frames) + b"\n", "s1") == [(1, frames[0]), (2, frames[1]), (3, frames[2])]
    assert split_frames(frames[0] + b"\nnot json\n" + frames[1], "s1") == [(1, frames[0]), (2, frames[1])]


def test_a_batch_is_applied_as_its_frames_one_by_one() -> None:
    """Frames of one message go out exactly as the same frames sent one per message."""
    frames = _frames(1, 2, 3, 4)
    one_by_one: list[Send] = []
    feed = _feed(one_by_one)
    for frame in frames:
        feed.on_frames(split_frames(frame, "s1"))
    batched: list[Send] = []
    feed = _feed(batched)
    feed.on_frames(split_frames(b"\n".join(frames[:3]), "s1"))
    feed.on_frames(split_frames(frames[3], "s1"))  # a lone frame, as before batches
    assert batched == one_by_one == [Send(f, i + 1) for i, f in enumerate(frames)]


def test_frames_before_the_feed_started_wait_in_order_up_to_the_bound() -> None:
    """While opening, frames are held in arrival order (past ``inbox_frames`` they are dropped: the
    first replay brings them); nothing is sent before the start."""
    frames = _frames(1, 2, 3)
    sent: list[Send] = []
    feed = _feed(sent, started=False)
    feed.on_frames(split_frames(b"\n".join(frames), "s1"))
    assert sent == []
    assert feed._early == [LiveFrame(1, frames[0]), LiveFrame(2, frames[1])]

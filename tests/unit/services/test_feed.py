"""A feed's handling of delivery messages (no NATS: the handler is called as the subscription would)."""

from __future__ import annotations

from typing import cast

from nats.aio.client import Client as NATS

from services.gateway.feed import SessionFeed
from shared.protocol import Chunk, Done, encode
from shared.session import Delivery, LiveFrame, Send


def _frames(*seqs: int) -> list[bytes]:
    return [encode(Done(seq=s, turn=1, reason="stop")) if s == 4 else encode(Chunk(seq=s, turn=1, text=f"t{s}")) for s in seqs]


def _feed(sent: list[Send], *, started: bool = True) -> SessionFeed:
    feed = SessionFeed(
        nc=cast(NATS, None),  # never used: nothing here subscribes or asks for a replay
        session="s1",
        delivery=Delivery(delivered=0, paused=False),
        emit=sent.append,
        inbox_frames=64,
        gap_timeout_s=1.0,
        replay_timeout_s=1.0,
    )
    feed.started = started
    return feed


def test_a_batch_is_applied_as_its_frames_one_by_one() -> None:
    """Frames joined by newlines go out exactly as the same frames sent one per message."""
    frames = _frames(1, 2, 3, 4)
    one_by_one: list[Send] = []
    feed = _feed(one_by_one)
    for frame in frames:
        feed._on_frames(frame)
    batched: list[Send] = []
    feed = _feed(batched)
    feed._on_frames(b"\n".join(frames[:3]))
    feed._on_frames(frames[3])  # a lone frame, as before batches
    assert batched == one_by_one == [Send(f, i + 1) for i, f in enumerate(frames)]
    assert feed.inbox.empty()  # no gap: nothing for run() to do


def test_a_batch_before_the_feed_started_is_queued_in_order() -> None:
    """Before start the frames wait in the inbox, each its own event, in the batch's order."""
    frames = _frames(1, 2, 3)
    sent: list[Send] = []
    feed = _feed(sent, started=False)
    feed._on_frames(b"\n".join(frames) + b"\n")
    assert sent == []
    assert [feed.inbox.get_nowait() for _ in range(3)] == [LiveFrame(i + 1, f) for i, f in enumerate(frames)]


def test_a_malformed_frame_in_a_batch_drops_only_itself() -> None:
    frames = _frames(1, 2)
    sent: list[Send] = []
    feed = _feed(sent)
    feed._on_frames(frames[0] + b"\nnot json\n" + frames[1])
    assert sent == [Send(frames[0], 1), Send(frames[1], 2)]

"""Grouping generated messages into per-session store segments, and a batch into delivery messages."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from services.buffer.service import FORCE_END_AFTER_DELIVERIES, Generated, delivery_messages, segments_of
from shared.messages import TurnEnd
from shared.protocol import Chunk, Done, encode
from shared.store import SegmentEnd


def chunk(seq: int, turn: int = 1) -> bytes:
    return encode(Chunk(seq=seq, turn=turn, text=f"w{seq}"))


def end(seq: int, turn: int = 1) -> bytes:
    return encode(TurnEnd(done=Done(seq=seq, turn=turn, reason="stop"), user="u"))


def test_frames_group_by_session_in_order() -> None:
    """Each session's frames keep their order; chunk bytes are stored as sent."""
    batch = segments_of([Generated("chat.gen.a", chunk(1)), Generated("chat.gen.b", chunk(1)), Generated("chat.gen.a", chunk(2))])
    assert [(s.session, [seq for seq, _ in s.frames]) for s, _ in batch] == [("a", [1, 2]), ("b", [1])]
    assert batch[0][0].frames[0][1] == chunk(1)
    assert all(s.end is None and index is None for s, index in batch)


def test_turn_end_closes_its_segment() -> None:
    """A turn's end closes its segment, carrying the done frame and the message's place in the batch;
    the next turn's frames start a new segment."""
    batch = segments_of(
        [Generated("chat.gen.a", chunk(1), "t1"), Generated("chat.gen.b", chunk(1)), Generated("chat.gen.a", end(2), "t1"),
         Generated("chat.gen.a", chunk(3, turn=2), "t2")]
    )
    assert [(s.session, index) for s, index in batch] == [("a", 2), ("b", None), ("a", None)]
    first = batch[0][0]
    assert [seq for seq, _ in first.frames] == [1]
    assert first.end == SegmentEnd(turn=1, seq=2, frame=encode(Done(seq=2, turn=1, reason="stop")), reason="stop", user="u")
    assert first.trace == "t1"
    assert [seq for seq, _ in batch[2][0].frames] == [3]


def test_an_end_redelivered_past_the_limit_is_forced() -> None:
    """A turn end that has waited through every redelivery is stored with what is there."""
    waited = segments_of([Generated("chat.gen.a", end(2), deliveries=FORCE_END_AFTER_DELIVERIES)])
    assert waited[0][0].end is not None and not waited[0][0].end.force
    overdue = segments_of([Generated("chat.gen.a", end(2), deliveries=FORCE_END_AFTER_DELIVERIES + 1)])
    assert overdue[0][0].end is not None and overdue[0][0].end.force


def test_malformed_messages_are_skipped() -> None:
    """Bad subjects and payloads are dropped without losing the good ones."""
    batch = segments_of([Generated("chat.gen.a.b", chunk(1)), Generated("chat.gen.a", b"{junk"), Generated("chat.gen.a", chunk(1))])
    assert [(s.session, len(s.frames)) for s, _ in batch] == [("a", 1)]


@given(
    frames=st.lists(st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\n", b"x")), max_size=30),
    max_bytes=st.integers(min_value=1, max_value=120),
)
def test_delivery_messages_keep_every_frame_in_order_within_the_limit(frames: list[bytes], max_bytes: int) -> None:
    """Split back on newlines (as the gateway does), the messages give the frames in order; each
    message is within ``max_bytes`` unless it is one frame longer than that on its own; and
    two neighbours could not have been one message."""
    messages = delivery_messages(frames, max_bytes)
    assert [frame for message in messages for frame in message.split(b"\n")] == frames
    for message in messages:
        assert len(message) <= max_bytes or b"\n" not in message
    for first, second in itertools.pairwise(messages):
        assert len(first) + 1 + len(second.split(b"\n")[0]) > max_bytes


def test_delivery_messages_one_message_per_batch_under_the_limit() -> None:
    assert delivery_messages([b"a", b"bb", b"c"], 1024) == [b"a\nbb\nc"]
    assert delivery_messages([b"a", b"bb", b"c"], 4) == [b"a\nbb", b"c"]
    assert delivery_messages([], 1024) == []

"""Grouping generated messages into per-session store segments."""

from __future__ import annotations

from services.buffer.service import FORCE_END_AFTER_DELIVERIES, Generated, segments_of
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

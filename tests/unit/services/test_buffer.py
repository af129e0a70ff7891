"""Grouping generated messages into per-session store segments."""

from __future__ import annotations

import msgspec

from services.buffer.service import segments_of
from shared.messages import TurnEnd
from shared.protocol import Chunk, Done, encode


def chunk(seq: int, turn: int = 1) -> bytes:
    return encode(Chunk(seq=seq, turn=turn, text=f"w{seq}"))


def end(seq: int, turn: int = 1) -> bytes:
    return encode(TurnEnd(done=Done(seq=seq, turn=turn, reason="stop"), prompt="p", answer="w1w2"))


def test_frames_group_by_session_in_order() -> None:
    """Each session's frames keep their order; chunk bytes are stored as sent."""
    segments = segments_of([("chat.gen.a", chunk(1), ""), ("chat.gen.b", chunk(1), ""), ("chat.gen.a", chunk(2), "")])
    assert [(s.session, [seq for seq, _ in s.frames]) for s in segments] == [("a", [1, 2]), ("b", [1])]
    assert segments[0].frames[0][1] == chunk(1)
    assert all(s.turn_end is None for s in segments)


def test_turn_end_closes_segment_and_writes_history() -> None:
    """A turn's end closes its segment; the next turn's frames start a new one."""
    segments = segments_of([("chat.gen.a", chunk(1), "t1"), ("chat.gen.a", end(2), "t1"), ("chat.gen.a", chunk(3, turn=2), "t2")])
    assert len(segments) == 2
    first = segments[0]
    assert [seq for seq, _ in first.frames] == [1, 2]
    assert first.frames[1][1] == encode(Done(seq=2, turn=1, reason="stop"))
    assert first.turn_end is not None
    turn, done_seq, entry = first.turn_end
    assert (turn, done_seq) == (1, 2)
    assert msgspec.json.decode(entry) == {
        "turn": 1, "prompt": "p", "answer": "w1w2", "reason": "stop", "first_seq": 0, "last_seq": 2,
    }
    assert [seq for seq, _ in segments[1].frames] == [3]
    assert first.trace == "t1"


def test_malformed_messages_are_skipped() -> None:
    """Bad subjects and payloads are dropped without losing the good ones."""
    segments = segments_of([("chat.gen.a.b", chunk(1), ""), ("chat.gen.a", b"{junk", ""), ("chat.gen.a", chunk(1), "")])
    assert [(s.session, len(s.frames)) for s in segments] == [("a", 1)]

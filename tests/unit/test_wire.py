"""The strict wire checker (tests/wire.py) fails every faulty stream it exists to catch,
and passes the streams the contract allows."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.sse import encode_event
from tests.wire import WireChecker, WireViolation


def ready(session: str = "s", last_seq: int = 0, paused: bool = False) -> str:
    return json.dumps({"type": "ready", "session": session, "last_seq": last_seq, "paused": paused})


def chunk(seq: int, turn: int = 1, text: str | None = None) -> str:
    return json.dumps({"type": "chunk", "seq": seq, "turn": turn, "text": f"t{seq}" if text is None else text})


def done(seq: int, turn: int = 1, reason: str = "stop") -> str:
    return json.dumps({"type": "done", "seq": seq, "turn": turn, "reason": reason})


def frame(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


def two_turns() -> list[str]:
    """Turn 1: seqs 1-3 (done at 3); turn 2: seqs 4-5 (done at 5)."""
    return [frame("accepted", id="a", turn=1), chunk(1), chunk(2), done(3),
            frame("accepted", id="b", turn=2), chunk(4, 2), done(5, 2)]


def feed_all(checker: WireChecker, frames: list[str], *, session: str = "s", last_seq: int = 0) -> None:
    connection = checker.ws(session, last_seq)
    connection.feed(ready(session, max(last_seq, 5)))
    for text in frames:
        connection.feed(text)


HISTORY = {
    "session": "s", "last_seq": 5, "resume_from": 5, "active": None, "turns": [
        {"turn": 1, "prompt": "a", "answer": "t1t2", "reason": "stop", "last_seq": 3},
        {"turn": 2, "prompt": "b", "answer": "t4", "reason": "stop", "last_seq": 5},
    ],
}


def test_a_correct_session_passes_with_history() -> None:
    checker = WireChecker()
    feed_all(checker, two_turns())
    checker.assert_history("s", HISTORY)


def test_reconnect_from_the_cursor_and_replay_of_the_same_frames_pass() -> None:
    checker = WireChecker()
    first = checker.ws("s", 0)
    first.feed(ready())
    first.feed(frame("accepted", turn=1))
    first.feed(chunk(1))
    second = checker.ws("s", 1)
    second.feed(ready(last_seq=2))
    for text in (chunk(2), done(3), frame("accepted", turn=2), chunk(4, 2), done(5, 2)):
        second.feed(text)
    again = checker.ws("s", 0)  # a fresh page replays everything
    again.feed(ready(last_seq=5))
    for text in (chunk(1), chunk(2), done(3), chunk(4, 2), done(5, 2)):
        again.feed(text)
    checker.assert_history("s", HISTORY)


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([chunk(1), chunk(3)], "a gap: seq 3 after 1"),
        ([chunk(1), chunk(1)], "duplicate or reordered seq 1 after 1"),
        ([chunk(2)], "a gap: seq 2 after 0"),
        ([chunk(1), chunk(2), chunk(2)], "duplicate"),
        ([chunk(1), done(2), done(3)], "a second done for turn 1: seq 2 and 3"),
        ([chunk(1), done(2), done(3, 2), done(4, 2)], "a second done for turn 2: seq 3 and 4"),
        ([chunk(1), done(2), chunk(3, 1)], "turn 1 after seq 2"),
        ([chunk(1), chunk(2, 2)], "turn 2 after seq 1"),
        ([chunk(1, 2)], "seq 1 belongs to turn 2"),
        ([chunk(1), frame("paused", seq=1), chunk(2)], "chunk seq 2 while paused at 1"),
        ([chunk(1), frame("paused", seq=1), done(2)], "done seq 2 while paused at 1"),
        ([chunk(1), frame("paused", seq=2)], "paused at seq 2, but this connection delivered up to 1"),
        ([chunk(1), frame("paused", seq=1), frame("resumed", seq=0)], "resumed at seq 0 after paused at 1"),
        ([frame("resumed", seq=0)], "resumed when not paused"),
        ([ready()], "a second ready"),
        ([json.dumps({"type": "chunk", "seq": 1, "turn": 1})], "chunk without text"),
        ([json.dumps({"type": "chunk", "seq": "1", "turn": 1, "text": "x"})], "without a valid seq"),
        ([done(1, reason="finished")], "done with reason 'finished'"),
        ([done(1, reason="error")], "an error done without a message"),
        ([frame("auth_ok", exp="soon")], "auth_ok without an integer exp"),
        ([frame("error", code="invalid")], "error without code and message"),
        ([frame("surprise")], "unknown frame type"),
        (["not json"], "not JSON"),
    ],
)
def test_each_fault_fails(frames: list[str], match: str) -> None:
    checker = WireChecker()
    with pytest.raises(WireViolation, match=match):
        feed_all(checker, frames, last_seq=0)
    assert checker.violations  # kept for taps, whose raise cannot reach the test
    with pytest.raises(WireViolation):
        checker.assert_clean()


def test_the_first_frame_must_be_ready_for_the_session_asked() -> None:
    with pytest.raises(WireViolation, match="not ready"):
        WireChecker().ws("s").feed(chunk(1))
    with pytest.raises(WireViolation, match="ready for session 'other'"):
        WireChecker().ws("s").feed(ready("other"))
    with pytest.raises(WireViolation, match="below the connection's last_seq"):
        WireChecker().ws("s", 4).feed(ready(last_seq=3))


def test_the_same_seq_must_carry_the_same_frame_on_every_connection() -> None:
    checker = WireChecker()
    feed_all(checker, [chunk(1, text="a")])
    with pytest.raises(WireViolation, match="seq 1 was"):
        feed_all(checker, [chunk(1, text="b")])


def test_a_second_done_for_a_turn_fails_even_at_another_seq_on_another_connection() -> None:
    checker = WireChecker()
    feed_all(checker, [chunk(1), done(2)])
    other = checker.ws("s", 2)
    other.feed(ready(last_seq=3))
    with pytest.raises(WireViolation, match="a second done for turn 1"):
        other.feed(done(3))


def test_a_connection_opened_while_paused_delivers_nothing_until_resumed() -> None:
    checker = WireChecker()
    connection = checker.ws("s", 0)
    connection.feed(ready(last_seq=3, paused=True))
    with pytest.raises(WireViolation, match="while paused at 0"):
        connection.feed(chunk(1))
    checker = WireChecker()
    connection = checker.ws("s", 0)
    connection.feed(ready(last_seq=3, paused=True))
    connection.feed(frame("resumed", seq=0))
    connection.feed(chunk(1))
    checker.assert_clean()


def test_pause_and_resume_at_the_cursor_pass() -> None:
    checker = WireChecker()
    feed_all(checker, [chunk(1), frame("paused", seq=1), frame("pong", t=1), frame("paused", seq=1),
                       frame("resumed", seq=1), chunk(2), done(3)])
    checker.assert_clean()


def test_a_jump_is_allowed_only_over_the_range_named_past_retention() -> None:
    checker = WireChecker()
    connection = checker.ws("s", 0)
    connection.feed(ready(last_seq=9))
    connection.feed(frame("error", code="unavailable", message="frames 1..4 are past retention"))
    connection.feed(chunk(5, 2))
    checker.assert_clean()
    connection = WireChecker().ws("s", 2)
    connection.feed(ready(last_seq=9))
    with pytest.raises(WireViolation, match="past retention, but this connection is at 2"):
        connection.feed(frame("error", code="unavailable", message="frames 1..4 are past retention"))


def test_every_accepted_turn_must_end() -> None:
    checker = WireChecker()
    feed_all(checker, [frame("accepted", turn=1), chunk(1)])
    with pytest.raises(AssertionError, match=r"accepted turns \[1\] never delivered a done"):
        checker.assert_ended("s")


def test_history_must_equal_the_text_delivered() -> None:
    checker = WireChecker()
    feed_all(checker, two_turns())
    changed = {**HISTORY, "turns": [{**HISTORY["turns"][0], "answer": "t1t2!"}, HISTORY["turns"][1]]}  # type: ignore[index]
    with pytest.raises(AssertionError, match="differ from the stored answer"):
        checker.assert_history("s", changed)
    missing = WireChecker()
    feed_all(missing, two_turns()[:4])
    with pytest.raises(AssertionError, match="turn 2 is stored but its done was never delivered"):
        missing.assert_history("s", HISTORY)
    missing.assert_history("s", HISTORY, complete=False)


def test_sse_checks_ids_pause_and_the_end_of_a_turn_stream() -> None:
    checker = WireChecker()
    stream = checker.sse("s", 0)
    body = b"retry: 1000\n\n" + b"".join(
        encode_event(text, event=json.loads(text)["type"], id=json.loads(text).get("seq")) for text in (chunk(1), done(2))
    )
    for i in range(len(body)):  # any split of the body
        stream.feed_bytes(body[i : i + 1])
    checker.assert_clean()
    with pytest.raises(WireViolation, match="id '7' for seq 1"):
        WireChecker().sse("s", 0).feed_bytes(encode_event(chunk(1), event="chunk", id=7))
    with pytest.raises(WireViolation, match="a gap"):
        WireChecker().sse("s", 3).feed_bytes(encode_event(chunk(5), event="chunk", id=5))
    turn = WireChecker().sse("s", None, turn=1)
    turn.feed_bytes(encode_event(done(1), event="done", id=1))
    with pytest.raises(WireViolation, match="after the turn's done"):
        turn.feed_bytes(encode_event(frame("paused", seq=1), event="paused"))
    paused = WireChecker().sse("s", 0)
    paused.feed_bytes(encode_event(frame("paused", seq=0), event="paused"))
    with pytest.raises(WireViolation, match="while paused"):
        paused.feed_bytes(encode_event(chunk(1), event="chunk", id=1))


def test_compat_text_must_be_the_stored_text_once_and_in_order() -> None:
    checker = WireChecker()
    compat = checker.compat("s")
    for text in ("t2", "t4"):
        compat.feed(text)
    compat.assert_history(HISTORY)
    twice = checker.compat("s")
    for text in ("t4", "t4"):
        twice.feed(text)
    with pytest.raises(AssertionError, match="not the stored text"):
        twice.assert_history(HISTORY)
    with pytest.raises(WireViolation, match="JSON frame on a plain-text"):
        checker.compat("s").feed(chunk(1))


def test_the_tap_records_instead_of_raising_into_the_client() -> None:
    checker = WireChecker()
    tap = checker.tap()
    tap.opened("/ws?session=s&last_seq=0")
    tap.received(ready())
    tap.received(chunk(2))  # a gap: recorded, not raised
    tap.closed()
    assert checker.violations and "a gap" in checker.violations[0]
    with pytest.raises(WireViolation):
        checker.assert_clean()


def test_sse_allows_the_jump_over_frames_past_retention_too() -> None:
    checker = WireChecker()
    stream = checker.sse("s", 0)
    stream.feed_bytes(encode_event(frame("error", code="unavailable", message="frames 1..4 are past retention"), event="error"))
    stream.feed_bytes(encode_event(chunk(5, 2), event="chunk", id=5))
    checker.assert_clean()
    assert stream.skipped == [(1, 4)]


def test_one_fault_is_reported_once_per_connection() -> None:
    """After a violation the connection's state is unknown: later frames on it are not checked
    (a wrong resumed seq would otherwise flag every later chunk), other connections still are."""
    checker = WireChecker()
    connection = checker.ws("s", 0)
    connection.feed(ready(last_seq=9))
    connection.feed(chunk(1))
    connection.feed(frame("paused", seq=1))
    with pytest.raises(WireViolation):
        connection.feed(frame("resumed", seq=2))
    for seq in range(2, 6):
        connection.feed(chunk(seq))
    assert len(checker.violations) == 1
    other = checker.ws("s", 0)
    other.feed(ready(last_seq=9))
    with pytest.raises(WireViolation, match="a gap"):
        other.feed(chunk(2))
    assert len(checker.violations) == 2

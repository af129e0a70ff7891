"""Faulty streams found by trying to get past the strict wire checker, each of
which it must reject, and legal streams it must accept (a false alarm would
make tests flaky). What it cannot see is listed in tests/wire.py's module doc."""

from __future__ import annotations

import json

import pytest

from shared.sse import encode_event
from tests.unit.test_wire import HISTORY, chunk, done, feed_all, frame, ready, two_turns
from tests.wire import WireChecker, WireViolation

REJECT = pytest.raises((WireViolation, AssertionError))


def sse(text: str, id: object = "auto", event: str | None = None) -> bytes:
    """An SSE event as the gateway writes it: only chunk and done carry an id."""
    f = json.loads(text)
    auto = f.get("seq") if f["type"] in ("chunk", "done") else None
    return encode_event(text, event=event or f["type"], id=auto if id == "auto" else id)  # type: ignore[arg-type]


# --- faulty streams it must reject --------------------------------------------


def test_done_of_wrong_turn_before_a_known_next_chunk() -> None:
    c = WireChecker()
    a = c.ws("s", 3)
    a.feed(ready(last_seq=5))
    a.feed(chunk(4, 2))
    a.feed(done(5, 2))
    b = c.ws("s", 2)
    b.feed(ready(last_seq=5))
    with REJECT:
        b.feed(done(3, turn=7))  # turn 7's done at 3, then turn 2 at 4


def test_done_of_turn_2_before_a_known_chunk_of_turn_2() -> None:
    c = WireChecker()
    a = c.ws("s", 3)
    a.feed(ready(last_seq=4))
    a.feed(chunk(4, 2))
    b = c.ws("s", 2)
    b.feed(ready(last_seq=4))
    with REJECT:
        b.feed(done(3, turn=2))  # turn 2 done at 3, its chunk at 4


def test_chunk_of_next_turn_before_previous_done_on_other_connection() -> None:
    c = WireChecker()
    a = c.ws("s", 9)
    a.feed(ready(last_seq=10))
    a.feed(done(10, 1))
    b = c.ws("s", 4)
    b.feed(ready(last_seq=10))
    with REJECT:
        b.feed(chunk(5, 2))  # turn 2 chunk at 5, turn 1 done at 10


def test_chunk_of_turn_1_after_turn_2_done() -> None:
    c = WireChecker()
    a = c.ws("s", 4)
    a.feed(ready(last_seq=10))
    a.feed(done(5, 2))
    b = c.ws("s", 7)
    b.feed(ready(last_seq=10))
    with REJECT:
        b.feed(chunk(8, 1))  # turns going backwards


def test_error_done_without_message() -> None:
    with REJECT:
        feed_all(WireChecker(), [chunk(1), done(2, reason="error")])


def test_accepted_turn_bool_zero_negative() -> None:
    for bad in (True, 0, -3):
        with REJECT:
            feed_all(WireChecker(), [frame("accepted", id="a", turn=bad)])


def test_accepted_reuses_a_finished_turn_number() -> None:
    c = WireChecker()
    with REJECT:
        feed_all(c, [frame("accepted", id="a", turn=1), chunk(1), done(2), frame("accepted", id="b", turn=1)])
        c.assert_ended("s")


def test_paused_resumed_seq_bool_or_float() -> None:
    with REJECT:
        feed_all(WireChecker(), [chunk(1), frame("paused", seq=True), frame("resumed", seq=1.0)])


def test_ready_last_seq_bool() -> None:
    with REJECT:
        WireChecker().ws("s", 0).feed(json.dumps({"type": "ready", "session": "s", "last_seq": True, "paused": False}))


def test_ready_last_seq_below_what_the_session_already_delivered() -> None:
    c = WireChecker()
    feed_all(c, [chunk(1), chunk(2), done(3)])
    with REJECT:
        c.ws("s", 0).feed(ready(last_seq=1))  # the session's stored hwm is at least 3


def test_duplicate_json_keys() -> None:
    with REJECT:
        feed_all(WireChecker(), ['{"type":"chunk","seq":7,"seq":1,"turn":1,"text":"x"}'])


def test_nan_is_not_json() -> None:
    with REJECT:
        feed_all(WireChecker(), ['{"type":"pong","t":NaN}'])


def test_lone_surrogate_in_chunk_text() -> None:
    with REJECT:
        feed_all(WireChecker(), ['{"type":"chunk","seq":1,"turn":1,"text":"\\ud83d"}'])


def test_chunk_over_16_kib() -> None:
    with REJECT:
        feed_all(WireChecker(), [chunk(1, text="x" * 40000)])


def test_unknown_error_code() -> None:
    with REJECT:
        feed_all(WireChecker(), [frame("error", code="kaboom", message="?")])


def test_history_missing_a_turn() -> None:
    c = WireChecker()
    feed_all(c, two_turns())
    with REJECT:
        c.assert_history("s", {**HISTORY, "turns": [HISTORY["turns"][1]]})  # type: ignore[index]


def test_history_turn_listed_twice_and_resume_from_wrong() -> None:
    c = WireChecker()
    feed_all(c, two_turns())
    with REJECT:
        c.assert_history("s", {**HISTORY, "resume_from": 1, "turns": [*HISTORY["turns"], HISTORY["turns"][1]]})  # type: ignore[misc]


def test_history_extra_text_missed_after_resume_from() -> None:
    """The documented flow: read history, open at last_seq=resume_from; turn 2's text is never compared."""
    c = WireChecker()
    w = c.ws("s", 3)
    w.feed(ready(last_seq=3))
    w.feed(chunk(4, 2, text="t4 PLUS EXTRA"))
    w.feed(done(5, 2))
    with REJECT:
        c.assert_history("s", HISTORY, complete=False)


def test_sse_non_seq_event_with_an_id() -> None:
    c = WireChecker()
    s = c.sse("s", 0)
    s.feed_bytes(sse(chunk(1)))
    with REJECT:
        s.feed_bytes(sse(frame("paused", seq=1), id=99))  # EventSource would reconnect from 99


def test_sse_turn_1_stream_starting_at_seq_3() -> None:
    c = WireChecker()
    s = c.sse("s", None, turn=1)
    with REJECT:
        s.feed_bytes(sse(chunk(3)))
        s.feed_bytes(sse(done(4)))
        c.assert_ended("s")


def test_sse_invalid_utf8_in_body() -> None:
    c = WireChecker()
    s = c.sse("s", 0)
    with REJECT:
        s.feed_bytes(b'id: 1\nevent: chunk\ndata: {"type":"chunk","seq":1,"turn":1,"text":"\xff\xfe"}\n\n')


def test_compat_json_frame_with_leading_space() -> None:
    with REJECT:
        WireChecker().compat("s").feed(' {"type":"ready","session":"s"}')


# --- legal streams it must accept ------------------------------------------------


def test_legal_compat_model_answers_with_json() -> None:
    WireChecker().compat("s").feed('{"type": "object", "properties": {}}')


def test_legal_turn_sse_stream_retention_error_after_pause() -> None:
    """POST /api/chat (SSE) while paused: paused{seq: base}, the turn outgrows the
    per-session cap while paused, resume replays from the oldest stored frame."""
    c = WireChecker()
    s = c.sse("s", None, turn=1)
    s.feed_bytes(sse(frame("paused", seq=0)))
    s.feed_bytes(sse(frame("resumed", seq=0)))
    s.feed_bytes(sse(frame("error", code="unavailable", message="frames 1..4 are past retention")))
    s.feed_bytes(sse(chunk(5)))
    s.feed_bytes(sse(done(6)))
    c.assert_clean()


def test_legal_ws_paused_resume_replay_interleaving() -> None:
    c = WireChecker()
    a = c.ws("s", 0)
    a.feed(ready(last_seq=0))
    b = c.ws("s", 0)
    b.feed(ready(last_seq=0))
    a.feed(chunk(1))
    a.feed(frame("paused", seq=1))
    b.feed(chunk(1))
    b.feed(chunk(2))
    b.feed(frame("paused", seq=2))
    late = c.ws("s", 1)
    late.feed(ready(last_seq=4, paused=True))
    late.feed(frame("paused", seq=1))
    a.feed(frame("resumed", seq=1))
    a.feed(chunk(2))
    a.feed(chunk(3))
    a.feed(done(4))
    b.feed(frame("resumed", seq=2))
    b.feed(chunk(3))
    b.feed(done(4))
    late.feed(frame("resumed", seq=1))
    late.feed(chunk(2))
    late.feed(chunk(3))
    late.feed(done(4))
    low = c.ws("s", 2)
    low.feed(ready(last_seq=4))
    low.feed(chunk(3))
    low.feed(done(4))
    c.assert_clean()


def test_legal_sse_events_opened_while_paused() -> None:
    c = WireChecker()
    feed_all(c, [chunk(1), chunk(2), done(3)])
    s = c.sse("s", 2)
    s.feed_bytes(b"retry: 1000\n\n" + sse(frame("paused", seq=2)) + b": keep-alive\n\n")
    s.feed_bytes(sse(frame("resumed", seq=2)) + sse(done(3)))
    t = c.sse("s", None, turn=2)
    t.feed_bytes(sse(frame("paused", seq=3)) + sse(frame("resumed", seq=3)) + sse(chunk(4, 2)) + sse(done(5, 2)))
    c.assert_clean()


def test_legal_errors_with_id_and_retention() -> None:
    c = WireChecker()
    w = c.ws("s", 0)
    w.feed(ready(last_seq=9))
    w.feed(frame("error", code="rate_limited", message="slow down", id="c1"))
    w.feed(frame("error", code="busy", message="a turn is generating", id="c2"))
    w.feed(frame("error", code="unavailable", message="frames 1..4 are past retention"))
    w.feed(chunk(5, 2))
    w.feed(frame("paused", seq=5))
    w.feed(frame("resumed", seq=5))
    c.assert_clean()


# --- held: faults the checker does catch ----------------------------------


@pytest.mark.parametrize("seq", [0, -1, True, 1.0, None, "1"])
def test_held_bad_chunk_seq(seq: object) -> None:
    with pytest.raises(WireViolation):
        feed_all(WireChecker(), [json.dumps({"type": "chunk", "seq": seq, "turn": 1, "text": "x"})])


def test_held_misc() -> None:
    c = WireChecker()
    feed_all(c, [chunk(1, text="a")])
    with pytest.raises(WireViolation):  # text differs between connections
        s = c.sse("s", 0)
        s.feed_bytes(sse(chunk(1, text="b")))
    with pytest.raises(WireViolation):  # resumed without paused on SSE
        WireChecker().sse("s", 0).feed_bytes(sse(frame("resumed", seq=0)))
    with pytest.raises(WireViolation):  # event name differs from the frame type
        WireChecker().sse("s", 0).feed_bytes(sse(chunk(1), event="done"))
    t = WireChecker().sse("s", None, turn=1)
    t.feed_bytes(sse(chunk(1)) + sse(done(2)))
    with pytest.raises(WireViolation):  # anything after a turn stream's done
        t.feed_bytes(sse(chunk(3, 2)))
    c2 = WireChecker()
    feed_all(c2, [frame("accepted", turn=2), *two_turns()[:4]])
    with pytest.raises(AssertionError):  # accepted turn that never ends
        c2.assert_ended("s")

"""The client's sans-I/O session: dedupe, offline queue, chat resends, pause intent, close codes."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest

from shared.client.session import (
    ChatRejected,
    CloseAction,
    GapDetected,
    OfflineQueueFull,
    SessionState,
    close_action,
    handshake_action,
)
from shared.protocol import (
    Accepted,
    Chat,
    Chunk,
    Done,
    LastChat,
    Pause,
    Paused,
    Ping,
    Ready,
    Resume,
    Resumed,
    Stop,
    encode,
)


def ready(session: str = "s1", paused: bool = False) -> str:
    return encode(Ready(session=session, last_seq=0, paused=paused)).decode()


def chunk(seq: int) -> str:
    return encode(Chunk(seq=seq, turn=1, text=f"w{seq}")).decode()


def sent(state: SessionState) -> list[dict[str, object]]:
    return [json.loads(data) for data in state.data_to_send()]


def test_url_carries_session_and_cursor() -> None:
    """Reconnect URLs name the session and the last seq, keeping other parameters."""
    state = SessionState()
    assert state.url("ws://h/ws") == "ws://h/ws?last_seq=0"
    state.receive(ready("abc"))
    state.receive(chunk(1))
    assert state.url("ws://h/ws?x=1") == "ws://h/ws?x=1&session=abc&last_seq=1"


def test_url_of_a_joined_session_carries_token_and_keeps_parameters() -> None:
    """A session given up front is joined from the first connection; the token goes in the query;
    every parameter of the base URL is kept, a value holding "=" included."""
    state = SessionState(session="s9", last_seq=4)
    assert state.url("ws://h/ws?sig=a=b&x=1", token="t1") == "ws://h/ws?sig=a%3Db&x=1&session=s9&last_seq=4&token=t1"


def test_duplicates_dropped_and_cursor_advances() -> None:
    """Frames at or below last_seq (replayed after a reconnect) are dropped."""
    state = SessionState(last_seq=2)
    state.receive(ready())
    assert state.receive(chunk(2)) == []
    assert [f.seq for f in state.receive(chunk(3))] == [3]  # type: ignore[union-attr]
    assert state.receive(chunk(3)) == []
    assert state.last_seq == 3


def test_gap_is_detected() -> None:
    """A skipped seq raises, so the connection is replaced and resumed."""
    state = SessionState()
    state.receive(ready())
    state.receive(chunk(1))
    with pytest.raises(GapDetected, match="got seq 3 after 1"):
        state.receive(chunk(3))


def test_offline_frames_go_out_in_order_after_ready() -> None:
    """Frames sent while offline are sent in order once the next connection is ready."""
    state = SessionState()
    state.send(Stop())
    state.send(Ping(t=1))
    state.send(Ping(t=2))
    assert state.data_to_send() == []
    state.receive(ready())
    assert sent(state) == [{"type": "stop"}, {"type": "ping", "t": 1}, {"type": "ping", "t": 2}]


def test_offline_queue_is_bounded() -> None:
    """More frames than max_queue while offline is an error, not unbounded memory."""
    state = SessionState(max_queue=2)
    state.send(Ping(t=1))
    state.send(Ping(t=2))
    with pytest.raises(OfflineQueueFull):
        state.send(Ping(t=3))


def test_chat_gets_an_id_and_is_resent_until_acknowledged() -> None:
    """A chat without id gets one; it is resent on every reconnect until accepted."""
    state = SessionState()
    state.receive(ready())
    frame = state.send(Chat(prompt="hi"))
    assert isinstance(frame, Chat) and frame.id
    assert sent(state) == [{"type": "chat", "prompt": "hi", "id": frame.id}]
    state.connection_lost()
    state.receive(ready())
    assert sent(state) == [{"type": "chat", "prompt": "hi", "id": frame.id}]
    state.receive(json.dumps({"type": "accepted", "turn": 1, "id": frame.id}))
    state.connection_lost()
    state.receive(ready())
    assert sent(state) == []


def test_chat_accepted_before_the_drop_is_not_resent() -> None:
    """A chat whose accepted was lost with the connection is reported accepted from ready.last_chat,
    not resent (a resend after its turn ended would start a second turn); other chats are resent."""
    state = SessionState()
    state.receive(ready())
    lost = state.send(Chat(prompt="hi", id="a"))
    other = state.send(Chat(prompt="and this", id="b"))
    state.data_to_send()
    state.connection_lost()
    frames = state.receive(encode(Ready(session="s1", last_seq=9, paused=False, last_chat=LastChat(id="a", turn=3))).decode())
    assert frames[1:] == [Accepted(id="a", turn=3)] and lost.id not in state.unacknowledged  # type: ignore[union-attr]
    assert sent(state) == [{"type": "chat", "prompt": "and this", "id": other.id}]
    state.connection_lost()
    assert state.receive(encode(Ready(session="s1", last_seq=9, paused=False, last_chat=LastChat(id="a", turn=3))).decode())[1:] == []


def test_a_chat_never_sent_is_not_taken_for_the_last_accepted_one() -> None:
    """A new client (a page load) whose chat reuses the id of the session's last accepted chat sends it:
    only a chat written to an earlier connection can be the one ready.last_chat names."""
    state = SessionState(session="s1")
    state.send(Chat(prompt="continue", id="c1"))  # before the first ready: never sent
    frames = state.receive(encode(Ready(session="s1", last_seq=9, paused=False, last_chat=LastChat(id="c1", turn=3))).decode())
    assert frames[1:] == []
    assert sent(state) == [{"type": "chat", "prompt": "continue", "id": "c1"}]


def test_refused_chat_is_not_resent() -> None:
    """An error naming the chat's id settles it."""
    state = SessionState()
    state.receive(ready())
    frame = state.send(Chat(prompt=" ", id="c9"))
    state.data_to_send()
    state.receive(json.dumps({"type": "error", "code": "invalid", "message": "x", "id": "c9"}))
    assert frame.id not in state.unacknowledged  # type: ignore[union-attr]


def test_accepted_for_an_unknown_chat_is_ignored() -> None:
    """An accepted or error naming a chat this client does not hold (another client's, a repeat) is harmless."""
    state = SessionState()
    state.receive(ready())
    assert state.receive(json.dumps({"type": "accepted", "turn": 1, "id": "other"})) == [Accepted(turn=1, id="other")]
    state.receive(json.dumps({"type": "error", "code": "busy", "message": "x", "id": "other"}))


def test_an_accepted_chat_named_again_by_ready_is_not_reported_twice() -> None:
    """A chat whose accepted arrived is settled: ready.last_chat naming it later reports nothing and resends nothing."""
    state = SessionState()
    state.receive(ready())
    state.send(Chat(prompt="hi", id="a"))
    state.data_to_send()
    state.receive(json.dumps({"type": "accepted", "turn": 1, "id": "a"}))
    state.connection_lost()
    frames = state.receive(encode(Ready(session="s1", last_seq=0, paused=False, last_chat=LastChat(id="a", turn=1))).decode())
    assert frames[1:] == [] and sent(state) == []


def test_a_chat_resent_on_reconnect_is_recognised_by_the_next_ready() -> None:
    """A chat written on a reconnect (sent offline) counts as sent: if the next ready says it was
    accepted, it is reported accepted, not sent a third time."""
    state = SessionState()
    state.send(Chat(prompt="offline", id="c1"))
    state.receive(ready())
    assert sent(state) == [{"type": "chat", "prompt": "offline", "id": "c1"}]
    state.connection_lost()
    frames = state.receive(encode(Ready(session="s1", last_seq=0, paused=False, last_chat=LastChat(id="c1", turn=1))).decode())
    assert frames[1:] == [Accepted(id="c1", turn=1)] and sent(state) == []


def test_frames_sent_after_the_connection_is_lost_wait_for_the_next_ready() -> None:
    """After connection_lost nothing is written until the next ready; frames go to the offline queue."""
    state = SessionState(max_queue=1)
    state.receive(ready())
    state.connection_lost()
    state.send(Ping(t=1))
    assert state.data_to_send() == []
    with pytest.raises(OfflineQueueFull):
        state.send(Ping(t=2))
    state.receive(ready())
    assert sent(state) == [{"type": "ping", "t": 1}]


def test_chat_rejected_carries_the_servers_code_and_message() -> None:
    """The exception for a refused chat exposes the error frame's code and message."""
    error = ChatRejected("busy", "a turn is running")
    assert (error.code, error.message) == ("busy", "a turn is running")
    assert str(error) == "the chat was refused: busy: a turn is running"


def test_chat_sent_offline_goes_once() -> None:
    """A chat sent while offline is sent once on reconnect, not twice."""
    state = SessionState()
    state.send(Chat(prompt="offline", id="c1"))
    state.receive(ready())
    assert sent(state) == [{"type": "chat", "prompt": "offline", "id": "c1"}]


@pytest.mark.parametrize(
    ("want", "server_paused", "expected"),
    [(Pause(), False, [{"type": "pause"}]), (Pause(), True, []), (Resume(), True, [{"type": "resume"}]), (Resume(), False, [])],
)
def test_pause_intent_reconciled_on_reconnect(want: object, server_paused: bool, expected: list[object]) -> None:
    """A pause or resume asked while offline is sent only if the session is not already so."""
    state = SessionState()
    state.send(want)  # type: ignore[arg-type]
    state.receive(ready(paused=server_paused))
    assert sent(state) == expected


def test_answered_pause_is_not_resent() -> None:
    """Once the server answers paused, a reconnect does not pause again."""
    state = SessionState()
    state.receive(ready())
    state.send(Pause())
    state.data_to_send()
    state.receive(json.dumps({"type": "paused", "seq": 0}))
    state.connection_lost()
    state.receive(ready(paused=True))
    assert sent(state) == [] and state.paused


def test_answered_pause_does_not_override_a_later_resume() -> None:
    """A pause the server answered is settled: if another connection resumed meanwhile, a reconnect
    does not pause again."""
    state = SessionState()
    state.receive(ready())
    state.send(Pause())
    state.data_to_send()
    assert not state.paused
    state.receive(encode(Paused(seq=0)).decode())
    assert state.paused and state.want_paused is None
    state.connection_lost()
    state.receive(ready(paused=False))
    assert sent(state) == [] and not state.paused


def test_answered_resume_does_not_override_a_later_pause() -> None:
    """Likewise a resume the server answered: a pause from elsewhere meanwhile stands after a reconnect."""
    state = SessionState()
    state.receive(ready(paused=True))
    state.send(Resume())
    state.data_to_send()
    state.receive(encode(Resumed(seq=0)).decode())
    assert not state.paused and state.want_paused is None
    state.connection_lost()
    state.receive(ready(paused=True))
    assert sent(state) == [] and state.paused


def test_a_pause_still_wanted_survives_an_unrelated_resumed() -> None:
    """A resumed frame (another connection's, in flight) does not settle the pause this client asked
    for and has not seen answered: a reconnect to an unpaused session sends the pause again."""
    state = SessionState()
    state.receive(ready())
    state.send(Pause())
    state.data_to_send()
    state.receive(encode(Resumed(seq=0)).decode())
    state.connection_lost()
    state.receive(ready(paused=False))
    assert sent(state) == [{"type": "pause"}]


def test_done_advances_cursor() -> None:
    """done counts in the seq like chunk."""
    state = SessionState()
    state.receive(ready())
    state.receive(chunk(1))
    state.receive(encode(Done(seq=2, turn=1, reason="stop")).decode())
    assert state.last_seq == 2


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (None, CloseAction.RECONNECT),
        (1001, CloseAction.RECONNECT),
        (1005, CloseAction.RECONNECT),
        (1006, CloseAction.RECONNECT),
        (1011, CloseAction.RECONNECT),
        (1012, CloseAction.RECONNECT),
        (1013, CloseAction.RECONNECT),
        (1014, CloseAction.RECONNECT),
        (4001, CloseAction.REFRESH_TOKEN),
        (1000, CloseAction.STOP),
        (1008, CloseAction.STOP),
        (1009, CloseAction.STOP),
        (4003, CloseAction.STOP),
        (4999, CloseAction.STOP),
    ],
)
def test_close_codes(code: int | None, action: CloseAction) -> None:
    """1012, 1013 and network errors reconnect; 4001 refreshes; 1008 and 4003 stop."""
    assert close_action(code) is action


@pytest.mark.parametrize(
    ("status", "action"),
    [
        (400, CloseAction.STOP),
        (401, CloseAction.REFRESH_TOKEN),
        (403, CloseAction.STOP),
        (408, CloseAction.RECONNECT),
        (429, CloseAction.RECONNECT),
        (499, CloseAction.STOP),
        (500, CloseAction.RECONNECT),
        (503, CloseAction.RECONNECT),
    ],
)
def test_handshake_refusals(status: int, action: CloseAction) -> None:
    """A refused upgrade: 401 refreshes the token, 408/429/5xx retry, 400/403 and other 4xx stop."""
    assert handshake_action(status) is action


def test_url_keeps_the_base_query_values_as_given() -> None:
    """A percent-encoded value, a '+' for a space and a blank value in the base URL keep their meaning."""
    state = SessionState(session="a b", last_seq=4)
    url = state.url("ws://h/ws?name=a%20b&plus=x+y&blank=&x=1", token="t==")
    query = parse_qs(urlsplit(url).query, keep_blank_values=True)
    assert query == {"name": ["a b"], "plus": ["x y"], "blank": [""], "x": ["1"], "session": ["a b"], "last_seq": ["4"], "token": ["t=="]}

"""Client frame parsing and validation, server frame encoding."""

from __future__ import annotations

import json

import pytest

from shared import protocol
from shared.errors import ProtocolError
from shared.protocol import (
    Accepted,
    Chat,
    Chunk,
    Done,
    Ping,
    Ready,
    decode_client_frame,
    decode_compat_frame,
    decode_server_frame,
    encode,
    frame_seq,
    validate_prompt,
)


def decode(data: str) -> protocol.ClientFrame:
    return decode_client_frame(data)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ('{"type":"chat","prompt":"hi","id":"c1"}', Chat(prompt="hi", id="c1")),
        ('{"type":"chat","prompt":"hi"}', Chat(prompt="hi")),
        ('{"type":"pause"}', protocol.Pause()),
        ('{"type":"resume"}', protocol.Resume()),
        ('{"type":"stop"}', protocol.Stop()),
        ('{"type":"ping","t":5}', Ping(t=5)),
        ('{"type":"ping"}', Ping()),
        ('{"type":"auth","token":"abc"}', protocol.Auth(token="abc")),
        ('{"type":"ack","seq":3}', protocol.Ack(seq=3)),
    ],
)
def test_decodes_every_client_frame(data: str, expected: object) -> None:
    """Each client frame of docs/protocol.md decodes to its type."""
    assert decode(data) == expected


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ("{", "invalid"),
        ("", "invalid"),
        ("null", "invalid"),
        ('{"type":"nope"}', "invalid"),
        ('{"prompt":"x"}', "invalid"),
        ('{"type":"chat"}', "invalid"),
        ('{"type":"chat","prompt":"x","id":"' + "i" * 129 + '"}', "invalid"),
        ('{"type":"ack","seq":"3"}', "invalid"),
        ('{"type":"stop","turn":1}', "invalid"),
        ('{"type":"ping","t":' + "[" * 5000 + "]" * 5000 + "}", "invalid"),  # nested past msgspec's guard
        ('{"type":"ping","t":' + '{"a":' * 986 + "1" + "}" * 986 + "}", "invalid"),  # decodes, but no pong encodes
        ('{"type":"ping","t":' + "[" * 33 + "]" * 33 + "}", "invalid"),
    ],
)
def test_rejects_bad_frames_with_code(data: str, code: str) -> None:
    """Bad frames raise ProtocolError carrying the error code to send."""
    with pytest.raises(ProtocolError) as error:
        decode(data)
    assert error.value.code == code
    assert isinstance(error.value.message, str) and error.value.message  # the error frame's message is a string


@pytest.mark.parametrize(("prompt", "code"), [("", "invalid"), (" \n", "invalid"), ("x" * 101, "too_big")])
def test_prompt_validation(prompt: str, code: str) -> None:
    """Blank prompts are invalid; prompts over the limit are too_big."""
    with pytest.raises(ProtocolError) as error:
        validate_prompt(prompt, max_prompt_chars=100)
    assert error.value.code == code
    assert isinstance(error.value.message, str) and error.value.message


def test_chat_id_at_the_limit_is_accepted() -> None:
    """A chat id of exactly 128 characters passes (129 is refused, above)."""
    assert decode('{"type":"chat","prompt":"x","id":"' + "i" * 128 + '"}') == Chat(prompt="x", id="i" * 128)


def test_ping_t_nesting_counts_objects_too() -> None:
    """Objects nest like arrays: a ping's t of 33 nested objects is refused, 32 pass."""
    def nested(depth: int) -> str:
        return '{"a":' * depth + "1" + "}" * depth

    with pytest.raises(ProtocolError):
        decode('{"type":"ping","t":' + nested(33) + "}")
    assert isinstance(decode('{"type":"ping","t":' + nested(32) + "}"), Ping)


def test_bad_server_frame_raises_protocol_error() -> None:
    """A client reading something that is not a server frame gets a ProtocolError with a message."""
    with pytest.raises(ProtocolError) as error:
        decode_server_frame('{"type":"chunk"}')
    assert isinstance(error.value.message, str) and error.value.message


def test_prompt_at_the_limit_is_accepted() -> None:
    """A prompt of exactly the limit passes."""
    assert validate_prompt("x" * 100, max_prompt_chars=100) == "x" * 100


def test_server_frames_encode_per_protocol() -> None:
    """Server frames carry type and the documented fields; None fields are omitted."""
    assert json.loads(encode(Ready(session="s", last_seq=4, paused=True))) == {
        "type": "ready", "session": "s", "last_seq": 4, "paused": True,
    }
    assert json.loads(encode(Done(seq=9, turn=2, reason="error", message="m"))) == {
        "type": "done", "seq": 9, "turn": 2, "reason": "error", "message": "m",
    }
    assert json.loads(encode(Accepted(turn=1, id="c"))) == {"type": "accepted", "turn": 1, "id": "c"}
    assert "message" not in json.loads(encode(Done(seq=1, turn=1, reason="stop")))


def test_server_frames_round_trip_and_seq() -> None:
    """Encoded frames decode back, and frame_seq reads the seq cheaply."""
    data = encode(Chunk(seq=12, turn=3, text="hé"))
    assert decode_server_frame(data) == Chunk(seq=12, turn=3, text="hé")
    assert frame_seq(data) == 12


@pytest.mark.parametrize(
    ("data", "action"),
    [('{"action":"pause"}', "pause"), ('{"action":"resume"}', "resume"), ('{"type":"ping"}', "ping"), ("junk", None), ('{"action":"fly"}', None),
     ("{}", None), ('{"type":"chat","prompt":"x"}', None)],
)
def test_compat_frames(data: str, action: str | None) -> None:
    """The original client's frames map to pause/resume and its heartbeat to ping; the rest is ignored."""
    assert decode_compat_frame(data) == action


@pytest.mark.parametrize(
    ("frame", "counts"),
    [
        (protocol.Ping(t=1), False),
        (protocol.Ack(seq=5), False),
        ("ping", False),
        (protocol.Chat(prompt="hi"), True),
        (protocol.Pause(), True),
        ("pause", True),
        (None, True),  # unreadable input costs the sender its rate
    ],
)
def test_heartbeats_and_acks_are_never_rate_limited(frame: object, counts: bool) -> None:
    """ping and ack never count against the frame rate limit (guarantee 6); everything else does."""
    assert protocol.rate_limited(frame) is counts  # type: ignore[arg-type]


def test_prompt_with_a_lone_surrogate_is_invalid() -> None:
    """A prompt holding half a surrogate pair (valid JSON, invalid Unicode) is refused as invalid."""
    with pytest.raises(ProtocolError, match="not valid Unicode") as error:
        protocol.validate_prompt("hi \ud83d", max_prompt_chars=100)
    assert error.value.code == "invalid"


def test_a_ping_t_within_the_nesting_limit_round_trips() -> None:
    """A ping's t nested up to the limit is echoed as is."""
    t = [[{"a": [1, "x"]}]] * 3
    frame = decode_client_frame(json.dumps({"type": "ping", "t": t}))
    assert isinstance(frame, Ping) and json.loads(encode(protocol.Pong(t=frame.t))) == {"type": "pong", "t": t}
    deepest = json.loads("[" * 32 + "]" * 32)
    assert decode_client_frame(json.dumps({"type": "ping", "t": deepest})) == Ping(t=deepest)


@pytest.mark.parametrize(("ping", "pong"), [
    ('{"type":"ping"}', {"type": "pong"}),
    ('{"type":"ping","t":null}', {"type": "pong", "t": None}),
    ('{"type":"ping","t":0}', {"type": "pong", "t": 0}),
    ('{"type":"ping","t":false}', {"type": "pong", "t": False}),
])
def test_pong_echoes_t_exactly_a_null_included(ping: str, pong: dict[str, object]) -> None:
    """t may be any JSON and is echoed as sent; a ping without t gets a pong without one."""
    frame = decode_client_frame(ping)
    assert isinstance(frame, Ping)
    assert json.loads(encode(protocol.Pong(t=frame.t))) == pong

"""Client protocol version 1 (docs/protocol.md): frames in both directions.

Frames are ``msgspec.Struct`` types tagged by ``type``; ``ClientFrame`` and
``ServerFrame`` are the unions per direction. :func:`decode_client_frame` is
the single place where client input becomes a typed frame or a
:class:`~shared.errors.ProtocolError` carrying the error ``code`` to send back.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from .errors import ProtocolError

__all__ = [
    "SUBPROTOCOL",
    "CLOSE_1000_NORMAL",
    "CLOSE_1008_POLICY",
    "CLOSE_1009_TOO_BIG",
    "CLOSE_1011_INTERNAL",
    "CLOSE_1012_RESTARTING",
    "CLOSE_1013_TRY_AGAIN_LATER",
    "CLOSE_4001_TOKEN_EXPIRED",
    "CLOSE_4003_FORBIDDEN",
    "DoneReason",
    "ErrorCode",
    "Chat",
    "Pause",
    "Resume",
    "Stop",
    "Ping",
    "Auth",
    "Ack",
    "ClientFrame",
    "Ready",
    "LastChat",
    "Accepted",
    "Chunk",
    "Done",
    "Paused",
    "Resumed",
    "Pong",
    "AuthOk",
    "Error",
    "ServerFrame",
    "decode_client_frame",
    "decode_server_frame",
    "encode",
    "frame_seq",
    "validate_prompt",
    "CompatAction",
    "decode_compat_frame",
    "rate_limited",
]

SUBPROTOCOL = "chat.v1"

CLOSE_1000_NORMAL = 1000
CLOSE_1008_POLICY = 1008
CLOSE_1009_TOO_BIG = 1009
CLOSE_1011_INTERNAL = 1011
CLOSE_1012_RESTARTING = 1012
# Extension: a reader too slow for its send queue; reconnect with last_seq.
CLOSE_1013_TRY_AGAIN_LATER = 1013
CLOSE_4001_TOKEN_EXPIRED = 4001
CLOSE_4003_FORBIDDEN = 4003

DoneReason = Literal["stop", "length", "stopped", "error"]
ErrorCode = Literal[
    "invalid", "busy", "unauthorized", "forbidden", "rate_limited", "too_big", "unavailable"
]

MAX_CLIENT_ID_CHARS = 128
MAX_PING_NESTING = 32  # a ping's ``t`` is echoed: msgspec encodes less depth than it decodes


class _ClientFrame(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, frozen=True):
    pass


class Chat(_ClientFrame, tag="chat", frozen=True):
    prompt: str
    id: str | None = None


class Pause(_ClientFrame, tag="pause", frozen=True):
    pass


class Resume(_ClientFrame, tag="resume", frozen=True):
    pass


class Stop(_ClientFrame, tag="stop", frozen=True):
    pass


class Ping(_ClientFrame, tag="ping", frozen=True):
    t: Any = msgspec.UNSET  # absent stays absent; a null is echoed as null


class Auth(_ClientFrame, tag="auth", frozen=True):
    token: str


class Ack(_ClientFrame, tag="ack", frozen=True):
    seq: int


ClientFrame = Chat | Pause | Resume | Stop | Ping | Auth | Ack


class _ServerFrame(msgspec.Struct, tag_field="type", omit_defaults=True, frozen=True):
    pass


class LastChat(msgspec.Struct, frozen=True):
    """The session's last accepted chat that had an id, and its turn."""

    id: str
    turn: int


class Ready(_ServerFrame, tag="ready", frozen=True):
    session: str
    last_seq: int
    paused: bool
    exp: int | None = None
    # Extension: lets a client that lost its connection right after a chat
    # know it was accepted, instead of resending it once its turn has ended.
    last_chat: LastChat | None = None
    # Extension: the gateway's bounds, so a client can refuse an oversized chat
    # before sending it (a frame past max_frame_bytes closes the socket with 1009).
    max_frame_bytes: int | None = None
    max_prompt_chars: int | None = None


class Accepted(_ServerFrame, tag="accepted", frozen=True):
    turn: int
    id: str | None = None


class Chunk(_ServerFrame, tag="chunk", frozen=True):
    seq: int
    turn: int
    text: str


class Done(_ServerFrame, tag="done", frozen=True):
    seq: int
    turn: int
    reason: DoneReason
    message: str | None = None
    # Extension, with reason error: "unavailable" (no worker in time), "content_filter" (the
    # provider's filter cut the answer), "tool_calls" (the model asked for a tool). A plain
    # string, so a client decodes codes added later.
    code: str | None = None


class Paused(_ServerFrame, tag="paused", frozen=True):
    seq: int


class Resumed(_ServerFrame, tag="resumed", frozen=True):
    seq: int


class Pong(_ServerFrame, tag="pong", frozen=True):
    t: Any = msgspec.UNSET


class AuthOk(_ServerFrame, tag="auth_ok", frozen=True):
    exp: int


class Error(_ServerFrame, tag="error", frozen=True):
    code: ErrorCode
    message: str
    id: str | None = None  # extension: the chat this error answers


ServerFrame = Ready | Accepted | Chunk | Done | Paused | Resumed | Pong | AuthOk | Error

_client_decoder = msgspec.json.Decoder(ClientFrame)
_server_decoder = msgspec.json.Decoder(ServerFrame)
_encoder = msgspec.json.Encoder()


class _SeqOnly(msgspec.Struct):
    seq: int


_seq_decoder = msgspec.json.Decoder(_SeqOnly)


def encode(frame: msgspec.Struct) -> bytes:
    """Encode a frame (or any internal message) as compact JSON."""
    return _encoder.encode(frame)


def frame_seq(data: bytes) -> int:
    """Return the ``seq`` of an encoded ``chunk`` or ``done`` frame."""
    seq: int = _seq_decoder.decode(data).seq
    return seq


def validate_prompt(prompt: str, *, max_prompt_chars: int) -> str:
    """Return ``prompt`` if it is non-blank and within the limit.

    Raises:
        ProtocolError: blank or not valid Unicode (``invalid``), or longer
            than the limit (``too_big``).
    """
    if not prompt.strip():
        raise ProtocolError("prompt must not be empty")
    try:
        prompt.encode()
    except UnicodeEncodeError:  # JSON can carry a lone "\\ud83d" that no frame could encode
        raise ProtocolError("prompt is not valid Unicode (it holds half of a surrogate pair)") from None
    if len(prompt) > max_prompt_chars:
        raise ProtocolError(
            f"prompt of {len(prompt)} characters exceeds the limit of {max_prompt_chars}",
            code="too_big",
        )
    return prompt


def decode_client_frame(data: str | bytes) -> ClientFrame:
    """Parse one client text frame and check its structure.

    The prompt's content (blank, too long) is checked where a turn starts,
    by :func:`validate_prompt`, so the error can name the chat's id.

    Raises:
        ProtocolError: malformed or too deeply nested JSON, unknown
            ``type``, missing or extra fields, wrong types, an over-long chat id.
    """
    try:
        frame: ClientFrame = _client_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid frame: {exc}") from None
    except msgspec.DecodeError:
        raise ProtocolError("malformed JSON") from None
    except RecursionError:  # msgspec's guard against deeply nested input
        raise ProtocolError("JSON nested too deeply") from None
    if isinstance(frame, Chat) and frame.id is not None and len(frame.id) > MAX_CLIENT_ID_CHARS:
        raise ProtocolError(f"chat id longer than {MAX_CLIENT_ID_CHARS} characters")
    if isinstance(frame, Ping) and _nested_deeper(frame.t, MAX_PING_NESTING):
        raise ProtocolError(f"ping 't' nested deeper than {MAX_PING_NESTING} levels")
    return frame


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` has arrays or objects nested more than ``limit`` deep (iteratively)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def decode_server_frame(data: str | bytes) -> ServerFrame:
    """Parse one server frame (used by the clients).

    Raises:
        ProtocolError: the data is not a known server frame.
    """
    try:
        frame: ServerFrame = _server_decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise ProtocolError(f"invalid server frame: {exc}") from None
    return frame


# The original design's client sends {"action": "pause"|"resume"} and
# {"type": "ping"} (its heartbeat); anything else is ignored (it expects no JSON back).
CompatAction = Literal["pause", "resume", "ping"]


class _CompatFrame(msgspec.Struct):
    action: str | None = None
    type: str | None = None


_compat_decoder = msgspec.json.Decoder(_CompatFrame)


def decode_compat_frame(data: str | bytes) -> CompatAction | None:
    """Return the action of an original-design client frame (``ping`` for its
    heartbeat), or None for anything else, which is ignored."""
    try:
        frame = _compat_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None
    if frame.action == "pause":
        return "pause"
    if frame.action == "resume":
        return "resume"
    if frame.type == "ping" and frame.action is None:
        return "ping"
    return None


def rate_limited(frame: ClientFrame | CompatAction | None) -> bool:
    """Whether a client frame counts against the connection's frame rate limit.

    Heartbeats and acks never do (docs/protocol.md, guarantee 6): a conforming
    client may ack every frame of a long replay. They cost the server one
    decode each, and a client that sends pings without reading the pongs is
    closed as a slow reader (1013), not for abuse.
    """
    return not isinstance(frame, (Ping, Ack)) and frame != "ping"

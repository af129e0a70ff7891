"""Messages the services exchange over NATS (never sent to clients as is).

- :class:`TurnRequest`: gateway -> JetStream ``CHAT_REQUESTS`` -> a worker.
- A worker publishes to ``chat.gen.<session>`` (JetStream ``CHAT_GENERATED``)
  the client-ready ``chunk`` frames and, last, one :class:`TurnEnd`; each
  message is bounded (a chunk's text by the worker's chunk size), whatever
  the answer's length.
- :class:`Control`: pause/resume/stop on ``chat.session.<session>.ctl`` (core NATS).
- :class:`ReplayRequest`: gateway -> a buffer, answered with stored frames.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .protocol import Chunk, Done

__all__ = [
    "TurnRequest",
    "TurnEnd",
    "Generated",
    "Control",
    "ReplayRequest",
    "decode_request",
    "decode_generated",
    "decode_control",
    "decode_replay_request",
    "REPLAY_HWM_HEADER",
    "REPLAY_FIRST_HEADER",
    "REPLAY_MORE_HEADER",
    "TRACE_HEADER",
]


class TurnRequest(msgspec.Struct, frozen=True):
    """One turn to generate. ``base_seq`` is the session's last seq when the turn
    started: the worker numbers the turn's frames from ``base_seq + 1``."""

    session: str
    turn: int
    prompt: str
    base_seq: int
    enqueued_at: float
    user: str | None = None


class TurnEnd(msgspec.Struct, tag_field="type", tag="turn_end", frozen=True):
    """The last message of a turn: its ``done`` frame.

    It carries neither the prompt nor the answer: no message on the pipeline
    may grow with the answer (NATS refuses payloads over ``max_payload``, 1 MiB
    by default). The buffer builds the history entry from the stored chunks
    and the record's prompt.
    """

    done: Done
    user: str | None = None  # whose turn count to release


Generated = Chunk | TurnEnd


class Control(msgspec.Struct, frozen=True):
    """A session control event. ``version`` orders pause/resume events, which
    may arrive from different gateways out of order."""

    action: Literal["pause", "resume", "stop"]
    version: int = 0
    turn: int | None = None


class ReplayRequest(msgspec.Struct, frozen=True):
    session: str
    after: int
    limit: int


# A turn's trace id, set by the gateway and carried on the turn's request and
# its TurnEnd, so the turn's log lines can be joined across services.
TRACE_HEADER = "Chat-Trace"

# Replay replies carry newline-separated frames in the body and these headers.
REPLAY_HWM_HEADER = "Chat-Hwm"
REPLAY_FIRST_HEADER = "Chat-First"
REPLAY_MORE_HEADER = "Chat-More"

_request_decoder = msgspec.json.Decoder(TurnRequest)
_generated_decoder = msgspec.json.Decoder(Generated)
_control_decoder = msgspec.json.Decoder(Control)
_replay_decoder = msgspec.json.Decoder(ReplayRequest)


def decode_request(data: bytes) -> TurnRequest:
    return _request_decoder.decode(data)


def decode_generated(data: bytes) -> Generated:
    generated: Generated = _generated_decoder.decode(data)
    return generated


def decode_control(data: bytes) -> Control:
    return _control_decoder.decode(data)


def decode_replay_request(data: bytes) -> ReplayRequest:
    return _replay_decoder.decode(data)

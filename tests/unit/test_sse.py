"""The incremental SSE decoder and the encoder."""

from __future__ import annotations

import pytest

from shared.sse import SSEDecoder, SSEEvent, encode_event

STREAM = (
    b": keep-alive\r\n"
    b'data: {"a":1}\r\n\r\n'
    b"data: first\n"
    b"data: second\n\n"
    b"id: 7\nevent: done\ndata: x\n\n"
    b"data: [DONE]\r\r"
)
EXPECTED = [
    SSEEvent(data='{"a":1}'),
    SSEEvent(data="first\nsecond"),
    SSEEvent(data="x", event="done", id="7"),
    SSEEvent(data="[DONE]", id="7"),
]


def test_whole_stream_in_one_read() -> None:
    """Several events in one read all come out, in order."""
    assert SSEDecoder().feed(STREAM) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13])
def test_split_across_reads(size: int) -> None:
    """Events split at any byte, CRLF included, decode the same."""
    decoder = SSEDecoder()
    events = []
    for start in range(0, len(STREAM), size):
        events += decoder.feed(STREAM[start : start + size])
    assert events == EXPECTED


def test_comments_and_empty_events_produce_nothing() -> None:
    """Keep-alive comments and blank lines alone are not events."""
    assert SSEDecoder().feed(b": ping\n\n\n: more\n\n") == []


def test_incomplete_event_waits() -> None:
    """An event without its blank line is not dispatched yet."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: half") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\n") == [SSEEvent(data="half")]


def test_line_limit() -> None:
    """A line longer than the limit raises instead of growing memory."""
    decoder = SSEDecoder(max_line_bytes=10)
    with pytest.raises(ValueError, match="exceeds"):
        decoder.feed(b"data: " + b"x" * 20)


def test_field_without_space_and_retry() -> None:
    """'data:x' (no space) and retry fields follow the spec."""
    assert SSEDecoder().feed(b"retry: 500\ndata:x\n\n") == [SSEEvent(data="x", retry=500)]


def test_encode_round_trip() -> None:
    """encode_event output decodes back to the same event."""
    data = encode_event('{"type":"chunk"}', event="chunk", id=3)
    assert data == b'id: 3\nevent: chunk\ndata: {"type":"chunk"}\n\n'
    assert SSEDecoder().feed(data) == [SSEEvent(data='{"type":"chunk"}', event="chunk", id="3")]


def test_an_event_of_many_data_lines_is_bounded_like_one_line() -> None:
    """Many short data lines that never end their event cannot grow memory past the bound."""
    decoder = SSEDecoder(max_line_bytes=100)
    assert decoder.feed(b"data: " + b"x" * 40 + b"\n" + b"data: " + b"y" * 40 + b"\n\n") == [
        SSEEvent(data="x" * 40 + "\n" + "y" * 40)
    ]
    with pytest.raises(ValueError, match="over 100"):
        decoder.feed((b"data: " + b"z" * 40 + b"\n") * 3)

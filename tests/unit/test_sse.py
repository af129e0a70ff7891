"""The incremental SSE decoder and the encoder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def decode_all(data: bytes, size: int = 0) -> list[SSEEvent]:
    """Every event of ``data`` fed whole (size 0) or in pieces of ``size`` bytes."""
    decoder = SSEDecoder()
    step = size or len(data) or 1
    events = [event for start in range(0, len(data), step) for event in decoder.feed(data[start : start + step])]
    return events


# The examples of the WHATWG event-stream section
# (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).
WHATWG_EXAMPLES = [
    (
        b"data: This is the first message.\n\ndata: This is the second message, it\ndata: has two lines.\n\n"
        b"data: This is the third message.\n\n",
        [
            SSEEvent(data="This is the first message."),
            SSEEvent(data="This is the second message, it\nhas two lines."),
            SSEEvent(data="This is the third message."),
        ],
    ),
    (
        b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n",
        [SSEEvent(data="73857293", event="add"), SSEEvent(data="2153", event="remove"), SSEEvent(data="113411", event="add")],
    ),
    (b"data: YHOO\ndata: +2\ndata: 10\n\n", [SSEEvent(data="YHOO\n+2\n10")]),
    (
        # A comment fires nothing; "id" without a colon resets the last event id; one space is stripped.
        b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n",
        [SSEEvent(data="first event", id="1"), SSEEvent(data="second event", id=""), SSEEvent(data=" third event", id="")],
    ),
    # "data" without a colon is an empty value; two data lines make one newline; the last block lacks its blank line.
    (b"data\n\ndata\ndata\n\ndata:", [SSEEvent(data=""), SSEEvent(data="\n")]),
    (b"data:test\n\ndata: test\n\n", [SSEEvent(data="test"), SSEEvent(data="test")]),
]


@pytest.mark.parametrize(("stream", "expected"), WHATWG_EXAMPLES)
@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("size", [0, 1, 2, 3])
def test_the_whatwg_examples(stream: bytes, expected: list[SSEEvent], ending: bytes, size: int) -> None:
    """The spec's examples decode as it says, with any line end and any split into reads."""
    assert decode_all(stream.replace(b"\n", ending), size) == expected


@pytest.mark.parametrize("size", [0, 1, 2])
def test_a_leading_byte_order_mark_is_stripped(size: int) -> None:
    """One UTF-8 BOM at the start of the stream is not part of the first field name."""
    assert decode_all(b"\xef\xbb\xbfdata: x\n\n", size) == [SSEEvent(data="x")]
    assert decode_all(b"data: \xef\xbb\xbfx\n\n", size) == [SSEEvent(data="\ufeffx")]  # only at the start


def test_unknown_fields_and_bad_retry_are_ignored() -> None:
    """Unknown fields, a non-numeric retry and an id holding NUL change nothing."""
    assert decode_all(b"foo: bar\nretry: 1a\nid: a\0b\ndata: x\n\n") == [SSEEvent(data="x")]


def test_an_error_field_dispatches_an_error_event() -> None:
    """llama.cpp's server writes streaming errors as an "error:" field: that block is an error event."""
    assert decode_all(b'error: {"code":500,"message":"boom"}\n\ndata: [DONE]\n\n') == [
        SSEEvent(data='{"code":500,"message":"boom"}', event="error"),
        SSEEvent(data="[DONE]"),
    ]


def test_close_dispatches_a_complete_last_event_and_flags_a_cut_line() -> None:
    """At the end of the body, an event missing only its blank line is dispatched; a body that ends
    inside a line is truncated and its event is not."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: [DONE]\n") == [] and not decoder.truncated
    assert decoder.close() == [SSEEvent(data="[DONE]")] and not decoder.truncated
    cut = SSEDecoder()
    assert cut.feed(b'data: {"choices":[{"delta":{"content":"hal') == []
    assert cut.close() == [] and cut.truncated


def test_a_long_line_in_small_reads_is_one_event() -> None:
    """A line arriving a few bytes at a time is kept in pieces and joined once its end arrives."""
    decoder = SSEDecoder()
    line = b"data: " + b"y" * 300_000 + b"\n\n"
    events = [event for start in range(0, len(line), 7) for event in decoder.feed(line[start : start + 7])]
    assert events == [SSEEvent(data="y" * 300_000)]


def test_a_line_past_the_limit_in_small_reads_raises() -> None:
    decoder = SSEDecoder(max_line_bytes=100)
    with pytest.raises(ValueError, match="exceeds"):
        for _ in range(30):
            decoder.feed(b"data: xxxx")


def test_the_line_limit_is_inclusive_on_every_line() -> None:
    """A line of exactly max_line_bytes is accepted, on the first line and after others; one more byte raises."""
    decoder = SSEDecoder(max_line_bytes=10)
    assert decoder.feed(b"data: abcd") == []  # 10 bytes, still incomplete
    assert decoder.feed(b"\n\n") == [SSEEvent(data="abcd")]
    assert decoder.feed(b"data: efgh") == []
    with pytest.raises(ValueError, match="exceeds"):
        decoder.feed(b"i")


def test_the_event_data_limit_is_inclusive_on_every_event() -> None:
    """An event's data (each line and its newline counted) may reach max_line_bytes, in every event; past it raises."""
    assert SSEDecoder(max_line_bytes=10).feed(b"data: abcd\ndata: efgh\n\n") == [SSEEvent(data="abcd\nefgh")]
    decoder = SSEDecoder(max_line_bytes=10)
    assert decoder.feed(b"data: x\n\n") == [SSEEvent(data="x")]
    assert decoder.feed(b"data: abcd\ndata: efgh\n\n") == [SSEEvent(data="abcd\nefgh")]
    with pytest.raises(ValueError, match="over 10"):
        decoder.feed(b"data: abcd\ndata: efghi\n")


def test_invalid_utf8_is_replaced_and_trailing_spaces_are_kept() -> None:
    """Bytes that are not UTF-8 become U+FFFD instead of failing; only the line end is stripped."""
    assert decode_all(b"data: \xff\n\ndata: a X\r\ndata: b \r\n\n") == [SSEEvent(data="\ufffd"), SSEEvent(data="a X\nb ")]


def test_close_inside_a_line_drops_the_whole_event() -> None:
    """A body cut inside a line discards that event's complete lines too: a partial event is never dispatched."""
    decoder = SSEDecoder()
    assert decoder.feed(b'data: a\ndata: {"cut') == []
    assert decoder.close() == [] and decoder.truncated


def test_an_error_event_carries_id_and_retry_and_ends_cleanly() -> None:
    """An empty error field still makes an error event, with the id and retry in force; the blank
    lines after it dispatch nothing more."""
    assert decode_all(b"id: 5\nretry: 10\nerror\n\n\n\ndata: y\n\n") == [
        SSEEvent(data="", event="error", id="5", retry=10),
        SSEEvent(data="y", id="5"),
    ]


def test_encode_splits_lines_only_at_newlines() -> None:
    """Bytes are accepted; each line of the data is one data field, spaces kept."""
    assert encode_event(b"a b\nc") == b"data: a b\ndata: c\n\n"


def test_a_body_of_only_a_bom_or_blanks_is_not_cut() -> None:
    """close() flags a cut line only for real content: a lone BOM, or spaces left in several reads, are nothing."""
    bom_only = SSEDecoder()
    assert bom_only.feed(b"\xef\xbb\xbf") == []
    assert bom_only.close() == [] and not bom_only.truncated
    blanks = SSEDecoder()
    assert blanks.feed(b"data: x\n\n") == [SSEEvent(data="x")]
    assert blanks.feed(b" ") == [] and blanks.feed(b" ") == []
    assert blanks.close() == [] and not blanks.truncated


class GeneralLoopDecoder(SSEDecoder):
    """The decoder with its LF-only paths off: every read goes through the general loop."""

    _lf_paths = False


_FIELDS = [b"data", b"data", b"data", b"event", b"id", b"retry", b"error", b"foo", b"", b":"]
_VALUES = st.one_of(
    st.sampled_from([b"", b" ", b"[DONE]", b"12", b"a\0b", b'{"choices":[{"delta":{"content":"h\xc3\xa9"}}]}']),
    st.text(max_size=12).map(lambda text: text.replace("\n", "").replace("\r", "").encode()),
    st.binary(max_size=6).map(lambda raw: raw.replace(b"\n", b"").replace(b"\r", b"")),
)


@st.composite
def event_streams(draw: st.DrawFn) -> bytes:
    """A stream of SSE blocks: mostly LF-ended "data:" fields, with CR/CRLF ends, other fields,
    comments, extra blank lines, a BOM, non-UTF-8 bytes and a cut last line mixed in."""
    ends = [b"\n"] if draw(st.booleans()) else [b"\n", b"\n", b"\r\n", b"\r"]
    parts = [b"\xef\xbb\xbf"] if draw(st.integers(0, 4)) == 0 else []
    for _ in range(draw(st.integers(0, 8))):
        for _ in range(draw(st.integers(0, 3))):
            field = draw(st.sampled_from(_FIELDS))
            separator = draw(st.sampled_from([b": ", b": ", b":", b"", b":  "]))
            value = draw(st.sampled_from([b"5", b"12"]) if field == b"retry" and draw(st.booleans()) else _VALUES)
            parts.append(field + separator + value + draw(st.sampled_from(ends)))
        parts.append(draw(st.sampled_from(ends)))  # the blank line that dispatches the block
    if draw(st.booleans()):
        parts.append(b"data: " + draw(_VALUES))  # the body may end inside a line
    return b"".join(parts)


def _run(decoder: SSEDecoder, stream: bytes, cuts: list[int]) -> tuple[list[SSEEvent], str, list[SSEEvent], bool]:
    """Events fed read by read, the error raised (if any), then close()'s events and truncated."""
    events: list[SSEEvent] = []
    bounds = [0, *sorted(set(cuts)), len(stream)]
    try:
        for start, end in zip(bounds, bounds[1:], strict=False):
            events += decoder.feed(stream[start:end])
    except ValueError as error:
        return events, str(error), [], False
    return events, "", decoder.close(), decoder.truncated


@settings(max_examples=1000, deadline=None)
@given(stream=event_streams(), data=st.data(), max_line_bytes=st.sampled_from([12, 40, 1 << 20]))
def test_the_lf_paths_decode_as_the_general_loop(stream: bytes, data: st.DataObject, max_line_bytes: int) -> None:
    """Random streams cut at random offsets (inside CRLF and UTF-8 characters too) give the same events,
    errors and end state through the LF-only paths as through the general loop."""
    line_ends = [index + 1 for index, byte in enumerate(stream) if byte in b"\r\n"]
    at_line_ends = data.draw(st.lists(st.booleans(), min_size=len(line_ends), max_size=len(line_ends)))
    cuts = [end for end, cut in zip(line_ends, at_line_ends, strict=True) if cut]  # reads of whole lines, often
    cuts += data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    expected = _run(GeneralLoopDecoder(max_line_bytes=max_line_bytes), stream, cuts)
    assert _run(SSEDecoder(max_line_bytes=max_line_bytes), stream, cuts) == expected


@pytest.mark.parametrize("before", [b"id: 9\nretry: 5\n", b"event: add\n", b"data: a\n", b"error: e\n", b"data: cut"])
@pytest.mark.parametrize(
    "read",
    [b"data: x\n\n", b"data:x\n\n", b"data:\n\n", b"data: \n\n", b"data:  x\n\n", b"data: \xc3\n\n", b"data: a\n\n" * 2],
)
def test_one_whole_event_per_read_after_other_lines(before: bytes, read: bytes) -> None:
    """A read of one whole event, after a read that left fields, data or part of a line pending, decodes
    as through the general loop: id kept, retry for one event only, the pending lines joined in."""
    fast, general = SSEDecoder(), GeneralLoopDecoder()
    assert fast.feed(before) == general.feed(before) == []
    for _ in range(2):
        assert fast.feed(read) == general.feed(read)
    assert fast.feed(b"\n") == general.feed(b"\n")  # nothing of the earlier lines is left to dispatch

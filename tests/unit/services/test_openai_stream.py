"""The OpenAI-compatible stream translator: text wherever servers put it, reasoning kept out,
every error shape an error, every end classified. The recorded shapes, with their sources, are in
tests/data/openai_streams/ and run through the whole stack in tests/integration/test_model_servers.py."""

from __future__ import annotations

import json

import pytest

from services.llm_worker.openai_stream import ChatStream, Finish, error_text, short
from shared.errors import UpstreamError
from shared.sse import SSEEvent


def chunk(delta: object = None, finish: str | None = None, **top: object) -> SSEEvent:
    choice: dict[str, object] = {"index": 0, "delta": delta if delta is not None else {}, "finish_reason": finish}
    return SSEEvent(data=json.dumps({"id": "r1", "object": "chat.completion.chunk", "choices": [choice], **top}))


def run(*events: SSEEvent) -> tuple[str, Finish | None]:
    stream = ChatStream()
    texts = []
    for event in events:
        text, finish = stream.event(event)
        texts.append(text)
        if finish is not None:
            return "".join(texts), finish
    return "".join(texts), None


def test_text_from_strings_parts_refusals_and_completion_chunks() -> None:
    """String content, typed parts (Mistral), a refusal and completion-style text are all answer text."""
    text, finish = run(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]}, {"type": "text", "text": "Hel"}]}),
        chunk({"content": "lo"}),
        chunk({"refusal": " no"}),
        SSEEvent(data=json.dumps({"choices": [{"index": 0, "text": "!", "finish_reason": None}]})),
        chunk(finish="stop"),
    )
    assert text == "Hello no!"
    assert finish is not None and finish.reason == "stop" and finish.reasoning_chars > 0 and finish.response_id == "r1"


def test_reasoning_never_becomes_answer_text() -> None:
    """reasoning_content, reasoning and reasoning_details are counted, not delivered."""
    text, finish = run(
        chunk({"reasoning_content": "think"}),
        chunk({"reasoning": "more"}),
        chunk({"reasoning_details": [{"type": "reasoning.text", "text": "x"}], "content": "Answer"}),
        chunk(finish="stop"),
    )
    assert text == "Answer" and finish is not None and finish.reasoning_chars >= len("thinkmore")


@pytest.mark.parametrize(
    ("upstream", "reason"),
    [("stop", "stop"), ("eos_token", "stop"), ("stop_sequence", "stop"), ("end_turn", "stop"), ("odd_new_reason", "stop"),
     ("length", "length"), ("max_tokens", "length"), ("model_length", "length")],
)
def test_finish_reasons_map_to_stop_or_length(upstream: str, reason: str) -> None:
    """Servers' own names for a finished or cut answer map to stop and length; the original is kept."""
    _, finish = run(chunk({"content": "a"}), chunk(finish=upstream))
    assert finish is not None and (finish.reason, finish.upstream_reason) == (reason, upstream)


@pytest.mark.parametrize(
    ("events", "code", "needle"),
    [
        ([chunk({"content": "a"}), chunk(finish="content_filter")], "content_filter", "content filter"),
        ([chunk({"tool_calls": [{"index": 0, "function": {"name": "lookup", "arguments": ""}}]}), chunk(finish="tool_calls")],
         "tool_calls", "lookup"),
        ([chunk({"tool_calls": [{"index": 0, "function": {"name": "f"}}]}), chunk(finish="stop")], "tool_calls", "f"),
        ([chunk({"content": "a"}), chunk(finish="abort")], None, "abort"),
        ([chunk({"content": "a"}), chunk(finish="error")], None, "error"),
        ([SSEEvent(data="[DONE]")], None, "without an answer"),
        ([chunk({"role": "assistant"}), SSEEvent(data="[DONE]")], None, "without an answer"),
        ([SSEEvent(data='{"error":{"message":"quota"}}')], None, "quota"),
        ([SSEEvent(data='{"error":"Input validation error","error_type":"validation"}')], None, "Input validation"),
        ([SSEEvent(data='{"object":"error","message":"bad","type":"BadRequestError","code":400}')], None, "bad"),
        ([SSEEvent(data='{"code":500,"message":"ctx full","type":"server_error"}', event="error")], None, "ctx full"),
        ([SSEEvent(data="plain words", event="error")], None, "plain words"),
    ],
)
def test_every_error_shape_is_an_error(events: list[SSEEvent], code: str | None, needle: str) -> None:
    """Content filter, tool calls, error finishes, empty streams and in-band errors raise, naming the cause."""
    with pytest.raises(UpstreamError, match=needle) as error:
        run(*events)
    assert error.value.code == code


def test_null_error_fields_on_healthy_chunks_are_not_errors() -> None:
    """"error": null, {} or "" beside real content is no error."""
    text, finish = run(chunk({"content": "a"}, error=None), chunk({"content": "b"}, error={}), chunk(finish="stop", error=""))
    assert (text, finish is not None) == ("ab", True)


def test_a_body_that_ends_early_is_an_error() -> None:
    """No finish and no [DONE]: with text, the connection dropped; without, no answer."""
    stream = ChatStream()
    stream.event(chunk({"content": "part"}))
    assert "dropped" in str(stream.end_of_body(truncated=False))
    assert "without an answer" in str(ChatStream().end_of_body(truncated=False))


def test_usage_and_ids_are_recorded() -> None:
    """Usage (also Groq's x_groq.usage) and the response id come back with the finish."""
    _, finish = run(chunk({"content": "a"}), chunk(finish="stop", x_groq={"usage": {"completion_tokens": 1}}))
    assert finish is not None and finish.details() == {
        "upstream_finish": "stop", "response_id": "r1", "usage": {"completion_tokens": 1},
    }


def test_named_events_and_empty_data_are_not_part_of_the_answer() -> None:
    """Only unnamed ("message") events carry chunks: a ping or debug event and empty data are skipped
    (WHATWG: an event's type is what the consumer listens for)."""
    text, finish = run(
        SSEEvent(data='{"choices":[{"index":0,"delta":{"content":"leak"}}]}', event="debug"),
        SSEEvent(data="   "),
        chunk({"content": "ok"}),
        chunk(finish="stop"),
    )
    assert (text, finish is not None) == ("ok", True)


def test_only_the_first_choice_is_the_answer() -> None:
    """With n > 1 the choices' chunks interleave; index 1's text never joins index 0's."""
    def choice(index: int, content: str, finish: str | None = None) -> SSEEvent:
        return SSEEvent(data=json.dumps({"choices": [{"index": index, "delta": {"content": content}, "finish_reason": finish}]}))

    text, finish = run(choice(1, "B"), choice(0, "A"), choice(1, "B", "stop"), choice(0, "a", "stop"))
    assert text == "Aa" and finish is not None


@pytest.mark.parametrize(
    ("events", "needle"),
    [
        ([chunk({"reasoning_content": "hmm"}), chunk(finish="length")], "spent it on reasoning"),
        ([chunk({"content": ""}), chunk(finish="length")], "length limit before writing any answer"),
        ([chunk({"reasoning": "hmm"}), chunk(finish="stop")], "sent only its reasoning"),
        ([chunk({"content": ""}), chunk(finish="stop")], "without writing any answer"),
    ],
)
def test_an_empty_answer_is_never_a_success(events: list[SSEEvent], needle: str) -> None:
    """A finish (stop or length) with no answer text is an error that says why."""
    with pytest.raises(UpstreamError, match=needle):
        run(*events)


def test_content_filter_error_values_carry_the_code() -> None:
    """Azure's in-stream error with code content_filter (or innererror ResponsibleAIPolicyViolation)
    tells the client it was the filter, not a fault."""
    for error in ({"code": "content_filter", "message": "filtered"},
                  {"code": "x", "message": "filtered", "innererror": {"code": "ResponsibleAIPolicyViolation"}}):
        with pytest.raises(UpstreamError, match="content filter") as raised:
            run(chunk({"content": "a"}), SSEEvent(data=json.dumps({"error": error})))
        assert raised.value.code == "content_filter"


def test_tool_calls_with_a_length_finish_or_no_finish_are_tool_calls() -> None:
    """A tool call cut by length, or followed only by the end of the body, still says tool_calls."""
    call = chunk({"tool_calls": [{"index": 0, "function": {"name": "search"}}]})
    with pytest.raises(UpstreamError, match="search") as raised:
        run(call, chunk(finish="length"))
    assert raised.value.code == "tool_calls"
    stream = ChatStream()
    stream.event(call)
    assert stream.end_of_body(truncated=False).code == "tool_calls"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('{"error":{"message":"m1","type":"t"}}', "m1"),
        ('{"error":true,"message":"m2"}', "m2"),
        ('{"detail":"m3"}', "m3"),
        ('[{"error":{"code":429,"message":"m4"}}]', "m4"),
        ('{"error":"m5"}', "m5"),
        ("plain m6", "plain m6"),
        ('{"weird":1}', '{"weird": 1}'),
        ("", "no details"),
    ],
)
def test_error_text_finds_the_message_in_every_shape(value: str, expected: str) -> None:
    """OpenAI, TGI, FastAPI, Gemini-style list and plain-text errors all give their message."""
    assert error_text(value) == expected


@pytest.mark.parametrize(
    ("raw", "kept", "gone"),
    [
        ("<html><body><h1>Bad &amp; gateway</h1></body></html>", "Bad & gateway", "<h1>"),
        ("Invalid header: Bearer abcdefghijklmnop", "Bearer ***", "abcdefghijklmnop"),
        ("Incorrect API key provided: sk-proj-abcdef123456", "sk-***", "abcdef123456"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZDEyMw==", "Basic ***", "dXNlcjpwYXNzd29yZDEyMw=="),
        ("cannot reach redis://app:hunter2@cache:6379", "app:***@cache", "hunter2"),
        ('Traceback (most recent call last):\n  File "/app/x.py", line 3', "stack trace, withheld", "/app/x.py"),
        ("line one\n\n   line two", "line one line two", "\n"),
    ],
)
def test_short_makes_provider_words_safe_to_show(raw: str, kept: str, gone: str) -> None:
    """Markup is stripped, credentials masked and stack traces withheld before a user sees them."""
    shown = short(raw)
    assert kept in shown and gone not in shown


def test_short_cuts_long_text() -> None:
    assert short("x" * 1000, 50) == "x" * 49 + "…"


def test_a_usage_chunk_after_the_finish_is_recorded() -> None:
    """OpenAI sends usage in one more chunk, with no choices, after the finish (stream_options.include_usage)."""
    stream = ChatStream()
    stream.event(chunk({"content": "a"}))
    _, finish = stream.event(chunk(finish="stop"))
    assert finish is not None and finish.usage is None
    assert stream.trailer(SSEEvent(data='{"id":"r1","choices":[],"usage":{"total_tokens":7}}')) is False
    assert stream.trailer(SSEEvent(data="not json")) is False
    assert stream.trailer(SSEEvent(data="[DONE]")) is True
    assert stream.details()["usage"] == {"total_tokens": 7}


def test_a_camel_case_finish_reason_ends_the_answer() -> None:
    """Gemini's OpenAI-compatible beta left finish_reason null and said finishReason."""
    text, finish = run(
        SSEEvent(data='{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null,"finishReason":"length"}]}')
    )
    assert text == "hi" and finish is not None and finish.reason == "length"

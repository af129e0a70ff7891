"""The OpenAI-compatible stream translator: text wherever servers put it, reasoning kept out,
every error shape an error, every end classified. The recorded shapes, with their sources, are in
tests/data/openai_streams/ and run through the whole stack in tests/integration/test_model_servers.py."""

from __future__ import annotations

import json

import pytest

from services.llm_worker.openai_stream import ChatStream, Finish
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

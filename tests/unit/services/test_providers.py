"""Providers: the demo model's text and pacing settings, and the OpenAI client's
stream parsing and error mapping (httpx.MockTransport, no sockets)."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from services.llm_worker.providers import Delta, DemoModel, Message, OpenAICompatible
from services.llm_worker.settings import DemoModelSettings, OpenAISettings
from shared.errors import UpstreamError
from shared.settings import Secret


async def collect(stream: AsyncIterator[Delta]) -> tuple[str, str | None]:
    text, reason = [], None
    async for delta in stream:
        text.append(delta.text)
        reason = delta.finish_reason or reason
    return "".join(text), reason


async def test_demo_model_is_readable_deterministic_and_bounded() -> None:
    """The demo answer quotes the prompt, counts turns, repeats for the same conversation, stops at the limit."""
    model = DemoModel(DemoModelSettings(tokens_per_s=1e9, answer_tokens=50))
    messages = [Message("user", "a"), Message("assistant", "b"), Message("user", "<script>x</script>")]
    text, reason = await collect(model.stream(messages))
    assert text.startswith('You said: "<script>x</script>". This is turn 2 of our conversation.')
    assert reason == "length"
    assert len(text.split()) <= 50
    assert (await collect(model.stream(messages)))[0] == text


def sse_body(*parts: bytes) -> Callable[[httpx.Request], httpx.Response]:
    async def stream() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=stream(), headers={"content-type": "text/event-stream"})

    return handler


def delta(text: str) -> bytes:
    return f"data: {json.dumps({'choices': [{'delta': {'content': text}}]})}\n\n".encode()


def provider(handler: Callable[[httpx.Request], httpx.Response]) -> OpenAICompatible:
    return OpenAICompatible(OpenAISettings(base_url="http://model.test/v1"), transport=httpx.MockTransport(handler))


async def test_parses_split_merged_and_commented_events() -> None:
    """Events split across reads, merged in one, and keep-alives give the exact text."""
    one, two = delta("Hel"), delta("lo")
    handler = sse_body(b": ka\n\n", one[:5], one[5:] + two, b"data: [DONE]\n\n")
    assert await collect(provider(handler).stream([Message("user", "x")])) == ("Hello", "stop")


async def test_a_finish_ends_the_stream_without_waiting_for_more() -> None:
    """After finish_reason the answer is complete: keep-alives that follow (a server that never sends
    [DONE] nor closes) are not awaited; "error": null and finish_reason "" are no error and no finish."""

    async def endless() -> AsyncIterator[bytes]:
        yield b'data: {"choices":[{"delta":{"content":"a"},"finish_reason":""}],"error":null}\n\n'
        yield b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
        while True:
            yield b": keep-alive\n\n"
            await asyncio.sleep(0.01)  # a server's pace: the worker waits only briefly for a usage chunk

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless(), headers={"content-type": "text/event-stream"})

    assert await asyncio.wait_for(collect(provider(handler).stream([])), 5) == ("a", "stop")


async def test_finish_reason_length_is_kept() -> None:
    """finish_reason length ends the turn with length."""
    final = b'data: {"choices":[{"delta":{},"finish_reason":"length"}]}\n\n'
    assert await collect(provider(sse_body(delta("a"), final, b"data: [DONE]\n\n")).stream([])) == ("a", "length")


@pytest.mark.parametrize(
    ("handler", "needle"),
    [
        (lambda r: httpx.Response(500, json={"error": {"message": "overloaded"}}), r"unavailable \(HTTP 500\): overloaded"),
        (lambda r: httpx.Response(401, text="bad key"), r"refused the key \(HTTP 401\): bad key"),
        (lambda r: httpx.Response(502, html="<html><body>Bad gateway</body></html>"), r"\(HTTP 502\)\. Try"),
        (sse_body(delta("a"), b'data: {"error": {"message": "quota"}}\n\n'), "quota"),
        (sse_body(b"data: {not json\n\n"), "malformed"),
        (sse_body(delta("a")), "dropped mid-answer"),
        (sse_body(b"data: [DONE]\n\n"), "without an answer"),
        (sse_body(delta("a"), b'data: {"choices":[{"delta":"text"}]}\n\n'), "unexpected shape"),
        (sse_body(b'data: {"choices":5}\n\n'), "unexpected shape"),
        (sse_body(b"data: " + b"[" * 100_000 + b"\n\n"), "malformed"),
        (lambda r: httpx.Response(200, json={"error": {"message": "You exceeded your quota"}}), "exceeded your quota"),
        (lambda r: httpx.Response(200, html="<html><body>Welcome to nginx!</body></html>"), "web page"),
        (lambda r: httpx.Response(301, headers={"location": "https://model.test/v1/chat/completions"}), "https://model.test/v1"),
    ],
)
async def test_upstream_errors_become_user_messages(handler, needle: str) -> None:  # type: ignore[no-untyped-def]
    """HTTP errors, error payloads (also as a 200 JSON body), bad or odd-shaped JSON and early EOF raise
    UpstreamError with a message naming the model API, not a worker exception."""
    with pytest.raises(UpstreamError, match=needle):
        await collect(provider(handler).stream([Message("user", "x")]))


@pytest.mark.parametrize(
    ("exc", "needle"),
    [
        (httpx.ReadTimeout("slow"), "did not answer in time"),
        (httpx.ConnectError("refused"), "Could not reach"),
        (httpx.RemoteProtocolError("cut"), "closed the connection without answering"),
    ],
)
async def test_transport_errors_are_mapped(exc: Exception, needle: str) -> None:
    """httpx errors map to UpstreamError at one boundary."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(UpstreamError, match=needle):
        await collect(provider(handler).stream([Message("user", "x")]))


async def test_sends_key_model_and_messages() -> None:
    """The request carries the bearer key, model, messages and stream flag."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return sse_body(delta("ok"), b"data: [DONE]\n\n")(request)

    settings = OpenAISettings(base_url="http://model.test/v1", model="m1", api_key=Secret("k-123"))
    client = OpenAICompatible(settings, transport=httpx.MockTransport(handler))
    await collect(client.stream([Message("user", "q")]))
    request = seen[0]
    assert request.url == "http://model.test/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer k-123"
    assert json.loads(request.content) == {"model": "m1", "messages": [{"role": "user", "content": "q"}], "stream": True}


async def test_azure_style_base_url_and_key_header() -> None:
    """A base URL with a query (Azure's api-version) keeps it after /chat/completions, and
    CHAT_OPENAI_API_KEY_HEADER=api-key sends the key as Azure expects, not as a bearer token."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return sse_body(delta("ok"), b"data: [DONE]\n\n")(request)

    settings = OpenAISettings(
        base_url="https://res.openai.azure.com/openai/deployments/gpt4o?api-version=2024-10-21",
        api_key=Secret("azure-key"),
        api_key_header="api-key",
    )
    assert await collect(OpenAICompatible(settings, transport=httpx.MockTransport(handler)).stream([])) == ("ok", "stop")
    request = seen[0]
    assert str(request.url) == "https://res.openai.azure.com/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21"
    assert request.headers["api-key"] == "azure-key" and "authorization" not in request.headers


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(408, True), (429, True), (502, True), (503, True), (504, True), (400, False), (401, False), (404, False), (500, False)],
)
async def test_which_statuses_may_be_retried(status: int, retryable: bool) -> None:
    """Only timeouts, rate limits and unavailable gateways are worth sending again."""
    with pytest.raises(UpstreamError) as error:
        await collect(provider(lambda r: httpx.Response(status, json={"error": {"message": "x"}})).stream([]))
    assert error.value.retryable is retryable


async def test_refused_and_reset_connections_may_be_retried() -> None:
    """A connection refused or reset before any answer is transient."""

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with pytest.raises(UpstreamError) as error:
        await collect(provider(refused).stream([]))
    assert error.value.retryable


async def test_a_key_echoed_by_the_server_never_reaches_the_user() -> None:
    """Proxies echo the key they rejected ("Received API Key = …"); the message masks it."""
    key = "team-key-0123456789"
    handler = lambda r: httpx.Response(401, json={"error": {"message": f"Authentication Error, Received API Key = {key}"}})  # noqa: E731
    settings = OpenAISettings(base_url="http://model.test/v1", api_key=Secret(key))
    with pytest.raises(UpstreamError, match="refused the key") as error:
        await collect(OpenAICompatible(settings, transport=httpx.MockTransport(handler)).stream([]))
    assert key not in str(error.value) and "***" in str(error.value)


async def test_a_whole_json_completion_is_an_answer() -> None:
    """A server that ignores "stream" and answers one chat.completion object still gives the answer."""
    completion = {"id": "c1", "object": "chat.completion", "usage": {"total_tokens": 3},
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "whole"}, "finish_reason": "stop"}]}
    deltas = [d async for d in provider(lambda r: httpx.Response(200, json=completion)).stream([])]
    assert "".join(d.text for d in deltas) == "whole"
    assert deltas[-1].finish_reason == "stop" and deltas[-1].details["usage"] == {"total_tokens": 3}


async def test_an_azure_prompt_filter_refusal_says_content_filter() -> None:
    """Azure answers a filtered prompt with HTTP 400 and code content_filter: the client gets that code."""
    body = {"error": {"message": "The response was filtered", "code": "content_filter", "status": 400,
                      "innererror": {"code": "ResponsibleAIPolicyViolation"}}}
    with pytest.raises(UpstreamError, match="content filter refused the prompt") as error:
        await collect(provider(lambda r: httpx.Response(400, json=body)).stream([]))
    assert error.value.code == "content_filter" and not error.value.retryable


async def test_an_x_gzip_body_is_decoded() -> None:
    """Content-Encoding x-gzip is gzip (RFC 9110 section 8.4.1.3), which httpx does not decode by that name."""
    body = gzip.compress(delta("zip") + b"data: [DONE]\n\n")

    async def parts() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 7):
            yield body[start : start + 7]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=parts(), headers={"content-type": "text/event-stream", "content-encoding": "x-gzip"})

    assert await collect(provider(handler).stream([])) == ("zip", "stop")


async def test_usage_sent_after_the_finish_is_kept() -> None:
    """The usage chunk that follows the finish reaches the turn's record."""
    finish = b'data: {"id":"r9","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    usage = b'data: {"id":"r9","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n'
    deltas = [d async for d in provider(sse_body(delta("a"), finish, usage, b"data: [DONE]\n\n")).stream([])]
    assert deltas[-1].details == {"upstream_finish": "stop", "response_id": "r9",
                                  "usage": {"prompt_tokens": 2, "completion_tokens": 1}}


async def test_reasoning_gives_textless_deltas_so_the_model_is_not_stalled() -> None:
    """A model that reasons before it answers yields an empty delta (progress, no text)."""
    reasoning = f"data: {json.dumps({'choices': [{'delta': {'reasoning_content': 'hmm'}}]})}\n\n".encode()
    deltas = [d async for d in provider(sse_body(reasoning, delta("a"), b"data: [DONE]\n\n")).stream([])]
    assert [(d.text, d.finish_reason) for d in deltas] == [("", None), ("a", None), ("", "stop")]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", delta("ok") + b"data: [DONE]\n\n"),  # SSE mislabelled as JSON
        ("text/plain", delta("ok") + b"data: [DONE]\n\n"),
        ("", b'\xef\xbb\xbf {"choices":[{"index":0,"message":{"content":"ok"},"finish_reason":"stop"}]}'),
        ("text/plain; charset=utf-8", b'{"choices":[{"index":0,"message":{"content":"ok"},"finish_reason":"stop"}]}'),
    ],
)
async def test_the_body_is_read_by_what_it_is_not_by_its_label(content_type: str, body: bytes) -> None:
    """An event stream labelled JSON or plain text is read as SSE; a JSON completion without a
    JSON label is read as one completion."""

    async def parts() -> AsyncIterator[bytes]:
        yield body[:3]
        yield body[3:]

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"content-type": content_type} if content_type else {}
        return httpx.Response(200, content=parts(), headers=headers)

    assert await collect(provider(handler).stream([])) == ("ok", "stop")


async def test_a_trailer_of_an_odd_shape_leaves_a_complete_answer_complete() -> None:
    """Found by an attack: a last chunk whose ``x_groq`` is a string ended a whole answer in a crash."""
    finish = f"data: {json.dumps({'choices': [{'delta': {}, 'finish_reason': 'stop'}]})}\n\n".encode()
    odd = b'data: {"x_groq": "x", "choices": []}\n\ndata: [DONE]\n\n'
    assert await collect(provider(sse_body(delta("hi"), finish, odd)).stream([])) == ("hi", "stop")


async def test_asks_for_an_uncompressed_body() -> None:
    """A compressed body may expand without bound in the decoder: identity is asked for."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["accept-encoding"])
        return sse_body(delta("ok"), b"data: [DONE]\n\n")(request)

    await collect(provider(handler).stream([]))
    assert seen == ["identity"]


async def test_blank_lines_before_the_body_are_skipped_as_they_come() -> None:
    """Thousands of blank reads before the first event: each is dropped, none kept."""
    parts = [b"\r\n" * 500] * 2000 + [b"\xef\xbb\xbf", delta("late"), b"data: [DONE]\n\n"]
    text, _ = await collect(provider(sse_body(*parts)).stream([]))
    assert text == "late"


async def test_a_redirect_message_masks_what_the_location_carries() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"location": "https://user:hunter22@evil.example/v1?key=abc123456789<b>"})

    with pytest.raises(UpstreamError) as error:
        await collect(provider(handler).stream([]))
    assert "hunter22" not in str(error.value) and "abc123456789" not in str(error.value) and "<b>" not in str(error.value)


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (401, {"error": {"message": "Incorrect API key provided"}}, "model_auth"),
        (403, {"error": {"message": "no access"}}, "model_auth"),
        (404, {"error": {"message": "model 'x' not found"}}, "model_not_found"),
        (429, {"error": {"message": "slow down"}}, "model_rate_limited"),
        (503, {"error": {"message": "overloaded"}}, "model_unavailable"),
        (400, {"error": {"message": "This model's maximum context length is 8192 tokens"}}, "context_too_long"),
        (422, {"error": {"message": "bad temperature"}}, "model_error"),
    ],
)
async def test_each_http_failure_has_a_code_a_program_can_act_on(status: int, body: dict, code: str) -> None:  # type: ignore[type-arg]
    """Fix the settings (auth, not found), wait (rate limited, unavailable) or start over (context)."""
    settings = OpenAISettings(base_url="http://model.test/v1", retries=0)
    client = OpenAICompatible(settings, transport=httpx.MockTransport(lambda r: httpx.Response(status, json=body)))
    with pytest.raises(UpstreamError) as error:
        await collect(client.stream([]))
    assert error.value.code == code


@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.ReadError("reset")])
async def test_an_unreachable_model_says_unavailable(exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(UpstreamError) as error:
        await collect(provider(handler).stream([]))
    assert error.value.code == "model_unavailable"

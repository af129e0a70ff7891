"""The OpenAI-compatible provider through the whole stack, against a local streaming server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from devstack.servers import Server
from tests.fake_openai import ANSWER, FakeOpenAI, serve_in_thread
from tests.stack import WAIT_S, Clients, Stack, history, isolated_stack, new_session, openai_env


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeOpenAI, str]]:
    server = FakeOpenAI()
    with serve_in_thread(server.app) as url:
        yield server, url


@pytest.fixture(scope="module")
def openai_stack(fake: tuple[FakeOpenAI, str], redis_server: Server) -> Iterator[Stack]:
    """Its own NATS, so no demo worker takes these requests."""
    env = openai_env(fake[1], CHAT_OPENAI_MODEL="fake-model")
    with isolated_stack(redis_server.url, env) as stack:
        yield stack


@pytest.fixture
async def oclients(openai_stack: Stack) -> AsyncIterator[Clients]:
    async with Clients(openai_stack) as opened:
        yield opened


async def test_streams_answer_and_sends_history(openai_stack: Stack, oclients: Clients, fake: tuple[FakeOpenAI, str]) -> None:
    """Split, merged and comment-laden SSE parses into the exact answer; turn 2 carries turn 1."""
    server, _ = fake
    session = new_session()
    client, _ = await oclients.open(session)
    _, text, done = await client.turn("hello")
    assert text == "".join(ANSWER)
    assert done["reason"] == "stop"
    _, text2, _ = await client.turn("and again")
    assert text2 == "".join(ANSWER)
    sent = server.requests[-1]
    assert sent["model"] == "fake-model" and sent["stream"] is True
    assert sent["messages"] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "".join(ANSWER)},
        {"role": "user", "content": "and again"},
    ]
    assert server.authorization[-1] == "Bearer sk-test-not-a-secret"
    record = await history(openai_stack, session)
    oclients.wire.assert_history(session, record)
    assert [t["answer"] for t in record["turns"]] == [text, text2]


@pytest.mark.parametrize(
    ("prompt", "expected_text", "needle"),
    [
        ("[500] please", "", "HTTP 500"),
        ("[drop] please", "partial answer", "dropped mid-answer"),
        ("[error-event] please", "some", "content policy triggered"),
    ],
)
async def test_upstream_failures_end_turn_with_error(
    openai_stack: Stack, oclients: Clients, prompt: str, expected_text: str, needle: str
) -> None:
    """HTTP errors, a cut connection and error payloads end the turn with done/error; the session goes on."""
    session = new_session()
    client, _ = await oclients.open(session)
    _, text, done = await client.turn(prompt)
    assert text == expected_text
    assert done["reason"] == "error"
    assert needle in done["message"]
    assert "sk-test" not in done["message"]
    _, text, done = await client.turn("works again")
    assert done["reason"] == "stop" and text == "".join(ANSWER)
    oclients.wire.assert_history(session, await history(openai_stack, session))


async def test_stop_closes_the_upstream_request(openai_stack: Stack, oclients: Clients, fake: tuple[FakeOpenAI, str]) -> None:
    """stop makes the worker close its upstream HTTP request and end the turn with stopped."""
    server, _ = fake
    server.disconnected.clear()
    session = new_session()
    client, _ = await oclients.open(session)
    await client.send({"type": "chat", "prompt": "[long] story"})
    await client.until("chunk")
    await client.send({"type": "stop"})
    done = await client.until("done")
    assert done["reason"] == "stopped"
    assert server.disconnected.wait(WAIT_S), "the upstream request was not closed"
    oclients.wire.assert_history(session, await history(openai_stack, session))

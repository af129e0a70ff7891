"""The conformance corpus: every recorded stream shape of real OpenAI-compatible servers, replayed
byte for byte (whole, and one byte per write) to the real worker through the real gateway, gives
exactly the expected answer text and done (reason, code, message)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from devstack.servers import Server
from tests.replay_server import ReplayServer, Shape, load_corpus
from tests.stack import WAIT_S, Clients, Stack, history, isolated_stack, new_session, openai_env

SHAPES = load_corpus()


@pytest.fixture(scope="module")
def replay() -> Iterator[tuple[ReplayServer, str]]:
    server = ReplayServer(SHAPES)
    with server.serve() as url:
        yield server, url


@pytest.fixture(scope="module")
def corpus_stack(replay: tuple[ReplayServer, str], redis_server: Server) -> Iterator[Stack]:
    env = openai_env(replay[1], CHAT_UPSTREAM_RETRY_INITIAL_S="0.01")
    with isolated_stack(redis_server.url, env) as stack:
        yield stack


@pytest.fixture
async def mclients(corpus_stack: Stack) -> AsyncIterator[Clients]:
    async with Clients(corpus_stack) as opened:
        yield opened


def test_the_corpus_covers_every_server_and_kind() -> None:
    """At least 25 shapes, each citing its source, from every server family the product claims to serve."""
    assert len(SHAPES) >= 25
    assert all(shape.source.startswith("https://") for shape in SHAPES.values())
    families = {name.split("-")[0] for name in SHAPES}
    assert {"openai", "azure", "ollama", "vllm", "llamacpp", "lmstudio", "tgi", "groq", "deepseek", "mistral",
            "openrouter", "litellm"} <= families
    expected = {(shape.expect["reason"], shape.expect.get("code")) for shape in SHAPES.values()}
    assert {("stop", None), ("length", None), ("error", None), ("error", "content_filter"), ("error", "tool_calls")} <= expected


@pytest.mark.parametrize("split", ["whole", "bytes"])
@pytest.mark.parametrize("name", sorted(SHAPES))
async def test_stream_shape(name: str, split: str, corpus_stack: Stack, mclients: Clients) -> None:
    """The shape's answer text and done come out exactly as its file expects; history agrees."""
    shape: Shape = SHAPES[name]
    session = new_session()
    client, _ = await mclients.open(session)
    _, text, done = await client.turn(f"[shape:{name}:{split}:{uuid.uuid4().hex[:12]}]", wait_s=3 * WAIT_S)
    expect = shape.expect
    assert text == expect.get("text", text), shape.source
    assert (done["reason"], done.get("code")) == (expect["reason"], expect.get("code")), done
    if "message" in expect:
        assert expect["message"] in done["message"], done["message"]
    assert "sk-test" not in done.get("message", "")
    mclients.wire.assert_history(session, await history(corpus_stack, session))


async def test_the_request_is_what_openai_compatible_servers_expect(replay: tuple[ReplayServer, str], mclients: Clients) -> None:
    """One POST to /v1/chat/completions with the bearer key, the model, the messages and stream true."""
    server, _ = replay
    client, _ = await mclients.open(new_session())
    before = len(server.requests)
    await client.turn(f"[shape:openai-basic:whole:{uuid.uuid4().hex[:12]}]")
    [request] = server.requests[before:]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == "Bearer sk-test-not-a-secret"
    assert request["body"]["stream"] is True and request["body"]["messages"][-1]["role"] == "user"


@pytest.mark.parametrize(
    ("name", "usage"),
    [
        ("groq-x-groq-usage", {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22}),
        ("openai-include-usage", {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}),
    ],
)
async def test_finish_reason_usage_and_response_id_are_recorded(
    name: str, usage: dict[str, int], corpus_stack: Stack, mclients: Clients
) -> None:
    """The worker's 'turn finished' log line carries the server's own finish reason, response id and
    usage, also when the usage comes in a chunk of its own after the finish (OpenAI)."""
    client, _ = await mclients.open(new_session())
    _, _, done = await client.turn(f"[shape:{name}:whole:{uuid.uuid4().hex[:12]}]")
    assert done["reason"] == "stop"
    worker = next(p for p in corpus_stack.processes if p.module == "services.llm_worker")
    finished = [json.loads(line) for line in worker.output().splitlines() if '"turn_finished"' in line]
    assert any(
        entry.get("upstream_finish") == "stop" and entry.get("response_id") == "chatcmpl-1" and entry.get("usage") == usage
        for entry in finished
    ), finished[-3:]

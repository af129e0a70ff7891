"""A property-based fuzz of client frames against a running gateway, and graceful drain."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from devstack.servers import Server
from shared.backoff import Backoff
from shared.client import ChatClient, Disconnected, GaveUp
from shared.protocol import Chunk, Done
from tests.faultproxy import FaultProxy
from tests.stack import WAIT_S, Stack, history, isolated_stack, new_session

TYPES = ["chat", "pause", "resume", "stop", "ping", "auth", "ack", "nope", "", "CHAT", "chat.v1"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
frames = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(TYPES)}, optional={
        "prompt": json_values, "id": json_values, "t": json_values, "seq": json_values, "token": json_values,
        "extra": json_values,
    }).map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=50),
)


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


async def _fuzz(stack: Stack, batch: list[str | bytes]) -> None:
    """Send the batch on one connection; every frame before the marker pong is an answer per the protocol."""
    async with connect(stack.ws_url(session=new_session()), subprotocols=["chat.v1"]) as ws:  # type: ignore[list-item]
        assert json.loads(await ws.recv())["type"] == "ready"
        for frame in batch:
            await ws.send(frame)
        await ws.send(json.dumps({"type": "ping", "t": "marker"}))
        async with asyncio.timeout(WAIT_S):
            while True:
                answer = json.loads(await ws.recv())
                if answer == {"type": "pong", "t": "marker"}:
                    break
                assert answer["type"] in ("error", "pong", "accepted", "paused", "resumed", "chunk", "done"), answer
                if answer["type"] == "error":
                    assert answer["code"] in ("invalid", "busy", "too_big", "rate_limited", "unauthorized", "unavailable")
                    assert answer["message"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(frames, min_size=1, max_size=12))
def test_fuzzed_frames_are_answered_and_leak_nothing(stack: Stack, batch: list[str | bytes]) -> None:
    """Random frames never crash a connection; each gets a protocol answer; the gateway's tasks do not grow."""

    async def run() -> None:
        async with httpx.AsyncClient(base_url=stack.http_url) as http:
            before = _metric((await http.get("/metrics")).text, "chat_gateway_tasks")
            await _fuzz(stack, batch)
            # The connection's tasks end once the gateway has processed the close; another
            # process's state offers no event to wait on, so this is a deadline-bounded check.
            async with asyncio.timeout(WAIT_S):
                while (after := _metric((await http.get("/metrics")).text, "chat_gateway_tasks")) > before + 4:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            # A chat in the batch may leave a turn's worker-side work running: a few tasks of slack.
            assert after <= before + 4

    asyncio.run(run())


@pytest.fixture
def two_gateways(redis_server: Server) -> Iterator[Stack]:
    with isolated_stack(redis_server.url, {"CHAT_DEMO_TOKENS_PER_S": "100", "CHAT_DEMO_ANSWER_TOKENS": "400"}) as stack:
        stack.start_gateway()
        yield stack


async def test_gateway_sigterm_mid_stream_moves_the_client(two_gateways: Stack) -> None:
    """SIGTERM closes the gateway's sockets with 1012; the client finishes the turn on the other one, every seq once."""
    first, second = two_gateways.gateways
    session = new_session()
    seqs: list[int] = []
    text: list[str] = []
    codes: list[int | None] = []
    async with FaultProxy("127.0.0.1", int(first.env["CHAT_PORT"])) as proxy:
        client = ChatClient(proxy.url(), session=session, backoff=Backoff(initial_s=0.05, cap_s=0.1))
        async with client:
            await client.chat("outlive a gateway")
            async with asyncio.timeout(3 * WAIT_S):
                async for event in client.events():
                    assert not isinstance(event, GaveUp), event
                    if isinstance(event, (Chunk, Done)):
                        assert event.seq == len(seqs) + 1
                        seqs.append(event.seq)
                    if isinstance(event, Chunk):
                        text.append(event.text)
                        if len(seqs) == 20:
                            proxy.target = ("127.0.0.1", int(second.env["CHAT_PORT"]))  # the load balancer's view
                            first.signal(signal.SIGTERM)
                    if isinstance(event, Disconnected):
                        codes.append(event.code)
                    if isinstance(event, Done):
                        break
    assert 1012 in codes
    # It exited within its bound (uvicorn re-raises SIGTERM after a graceful shutdown).
    assert first.process is not None and first.process.wait(10) in (0, -signal.SIGTERM)
    two_gateways.port = int(second.env["CHAT_PORT"])
    assert "".join(text) == (await history(two_gateways, session))["turns"][0]["answer"]


@pytest.mark.parametrize("slots", ["16", "1"])
async def test_worker_sigterm_ends_unfinished_turns_cleanly(redis_server: Server, slots: str) -> None:
    """A worker told to stop mid-turn, with room to spare or with every slot taken, ends the turn with
    done/error after its drain timeout; the session goes on."""
    env = {"CHAT_DEMO_TOKENS_PER_S": "50", "CHAT_DEMO_ANSWER_TOKENS": "2000", "CHAT_DRAIN_TIMEOUT_S": "0.5",
           "CHAT_WORKER_CONCURRENCY": slots}
    with isolated_stack(redis_server.url, env) as stack:
        async with connect(stack.ws_url(session=new_session()), subprotocols=["chat.v1"]) as ws:  # type: ignore[list-item]
            await ws.recv()
            await ws.send(json.dumps({"type": "chat", "prompt": "never finished"}))
            frame: dict[str, object] = {}
            while frame.get("type") != "chunk":
                frame = json.loads(await ws.recv())
            worker = next(p for p in stack.processes if p.module == "services.llm_worker")
            worker.signal(signal.SIGTERM)
            async with asyncio.timeout(WAIT_S):
                while frame.get("type") != "done":
                    frame = json.loads(await ws.recv())
            assert frame["reason"] == "error" and "restarted" in str(frame["message"])
            assert worker.process is not None and worker.process.wait(10) in (0, -signal.SIGTERM)
            stack.start_worker()
            await ws.send(json.dumps({"type": "chat", "prompt": "and again"}))
            while frame.get("type") != "accepted":
                frame = json.loads(await ws.recv())
            assert frame["turn"] == 2

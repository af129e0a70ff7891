"""Graceful drain: a gateway or a worker told to stop mid-turn. (The protocol
fuzz is in test_fuzz.py.) Every frame read goes through the strict wire checker."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect

from devstack.servers import Server
from shared.backoff import Backoff
from shared.client import ChatClient, Disconnected, GaveUp
from shared.protocol import Chunk, Done
from tests.faultproxy import FaultProxy
from tests.stack import WAIT_S, Stack, history, isolated_stack, new_session
from tests.wire import WireChecker


@pytest.fixture
def two_gateways(redis_server: Server) -> Iterator[Stack]:
    with isolated_stack(redis_server.url, {"CHAT_DEMO_TOKENS_PER_S": "100", "CHAT_DEMO_ANSWER_TOKENS": "400"}) as stack:
        stack.start_gateway()
        yield stack


async def test_gateway_sigterm_mid_stream_moves_the_client(two_gateways: Stack) -> None:
    """SIGTERM closes the gateway's sockets with 1012; the client finishes the turn on the other one, every seq once."""
    first, second = two_gateways.gateways
    session = new_session()
    text: list[str] = []
    codes: list[int | None] = []
    checker = WireChecker()
    async with FaultProxy("127.0.0.1", int(first.env["CHAT_PORT"])) as proxy:
        client = ChatClient(
            proxy.url(), session=session, backoff=Backoff(initial_s=0.05, cap_s=0.1), wire_tap=checker.tap()
        )
        async with client:
            await client.chat("outlive a gateway")
            async with asyncio.timeout(3 * WAIT_S):
                async for event in client.events():
                    assert not isinstance(event, GaveUp), event
                    if isinstance(event, Chunk):  # the wire checker judges seqs; the events drive the test
                        text.append(event.text)
                        if len(text) == 20:
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
    stored = await history(two_gateways, session)
    assert "".join(text) == stored["turns"][0]["answer"]
    checker.assert_history(session, stored)  # on the raw frames of both gateways' connections


@pytest.mark.parametrize("slots", ["16", "1"])
async def test_worker_sigterm_ends_unfinished_turns_cleanly(redis_server: Server, slots: str) -> None:
    """A worker told to stop mid-turn, with room to spare or with every slot taken, ends the turn with
    done/error after its drain timeout; the session goes on."""
    env = {
        "CHAT_DEMO_TOKENS_PER_S": "50",
        "CHAT_DEMO_ANSWER_TOKENS": "2000",
        "CHAT_DRAIN_TIMEOUT_S": "0.5",
        "CHAT_WORKER_CONCURRENCY": slots,
    }
    checker = WireChecker()
    session = new_session()
    with isolated_stack(redis_server.url, env) as stack:
        async with connect(stack.ws_url(session=session), subprotocols=["chat.v1"]) as ws:  # type: ignore[list-item]
            wire = checker.ws(session)

            async def until(kind: str) -> dict[str, Any]:
                async with asyncio.timeout(WAIT_S):
                    while (frame := wire.feed(await ws.recv()))["type"] != kind:
                        pass
                return frame

            await until("ready")
            await ws.send(json.dumps({"type": "chat", "prompt": "never finished"}))
            await until("chunk")
            worker = next(p for p in stack.processes if p.module == "services.llm_worker")
            worker.signal(signal.SIGTERM)
            done = await until("done")
            assert done["reason"] == "error" and "restarted" in str(done["message"])
            assert worker.process is not None and worker.process.wait(10) in (0, -signal.SIGTERM)
            stack.start_worker()
            await ws.send(json.dumps({"type": "chat", "prompt": "and again"}))
            assert (await until("accepted"))["turn"] == 2
            await ws.send(json.dumps({"type": "stop"}))
            await until("done")
            checker.assert_history(session, await history(stack, session))

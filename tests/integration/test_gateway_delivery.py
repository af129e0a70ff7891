"""How a gateway takes a session's delivery messages from NATS: several
frames in one message (a buffer's batch), and connections of one process
sharing one subscription per session."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from devstack.servers import Server
from services.gateway.subscriptions import is_direct, subscribe_direct
from shared.protocol import Chunk, Done, encode
from shared.subjects import SUBJECT_REPLAY, delivery_subject
from tests.sse_stream import SseStream
from tests.stack import WAIT_S, Client, Clients, Stack, history, isolated_stack, new_session


class ReplayWatch:
    """Sees the replay requests gateways send for one session: a feed asks for
    one when it starts, after its subscription is in place, so once it is
    seen a frame published to the session reaches that feed."""

    def __init__(self, nc: NATS, session: str) -> None:
        self.nc, self.session = nc, session
        self.requests: asyncio.Queue[None] = asyncio.Queue()

    async def start(self) -> None:
        async def on_request(msg: Msg) -> None:
            if json.loads(msg.data)["session"] == self.session:
                self.requests.put_nowait(None)

        await self.nc.subscribe(SUBJECT_REPLAY, cb=on_request)
        await self.nc.flush()

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S):
            for _ in range(count):
                await self.requests.get()


@asynccontextmanager
async def bus(stack: Stack, session: str) -> AsyncIterator[tuple[NATS, ReplayWatch]]:
    nc = await nats.connect(stack.env["CHAT_NATS_URL"])
    try:
        watch = ReplayWatch(nc, session)
        await watch.start()
        yield nc, watch
    finally:
        await nc.close()


def turn_frames(turn: int, first_seq: int, texts: list[str]) -> list[bytes]:
    """A turn's chunks then its done, numbered from ``first_seq``."""
    frames = [encode(Chunk(seq=first_seq + i, turn=turn, text=t)) for i, t in enumerate(texts)]
    return [*frames, encode(Done(seq=first_seq + len(texts), turn=turn, reason="stop"))]


async def test_a_message_of_several_frames_reaches_every_kind_of_connection(stack: Stack, clients: Clients) -> None:
    """One delivery message holding a whole turn's frames, joined by newlines, is
    delivered frame by frame, in order, to a WebSocket and to an SSE stream."""
    session = new_session()
    texts = ["one ", "two ", "three"]
    async with bus(stack, session) as (nc, watch), httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        client, _ = await clients.open(session)
        async with http.stream("GET", f"/api/sessions/{session}/events") as response:
            events = SseStream(response, clients.wire.sse(session, 0))
            await watch.wait(2)
            await nc.publish(delivery_subject(session), b"\n".join(turn_frames(1, 1, texts)))
            for reader in (client, events):
                done = await reader.until("done")
                assert done["seq"] == 4
            assert client.texts() == events.texts() == "".join(texts)


@pytest.fixture(scope="module")
def own_stack(redis_server: Server) -> Iterator[Stack]:
    """A stack of its own (so the gateway's subscription count is this file's alone), with answers
    lasting 1.5 s (100 tokens/s), for connections that join and leave while a turn streams."""
    with isolated_stack(redis_server.url, {"CHAT_DEMO_TOKENS_PER_S": "100", "CHAT_DEMO_ANSWER_TOKENS": "150"}) as running:
        yield running


async def gauge(http: httpx.AsyncClient, name: str) -> float:
    text = (await http.get("/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


async def until_gauge(http: httpx.AsyncClient, name: str, value: float) -> None:
    """Wait until the gateway reports ``value`` (another process's state offers no event: poll, bounded)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            if await gauge(http, name) == value:
                return
            await asyncio.sleep(0.02)


async def test_connections_to_a_session_share_one_subscription(own_stack: Stack) -> None:
    """Two connections to a session in one gateway make one subscription: the second joins while
    the first streams a turn and gets every frame once, in order; the first leaves mid-turn and the
    second goes on to the done. The last to leave unsubscribes, and the next connection subscribes
    again and streams the next turn."""
    stack, session = own_stack, new_session()
    async with Clients(stack) as clients, httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        first, _ = await clients.open(session)
        turn, _ = await start_turn(first)
        await first.until("chunk")
        second, _ = await clients.open(session)
        assert await gauge(http, "chat_gateway_subscribed_sessions") == 1
        await second.until("chunk")
        await first.ws.close()
        await until_gauge(http, "chat_gateway_open_connections", 1)
        assert await gauge(http, "chat_gateway_subscribed_sessions") == 1
        done = await second.until("done")
        await second.ws.close()
        await until_gauge(http, "chat_gateway_subscribed_sessions", 0)

        third, _ = await clients.open(session, last_seq=done["seq"])
        assert await gauge(http, "chat_gateway_subscribed_sessions") == 1
        next_turn, _, _ = await third.turn("again")
        stored = await history(stack, session)
        answers = {t["turn"]: t["answer"] for t in stored["turns"]}
        assert second.texts(turn) == answers[turn] and third.texts(next_turn) == answers[next_turn]
        assert second.texts(turn).startswith(first.texts(turn))


async def start_turn(client: Client) -> tuple[int, dict[str, Any]]:
    await client.send({"type": "chat", "prompt": "share it", "id": uuid.uuid4().hex})
    accepted = await client.until("accepted")
    return accepted["turn"], accepted


async def test_a_direct_subscription_hands_messages_on_in_order_without_a_task(nats_server: Server) -> None:
    """With the installed nats-py, a session's subscription calls its handler in the read loop (no
    task or queue of its own), in publish order, and unsubscribes; if a nats-py upgrade changed
    the internals this relies on, this fails rather than the gateway silently growing again."""
    got: list[tuple[str, bytes]] = []
    enough = asyncio.Event()

    def handler(subject: str, data: bytes) -> None:
        got.append((subject, data))
        if len(got) == 100:
            enough.set()

    nc = await nats.connect(nats_server.url)
    try:
        before = len(asyncio.all_tasks())
        sub = await subscribe_direct(nc, "direct.test.*", handler)
        assert is_direct(sub)
        for index in range(100):
            await nc.publish(f"direct.test.{index % 2}", str(index).encode())
        await asyncio.wait_for(enough.wait(), WAIT_S)
        assert len(asyncio.all_tasks()) == before  # nats-py's task for it has ended
        assert got == [(f"direct.test.{i % 2}", str(i).encode()) for i in range(100)]
        await sub.unsubscribe()
        await nc.publish("direct.test.0", b"after")
        await nc.flush()
        await nc.publish("direct.test.0", b"after")  # a round trip later: would have arrived by now
        await nc.flush()
        assert len(got) == 100
    finally:
        await nc.close()

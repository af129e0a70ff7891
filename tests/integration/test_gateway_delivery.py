"""How a gateway takes a session's delivery messages from NATS: several
frames in one message (a buffer's batch), and connections of one process
sharing one subscription per session."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared.protocol import Chunk, Done, encode
from shared.subjects import SUBJECT_REPLAY, delivery_subject
from tests.sse_stream import SseStream
from tests.stack import WAIT_S, Clients, Stack, new_session


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

"""The floor: a bare relay, one NATS hop into one WebSocket and nothing else.

Same web stack as the gateway (Starlette on uvicorn, websockets-sansio,
uvloop), no store, no sequencing, no replay, no pause, no auth. A client's
chat frame asks the source (bench/upstream.py ``--nats``) to publish its
stream onto a subject this connection subscribed to; every message is sent
on as one text frame; while paused, messages wait in a list in memory and
go out on resume. What our stack costs beyond this is the price of its
guarantees.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator

import nats
import uvicorn
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from shared.protocol import SUBPROTOCOL

from .upstream import START_SUBJECT, parse_stream_spec


def create_app(nats_url: str) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.nc = await nats.connect(nats_url)
        yield
        await app.state.nc.close()

    async def relay(websocket: WebSocket) -> None:
        nc: NATS = websocket.app.state.nc
        await websocket.accept(subprotocol=SUBPROTOCOL)
        subject = f"bench.relay.{uuid.uuid4().hex}"
        held: list[str] | None = None  # frames kept while paused

        async def forward(msg: Msg) -> None:
            if held is not None:
                held.append(msg.data.decode())
            else:
                await websocket.send_text(msg.data.decode())

        sub = await nc.subscribe(subject, cb=forward)
        await websocket.send_text('{"type":"ready","session":"relay","last_seq":0,"paused":false}')
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                frame = json.loads(message.get("text") or "{}")
                if frame.get("type") == "chat":
                    rate, tokens = parse_stream_spec(frame.get("prompt", ""))
                    spec = {"subject": subject, "rate": rate, "tokens": tokens}
                    await nc.request(START_SUBJECT, json.dumps(spec).encode(), timeout=5)
                    await websocket.send_text('{"type":"accepted","turn":1}')
                elif frame.get("type") == "pause" and held is None:
                    held = []
                    await websocket.send_text('{"type":"paused","seq":0}')
                elif frame.get("type") == "resume" and held is not None:
                    await websocket.send_text('{"type":"resumed","seq":0}')
                    while held:  # frames arriving meanwhile join the queue, so order holds
                        await websocket.send_text(held.pop(0))
                    held = None
        finally:
            await sub.unsubscribe()

    return Starlette(routes=[WebSocketRoute("/ws", relay)], lifespan=lifespan)


def main() -> None:
    uvicorn.run(
        create_app(os.environ["BENCH_NATS_URL"]),
        host="127.0.0.1",
        port=int(os.environ["BENCH_RELAY_PORT"]),
        ws=os.environ.get("BENCH_RELAY_WS", "websockets-sansio"),  # to compare implementations
        ws_per_message_deflate=False,
        log_config=None,
        access_log=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()

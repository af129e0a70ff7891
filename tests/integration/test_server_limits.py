"""The gateway drops silent connections; sessions expire after the retention TTL."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import InvalidStatus

from devstack.servers import Server
from shared.subjects import session_key
from tests.stack import WAIT_S, Clients, Stack, history, isolated_stack, new_session
from tests.wire import WireChecker

SHORT = {"CHAT_RETENTION_S": "1", "CHAT_PING_INTERVAL_S": "0.2", "CHAT_PING_TIMEOUT_S": "0.3"}


@pytest.fixture(scope="module")
def short_stack(redis_server: Server) -> Iterator[Stack]:
    """One-second retention and a fast ping."""
    with isolated_stack(redis_server.url, SHORT) as stack:
        yield stack


def server_frames(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The opcode and payload of each whole frame in bytes a server sent (unmasked; RFC 6455, 5.2)."""
    at = 0
    while at + 2 <= len(data):
        assert data[at] & 0x80, "a fragmented frame"  # FIN: the gateway sends whole messages
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length in (126, 127):
            size = 2 if length == 126 else 8
            length = int.from_bytes(data[at : at + size], "big")
            at += size
        if at + length > len(data):
            return
        yield opcode, data[at : at + length]
        at += length


async def test_gateway_drops_a_connection_that_stops_answering(short_stack: Stack) -> None:
    """A client that completes the upgrade and then answers no ping is closed by the gateway."""
    session = new_session()
    wire = WireChecker()
    reader, writer = await asyncio.open_connection("127.0.0.1", short_stack.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws?session={session} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: chat.v1\r\n\r\n"
        ).encode()
    )
    response = await reader.readuntil(b"\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 101")
    received = b""
    async with asyncio.timeout(WAIT_S):
        while chunk := await reader.read(4096):  # pings arrive; no pong goes back
            received += chunk
    frames = list(server_frames(received))
    socket = wire.ws(session)
    for opcode, payload in frames:
        if opcode == 0x1:  # text: the protocol's frames, checked as any connection's
            socket.feed(payload.decode())
    assert socket.ready is not None
    assert 0x9 in [opcode for opcode, _ in frames]  # a ping frame was sent before the close
    writer.close()
    wire.assert_clean()


async def test_sessions_expire_after_retention(short_stack: Stack, redis_server: Server) -> None:
    """A session's record is gone after CHAT_RETENTION_S; resuming it is refused."""
    session = new_session()
    redis = aioredis.Redis.from_url(short_stack.env["CHAT_REDIS_URL"])
    await redis.config_set("notify-keyspace-events", "Ex")
    pubsub = redis.pubsub()
    await pubsub.subscribe(f"__keyevent@{short_stack.database}__:expired")
    try:
        clients = Clients(short_stack)
        client, _ = await clients.open(session)
        await client.turn("short-lived")
        last_seq = client.last_seq
        clients.wire.assert_history(session, await history(short_stack, session))
        await clients.close()
        async with asyncio.timeout(WAIT_S):
            async for message in pubsub.listen():
                if message["type"] == "message" and message["data"] == session_key(session).encode():
                    break
        record = await history(short_stack, session)
        assert record["turns"] == [] and record["last_seq"] == 0
        with pytest.raises(InvalidStatus) as refused:
            await clients.open(session, last_seq=last_seq)
        assert refused.value.response.status_code == 400
        clients.wire.assert_clean()
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        await redis.aclose()

"""The Python client's token path against a real WebSocket peer (the gateway's auth is a later issue)."""

from __future__ import annotations

import json

from websockets.asyncio.server import ServerConnection, serve

from shared.backoff import Backoff
from shared.client import ChatClient, GaveUp
from shared.protocol import Chunk, Done


async def test_4001_refreshes_the_token_and_resumes() -> None:
    """After a 4001 the client asks its token provider again, reconnects with the new token and resumes."""
    seen: list[tuple[str | None, str]] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        seen.append((ws.request.headers.get("Authorization"), ws.request.path))
        await ws.send(json.dumps({"type": "ready", "session": "s1", "last_seq": 1, "paused": False}))
        if len(seen) == 1:
            await ws.send(json.dumps({"type": "chunk", "seq": 1, "turn": 1, "text": "a"}))
            await ws.close(4001, "token expired")
            return
        await ws.send(json.dumps({"type": "chunk", "seq": 1, "turn": 1, "text": "a"}))  # replayed: dropped
        await ws.send(json.dumps({"type": "chunk", "seq": 2, "turn": 1, "text": "b"}))
        await ws.send(json.dumps({"type": "done", "seq": 3, "turn": 1, "reason": "stop"}))
        await ws.wait_closed()

    tokens = iter(["t1", "t2"])

    async def provider() -> str:
        return next(tokens)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = ChatClient(
            f"ws://127.0.0.1:{port}/ws", session="s1", token_provider=provider, backoff=Backoff(initial_s=0.01, cap_s=0.02)
        )
        async with client:
            frames = []
            async for event in client.events():
                assert not isinstance(event, GaveUp)
                if isinstance(event, (Chunk, Done)):
                    frames.append(event)
                if isinstance(event, Done):
                    break
    assert [f.seq for f in frames] == [1, 2, 3]
    assert [auth for auth, _ in seen] == ["Bearer t1", "Bearer t2"]
    assert seen[1][1] == "/ws?session=s1&last_seq=1"  # resumed after the chunk it had; the token rides in the header


async def test_failing_token_provider_is_retried_with_backoff() -> None:
    """A token provider that fails is a failed attempt: the client backs off and asks again."""
    seen: list[str | None] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        seen.append(ws.request.headers.get("Authorization"))
        await ws.send(json.dumps({"type": "ready", "session": "s1", "last_seq": 0, "paused": False}))
        await ws.wait_closed()

    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("identity provider unreachable")
        return "t2"

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = ChatClient(f"ws://127.0.0.1:{port}/ws", token_provider=provider, backoff=Backoff(initial_s=0.01, cap_s=0.02))
        async with client:
            events = [type(e).__name__ async for e in _until_connected(client)]
    assert events[0] == "Reconnecting"
    assert seen == ["Bearer t2"]


async def _until_connected(client: ChatClient):  # type: ignore[no-untyped-def]
    async for event in client.events():
        yield event
        if type(event).__name__ == "Connected":
            return

"""The Python client against a real WebSocket peer that refuses, is absent, or replays:
refusals carry the server's reason and stop or retry by status; the first
connection has a deadline; tokens ride in a header; ``turn()`` follows its own turn."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from devstack.servers import free_port
from shared.backoff import Backoff
from shared.client import ChatClient, ChatRejected, ClientClosed, GaveUp, HandshakeRefused, Reconnecting
from shared.protocol import Accepted, Chunk, Done
from tests.stack import WAIT_S

FAST = Backoff(initial_s=0.01, cap_s=0.02)


def json_refusal(status: int, code: str, message: str) -> Response:
    body = json.dumps({"type": "error", "code": code, "message": message}).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return Response(status, HTTPStatus(status).phrase, headers, body)


@asynccontextmanager
async def peer(
    refuse: Callable[[Request], Response | None] | None = None,
    handler: Callable[[ServerConnection], Any] | None = None,
) -> AsyncIterator[tuple[str, list[Request]]]:
    """A WebSocket server on a free port; yields its URL and the requests it got."""
    requests: list[Request] = []

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        requests.append(request)
        return refuse(request) if refuse is not None else None

    async def default(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with serve(handler or default, "127.0.0.1", 0, process_request=process_request) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws", requests


async def all_events(client: ChatClient) -> list[object]:
    async with asyncio.timeout(WAIT_S):
        return [event async for event in client.events()]


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (400, "invalid", "last_seq 99 is beyond the session's last seq 3"),
        (401, "unauthorized", "a token is required"),
        (403, "forbidden", "this session belongs to another user"),
    ],
)
async def test_refusal_stops_at_once_with_the_servers_reason(status: int, code: str, message: str) -> None:
    """400, 401 (no token provider) and 403 are not retried; the reason is the server's code and message."""
    async with peer(lambda request: json_refusal(status, code, message)) as (url, requests):
        async with ChatClient(url, backoff=FAST) as client:
            events = await all_events(client)
            with pytest.raises(HandshakeRefused) as raised:
                await client.chat("hello")
    assert len(requests) == 1
    assert len(events) == 1 and isinstance(events[0], GaveUp)
    error = events[0].error
    assert isinstance(error, HandshakeRefused)
    assert (error.status, error.code, error.message) == (status, code, message)
    assert raised.value is error
    assert events[0].reason == f"the gateway refused the connection: HTTP {status} {code}: {message}"


@pytest.mark.parametrize(("status", "code"), [(429, "rate_limited"), (503, "unavailable")])
async def test_limits_are_retried_and_say_why(status: int, code: str) -> None:
    """429 and 503 retry; each Reconnecting names the refusal, and the last GaveUp carries it."""
    async with peer(lambda request: json_refusal(status, code, "too many connections")) as (url, requests):
        async with ChatClient(url, backoff=Backoff(initial_s=0.01, cap_s=0.02, max_attempts=2)) as client:
            events = await all_events(client)
    assert [type(e) for e in events] == [Reconnecting, Reconnecting, GaveUp]
    assert all(f"HTTP {status} {code}: too many connections" in e.reason for e in events)  # type: ignore[attr-defined]
    assert isinstance(events[-1], GaveUp) and isinstance(events[-1].error, HandshakeRefused)
    assert len(requests) == 3


async def test_a_body_that_is_not_json_is_still_shown() -> None:
    """A proxy's plain-text refusal is the message; the code is unknown."""

    def refuse(request: Request) -> Response:
        body = b"upstream connect error\n"
        return Response(403, "Forbidden", Headers([("Content-Length", str(len(body)))]), body)

    async with peer(refuse) as (url, _):
        async with ChatClient(url, backoff=FAST) as client:
            events = await all_events(client)
    assert isinstance(events[-1], GaveUp) and isinstance(events[-1].error, HandshakeRefused)
    assert (events[-1].error.code, events[-1].error.message) == (None, "upstream connect error")


async def test_a_fixed_token_goes_in_the_header_and_a_401_for_it_stops() -> None:
    """token= is sent as Authorization: Bearer, never in the URL; refused, it is not resent forever."""
    async with peer(lambda request: json_refusal(401, "unauthorized", "the token has expired")) as (url, requests):
        async with ChatClient(url, token="secret-token-1", backoff=FAST) as client:
            events = await all_events(client)
    assert len(requests) == 1
    assert requests[0].headers["Authorization"] == "Bearer secret-token-1"
    assert "secret-token-1" not in requests[0].path
    assert isinstance(events[-1], GaveUp) and "secret-token-1" not in events[-1].reason


async def test_a_provider_token_refused_on_arrival_stops_after_one_refresh() -> None:
    """An old token refused with 401 is refreshed once; a fresh token refused too ends the client."""
    given: list[str] = []

    async def provider() -> str:
        given.append(f"t{len(given) + 1}")
        return given[-1]

    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "ready", "session": "s1", "last_seq": 0, "paused": False}))
        await ws.close(1012, "restarting")  # the next handshake reuses the token it has

    accepted: list[Request] = []
    refused: list[Request] = []

    def refuse_now(request: Request) -> Response:
        refused.append(request)
        return json_refusal(401, "unauthorized", "the token has expired")

    def decide(request: Request) -> Response | None:
        if not accepted:
            accepted.append(request)
            return None
        return refuse_now(request)

    async with peer(decide, handler) as (url, _):
        async with ChatClient(url, token_provider=provider, backoff=FAST) as client:
            events = await all_events(client)
    assert given == ["t1", "t2"]
    assert [r.headers["Authorization"] for r in refused] == ["Bearer t1", "Bearer t2"]
    assert isinstance(events[-1], GaveUp) and isinstance(events[-1].error, HandshakeRefused)


async def test_first_connection_has_a_deadline_and_says_why() -> None:
    """Nothing listening: every retry names the URL and the cause, and the client
    gives up once connect_timeout_s has passed, not after unlimited attempts."""
    url = f"ws://127.0.0.1:{free_port()}/ws"
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with ChatClient(url, backoff=Backoff(initial_s=0.05, cap_s=0.1), connect_timeout_s=0.5) as client:
        events = await all_events(client)
    took = loop.time() - started
    assert 0.5 <= took < WAIT_S
    retries = [e for e in events if isinstance(e, Reconnecting)]
    assert retries and all(e.reason == f"cannot reach {url}: connection refused" for e in retries)
    assert isinstance(events[-1], GaveUp)
    assert events[-1].reason == f"could not connect within 0.5 s: cannot reach {url}: connection refused"
    with pytest.raises(ClientClosed, match="could not connect within 0.5 s"):
        await client.chat("hello")


def replaying_server(busy: bool = False) -> Callable[[ServerConnection], Any]:
    """A session with one finished turn: a connection at last_seq=0 first gets turn 1 again."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "ready", "session": "demo", "last_seq": 3, "paused": False}))
        await ws.send(json.dumps({"type": "chunk", "seq": 1, "turn": 1, "text": "old "}))
        await ws.send(json.dumps({"type": "chunk", "seq": 2, "turn": 1, "text": "answer"}))
        await ws.send(json.dumps({"type": "done", "seq": 3, "turn": 1, "reason": "stop"}))
        async for message in ws:
            frame = json.loads(message)
            if frame["type"] != "chat":
                continue
            if busy:
                await ws.send(json.dumps({"type": "error", "code": "busy", "message": "a turn is generating", "id": frame["id"]}))
                continue
            await ws.send(json.dumps({"type": "accepted", "turn": 2, "id": frame["id"]}))
            await ws.send(json.dumps({"type": "chunk", "seq": 4, "turn": 2, "text": "new "}))
            await ws.send(json.dumps({"type": "chunk", "seq": 5, "turn": 2, "text": "answer"}))
            await ws.send(json.dumps({"type": "done", "seq": 6, "turn": 2, "reason": "stop"}))

    return handler


async def test_turn_follows_its_own_turn_past_the_replay() -> None:
    """With last_seq=0 the replayed turn 1 is skipped: turn() yields turn 2's accepted, chunks and done."""
    async with peer(handler=replaying_server()) as (url, _):
        async with ChatClient(url, session="demo") as client:
            async with asyncio.timeout(WAIT_S):
                events = [event async for event in client.turn("and again")]
    frames = [e for e in events if isinstance(e, (Accepted, Chunk, Done))]
    assert [type(f) for f in frames] == [Accepted, Chunk, Chunk, Done]
    assert "".join(f.text for f in frames if isinstance(f, Chunk)) == "new answer"
    assert isinstance(frames[-1], Done) and frames[-1].turn == 2


async def test_turn_raises_when_the_chat_is_refused() -> None:
    """An error answering the chat (busy) is an exception, not a silent end."""
    async with peer(handler=replaying_server(busy=True)) as (url, _):
        async with ChatClient(url, session="demo") as client:
            with pytest.raises(ChatRejected) as raised:
                async with asyncio.timeout(WAIT_S):
                    async for _ in client.turn("and again"):
                        pass
    assert (raised.value.code, raised.value.message) == ("busy", "a turn is generating")

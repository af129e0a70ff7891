"""HTTP endpoints (JSON, SSE, controls, history, health) and the original design's client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect

from devstack.servers import Server
from tests.sse_stream import SseStream
from tests.stack import TIMEOUT_FACTOR, WAIT_S, Bus, Clients, Stack, history, isolated_stack, new_session
from tests.wire import WireChecker

SSE = {"Accept": "text/event-stream"}  # POST /api/chat: stream the turn back


async def stored_frames(bus: Bus, count: int) -> None:
    """Wait until the buffer has stored and published ``count`` more frames of the session."""
    async with asyncio.timeout(WAIT_S):
        for _ in range(count):
            await bus.frames.get()


async def test_post_chat_returns_202_and_streams_to_sockets(stack: Stack, clients: Clients) -> None:
    """POST /api/chat starts a turn whose frames reach the session's sockets."""
    session = new_session()
    client, _ = await clients.open(session)
    async with httpx.AsyncClient(base_url=stack.http_url) as http:
        response = await http.post("/api/chat", json={"session": session, "prompt": "over http"})
    assert response.status_code == 202
    assert response.json() == {"session": session, "turn": 1}
    clients.wire.accepted(session, 1)
    await client.until("done")
    clients.wire.assert_history(session, await history(stack, session))


async def test_post_chat_sse_streams_the_turn(stack: Stack) -> None:
    """With Accept: text/event-stream the turn streams back as SSE with id = seq, and ends after its done."""
    wire = WireChecker()
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        async with http.stream("POST", "/api/chat", json={"prompt": "sse please"}, headers=SSE) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            session = response.headers["x-chat-session"]
            turn = int(response.headers["x-chat-turn"])
            stream = SseStream(response, wire.sse(session, None, turn=turn))
            await stream.to_end()
    assert turn == 1 and [f["type"] for f in stream.frames][-1] == "done"
    wire.assert_history(session, await history(stack, session))


async def test_events_resume_from_last_event_id(stack: Stack, clients: Clients) -> None:
    """GET events with Last-Event-ID replays exactly the frames after it."""
    session = new_session()
    client, _ = await clients.open(session)
    await client.turn("first")
    await client.turn("second")
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        async with http.stream("GET", f"/api/sessions/{session}/events", headers={"Last-Event-ID": "7"}) as response:
            stream = SseStream(response, clients.wire.sse(session, 7))
            while stream.wire.cursor != client.last_seq:
                await stream.recv()
        assert [f["seq"] for f in stream.frames] == list(range(8, client.last_seq + 1))
        async with http.stream("GET", f"/api/sessions/{session}/events?last_seq=abc") as response:
            assert response.status_code == 400
    clients.wire.assert_history(session, await history(stack, session))


async def test_http_controls_pause_resume_stop(paced_stack: Stack, paced: Clients) -> None:
    """pause/resume/stop over HTTP act on the session's sockets like the frames do."""
    stack = paced_stack
    session = new_session()
    client, _ = await paced.open(session)
    async with httpx.AsyncClient(base_url=stack.http_url) as http:
        await client.send({"type": "chat", "prompt": "control me"})
        await client.until("chunk")
        assert (await http.post(f"/api/sessions/{session}/pause")).json() == {"session": session, "paused": True}
        paused = await client.until("paused")
        assert (await http.post(f"/api/sessions/{session}/resume")).status_code == 200
        resumed = await client.until("resumed")
        assert resumed["seq"] == paused["seq"]
        response = await http.post(f"/api/sessions/{session}/resume")
        assert response.status_code == 409 and response.json()["code"] == "invalid"
        stop = await http.post(f"/api/sessions/{session}/stop")
        assert stop.status_code == 202
        done = await client.until("done")
        assert done["reason"] == "stopped"
        # Once idle, stop has nothing to act on.
        assert (await http.post(f"/api/sessions/{session}/stop")).status_code == 409
        busy_check = await http.post("/api/chat", json={"session": session, "prompt": "again"})
        assert busy_check.status_code == 202
        paced.wire.accepted(session, busy_check.json()["turn"])
        second = await http.post("/api/chat", json={"session": session, "prompt": "too soon"})
        assert second.status_code == 409 and second.json()["code"] == "busy"
        await client.until("done")
    paced.wire.assert_history(session, await history(stack, session))


async def test_http_pause_holds_every_connection(paced_stack: Stack, paced: Clients) -> None:
    """Guarantee 2 over POST …/pause: while a turn streams to a WebSocket, a session events stream and
    the turn's own POST /api/chat stream, each gets paused and nothing after it, even once the whole
    turn is stored; after POST …/resume, each gets the rest in order."""
    stack, wire = paced_stack, paced.wire
    session = new_session()
    client, _ = await paced.open(session)
    async with Bus(stack, session) as bus, httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        async with http.stream("GET", f"/api/sessions/{session}/events") as events_response, http.stream(
            "POST", "/api/chat", json={"session": session, "prompt": "hold it"}, headers=SSE
        ) as turn_response:
            assert turn_response.status_code == 200
            turn = int(turn_response.headers["x-chat-turn"])
            events = SseStream(events_response, wire.sse(session, 0))
            own = SseStream(turn_response, wire.sse(session, None, turn=turn))
            for reader in (client, events, own):
                await reader.until("chunk")
            assert (await http.post(f"/api/sessions/{session}/pause")).json() == {"session": session, "paused": True}
            for reader in (client, events, own):
                await reader.until("paused")
            # Generation goes on: the whole turn is stored while every connection holds.
            stored = await bus.stored_done(turn)
            # The pong is queued after any frame the gateway had taken from NATS: reading it reads
            # past everything the pause let through (none, or the checker fails).
            await client.send({"type": "ping", "t": "marker"})
            assert (await client.until("pong"))["t"] == "marker"
            assert max(reader.wire.cursor or 0 for reader in (client, events, own)) < stored["seq"]
            assert (await http.post(f"/api/sessions/{session}/resume")).json() == {"session": session, "paused": False}
            # Any frame that leaked before resumed is fed, and refused, on the way to the done.
            for reader in (client, events, own):
                await reader.until("resumed")
                await reader.until("done")
            await own.to_end()
    wire.assert_history(session, await history(stack, session))


async def test_connections_opened_while_paused_wait_for_a_resume(paced_stack: Stack, paced: Clients) -> None:
    """A WebSocket (ready.paused true) and an events stream opened while the session is paused get
    nothing, even once the turn is stored, until another connection resumes; then all of it, in order."""
    stack, wire = paced_stack, paced.wire
    session = new_session()
    first, _ = await paced.open(session)
    async with Bus(stack, session) as bus, httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        await first.send({"type": "chat", "prompt": "late joiners", "id": "j"})
        turn = (await first.until("accepted"))["turn"]
        await first.until("chunk")
        assert (await http.post(f"/api/sessions/{session}/pause")).status_code == 200
        await first.until("paused")
        late, ready = await paced.open(session)
        assert ready["paused"] is True and late.wire.paused
        async with http.stream("GET", f"/api/sessions/{session}/events") as response:
            events = SseStream(response, wire.sse(session, 0))
            assert (await events.recv())["type"] == "paused"  # an events stream has no ready: it says so first
            await bus.stored_done(turn)
            for client in (first, late):
                await client.send({"type": "ping", "t": "marker"})
                assert (await client.until("pong"))["t"] == "marker"
            assert late.last_seq == 0
            await first.send({"type": "resume"})
            await first.until("resumed")
            for reader in (late, events):
                await reader.until("resumed")
            for reader in (first, late, events):
                await reader.until("done")
    assert late.last_seq == events.wire.cursor == first.last_seq  # each from seq 1 (the checker saw to it)
    wire.assert_history(session, await history(stack, session))


@pytest.fixture(scope="module")
def long_stack(redis_server: Server) -> Iterator[Stack]:
    """Ten-second answers (50 tokens/s, 500 tokens), for a turn that must outlast several pauses; its own NATS."""
    with isolated_stack(redis_server.url, {"CHAT_DEMO_TOKENS_PER_S": "50", "CHAT_DEMO_ANSWER_TOKENS": "500"}) as running:
        yield running


async def test_many_pauses_in_one_turn_on_two_connections(long_stack: Stack) -> None:
    """Pause and resume four times in one turn, over HTTP and by frame, while it streams to a
    WebSocket and an events stream at once: each pause holds both while frames are stored, each
    resume delivers the held frames; a stop ends the turn and both have every seq once, in order."""
    stack = long_stack
    session = new_session()
    async with Clients(stack) as clients, Bus(stack, session) as bus, httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        wire = clients.wire
        client, _ = await clients.open(session)
        async with http.stream("GET", f"/api/sessions/{session}/events") as response:
            events = SseStream(response, wire.sse(session, 0))
            started = await http.post("/api/chat", json={"session": session, "prompt": "stop and go"})
            assert started.status_code == 202
            wire.accepted(session, started.json()["turn"])
            for cycle in range(4):
                for reader in (client, events):
                    await reader.until("chunk")
                if cycle % 2:
                    await client.send({"type": "pause"})
                else:
                    assert (await http.post(f"/api/sessions/{session}/pause")).status_code == 200
                paused = [await reader.until("paused") for reader in (client, events)]
                await stored_frames(bus, 5)  # generation goes on while both hold
                await client.send({"type": "ping", "t": cycle})
                assert (await client.until("pong"))["t"] == cycle
                if cycle % 2:
                    assert (await http.post(f"/api/sessions/{session}/resume")).status_code == 200
                else:
                    await client.send({"type": "resume"})
                for index, held in enumerate(paused):
                    assert (await (client, events)[index].until("resumed"))["seq"] == held["seq"]
            assert (await http.post(f"/api/sessions/{session}/stop")).status_code == 202
            for reader in (client, events):
                assert (await reader.until("done"))["reason"] == "stopped"
        wire.assert_history(session, await history(stack, session))


async def test_health_and_readiness(stack: Stack) -> None:
    """healthz answers; readyz reports NATS and Redis reachable."""
    async with httpx.AsyncClient(base_url=stack.http_url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert (await http.get("/readyz")).json() == {"ready": True, "nats": True, "redis": True}
        page = await http.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "/static/chat-page.js" in page.text
        for name, export in [("chat-page.js", "import { ChatClient"), ("chat-client.js", "export class ChatClient"), ("markdown.js", "export function renderMarkdown")]:
            module = await http.get(f"/static/{name}")
            assert module.status_code == 200 and "javascript" in module.headers["content-type"]
            assert export in module.text


async def test_original_design_client(stack: Stack) -> None:
    """sessionId= without subprotocol: plain text frames, {action} controls, streamed POST body."""
    session = new_session()
    wire = WireChecker()
    # The original page connects at ws://host:port?sessionId=… (path /).
    async with connect(f"ws://127.0.0.1:{stack.port}/?sessionId={session}") as ws:
        assert ws.subprotocol is None
        socket = wire.compat(session)
        async with httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
            async with http.stream("POST", "/api/chat", json={"prompt": "old client", "sessionId": session}) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/plain")
                body = wire.compat(session)
                async with asyncio.timeout(WAIT_S):
                    async for part in response.aiter_text():
                        body.feed(part)
        record = await history(stack, session)
        body.assert_history(record, from_start=True)
        while len(socket.text) < len(record["turns"][0]["answer"]):
            socket.feed(await asyncio.wait_for(ws.recv(), WAIT_S))
        socket.assert_history(record, from_start=True)
        await ws.send(json.dumps({"type": "ping"}))  # tolerated, unanswered
    wire.assert_clean()


async def test_original_client_pause_and_resume(stack: Stack) -> None:
    """{"action":"pause"} holds the text; {"action":"resume"} delivers all of it exactly once."""
    session = new_session()
    wire = WireChecker()
    async with Bus(stack, session) as bus, connect(f"ws://127.0.0.1:{stack.port}/ws?sessionId={session}") as ws:
        socket = wire.compat(session)
        # Pause before the turn: the connection's pause is queued ahead of any frame.
        await ws.send(json.dumps({"action": "pause"}))
        await bus.control("pause")
        async with httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
            started = await http.post("/api/chat", json={"session": session, "prompt": "pause the old way"})
        assert started.status_code == 202
        await bus.stored_done(started.json()["turn"])
        # The original protocol has no acknowledgement to wait on, so the
        # negative check is a short (scaled) window after the whole turn was stored.
        with pytest.raises(TimeoutError):
            socket.feed(await asyncio.wait_for(ws.recv(), 0.2 * TIMEOUT_FACTOR))
        await ws.send(json.dumps({"action": "resume"}))
        record = await history(stack, session)
        while len(socket.text) < len(record["turns"][0]["answer"]):
            socket.feed(await asyncio.wait_for(ws.recv(), WAIT_S))
    socket.assert_history(record, from_start=True)
    wire.assert_clean()


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key = line.split(" ")[0]
            if key == name or key.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


async def test_metrics_move_with_a_turn(stack: Stack, clients: Clients) -> None:
    """GET /metrics is Prometheus text; turns, frames and connections counters move as a turn runs."""
    names = ["chat_gateway_turns_started_total", "chat_gateway_frames_delivered_total", "chat_gateway_connections_total", "chat_gateway_replays_total"]
    async with httpx.AsyncClient(base_url=stack.http_url) as http:
        response = await http.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        before = {name: _metric(response.text, name) for name in names}
        client, _ = await clients.open(new_session())
        _, _, done = await client.turn("count me")
        after_text = (await http.get("/metrics")).text
    after = {name: _metric(after_text, name) for name in names}
    assert after["chat_gateway_turns_started_total"] == before["chat_gateway_turns_started_total"] + 1
    assert after["chat_gateway_frames_delivered_total"] >= before["chat_gateway_frames_delivered_total"] + done["seq"]
    assert after["chat_gateway_connections_total"] >= before["chat_gateway_connections_total"] + 1
    assert after["chat_gateway_replays_total"] >= before["chat_gateway_replays_total"] + 1
    assert 'chat_gateway_open_connections{kind="ws"}' in after_text

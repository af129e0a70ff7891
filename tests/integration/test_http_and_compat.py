"""HTTP endpoints (JSON, SSE, controls, history, health) and the original design's client."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from websockets.asyncio.client import connect

from shared.sse import SSEDecoder
from tests.stack import TIMEOUT_FACTOR, WAIT_S, Bus, Clients, Stack, history, new_session


async def _sse_events(response: httpx.Response, *, until_done: bool = True) -> list[tuple[str, str | None, dict]]:  # type: ignore[type-arg]
    decoder = SSEDecoder()
    events = []
    async for raw in response.aiter_raw():
        for event in decoder.feed(raw):
            events.append((event.event, event.id, json.loads(event.data)))
            if until_done and event.event == "done":
                return events
    return events


async def test_post_chat_returns_202_and_streams_to_sockets(stack: Stack, clients: Clients) -> None:
    """POST /api/chat starts a turn whose frames reach the session's sockets."""
    session = new_session()
    client, _ = await clients.open(session)
    async with httpx.AsyncClient(base_url=stack.http_url) as http:
        response = await http.post("/api/chat", json={"session": session, "prompt": "over http"})
    assert response.status_code == 202
    assert response.json() == {"session": session, "turn": 1}
    await client.until("done")
    assert client.texts() == (await history(stack, session))["turns"][0]["answer"]


async def test_post_chat_sse_streams_the_turn(stack: Stack) -> None:
    """With Accept: text/event-stream the turn streams back as SSE with id = seq."""
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        async with http.stream(
            "POST", "/api/chat", json={"prompt": "sse please"}, headers={"Accept": "text/event-stream"}
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            session = response.headers["x-chat-session"]
            events = await _sse_events(response)
    assert [int(e[1]) for e in events] == list(range(1, len(events) + 1))  # type: ignore[arg-type]
    assert events[-1][0] == "done"
    text = "".join(data["text"] for kind, _, data in events if kind == "chunk")
    assert text == (await history(stack, session))["turns"][0]["answer"]


async def test_events_resume_from_last_event_id(stack: Stack, clients: Clients) -> None:
    """GET events with Last-Event-ID replays exactly the frames after it."""
    session = new_session()
    client, _ = await clients.open(session)
    await client.turn("first")
    await client.turn("second")
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        async with http.stream("GET", f"/api/sessions/{session}/events", headers={"Last-Event-ID": "7"}) as response:
            decoder = SSEDecoder()
            ids: list[int] = []
            async for raw in response.aiter_raw():
                ids += [int(e.id) for e in decoder.feed(raw) if e.id is not None]
                if ids and ids[-1] == client.last_seq:
                    break
        assert ids == list(range(8, client.last_seq + 1))
        async with http.stream("GET", f"/api/sessions/{session}/events?last_seq=abc") as response:
            assert response.status_code == 400


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
        second = await http.post("/api/chat", json={"session": session, "prompt": "too soon"})
        assert second.status_code == 409 and second.json()["code"] == "busy"
        await client.until("done")


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
    received: list[str] = []
    # The original page connects at ws://host:port?sessionId=… (path /).
    async with connect(f"ws://127.0.0.1:{stack.port}/?sessionId={session}") as ws:
        assert ws.subprotocol is None
        async with httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
            async with http.stream("POST", "/api/chat", json={"prompt": "old client", "sessionId": session}) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/plain")
                body_parts = [part async for part in response.aiter_text()]
        body = "".join(body_parts)
        answer = (await history(stack, session))["turns"][0]["answer"]
        assert body == answer
        while "".join(received) != answer:
            frame = await asyncio.wait_for(ws.recv(), WAIT_S)
            assert isinstance(frame, str) and not frame.startswith("{")
            received.append(frame)
        await ws.send(json.dumps({"type": "ping"}))  # tolerated, unanswered


async def test_original_client_pause_and_resume(stack: Stack) -> None:
    """{"action":"pause"} holds the text; {"action":"resume"} delivers all of it exactly once."""
    session = new_session()
    async with Bus(stack, session) as bus, connect(f"ws://127.0.0.1:{stack.port}/ws?sessionId={session}") as ws:
        # Pause before the turn: the connection's pause is queued ahead of any frame.
        await ws.send(json.dumps({"action": "pause"}))
        await bus.control("pause")
        async with httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
            started = await http.post("/api/chat", json={"session": session, "prompt": "pause the old way"})
        assert started.status_code == 202
        await bus.stored_done(started.json()["turn"])
        # The original protocol has no acknowledgement to wait on, so the
        # negative check is a short window after the whole turn was stored.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.2 * TIMEOUT_FACTOR)
        await ws.send(json.dumps({"action": "resume"}))
        answer = (await history(stack, session))["turns"][0]["answer"]
        received: list[str] = []
        while len("".join(received)) < len(answer):
            received.append(await asyncio.wait_for(ws.recv(), WAIT_S))  # type: ignore[arg-type]
        assert "".join(received) == answer


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

"""Every bad input gets a clear error frame, status or close code, and harms nothing else."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.stack import Clients, Stack, history, new_session, session_paths

BAD_SESSION_IDS = ["a.b", "a*", "a>", "has space", "x" * 65, "", "a/b", "é"]


async def _still_alive(client) -> None:  # type: ignore[no-untyped-def]
    await client.send({"type": "ping", "t": "alive"})
    assert await client.until("pong") == {"type": "pong", "t": "alive"}


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ("{not json", "malformed JSON"),
        ('{"type":"teleport"}', "invalid frame"),
        ('{"type":"chat"}', "prompt"),
        ('{"type":"chat","prompt":42}', "Expected `str`"),
        ('{"type":"ack"}', "seq"),
        ('["chat"]', "Expected `object`"),
        ('{"type":"pause","extra":1}', "unknown field"),
        ('"just a string"', "Expected `object`"),
        ('{"type":"ping","t":' + "[" * 3000 + "]" * 3000 + "}", "nested too deeply"),
    ],
)
async def test_malformed_frames_get_invalid(clients: Clients, payload: str, needle: str) -> None:
    """Malformed or too deeply nested JSON, unknown type, missing or wrong fields: error invalid, connection open."""
    client, _ = await clients.open(new_session())
    await client.ws.send(payload)
    error = await client.until("error")
    assert error["code"] == "invalid"
    assert needle in error["message"]
    await _still_alive(client)


async def test_binary_frame_gets_invalid(clients: Clients) -> None:
    """A binary frame is refused with error invalid; the connection stays open."""
    client, _ = await clients.open(new_session())
    await client.ws.send(b'{"type":"ping"}')
    error = await client.until("error")
    assert error["code"] == "invalid" and "binary" in error["message"]
    await _still_alive(client)


async def test_frame_over_limit_closes_1009(clients: Clients) -> None:
    """A frame bigger than CHAT_MAX_FRAME_BYTES closes the connection with 1009."""
    client, _ = await clients.open(new_session())
    await client.ws.send(json.dumps({"type": "chat", "prompt": "x" * 70_000}))
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await client.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


@pytest.mark.parametrize(("prompt", "code"), [("", "invalid"), ("   \n", "invalid"), ("y" * 16_001, "too_big")])
async def test_bad_prompts(stack: Stack, clients: Clients, prompt: str, code: str) -> None:
    """Empty and oversized prompts are refused and start no turn."""
    session = new_session()
    client, _ = await clients.open(session)
    await client.send({"type": "chat", "prompt": prompt})
    error = await client.until("error")
    assert error["code"] == code
    turn, _, _ = await client.turn("a fine prompt")
    assert turn == 1  # the refused prompt used no turn number
    clients.wire.assert_history(session, await history(stack, session))


async def test_chat_while_generating_is_busy(paced: Clients) -> None:
    """A second chat while a turn generates gets busy; the first turn completes."""
    client, _ = await paced.open(new_session())
    await client.send({"type": "chat", "prompt": "first", "id": "a"})
    await client.until("accepted")
    await client.send({"type": "chat", "prompt": "second", "id": "b"})
    error = await client.until("error")
    assert error["code"] == "busy"
    done = await client.until("done")
    assert done["turn"] == 1
    paced.wire.assert_ended(client.wire.session or "")


async def test_resume_when_not_paused_is_invalid(clients: Clients) -> None:
    """resume without a pause is refused; stop with no turn is refused."""
    client, _ = await clients.open(new_session())
    await client.send({"type": "resume"})
    error = await client.until("error")
    assert error["code"] == "invalid" and "not paused" in error["message"]
    await client.send({"type": "stop"})
    error = await client.until("error")
    assert error["code"] == "invalid" and "no turn" in error["message"]


@pytest.mark.parametrize("session", BAD_SESSION_IDS)
async def test_bad_session_id_refused_before_upgrade(stack: Stack, session: str) -> None:
    """A session id outside ^[A-Za-z0-9_-]{1,64}$ gets HTTP 400 before the upgrade."""
    from urllib.parse import quote

    with pytest.raises(InvalidStatus) as refused:
        await connect(stack.ws_url(session=quote(session, safe="")), subprotocols=["chat.v1"])  # type: ignore[list-item]
    assert refused.value.response.status_code == 400
    assert b"session id" in refused.value.response.body


@pytest.mark.parametrize("session", [s for s in BAD_SESSION_IDS if s and "/" not in s])
async def test_bad_session_id_refused_over_http(stack: Stack, session: str) -> None:
    """The HTTP paths refuse bad session ids with 400 and a JSON error."""
    from urllib.parse import quote

    async with httpx.AsyncClient(base_url=stack.http_url) as http:
        for method, path in session_paths(quote(session, safe="")):
            response = await http.request(method, path)
            assert response.status_code == 400, (method, path, response.text)
            assert response.json()["code"] == "invalid"
        response = await http.post("/api/chat", json={"session": session, "prompt": "hi"})
        assert response.status_code == 400


@pytest.mark.parametrize("last_seq", ["-1", "abc", "1.5", "99999999999999999999"])
async def test_bad_last_seq_refused(stack: Stack, last_seq: str) -> None:
    """last_seq must be a non-negative integer."""
    with pytest.raises(InvalidStatus) as refused:
        await connect(stack.ws_url(session=new_session(), last_seq=last_seq), subprotocols=["chat.v1"])  # type: ignore[list-item]
    assert refused.value.response.status_code == 400


async def test_last_seq_beyond_session_refused(stack: Stack) -> None:
    """A cursor past the session's last seq is refused with 400."""
    with pytest.raises(InvalidStatus) as refused:
        await connect(stack.ws_url(session=new_session(), last_seq=5), subprotocols=["chat.v1"])  # type: ignore[list-item]
    assert refused.value.response.status_code == 400
    assert b"beyond" in refused.value.response.body


async def test_unknown_subprotocol_refused(stack: Stack) -> None:
    """A client offering only other subprotocols is refused with 400."""
    with pytest.raises(InvalidStatus) as refused:
        await connect(stack.ws_url(session=new_session()), subprotocols=["chat.v9"])  # type: ignore[list-item]
    assert refused.value.response.status_code == 400


async def test_http_bad_bodies(stack: Stack) -> None:
    """POST /api/chat refuses malformed or too deeply nested JSON, non-objects, bad prompts and huge bodies."""
    async with httpx.AsyncClient(base_url=stack.http_url) as http:
        cases = [
            (b"{nope", 400, "invalid"),
            (b"[1,2]", 400, "invalid"),
            (json.dumps({"prompt": 5}).encode(), 400, "invalid"),
            (json.dumps({"prompt": ""}).encode(), 400, "invalid"),
            (json.dumps({"prompt": "z" * 16_001}).encode(), 413, "too_big"),
            (json.dumps({"prompt": "z" * 70_000}).encode(), 413, "too_big"),
            (b'{"prompt":' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "invalid"),
            (json.dumps({"prompt": "half \ud83d"}).encode(), 400, "invalid"),  # valid JSON, not valid Unicode
        ]
        for body, status, code in cases:
            response = await http.post("/api/chat", content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == status, (body[:20], response.text)
            assert response.json()["code"] == code


async def test_resent_chat_starts_one_turn(paced_stack: Stack, paced: Clients) -> None:
    """A chat resent with the same id while its turn generates (a retry after a reconnect) gets that turn
    back; once the turn has ended, the same chat starts a new turn with its own done."""
    session = new_session()
    client, _ = await paced.open(session)
    await client.send({"type": "chat", "prompt": "once", "id": "retry-1"})
    first = await client.until("accepted")
    await client.send({"type": "chat", "prompt": "once", "id": "retry-1"})
    second = await client.until("accepted")
    assert first == second == {"type": "accepted", "turn": 1, "id": "retry-1"}
    assert (await client.until("done"))["turn"] == 1
    await client.send({"type": "chat", "prompt": "once", "id": "retry-1"})
    assert (await client.until("accepted"))["turn"] == 2
    assert (await client.until("done"))["turn"] == 2
    record = await history(paced_stack, session)
    paced.wire.assert_history(session, record)  # two turns, each with its one done and its text
    assert [t["prompt"] for t in record["turns"]] == ["once", "once"]


async def test_ready_names_the_last_accepted_chat(clients: Clients) -> None:
    """A client that lost its connection right after a chat learns from ready that it was accepted, and as
    which turn, so it need not resend it (a resend after the turn ended would start a second one)."""
    session = new_session()
    client, ready = await clients.open(session)
    assert "last_chat" not in ready
    await client.send({"type": "chat", "prompt": "no id"})
    await client.until("done")
    _, ready = await clients.open(session)
    assert "last_chat" not in ready  # a chat without an id cannot be resent, so is not named
    await client.send({"type": "chat", "prompt": "remember me", "id": "x-1"})
    turn = (await client.until("accepted"))["turn"]
    await client.until("done")
    _, ready = await clients.open(session)
    assert ready["last_chat"] == {"id": "x-1", "turn": turn}
    await client.send({"type": "chat", "prompt": "no id again"})  # a chat without an id does not replace it
    await client.until("done")
    _, ready = await clients.open(session)
    assert ready["last_chat"] == {"id": "x-1", "turn": turn}


async def test_chat_ids_restarting_on_every_page_load(paced_stack: Stack, paced: Clients) -> None:
    """A client whose ids restart at "c1" on each load sends the same chat on two connections:
    each load gets a new turn and its done, never an accepted that produces nothing."""
    session = new_session()
    for expected_turn in (1, 2):
        client, _ = await paced.open(session)  # replays the whole session, as a fresh page load may
        await client.send({"type": "chat", "prompt": "continue", "id": "c1"})
        accepted = await client.until("accepted")
        assert accepted["turn"] == expected_turn
        while (frame := await client.until("done"))["turn"] != expected_turn:
            pass
        assert frame["reason"] == "length"
        await client.ws.close()
    paced.wire.assert_history(session, await history(paced_stack, session))


async def test_reused_chat_id_with_new_prompt_is_a_new_turn(paced: Clients) -> None:
    """Clients that give every chat the id "c1" still get a turn per prompt, and busy while generating."""
    client, _ = await paced.open(new_session())
    for number, prompt in enumerate(["one", "two"], start=1):
        await client.send({"type": "chat", "prompt": prompt, "id": "c1"})
        assert (await client.until("accepted")) == {"type": "accepted", "turn": number, "id": "c1"}
        await client.until("done")
    await client.send({"type": "chat", "prompt": "three", "id": "c1"})
    await client.until("accepted")
    await client.send({"type": "chat", "prompt": "four", "id": "c1"})
    assert (await client.until("error"))["code"] == "busy"


async def test_error_answering_a_chat_carries_its_id(clients: Clients) -> None:
    """An error that refuses a chat names the chat's id, so a client can match it."""
    client, _ = await clients.open(new_session())
    await client.send({"type": "chat", "prompt": " ", "id": "blank-1"})
    assert await client.until("error") == {
        "type": "error", "code": "invalid", "message": "prompt must not be empty", "id": "blank-1",
    }

"""Turns, pause/resume, replay and stop through real services over a real WebSocket."""

from __future__ import annotations

import asyncio
import uuid

from devstack.servers import Server
from tests.stack import WAIT_S, Bus, Client, Clients, Stack, history, isolated_stack, new_session


async def test_three_turn_conversation_matches_history(stack: Stack, clients: Clients) -> None:
    """Three turns stream gap-free across the session and equal the stored answers."""
    session = new_session()
    client, ready = await clients.open(session)
    assert ready == {
        "type": "ready", "session": session, "last_seq": 0, "paused": False,
        "max_frame_bytes": 64 * 1024, "max_prompt_chars": 16_000,  # the defaults, so a client can check before sending
    }
    answers = []
    for number, prompt in enumerate(["first question", "second question", "third question"], start=1):
        turn, text, done = await client.turn(prompt)
        assert turn == number
        assert done["reason"] in ("stop", "length")
        # The demo model is told the earlier turns: it counts them.
        assert f"This is turn {number} of our conversation." in text
        answers.append(text)
    await client.ws.close()
    record = await history(stack, session)
    clients.wire.assert_history(session, record)
    assert [t["answer"] for t in record["turns"]] == answers
    assert [t["prompt"] for t in record["turns"]] == ["first question", "second question", "third question"]
    assert record["last_seq"] == client.last_seq
    assert record["active"] is None


async def test_pause_holds_frames_until_resume(paced_stack: Stack, paced: Clients) -> None:
    """Nothing after the paused seq arrives; generation goes on; resume delivers the rest once."""
    stack = paced_stack
    session = new_session()
    client, _ = await paced.open(session)
    async with Bus(stack, session) as bus:
        await client.send({"type": "chat", "prompt": "tell me a story", "id": "p"})
        accepted = await client.until("accepted")
        for _ in range(3):
            await client.until("chunk")
        await client.send({"type": "pause"})
        paused = await client.until("paused")
        assert paused["seq"] == client.last_seq
        # The turn finishes upstream while paused: its output is stored.
        stored = await bus.stored_done(accepted["turn"])
    assert stored["seq"] > paused["seq"] + 1
    # Guarantee 2: nothing arrived after the paused frame. The pong is queued
    # after any frame the gateway had already taken from NATS, so it is the
    # next frame only if nothing leaked.
    await client.send({"type": "ping", "t": "marker"})
    assert await client.recv() == {"type": "pong", "t": "marker"}
    await client.send({"type": "resume"})
    resumed = await client.until("resumed")
    assert resumed["seq"] == paused["seq"]
    await client.until("done")
    paced.wire.assert_history(session, await history(stack, session))


async def test_pause_state_is_shared_by_connections(paced_stack: Stack, paced: Clients) -> None:
    """A pause on one connection pauses the others, and new ones start paused."""
    stack, clients = paced_stack, paced
    session = new_session()
    first, _ = await clients.open(session)
    second, _ = await clients.open(session)
    await first.send({"type": "chat", "prompt": "shared pause", "id": "s"})
    await first.until("chunk")
    await second.until("chunk")
    await first.send({"type": "pause"})
    await first.until("paused")
    second_paused = await second.until("paused")
    third, ready = await clients.open(session)
    assert ready["paused"] is True
    # The resume comes from the second connection and resumes all three.
    await second.send({"type": "resume"})
    for client in (first, second):
        resumed = await client.until("resumed")
        assert resumed["seq"] == client.last_seq
    assert second_paused["seq"] <= second.last_seq
    await third.until("resumed")
    for client in (first, second, third):
        await client.until("done")
    record = await history(stack, session)
    clients.wire.assert_history(session, record)
    assert first.texts() == second.texts() == third.texts() == record["turns"][0]["answer"]


async def test_reconnect_with_last_seq_replays_exactly_the_rest(stack: Stack, clients: Clients) -> None:
    """A client that drops after N frames gets N+1.. and nothing twice."""
    session = new_session()
    client, _ = await clients.open(session)
    await client.send({"type": "chat", "prompt": "drop me", "id": "r"})
    for _ in range(5):
        await client.until("chunk")
    seen = client.last_seq
    await client.ws.close()
    again, ready = await clients.open(session, last_seq=seen)
    assert ready["last_seq"] >= seen
    await again.until("done")
    clients.wire.assert_history(session, await history(stack, session))
    assert again.frames[1]["seq"] == seen + 1


async def test_replay_from_zero_and_across_gateways(stack: Stack, clients: Clients) -> None:
    """last_seq=0 replays the whole session; a second gateway serves the same session."""
    session = new_session()
    client, _ = await clients.open(session)
    _, first_text, _ = await client.turn("one")
    _, second_text, _ = await client.turn("two")
    await client.ws.close()
    other = stack.start_gateway()
    try:
        replayed, ready = await clients.open(session, last_seq=0, port=int(other.env["CHAT_PORT"]))
        assert ready["last_seq"] == client.last_seq
        while replayed.last_seq < client.last_seq:
            await replayed.recv()
        assert replayed.texts() == first_text + second_text
        assert [f["seq"] for f in replayed.frames[1:]] == list(range(1, client.last_seq + 1))
        clients.wire.assert_history(session, await history(stack, session, gateway=stack.gateways.index(other)))
    finally:
        other.stop()
        stack.processes.remove(other)
        stack.gateways.remove(other)


async def test_stop_ends_the_turn_with_stopped(paced_stack: Stack, paced: Clients) -> None:
    """Stop cancels the generation and the turn ends with done/stopped; the next turn works."""
    session = new_session()
    client, _ = await paced.open(session)
    await client.send({"type": "chat", "prompt": "a long story", "id": "s"})
    await client.until("chunk")
    await client.send({"type": "stop"})
    done = await client.until("done")
    assert done["reason"] == "stopped"
    record = await history(paced_stack, session)
    assert record["turns"][0]["reason"] == "stopped"
    paced.wire.assert_history(session, record)
    turn, _, done = await client.turn("after stop")
    assert turn == 2 and done["reason"] == "length"
    paced.wire.assert_history(session, await history(paced_stack, session))


async def test_ping_and_ack(stack: Stack, clients: Clients) -> None:
    """ping is answered with pong echoing t; ack is accepted silently."""
    client, _ = await clients.open(new_session())
    await client.send({"type": "ack", "seq": 0})
    await client.send({"type": "ping", "t": 12345})
    assert await client.recv() == {"type": "pong", "t": 12345}


async def test_new_session_id_when_omitted(stack: Stack, clients: Clients) -> None:
    """Without a session parameter the server picks a valid new id."""
    client, ready = await clients.open(None)
    assert 1 <= len(ready["session"]) <= 64
    assert ready["last_seq"] == 0
    await client.ws.close()


def test_wait_budget_is_positive() -> None:
    """The scaled wait is usable (guards a bad CHAT_TEST_TIMEOUT_FACTOR)."""
    assert WAIT_S > 0


async def test_accepted_comes_before_its_turns_frames(redis_server: Server) -> None:
    """A worker can be quicker than the gateway's reply to a chat; still, on the connection that sent
    the chat, accepted arrives before any frame of the turn it started (100 connections of short turns
    keep the gateway busy enough for the worker to win the race often)."""
    env = {"CHAT_DEMO_TOKENS_PER_S": "5000", "CHAT_DEMO_ANSWER_TOKENS": "3"}
    with isolated_stack(redis_server.url, env) as stack:
        stack.start_worker()
        async with Clients(stack) as clients:

            async def turns(client: Client) -> None:
                for _ in range(15):
                    await client.send({"type": "chat", "prompt": "quick", "id": uuid.uuid4().hex})
                    frame = await client.recv()
                    assert frame["type"] == "accepted", f"{frame} came before accepted"
                    await client.until("done")

            opened = [(await clients.open(new_session()))[0] for _ in range(100)]
            await asyncio.gather(*(turns(client) for client in opened))

"""A NATS restart mid-stream: services reconnect by themselves and nothing is lost.

These run on a local nats-server of their own (a free port, kept across the
restart), whatever servers the rest of the session uses, so they run on every
host; every frame goes through the strict wire checker (``Clients``).
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats
import pytest

from devstack.servers import LocalNats, Server
from shared.subjects import STREAM_GENERATED, STREAM_REQUESTS
from tests.stack import WAIT_S, Bus, Clients, Stack, history, new_session, restartable_stack

DEMO = {"CHAT_DEMO_TOKENS_PER_S": "100", "CHAT_DEMO_ANSWER_TOKENS": "150"}


@pytest.fixture
async def restartable(redis_server: Server) -> AsyncIterator[tuple[LocalNats, Stack, Clients]]:
    async with restartable_stack(redis_server.url, DEMO) as running:
        yield running


async def restart_mid_turn(nats: LocalNats, clients: Clients, *, wait_s: float) -> tuple[str, dict[str, Any]]:
    """Start a turn on a new session, restart NATS after its 10th chunk; the session and the turn's done."""
    session = new_session()
    client, _ = await clients.open(session)
    await client.send({"type": "chat", "prompt": "generate through a broker restart"})
    await client.until("accepted")
    for _ in range(10):
        await client.until("chunk")
    nats.stop()
    nats.start()
    return session, await client.until("done", wait_s=wait_s)  # Client.recv checks every seq


async def test_nats_restart_mid_stream(restartable: tuple[LocalNats, Stack, Clients]) -> None:
    """Every seq arrives once, in order, and the turn ends, across a NATS restart."""
    nats, stack, clients = restartable
    session, done = await restart_mid_turn(nats, clients, wait_s=3 * WAIT_S)
    assert done["reason"] == "length"
    clients.wire.assert_history(session, await history(stack, session))


async def test_gateway_catches_up_after_missing_a_whole_turn_end(
    restartable: tuple[LocalNats, Stack, Clients],
) -> None:
    """A gateway that was away while a turn finished catches up from Redis once NATS is back."""
    nats, stack, clients = restartable
    gateway = stack.gateways[0]
    session = new_session()
    client, _ = await clients.open(session)
    await client.send({"type": "chat", "prompt": "finish while the gateway is away"})
    await client.until("accepted")
    await client.until("chunk")
    gateway.signal(signal.SIGSTOP)  # it will miss everything published from here on
    try:
        nats.stop()
        nats.start()
        async with Bus(stack, session) as bus:
            await bus.stored_done(turn=1, wait_s=3 * WAIT_S)
    finally:
        gateway.signal(signal.SIGCONT)
    # No live frame will ever come again for this turn: only the resync after
    # the gateway's reconnect can deliver the rest.
    done = await client.until("done", wait_s=3 * WAIT_S)
    assert done["reason"] == "length"
    clients.wire.assert_history(session, await history(stack, session))


async def test_resume_missed_during_reconnect_is_recovered(restartable: tuple[LocalNats, Stack, Clients]) -> None:
    """A resume broadcast a gateway missed while reconnecting to NATS is read back from Redis."""
    nats, stack, clients = restartable
    session = new_session()
    client, _ = await clients.open(session)
    await client.send({"type": "chat", "prompt": "pause, then resume elsewhere"})
    await client.until("chunk")
    await client.send({"type": "pause"})
    paused = await client.until("paused")
    other = stack.start_gateway()
    frozen = stack.gateways[0]
    frozen.signal(signal.SIGSTOP)
    try:
        nats.stop()
        nats.start()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{other.env['CHAT_PORT']}") as http:
            response = await http.post(f"/api/sessions/{session}/resume")
        assert response.status_code == 200
    finally:
        frozen.signal(signal.SIGCONT)
    resumed = await client.until("resumed", wait_s=3 * WAIT_S)
    assert resumed["seq"] == paused["seq"]
    await client.until("done", wait_s=3 * WAIT_S)
    clients.wire.assert_history(session, await history(stack, session))


@pytest.fixture
async def memory_storage(redis_server: Server) -> AsyncIterator[tuple[LocalNats, Stack, Clients]]:
    """As ``restartable``, with the generated stream in memory: a restart deletes it."""
    async with restartable_stack(redis_server.url, {**DEMO, "CHAT_JS_STORAGE": "memory"}) as running:
        yield running


async def test_memory_storage_streams_come_back_after_a_nats_restart(
    memory_storage: tuple[LocalNats, Stack, Clients],
) -> None:
    """The restart deletes the memory stream and the consumers on it; the services
    make them again, so the next turns stream as before."""
    nats, stack, clients = memory_storage
    before = new_session()
    client, _ = await clients.open(before)
    await client.send({"type": "chat", "prompt": "before the restart"})
    assert (await client.until("done", wait_s=3 * WAIT_S))["reason"] == "length"
    nats.stop()
    nats.start()
    for session in (before, new_session()):  # the same connection's next turn, and a new session's
        client = client if session == before else (await clients.open(session))[0]
        await client.send({"type": "chat", "prompt": "after the restart"})
        await client.until("accepted", wait_s=3 * WAIT_S)
        done = await client.until("done", wait_s=3 * WAIT_S)
        assert done["reason"] == "length"
        clients.wire.assert_history(session, await history(stack, session))


async def test_memory_storage_turn_across_a_nats_restart_ends(
    memory_storage: tuple[LocalNats, Stack, Clients],
) -> None:
    """Frames the stream held at the restart are lost (memory storage's documented cost),
    but the turn still ends with one done, and what the client saw is what the record holds."""
    nats, stack, clients = memory_storage
    session, _ = await restart_mid_turn(nats, clients, wait_s=6 * WAIT_S)
    clients.wire.assert_history(session, await history(stack, session))


@pytest.mark.parametrize("stream", [STREAM_GENERATED, STREAM_REQUESTS])
async def test_a_stream_deleted_while_connected_is_made_again(
    restartable: tuple[LocalNats, Stack, Clients], stream: str
) -> None:
    """No reconnect tells the services: the first publish or pull that finds the stream
    gone makes it again, and the next chat streams to its done."""
    nats_server, stack, clients = restartable
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()
    for session in (new_session(), new_session()):
        client, _ = await clients.open(session)
        await client.send({"type": "chat", "prompt": "after the stream was deleted"})
        await client.until("accepted", wait_s=3 * WAIT_S)
        assert (await client.until("done", wait_s=3 * WAIT_S))["reason"] == "length"
        clients.wire.assert_history(session, await history(stack, session))

"""Attacks on the cost-per-token paths (frame-rate cap, async publish window, the buffer's one
message per session per batch, the gateway's shared subscription, packed turns in Redis), from
outside: the protocol, NATS, Redis and process signals, on real servers. Every frame goes through
the strict wire checker, which compares each seq's frame byte for byte across connections and
replays.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import httpx
import nats
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from devstack.processes import ServiceProcess
from devstack.servers import LocalNats, LocalRedis, Server
from services.llm_worker.service import PUBLISH_ACK_TIMEOUT_S
from shared.messages import TurnEnd, decode_generated
from shared.subjects import generated_subject, session_key
from tests.fake_openai import FakeOpenAI, _delta, _event, serve_in_thread
from tests.integration.test_gateway_delivery import gauge, until_gauge
from tests.sse_stream import SseStream
from tests.stack import WAIT_S, Clients, Stack, history, isolated_stack, new_session, openai_env

FINISH = _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
DONE = b"data: [DONE]\n\n"
# Texts whose JSON needs escapes, and 2-, 3- and 4-byte characters: a packed turn re-encodes them.
ODD_TEXTS = ['"q"', "back\\slash", "\n\r\t", "\u0000\u001f", "\u2028\u2029", " café", " 東京", " 😀", "</script>", "\x7f"]


class AttackModel(FakeOpenAI):
    """FakeOpenAI plus: ``[huge:N]`` one delta of N ASCII bytes, then the finish; ``[empties:N]``
    N empty-content deltas between two words, then the finish; ``[odd]`` ``ODD_TEXTS``, 5 ms
    apart; ``[nothing]`` the finish alone; ``[many:N]`` N one-byte deltas in
    one write, then the finish."""

    async def _stream(self, prompt: str) -> AsyncIterator[bytes]:
        if huge := re.search(r"\[huge:(\d+)\]", prompt):
            yield _delta("x" * int(huge.group(1)))
            yield FINISH + DONE
            return
        if empties := re.search(r"\[empties:(\d+)\]", prompt):
            yield _delta("a ")
            yield _delta("") * int(empties.group(1))
            yield _delta("b")
            yield FINISH + DONE
            return
        if "[odd]" in prompt:
            for text in ODD_TEXTS:
                yield _delta(text)
                await asyncio.sleep(0.005)
            yield FINISH + DONE
            return
        if "[nothing]" in prompt:
            yield FINISH + DONE
            return
        if many := re.search(r"\[many:(\d+)\]", prompt):
            yield b"".join(_delta(chr(ord("a") + i % 26)) for i in range(int(many.group(1)))) + FINISH + DONE
            return
        async for piece in super()._stream(prompt):
            yield piece


@pytest.fixture(scope="module")
def model() -> Iterator[str]:
    with serve_in_thread(AttackModel().app) as url:
        yield url


@pytest.fixture(scope="module")
def attack_stack(model: str, redis_server: Server) -> Iterator[Stack]:
    """One gateway, worker and buffer on a NATS of their own; the default frame cap (10 ms).
    A small kernel send buffer, so a client that stops reading is soon a slow reader to the gateway."""
    env = openai_env(
        model, CHAT_MAX_ANSWER_BYTES=str(4 * 1024 * 1024), CHAT_SEND_BUFFER_BYTES="8192",
        CHAT_MAX_TURNS_PER_USER="100", CHAT_MAX_CONNECTIONS_PER_USER="200",  # anonymous clients are one user
    )
    with isolated_stack(redis_server.url, env) as stack:
        yield stack


@pytest.fixture
async def aclients(attack_stack: Stack) -> AsyncIterator[Clients]:
    async with Clients(attack_stack) as opened:
        yield opened


async def test_a_huge_delta_reaches_the_client_whole(attack_stack: Stack, aclients: Clients) -> None:
    """1.5 MB of 1,000-byte deltas in one write: the cap coalesces them, the worker splits the
    text into 16 KiB chunks published back to back, the
    buffer pulls them in one batch and joins them into one delivery message, which must stay
    under NATS's 1 MiB max_payload. The whole text and the done arrive; history agrees."""
    session = new_session()
    client, _ = await aclients.open(session)
    turn, text, done = await client.turn("[burst:1500000]", wait_s=3 * WAIT_S)
    assert done["reason"] == "stop", done
    assert len(text) == len("first") + 1_500_000
    aclients.wire.assert_history(session, await history(attack_stack, session))


async def test_empty_and_many_tiny_deltas(attack_stack: Stack, aclients: Clients) -> None:
    """Empty deltas under the cap make no empty chunk and hold nothing back; 5,000 one-byte deltas
    in one write coalesce into few chunks carrying exactly their text."""
    session = new_session()
    client, _ = await aclients.open(session)
    _, text, done = await client.turn("[empties:500]")
    assert (text, done["reason"]) == ("a b", "stop")
    assert all(f["text"] for f in client.frames if f["type"] == "chunk"), "an empty chunk"
    _, text, done = await client.turn("[many:5000]")
    assert text == "".join(chr(ord("a") + i % 26) for i in range(5000)) and done["reason"] == "stop"
    chunks = [f for f in client.frames if f["type"] == "chunk" and f["turn"] == done["turn"]]
    assert len(chunks) < 50, len(chunks)
    aclients.wire.assert_history(session, await history(attack_stack, session))


@asynccontextmanager
async def generated_end(stack: Stack, session: str) -> AsyncIterator[asyncio.Event]:
    """An event set once the worker has published the session's turn end to JetStream."""
    ended = asyncio.Event()
    nc = await nats.connect(stack.env["CHAT_NATS_URL"])

    async def on_generated(msg: nats.aio.msg.Msg) -> None:
        if isinstance(decode_generated(msg.data), TurnEnd):
            ended.set()

    try:
        await nc.subscribe(generated_subject(session), cb=on_generated)
        await nc.flush()
        yield ended
    finally:
        await nc.close()


async def test_a_backlog_of_big_chunks_is_delivered_after_a_buffer_pause(attack_stack: Stack, aclients: Clients) -> None:
    """The buffer is frozen (SIGSTOP: a long GC pause, a slow host) while the worker publishes 1.5 MB
    (~92 chunks of 16 KiB) and the turn's end; thawed, it pulls them in one batch of up to 256
    and must not join one session's frames into a message over NATS's 1 MiB max_payload. The
    client gets the whole text and the done."""
    session = new_session()
    client, _ = await aclients.open(session)
    buffer = next(p for p in attack_stack.processes if p.name == "buffer")
    assert buffer.process is not None
    async with generated_end(attack_stack, session) as ended:
        buffer.process.send_signal(signal.SIGSTOP)
        try:
            await client.send({"type": "chat", "prompt": "[burst:1500000]"})
            await asyncio.wait_for(ended.wait(), WAIT_S)
        finally:
            buffer.process.send_signal(signal.SIGCONT)
    done = await client.until("done", wait_s=3 * WAIT_S)
    assert done["reason"] == "stop", done
    assert len(client.texts()) == len("first") + 1_500_000
    aclients.wire.assert_history(session, await history(attack_stack, session))



async def test_many_sessions_in_one_batch(attack_stack: Stack, aclients: Clients) -> None:
    """40 sessions' turns at once, each 2,000 one-byte deltas (the buffer's batches hold frames of
    many sessions, one message per session): every client gets exactly its own answer, no frame of
    another session, and history agrees."""
    sessions = [new_session() for _ in range(40)]
    opened = [(await aclients.open(session))[0] for session in sessions]
    results = await asyncio.gather(*(client.turn("[many:2000]", wait_s=3 * WAIT_S) for client in opened))
    expected = "".join(chr(ord("a") + i % 26) for i in range(2000))
    for (_, text, done) in results:
        assert (text, done["reason"]) == (expected, "stop")
    for session in sessions:
        aclients.wire.assert_history(session, await history(attack_stack, session))


async def test_pause_resume_on_ws_and_sse_during_a_burst(attack_stack: Stack, aclients: Clients) -> None:
    """A WebSocket and an SSE stream on one session while 1.5 MB streams: a pause over HTTP lands
    mid-burst on both (no frame after paused), a resume brings the rest from the paused seq,
    each seq once, byte-identical on both."""
    session = new_session()
    async with httpx.AsyncClient(base_url=attack_stack.http_url, timeout=WAIT_S) as http:
        client, _ = await aclients.open(session)
        async with http.stream("GET", f"/api/sessions/{session}/events?last_seq=0") as response:
            events = SseStream(response, aclients.wire.sse(session, 0))
            await client.send({"type": "chat", "prompt": "[burst:1500000]"})
            await client.until("chunk")
            assert (await http.post(f"/api/sessions/{session}/pause")).status_code < 300
            await client.until("paused")
            await events.until("paused")
            assert (await http.post(f"/api/sessions/{session}/resume")).status_code < 300
            await client.until("resumed")
            done = await client.until("done", wait_s=3 * WAIT_S)
            assert done["reason"] == "stop"
            while (events.wire.cursor or 0) < done["seq"]:
                await events.recv(3 * WAIT_S)
    assert len(client.texts()) == len("first") + 1_500_000
    aclients.wire.assert_history(session, await history(attack_stack, session))

@pytest.fixture(scope="module")
def trimmed_stack(model: str, redis_server: Server) -> Iterator[Stack]:
    """Every delta its own frame, 20 frames and 2 turns of history kept: packed turns trimmed inside."""
    env = openai_env(model, CHAT_FRAME_INTERVAL_MS="0", CHAT_MAX_FRAMES_PER_SESSION="20", CHAT_MAX_HISTORY_TURNS="2")
    with isolated_stack(redis_server.url, env) as stack:
        yield stack


async def replay_ws(clients: Clients, session: str, after: int, hwm: int, wait_s: float = WAIT_S) -> None:
    """A WebSocket from cursor ``after`` reads up to ``hwm``; the checker compares every seq."""
    client, ready = await clients.open(session, last_seq=after)
    assert ready["last_seq"] >= hwm
    while client.last_seq < hwm:
        await client.recv(wait_s)
    await client.ws.close()


async def replay_sse(clients: Clients, http: httpx.AsyncClient, session: str, after: int, hwm: int, *, header: bool) -> None:
    """An SSE stream from ``after`` (Last-Event-ID, or ?last_seq=) reads up to ``hwm``."""
    path, headers = f"/api/sessions/{session}/events", {}
    if header:
        headers["Last-Event-ID"] = str(after)
    else:
        path += f"?last_seq={after}"
    async with http.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200
        events = SseStream(response, clients.wire.sse(session, after))
        while (events.wire.cursor or 0) < hwm:
            await events.recv()


async def test_replay_from_every_cursor_after_packing_and_trimming(trimmed_stack: Stack) -> None:
    """Four turns (plain, escapes and multi-byte characters, stopped mid-stream, plain) past a
    20-frame cap and a 2-turn history: the oldest packed turn is trimmed inside and has lost its
    history entry (its texts moved into the member). Replay from every cursor 0..hwm over WebSocket
    last_seq, SSE Last-Event-ID and ?last_seq= gives frames byte-identical to the live ones (the
    checker compares per seq), frames past the cap reported as past retention."""
    session = new_session()
    async with Clients(trimmed_stack) as clients, httpx.AsyncClient(base_url=trimmed_stack.http_url, timeout=WAIT_S) as http:
        live, _ = await clients.open(session)
        await live.turn("hello")
        _, text, done = await live.turn("[odd]")
        assert (text, done["reason"]) == ("".join(ODD_TEXTS), "stop")
        await live.send({"type": "chat", "prompt": "[long]"})
        for _ in range(8):
            await live.until("chunk")
        await live.send({"type": "stop"})
        assert (await live.until("done"))["reason"] == "stopped"
        await live.turn("again")
        hwm = live.last_seq
        assert hwm > 20, hwm  # the oldest frames are trimmed (~25: inside the first turn)
        # The history of two turns: the last two, as delivered.
        turns = (await history(trimmed_stack, session))["turns"]
        assert [t["turn"] for t in turns] == [3, 4]
        for after in range(0, hwm + 1):
            await replay_ws(clients, session, after, hwm)
            await replay_sse(clients, http, session, after, hwm, header=True)
            await replay_sse(clients, http, session, after, hwm, header=False)


async def websockets_connect(url: str) -> ClientConnection:
    """A chat.v1 WebSocket that reads at most one message ahead, over a socket with a 4 KiB
    receive buffer: unread, the buffers soon fill and the gateway sees a slow reader."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window is set then
    sock.setblocking(False)
    parts = urlsplit(url)
    await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
    return await connect(url, sock=sock, subprotocols=["chat.v1"], max_queue=1)  # type: ignore[list-item]


async def test_connections_churning_on_one_session_mid_turn(attack_stack: Stack, aclients: Clients) -> None:
    """While a turn streams (a token per 20 ms): 40 WebSockets join from cursor 0, read a chunk and
    leave, 5 at a time, with an SSE stream of the session open throughout and a client that stops
    reading; a fast reader keeps every frame, in order, once. Then 1.5 MB arrives at once: the fast
    reader and the SSE stream get it all, the unread client notwithstanding. After
    all leave, the gateway's subscriptions, connections and tasks are back to their baseline."""
    stack, session = attack_stack, new_session()
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        await until_gauge(http, "chat_gateway_open_connections", 0)
        baseline_tasks = await gauge(http, "chat_gateway_tasks")
        fast, _ = await aclients.open(session)
        slow_ws = await websockets_connect(stack.ws_url("/ws", session=session))
        async with http.stream("GET", f"/api/sessions/{session}/events?last_seq=0") as response:
            events = SseStream(response, aclients.wire.sse(session, 0))
            await fast.send({"type": "chat", "prompt": "[long]"})
            await fast.until("chunk")

            async def churn() -> None:
                client, _ = await aclients.open(session)
                await client.until("chunk")
                await client.ws.close()

            for _ in range(8):
                await asyncio.gather(*(churn() for _ in range(5)))
            assert await gauge(http, "chat_gateway_subscribed_sessions") == 1
            await fast.send({"type": "stop"})
            assert (await fast.until("done"))["reason"] == "stopped"
            _, text, done = await fast.turn("[burst:1500000]", wait_s=3 * WAIT_S)
            assert done["reason"] == "stop" and len(text) == len("first") + 1_500_000
            while (events.wire.cursor or 0) < done["seq"]:
                await events.recv()
        await slow_ws.close()
        await fast.ws.close()
        for client in aclients.opened:
            await client.ws.close()
        await until_gauge(http, "chat_gateway_open_connections", 0)
        await until_gauge(http, "chat_gateway_subscribed_sessions", 0)
        await until_gauge(http, "chat_gateway_tasks", baseline_tasks)
    aclients.wire.assert_history(session, await history(stack, session))



async def test_a_huge_packed_turn_replays_in_pieces(attack_stack: Stack, aclients: Clients) -> None:
    """A turn with no text, then a 1.5 MB one, both packed: replays from 0, from inside the big turn and
    from its last chunk (each reply at most 512 KiB, so the packed member is served in pieces) over
    WebSocket and SSE give every frame byte-identical to the live one."""
    session = new_session()
    async with httpx.AsyncClient(base_url=attack_stack.http_url, timeout=3 * WAIT_S) as http:
        client, _ = await aclients.open(session)
        _, text, done = await client.turn("[nothing]")  # an empty answer is an error, never a silent stop
        assert (text, done["reason"]) == ("", "error") and done["message"]
        _, text, done = await client.turn("[burst:1500000]", wait_s=3 * WAIT_S)
        assert done["reason"] == "stop" and len(text) == len("first") + 1_500_000
        hwm = done["seq"]
        for after in (0, 1, 2, hwm // 2, hwm - 2, hwm - 1):
            await replay_ws(aclients, session, after, hwm, wait_s=3 * WAIT_S)
            await replay_sse(aclients, http, session, after, hwm, header=after % 2 == 0)
    aclients.wire.assert_history(session, await history(attack_stack, session))

@pytest.fixture(scope="module")
def fault_stack(model: str, redis_server: Server) -> Iterator[Stack]:
    """Two buffers, one worker whose lease runs out 2 s after it dies, and a 1 s drain."""
    env = openai_env(model, CHAT_LEASE_S="2", CHAT_DRAIN_TIMEOUT_S="1", CHAT_REAP_INTERVAL_S="0.2")
    with isolated_stack(redis_server.url, env) as stack:
        stack.start_buffer()
        yield stack


@pytest.fixture
async def fclients(fault_stack: Stack) -> AsyncIterator[Clients]:
    async with Clients(fault_stack) as opened:
        yield opened


def service(stack: Stack, name: str) -> ServiceProcess:
    return next(p for p in stack.processes if p.name == name and p.alive)


async def test_a_buffer_killed_mid_stream(fault_stack: Stack, fclients: Clients) -> None:
    """One of two buffers is SIGKILLed while a turn streams (frames it pulled may be stored and
    unpublished, or unstored and unacked: redelivered to the other after the 5 s ack wait). The
    client still gets every seq once, in order; the stop ends the turn; history agrees."""
    session = new_session()
    client, _ = await fclients.open(session)
    await client.send({"type": "chat", "prompt": "[long]"})
    for _ in range(5):
        await client.until("chunk")
    victim = service(fault_stack, "buffer")
    victim.kill()
    try:
        # Frames of the next 6 s: past the ack wait, so redelivered ones have come back.
        deadline = asyncio.get_running_loop().time() + 6
        while asyncio.get_running_loop().time() < deadline:
            await client.until("chunk")
        await client.send({"type": "stop"})
        assert (await client.until("done", wait_s=2 * WAIT_S))["reason"] == "stopped"
    finally:
        victim.start()
    _, _, done = await client.turn("hello")
    assert done["reason"] == "stop"
    fclients.wire.assert_history(session, await history(fault_stack, session))


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
async def test_the_worker_dies_mid_window(fault_stack: Stack, fclients: Clients, how: signal.Signals) -> None:
    """The worker is SIGKILLed (its lease runs out: a buffer ends the turn after the last frame it
    published) or SIGTERMed (its 1 s drain ends the turn) while it streams, frames in its publish
    window: the turn ends with one done, error, after contiguous chunks and nothing after it; a
    worker started again runs the next turn."""
    session = new_session()
    client, _ = await fclients.open(session)
    await client.send({"type": "chat", "prompt": "[long]"})
    for _ in range(5):
        await client.until("chunk")
    victim = service(fault_stack, "llm_worker")
    try:
        victim.signal(how)
        done = await client.until("done", wait_s=2 * WAIT_S)
        assert done["reason"] == "error" and done["message"], done
        await asyncio.to_thread(victim.process.wait, WAIT_S)  # type: ignore[union-attr]
    finally:
        victim.start()
    _, text, again = await client.turn("hello")
    assert again["reason"] == "stop" and text == "Hello from the fake model."
    fclients.wire.assert_history(session, await history(fault_stack, session))


@pytest.fixture(scope="module")
def short_retention_stack(model: str, redis_server: Server) -> Iterator[Stack]:
    """Sessions kept 2 s after their last write; the worker renews its lease every 3.3 s (the default 10 s lease)."""
    with isolated_stack(redis_server.url, openai_env(model, CHAT_RETENTION_S="2")) as stack:
        yield stack


async def test_a_packed_turn_outlives_a_long_next_turn(short_retention_stack: Stack) -> None:
    """Turn 1 ends and is packed (its texts held in its history entry); turn 2 then streams for 4 s,
    twice the retention, its batches keeping the log alive. Replay from 0 during turn 2 and after it
    must still give turn 1's frames byte for byte: its texts must not expire before its member."""
    stack, session = short_retention_stack, new_session()
    async with Clients(stack) as clients:
        live, _ = await clients.open(session)
        _, first, _ = await live.turn("hello")
        await live.send({"type": "chat", "prompt": "[long]"})
        started = asyncio.get_running_loop().time()
        while asyncio.get_running_loop().time() - started < 4:
            await live.until("chunk")
        hwm = live.last_seq
        # A gap is replayed again after 0.25 s: 5 s without a frame is a hang.
        await replay_ws(clients, session, 0, hwm, wait_s=5)
        await live.send({"type": "stop"})
        assert (await live.until("done"))["reason"] == "stopped"
        await replay_ws(clients, session, 0, live.last_seq)
        assert clients.opened[-1].texts(1) == first
        clients.wire.assert_history(session, await history(stack, session))


async def test_a_silent_model_outlives_a_short_retention(short_retention_stack: Stack) -> None:
    """A model silent for twice the retention (and past a lease renewal): the generating
    turn's record must not expire under it. The stop then ends the turn, its history kept;
    once ended, the record's TTL is the retention again."""
    stack, session = short_retention_stack, new_session()
    async with Clients(stack) as clients:
        live, _ = await clients.open(session)
        await live.send({"type": "chat", "prompt": "[stall]"})
        await live.until("accepted")
        await asyncio.sleep(4)  # the condition under test is time passing with no write but renewals
        await live.send({"type": "stop"})
        assert (await live.until("done"))["reason"] == "stopped"
        record = await history(stack, session)
        assert [turn["reason"] for turn in record["turns"]] == ["stopped"]
        clients.wire.assert_history(session, record)
        redis = aioredis.Redis.from_url(stack.env["CHAT_REDIS_URL"])
        try:
            assert 0 < await redis.ttl(session_key(session)) <= 2
        finally:
            await redis.aclose()


@pytest.fixture(scope="module")
def own_nats() -> Iterator[LocalNats]:
    server = LocalNats()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def frozen_nats_stack(model: str, redis_server: Server, own_nats: LocalNats) -> Iterator[Stack]:
    with isolated_stack(redis_server.url, openai_env(model), nats=own_nats) as stack:
        yield stack


async def test_nats_frozen_past_the_ack_timeout_mid_turn(frozen_nats_stack: Stack, own_nats: LocalNats) -> None:
    """nats-server is frozen (SIGSTOP) for 6 s, past the worker's 5 s ack timeout, while a fast
    turn streams with frames in the publish window: thawed, the resent frames are stored once;
    the client gets every seq once, in order, and the turn ends stopped on a stop sent after."""
    stack, session = frozen_nats_stack, new_session()
    assert own_nats.process is not None
    async with Clients(stack) as clients:
        client, _ = await clients.open(session)
        await client.send({"type": "chat", "prompt": "[long]"})
        for _ in range(5):
            await client.until("chunk")
        own_nats.process.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(PUBLISH_ACK_TIMEOUT_S + 1)  # the variable under test: how long NATS is frozen
        finally:
            own_nats.process.send_signal(signal.SIGCONT)
        seen = client.last_seq
        while client.last_seq < seen + 20:
            await client.until("chunk", wait_s=3 * WAIT_S)
        await client.send({"type": "stop"})
        assert (await client.until("done", wait_s=2 * WAIT_S))["reason"] == "stopped"
        _, _, again = await client.turn("hello")
        assert again["reason"] == "stop"
        clients.wire.assert_history(session, await history(stack, session))


async def test_a_gateway_subscription_survives_a_nats_restart(frozen_nats_stack: Stack, own_nats: LocalNats) -> None:
    """Two WebSockets and an SSE stream share the gateway's one subscription to a session; nats-server
    restarts between turns (the client reconnects and resubscribes its subscriptions, whose message
    queue this gateway replaced). The next turn is delivered live to all three, every seq once."""
    stack, session = frozen_nats_stack, new_session()
    async with Clients(stack) as clients, httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        first, _ = await clients.open(session)
        second, _ = await clients.open(session)
        await first.turn("hello")
        async with http.stream("GET", f"/api/sessions/{session}/events?last_seq={first.last_seq}") as response:
            events = SseStream(response, clients.wire.sse(session, first.last_seq))
            own_nats.stop()
            own_nats.start()
            await until_gauge(http, "chat_gateway_subscribed_sessions", 1)
            # The gateway's NATS client reconnects in the background: a chat before that is refused, not lost.
            async with asyncio.timeout(3 * WAIT_S):
                while True:
                    await first.send({"type": "chat", "prompt": "[many:300]"})
                    answer = await first.recv()
                    while answer["type"] not in ("accepted", "error"):
                        answer = await first.recv()
                    if answer["type"] == "accepted":
                        break
                    assert answer["code"] == "unavailable", answer
                    await asyncio.sleep(0.2)  # the gateway's reconnect offers no event to wait on
            done = await first.until("done", wait_s=3 * WAIT_S)
            assert done["reason"] == "stop"
            for reader in (second, events):
                while (reader.wire.cursor or 0) < done["seq"]:
                    await reader.recv(3 * WAIT_S)
        clients.wire.assert_history(session, await history(stack, session))


@pytest.fixture(scope="module")
def long_cap_stack(model: str, redis_server: Server) -> Iterator[Stack]:
    """A 1,000 ms frame cap: text waits up to a second in the worker."""
    with isolated_stack(redis_server.url, openai_env(model, CHAT_FRAME_INTERVAL_MS="1000")) as stack:
        yield stack


async def test_reconnects_and_a_stop_during_cap_waits(long_cap_stack: Stack) -> None:
    """Under a 1 s cap, while ``[long]`` sends a word every 20 ms: a client leaves right after each
    chunk (its next text still waiting in the worker's window) and comes back from its last seq,
    three times; then a stop lands mid-window. The text delivered is the words in order with none
    missing or repeated, the turn ends stopped, and history holds exactly what was delivered."""
    stack, session = long_cap_stack, new_session()
    async with Clients(stack) as clients:
        client, _ = await clients.open(session)
        await client.send({"type": "chat", "prompt": "[long]"})
        await client.until("chunk")
        text = client.texts()
        for _ in range(3):
            await client.ws.close()
            client, _ = await clients.open(session, last_seq=client.last_seq)
            text += (await client.until("chunk"))["text"]
        await client.send({"type": "stop"})
        while (frame := await client.recv())["type"] != "done":
            if frame["type"] == "chunk":
                text += frame["text"]
        assert frame["reason"] == "stopped"
        words = text.split()
        assert words == [f"w{i}" for i in range(len(words))] and len(words) > 3, text[:200]
        stored = await history(stack, session)
        assert stored["turns"][-1]["answer"] == text
        clients.wire.assert_history(session, stored)


async def test_connections_closing_during_a_burst_leave_no_task(attack_stack: Stack, aclients: Clients) -> None:
    """Ten WebSockets on one session close after the first chunk of a 1.5 MB burst, their writers
    mid-send (frames queued, some on unread sockets); one stays to the done. The gateway's
    connections, subscriptions and tasks return to their baseline."""
    stack, session = attack_stack, new_session()
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        await until_gauge(http, "chat_gateway_open_connections", 0)
        baseline_tasks = await gauge(http, "chat_gateway_tasks")
        stayer, _ = await aclients.open(session)
        leavers = [(await aclients.open(session))[0] for _ in range(5)]
        unread = [await websockets_connect(stack.ws_url("/ws", session=session)) for _ in range(5)]
        await stayer.send({"type": "chat", "prompt": "[burst:1500000]"})
        await asyncio.gather(*(leaver.until("chunk") for leaver in leavers))
        await asyncio.gather(*(leaver.ws.close() for leaver in leavers), *(ws.close() for ws in unread))
        done = await stayer.until("done", wait_s=3 * WAIT_S)
        assert done["reason"] == "stop" and len(stayer.texts()) == len("first") + 1_500_000
        await stayer.ws.close()
        await until_gauge(http, "chat_gateway_open_connections", 0)
        await until_gauge(http, "chat_gateway_subscribed_sessions", 0)
        await until_gauge(http, "chat_gateway_tasks", baseline_tasks)


@pytest.fixture(scope="module")
def own_redis() -> Iterator[LocalRedis]:
    server = LocalRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def restarted_redis_stack(model: str, own_redis: LocalRedis) -> Iterator[Stack]:
    with isolated_stack(own_redis.url, openai_env(model)) as stack:
        yield stack


async def test_redis_restart_mid_turn(restarted_redis_stack: Stack, own_redis: LocalRedis) -> None:
    """redis-server restarts (SIGTERM, AOF kept) while a turn streams: the buffer's batches fail and
    are redelivered, the worker's lease renewals fail meanwhile. The client gets every seq once,
    in order; the stop ends the turn; the packed turn replays from 0 byte for byte; history agrees."""
    stack, session = restarted_redis_stack, new_session()
    async with Clients(stack) as clients:
        client, _ = await clients.open(session)
        await client.send({"type": "chat", "prompt": "[long]"})
        for _ in range(5):
            await client.until("chunk")
        own_redis.stop()
        own_redis.start()
        seen = client.last_seq
        while client.last_seq < seen + 20:
            await client.until("chunk", wait_s=3 * WAIT_S)
        await client.send({"type": "stop"})
        done = await client.until("done", wait_s=2 * WAIT_S)
        assert done["reason"] in ("stopped", "error"), done
        await replay_ws(clients, session, 0, done["seq"])
        clients.wire.assert_history(session, await history(stack, session))


async def test_the_last_connection_leaving_and_joining_in_a_storm(attack_stack: Stack, aclients: Clients) -> None:
    """While a turn streams with no reader left, 60 connections open and close at once, 20 at a
    time, some before their ready is read (the subscription made, torn down and made again under
    them). A connection opened afterwards gets live frames past its ready's last_seq, and once
    all leave the gateway holds no subscription and no extra task."""
    stack, session = attack_stack, new_session()
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        await until_gauge(http, "chat_gateway_open_connections", 0)
        baseline_tasks = await gauge(http, "chat_gateway_tasks")
        starter, _ = await aclients.open(session)
        await starter.send({"type": "chat", "prompt": "[long]"})
        await starter.until("chunk")
        await starter.ws.close()

        async def blink(read_ready: bool) -> None:
            if read_ready:
                client, _ = await aclients.open(session)
                await client.ws.close()
            else:
                ws = await connect(stack.ws_url("/ws", session=session), subprotocols=["chat.v1"])  # type: ignore[list-item]
                await ws.close()

        for _ in range(3):
            await asyncio.gather(*(blink(i % 2 == 0) for i in range(20)))
        late, ready = await aclients.open(session, last_seq=None)
        while late.last_seq <= ready["last_seq"] + 5:  # live frames, not only the replay
            await late.until("chunk")
        await late.send({"type": "stop"})
        assert (await late.until("done"))["reason"] == "stopped"
        await late.ws.close()
        await until_gauge(http, "chat_gateway_open_connections", 0)
        await until_gauge(http, "chat_gateway_subscribed_sessions", 0)
        await until_gauge(http, "chat_gateway_tasks", baseline_tasks)
    aclients.wire.assert_history(session, await history(stack, session))


@pytest.fixture(scope="module")
def uncapped_small_queue_stack(model: str, redis_server: Server) -> Iterator[Stack]:
    """No frame cap; 128 frames queued per client at most (a 1.5 MB burst, ~92 frames arriving
    at once, fits), 4 KiB kernel send buffers."""
    env = openai_env(model, CHAT_FRAME_INTERVAL_MS="0", CHAT_SEND_QUEUE_FRAMES="128", CHAT_SEND_BUFFER_BYTES="4096")
    with isolated_stack(redis_server.url, env) as stack:
        yield stack


async def test_a_slow_reader_among_fast_ones(uncapped_small_queue_stack: Stack) -> None:
    """Two turns of 1.5 MB at once (~92 chunks of 16 KiB each; 184 frames, more than a 128-frame
    queue) to four connections of one session, one of which never reads: it is closed as a slow
    reader (1013) and the three others get every frame, in order, once; afterwards no connection,
    subscription or extra task is left."""
    stack, session = uncapped_small_queue_stack, new_session()
    async with Clients(stack) as clients, httpx.AsyncClient(base_url=stack.http_url, timeout=WAIT_S) as http:
        await until_gauge(http, "chat_gateway_open_connections", 0)
        baseline_tasks = await gauge(http, "chat_gateway_tasks")
        fast = [(await clients.open(session))[0] for _ in range(3)]
        slow = await websockets_connect(stack.ws_url("/ws", session=session))
        for _ in range(2):
            results = await asyncio.gather(fast[0].turn("[burst:1500000]", wait_s=3 * WAIT_S),
                                           *(f.until("done", wait_s=3 * WAIT_S) for f in fast[1:]))
            assert len(results[0][1]) == len("first") + 1_500_000
        assert all(f.texts() == fast[0].texts() for f in fast)
        await until_gauge(http, "chat_gateway_slow_readers_total", 1)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(slow.recv(), WAIT_S)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        for client in fast:
            await client.ws.close()
        await until_gauge(http, "chat_gateway_open_connections", 0)
        await until_gauge(http, "chat_gateway_subscribed_sessions", 0)
        await until_gauge(http, "chat_gateway_tasks", baseline_tasks)
        clients.wire.assert_history(session, await history(stack, session))

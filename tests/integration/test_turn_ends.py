"""Every turn ends with exactly one done, promptly, whatever the model or the client sends
(docs/protocol.md, guarantees 5 and 6), on a stack of two gateways, two workers and two buffers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import jwt
import pytest

from devstack.servers import Server
from tests.fake_openai import FakeOpenAI, serve_in_thread
from tests.faultproxy import FaultProxy
from tests.stack import TIMEOUT_FACTOR, WAIT_S, Client, Clients, Stack, history, isolated_stack, new_session, openai_env

ANSWER_CAP = 1_200_000  # above the 1.05 MB runaway answer, so the model's own "length" is what ends it
EMOJI = "\U0001f600"
UPSTREAM_READ_TIMEOUT_S = 3  # the stall timeout: a turn that ends sooner did not wait for it


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    with serve_in_thread(server.app) as url:
        server.url = url  # type: ignore[attr-defined]
        yield server


@pytest.fixture(scope="module")
def ends_stack(fake: FakeOpenAI, redis_server: Server) -> Iterator[Stack]:
    """Two of each service: frames of a session are stored by either buffer, out of order."""
    env = openai_env(
        fake.url,  # type: ignore[attr-defined]
        CHAT_UPSTREAM_READ_TIMEOUT_S=str(UPSTREAM_READ_TIMEOUT_S), CHAT_MAX_ANSWER_BYTES=str(ANSWER_CAP), CHAT_MAX_TURNS_PER_USER="1",
    )
    with isolated_stack(redis_server.url, env) as stack:
        stack.start_buffer()
        stack.start_worker()
        stack.start_gateway()
        yield stack


@pytest.fixture
async def eclients(ends_stack: Stack) -> AsyncIterator[Clients]:
    async with Clients(ends_stack) as opened:
        yield opened


async def dev_token(stack: Stack, user: str) -> str:
    async with httpx.AsyncClient(base_url=stack.http_url) as http:
        response = await http.post("/api/token", json={"user": user})
        token: str = response.json()["token"]
        return token


async def test_an_answer_over_one_mebibyte_ends_and_frees_everything(ends_stack: Stack, eclients: Clients) -> None:
    """A model that runs away past NATS's 1 MiB payload (1.05 MB, then finish_reason length) delivers
    every byte, then one done; history has the whole answer, the session and the user's slot are free."""
    token = await dev_token(ends_stack, "runaway")
    session = new_session()
    client, _ = await eclients.open(session, token=token)
    turn, text, done = await client.turn("[text:1050000:length] go on", wait_s=3 * WAIT_S)
    assert (len(text), done["reason"]) == (1_050_000, "length")
    assert all(len(f["text"].encode()) <= 16 * 1024 for f in client.frames if f["type"] == "chunk")
    record = await history(ends_stack, session, gateway=1, token=token)
    eclients.wire.assert_history(session, record)
    assert [(t["turn"], t["reason"], t["answer"] == text) for t in record["turns"]] == [(turn, "length", True)]
    assert record["active"] is None and record["resume_from"] == done["seq"]
    # The user's only turn slot (CHAT_MAX_TURNS_PER_USER=1) was released with the done.
    other, _ = await eclients.open(new_session(), token=token)
    _, _, other_done = await other.turn("hello")
    assert other_done["reason"] == "stop"
    _, _, again = await client.turn("[text:10:stop] and again")
    assert again["reason"] == "stop"


async def test_a_one_megabyte_answer_ends_normally(ends_stack: Stack, eclients: Clients) -> None:
    """1,000,000 bytes of answer and finish_reason stop end with done stop, every byte delivered once."""
    session = new_session()
    client, _ = await eclients.open(session)
    _, text, done = await client.turn("[text:1000000:stop] write a lot", wait_s=3 * WAIT_S)
    assert (len(text), done["reason"]) == (1_000_000, "stop")
    eclients.wire.assert_history(session, await history(ends_stack, session, gateway=1))


async def test_an_endless_answer_stops_at_the_cap(ends_stack: Stack, eclients: Clients, fake: FakeOpenAI) -> None:
    """A model that never finishes is cut at CHAT_MAX_ANSWER_BYTES with done length, and its request closed."""
    fake.disconnected.clear()
    client, _ = await eclients.open(new_session())
    _, text, done = await client.turn("[forever]", wait_s=3 * WAIT_S)
    assert (len(text.encode()), done["reason"]) == (ANSWER_CAP, "length")
    assert fake.disconnected.wait(WAIT_S), "the upstream request was not closed"


async def test_surrogate_halves_split_across_events(ends_stack: Stack, eclients: Clients) -> None:
    """An emoji split into two events arrives whole; halves with no partner become U+FFFD; the turn ends stop."""
    session = new_session()
    client, _ = await eclients.open(session)
    _, text, done = await client.turn("[surrogates]")
    assert done["reason"] == "stop"
    assert text == f"a{EMOJI}b\ufffdc\ufffdd\ufffd"
    eclients.wire.assert_history(session, await history(ends_stack, session, gateway=1))


async def test_a_malformed_event_ends_the_turn_at_once(ends_stack: Stack, eclients: Clients) -> None:
    """An event the worker cannot read ends the turn at once with an error that names the failure,
    not after the lease runs out as "stopped responding"."""
    client, _ = await eclients.open(new_session())
    await client.send({"type": "chat", "prompt": "[bad-delta]"})
    await client.until("chunk")
    read_at = time.monotonic()
    done = await client.until("done")
    assert client.texts() == "before" and done["reason"] == "error"
    # Neither the reaper's message (a lease run out) nor the stall's (no text for the read timeout)...
    assert done["message"] and "stopped responding" not in done["message"] and "no text" not in done["message"]
    # ...and sooner than either could have come: a bound of the product (the 3 s read timeout), not of this machine.
    assert time.monotonic() - read_at < UPSTREAM_READ_TIMEOUT_S
    _, _, again = await client.turn("[text:5:stop]")
    assert again["reason"] == "stop"


async def test_a_model_that_sends_no_text_is_stalled(ends_stack: Stack, eclients: Clients) -> None:
    """Keep-alive comments and empty deltas are not progress: after CHAT_UPSTREAM_READ_TIMEOUT_S (3 s here)
    without text the turn ends with an error saying so, and the session goes on."""
    client, _ = await eclients.open(new_session())
    _, text, done = await client.turn("[keepalive]")
    assert text == "hold on" and done["reason"] == "error" and "no text for 3 s" in done["message"]
    _, _, again = await client.turn("[text:5:stop]")
    assert again["reason"] == "stop"


async def test_a_finish_ends_the_turn_without_waiting_for_the_stream_to_close(ends_stack: Stack, eclients: Clients) -> None:
    """A server that sends the finish, then keep-alives, and never [DONE] nor EOF: the turn ends at the finish."""
    client, _ = await eclients.open(new_session())
    await client.send({"type": "chat", "prompt": "[finish-then-idle]"})
    await client.until("chunk")
    read_at = time.monotonic()
    done = await client.until("done")
    assert (client.texts(), done["reason"]) == ("all done", "stop")
    # Not the stall timeout: a bound of the product (the 3 s read timeout after the text), not of this machine.
    assert time.monotonic() - read_at < UPSTREAM_READ_TIMEOUT_S


async def test_a_stop_beats_what_the_model_already_sent(ends_stack: Stack, eclients: Clients) -> None:
    """A model far faster than delivery has its whole answer and finish queued at the worker; a stop
    accepted meanwhile still ends the turn stopped, and what was queued is not published after it."""
    client, _ = await eclients.open(new_session())
    await client.send({"type": "chat", "prompt": "[burst:1150000]"})
    for _ in range(3):
        await client.until("chunk")
    await client.send({"type": "stop"})
    done = await client.until("done", wait_s=3 * WAIT_S)
    assert done["reason"] == "stopped"
    assert len(client.texts().encode()) < 1_150_000


async def test_stop_while_the_model_has_sent_nothing(ends_stack: Stack, eclients: Clients, fake: FakeOpenAI) -> None:
    """A stop while the model stalls before its first token ends the turn stopped and closes the request."""
    fake.disconnected.clear()
    fake.requested.clear()
    client, _ = await eclients.open(new_session())
    await client.send({"type": "chat", "prompt": "[stall]"})
    await client.until("accepted")
    assert await asyncio.to_thread(fake.requested.wait, WAIT_S), "the model was never asked"
    assert not fake.disconnected.is_set()
    await client.send({"type": "stop"})
    done = await client.until("done")
    assert (done["reason"], done["seq"]) == ("stopped", 1)
    assert fake.disconnected.wait(WAIT_S), "the upstream request was not closed"


async def test_stop_at_every_moment_of_a_turns_start(ends_stack: Stack, eclients: Clients) -> None:
    """A stop sent with the chat, right after accepted, or a few milliseconds later (before the claim,
    at the claim, before the first token, mid-stream) always ends the turn with done stopped."""
    client, _ = await eclients.open(new_session())
    # The delay is the variable under test: when the stop leaves, relative to accepted.
    for delay_s in (None, 0.0, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05) * 2:
        await client.send({"type": "chat", "prompt": "[long]"})  # a token every 20 ms, never finishing
        if delay_s is not None:
            await client.until("accepted")
            await asyncio.sleep(delay_s)
        await client.send({"type": "stop"})
        done = await client.until("done")
        assert done["reason"] == "stopped", (delay_s, done)


async def test_stop_before_any_worker_claims_the_turn(redis_server: Server) -> None:
    """With no worker running, a stopped turn ends stopped within the reaper's interval, not the queue timeout;
    a worker started later skips the stale request."""
    with isolated_stack(redis_server.url, {"CHAT_QUEUE_TIMEOUT_S": "60"}, worker=False) as stack:
        async with Clients(stack) as clients:
            client, _ = await clients.open(new_session())
            await client.send({"type": "chat", "prompt": "nobody is here", "id": "a"})
            await client.until("accepted")
            await client.send({"type": "stop"})
            done = await client.until("done", wait_s=WAIT_S)
            assert (done["reason"], done["seq"]) == ("stopped", 1)
            stack.start_worker()
            turn, _, done = await client.turn("now someone is")
            assert (turn, done["reason"]) == (2, "length")


async def test_a_client_that_acks_every_frame_is_never_cut_off(stack: Stack, clients: Clients) -> None:
    """Acking each frame of a 1,000-frame catch-up replay, and of a live turn, with pings between, gets
    no error and no close (guarantee 6)."""
    session = new_session()
    writer, _ = await clients.open(session)
    while writer.last_seq < 1000:
        await writer.turn("fill the log")
    reader, ready = await clients.open(session)
    assert ready["last_seq"] >= 1000

    async def read_and_ack(until_seq: int) -> None:
        while reader.last_seq < until_seq:
            frame = await reader.recv()
            assert frame["type"] in ("chunk", "done", "pong", "accepted"), frame
            if frame["type"] in ("chunk", "done"):
                await reader.send({"type": "ack", "seq": frame["seq"]})
                if frame["seq"] % 10 == 0:
                    await reader.send({"type": "ping", "t": frame["seq"]})

    await read_and_ack(ready["last_seq"])
    await reader.send({"type": "chat", "prompt": "live now", "id": "live"})
    await read_and_ack(ready["last_seq"] + 1)
    while (frame := await reader.recv())["type"] != "done":
        assert frame["type"] in ("chunk", "pong", "accepted"), frame
        if frame["type"] == "chunk":
            await reader.send({"type": "ack", "seq": frame["seq"]})
    await reader.send({"type": "ping", "t": "still here"})
    assert await reader.until("pong") == {"type": "pong", "t": "still here"}
    clients.wire.assert_history(session, await history(stack, session))


async def test_history_says_where_to_resume(paced_stack: Stack, paced: Clients) -> None:
    """While a turn generates, history's resume_from (and last_seq) is the last finished turn's done:
    a connection opened there gets the generating turn from its first chunk."""
    session = new_session()
    client, _ = await paced.open(session)
    await client.turn("first")
    finished_at = client.last_seq
    await client.send({"type": "chat", "prompt": "second", "id": "b"})
    await client.until("chunk")
    await client.until("chunk")
    record = await history(paced_stack, session)
    assert (record["resume_from"], record["last_seq"]) == (finished_at, finished_at)
    assert record["active"]["turn"] == 2 and [t["last_seq"] for t in record["turns"]] == [finished_at]
    resumed, _ = await paced.open(session, last_seq=record["resume_from"])
    first = await resumed.until("chunk")
    assert (first["seq"], first["turn"]) == (finished_at + 1, 2)
    await resumed.until("done")
    paced.wire.assert_history(session, await history(paced_stack, session))


async def test_tokens_from_a_clock_slightly_ahead_are_accepted(stack: Stack, clients: Clients) -> None:
    """An HS256 token whose iat is 2 s in the future (another host's clock) works on the WebSocket and HTTP."""
    now = int(time.time())
    token = jwt.encode({"sub": "skewed", "iat": now + 2, "nbf": now + 2, "exp": now + 600}, stack.env["CHAT_AUTH_SECRET"])
    session = new_session()
    client, ready = await clients.open(session, token=token)
    assert ready["exp"] == now + 600
    async with httpx.AsyncClient(base_url=stack.http_url, headers={"Authorization": f"Bearer {token}"}) as http:
        assert (await http.get(f"/api/sessions/{session}/history")).status_code == 200


async def test_no_lease_is_lost_after_its_turn(redis_server: Server) -> None:
    """Many short turns with a lease renewed every third of it: no worker ever reports a lease lost, and
    no turn is reaped (the lease keeper never outlives its turn)."""
    # A 0.3 s lease (and 0.2 s turns) at factor 1; all scaled alike, so a worker that a loaded machine
    # starves for a moment is not taken for one that lost its lease.
    lease_s = 0.3 * TIMEOUT_FACTOR
    env = {
        "CHAT_LEASE_S": str(lease_s), "CHAT_REAP_INTERVAL_S": "0.05",
        "CHAT_DEMO_TOKENS_PER_S": str(200 / TIMEOUT_FACTOR), "CHAT_DEMO_ANSWER_TOKENS": "40",
    }
    with isolated_stack(redis_server.url, env) as stack:
        async with Clients(stack) as clients:
            opened: list[Client] = [(await clients.open(new_session()))[0] for _ in range(20)]
            for _ in range(3):
                dones = await asyncio.gather(*(client.turn("short") for client in opened))
                assert {done["reason"] for _, _, done in dones} == {"length"}
            # Not a wait for an event but for its absence: several lease periods after
            # the last turn, a keeper that outlived its turn would have renewed and spoken.
            await asyncio.sleep(3 * lease_s)
        logs = "".join(process.output() for process in stack.processes)
    assert "lease lost" not in logs and "turn_reaped" not in logs


async def test_a_done_that_waits_for_redis_still_frees_the_worker(fake: FakeOpenAI, redis_server: Server) -> None:
    """The model finishes while its worker cannot reach Redis (so its lease is not trusted): the turn
    still gets one done, from the worker once Redis is back or from a reaper, and the worker's only
    slot is free again for the next turn."""
    env = openai_env(
        fake.url,  # type: ignore[attr-defined]
        CHAT_WORKER_CONCURRENCY="1", CHAT_LEASE_S="1", CHAT_REAP_INTERVAL_S="0.1",
    )
    with isolated_stack(redis_server.url, env, worker=False) as stack:
        async with FaultProxy(*stack.redis_address()) as proxy:
            await stack.start_worker_through(proxy.port)
            async with Clients(stack) as clients:
                client, _ = await clients.open(new_session())
                fake.gate.clear()
                await client.send({"type": "chat", "prompt": "[gated]", "id": "a"})
                await client.until("chunk")
                proxy.refuse = True
                proxy.cut_all()
                await asyncio.sleep(1.0)  # a lease's length without Redis: the worker no longer trusts it
                fake.gate.set()  # the model finishes now; its done must wait for the lease
                proxy.refuse = False
                done = await client.until("done")
                assert done["turn"] == 1
                _, text, again = await client.turn("[text:5:stop]")  # needs the worker's one slot
                assert (text, again["reason"]) == ("0000 ", "stop")

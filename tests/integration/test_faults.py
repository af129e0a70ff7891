"""Turns end cleanly, in bounded time, when workers die, are all busy, or are missing."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import replace

import nats

from devstack.servers import LocalRedis, Server
from services.buffer.service import GENERATED_ACK_WAIT_S
from shared.subjects import CONSUMER_BUFFERS, STREAM_GENERATED
from tests.faultproxy import FaultProxy
from tests.stack import TIMEOUT_FACTOR, WAIT_S, Clients, history, isolated_stack, new_session

FAST_LEASES = {"CHAT_LEASE_S": "1", "CHAT_REAP_INTERVAL_S": "0.2"}


async def test_worker_killed_mid_turn_ends_it_with_error(redis_server: Server) -> None:
    """SIGKILL a worker mid-turn: the turn ends with done/error within its lease, then the session goes on."""
    env = {**FAST_LEASES, "CHAT_DEMO_TOKENS_PER_S": "50", "CHAT_DEMO_ANSWER_TOKENS": "2000"}
    with isolated_stack(redis_server.url, env) as stack:
        async with Clients(stack) as clients:
            session = new_session()
            client, _ = await clients.open(session)
            await client.send({"type": "chat", "prompt": "interrupted", "id": "a"})
            for _ in range(5):
                await client.until("chunk")
            worker = next(p for p in stack.processes if p.module == "services.llm_worker")
            worker.signal(signal.SIGKILL)
            done = await client.until("done", wait_s=WAIT_S)  # lease 1 s + reaper 0.2 s, well inside
            assert done["reason"] == "error" and "stopped responding" in done["message"]
            record = await history(stack, session)
            assert record["turns"][0]["reason"] == "error"
            clients.wire.assert_history(session, record)  # the text delivered is the text stored
            stack.start_worker()
            await client.send({"type": "chat", "prompt": "next", "id": "b"})
            assert (await client.until("accepted"))["turn"] == 2
            await client.until("chunk")


async def test_no_worker_within_the_queue_timeout(redis_server: Server) -> None:
    """With no worker running, a turn waits its queue timeout and fails with code unavailable."""
    env = {**FAST_LEASES, "CHAT_QUEUE_TIMEOUT_S": "1"}
    with isolated_stack(redis_server.url, env, worker=False) as stack:
        async with Clients(stack) as clients:
            client, _ = await clients.open(new_session())
            await client.send({"type": "chat", "prompt": "anyone?", "id": "a"})
            await client.until("accepted")
            done = await client.until("done", wait_s=WAIT_S)
            assert (done["reason"], done["code"]) == ("error", "unavailable")
            assert done["seq"] == 1
            # The stale request, taken later by a worker, is skipped; a new turn runs.
            stack.start_worker()
            turn, _, done = await client.turn("now?")
            assert turn == 2 and done["reason"] == "length"


async def test_all_workers_busy_waits_bounded(redis_server: Server) -> None:
    """One worker with one slot: a second turn waits for it, and fails unavailable if the wait runs out."""
    env = {**FAST_LEASES, "CHAT_WORKER_CONCURRENCY": "1", "CHAT_QUEUE_TIMEOUT_S": "2",
           "CHAT_DEMO_TOKENS_PER_S": "100", "CHAT_DEMO_ANSWER_TOKENS": "50"}
    with isolated_stack(redis_server.url, env) as stack:
        async with Clients(stack) as clients:
            first, _ = await clients.open(new_session())
            second, _ = await clients.open(new_session())
            # A half-second answer: the second turn waits for the slot, then runs.
            await first.send({"type": "chat", "prompt": "short", "id": "a"})
            await first.until("chunk")
            _, _, done = await second.turn("waits its turn")
            assert done["reason"] == "length"
            await first.until("done")
    # A ten-second answer holds the slot past the queue timeout: the waiting turn fails unavailable.
    env["CHAT_DEMO_ANSWER_TOKENS"] = "1000"
    with isolated_stack(redis_server.url, env) as stack:
        async with Clients(stack) as clients:
            first, _ = await clients.open(new_session())
            second, _ = await clients.open(new_session())
            await first.send({"type": "chat", "prompt": "ten seconds", "id": "a"})
            await first.until("chunk")
            await second.send({"type": "chat", "prompt": "no room", "id": "b"})
            await second.until("accepted")
            done = await second.until("done", wait_s=WAIT_S)
            assert (done["reason"], done["code"]) == ("error", "unavailable")


async def test_buffer_killed_and_restarted_loses_nothing(redis_server: Server) -> None:
    """SIGKILL the only buffer mid-stream: frames wait in JetStream; a new buffer stores them; every seq once."""
    env = {"CHAT_DEMO_TOKENS_PER_S": "100", "CHAT_DEMO_ANSWER_TOKENS": "300"}
    with isolated_stack(redis_server.url, env) as stack:
        async with Clients(stack) as clients:
            session = new_session()
            client, _ = await clients.open(session)
            await client.send({"type": "chat", "prompt": "survive the buffer", "id": "a"})
            for _ in range(10):
                await client.until("chunk")
            buffer = next(p for p in stack.processes if p.module == "services.buffer")
            buffer.signal(signal.SIGKILL)
            assert buffer.process is not None and buffer.process.wait(WAIT_S) == -signal.SIGKILL
            buffer.start()  # a new buffer process, same settings
            # Frames the dead buffer held come back after the consumer's ack_wait (5 s), well inside this.
            done = await client.until("done", wait_s=2 * WAIT_S)  # the wire checker sees every seq
            assert done["reason"] == "length"
            clients.wire.assert_history(session, await history(stack, session))


async def test_a_buffer_brings_the_consumers_ack_wait_up_to_date(redis_server: Server) -> None:
    """A consumer left with an older, longer ack_wait (an upgrade) gets the buffer's at its start:
    else a buffer that dies holding frames would stall their sessions for that long."""
    with isolated_stack(redis_server.url, worker=False) as stack:
        nc = await nats.connect(stack.env["CHAT_NATS_URL"])
        try:
            js = nc.jetstream()
            old = (await js.consumer_info(STREAM_GENERATED, CONSUMER_BUFFERS)).config
            await js.add_consumer(STREAM_GENERATED, replace(old, ack_wait=30.0))
            assert (await js.consumer_info(STREAM_GENERATED, CONSUMER_BUFFERS)).config.ack_wait == 30.0
            buffer = next(p for p in stack.processes if p.module == "services.buffer")
            await asyncio.to_thread(buffer.stop)
            await asyncio.to_thread(buffer.start)
            assert (await js.consumer_info(STREAM_GENERATED, CONSUMER_BUFFERS)).config.ack_wait == GENERATED_ACK_WAIT_S
        finally:
            await nc.close()


async def test_redis_restart_mid_stream(redis_server: Server) -> None:
    """Redis (with AOF, as compose runs it) restarted mid-stream: the services reconnect, the turn completes once."""
    redis = LocalRedis()
    redis.start()
    try:
        env = {"CHAT_DEMO_TOKENS_PER_S": "100", "CHAT_DEMO_ANSWER_TOKENS": "300"}
        with isolated_stack(redis.url, env) as stack:
            async with Clients(stack) as clients:
                session = new_session()
                client, _ = await clients.open(session)
                await client.send({"type": "chat", "prompt": "survive redis", "id": "a"})
                for _ in range(10):
                    await client.until("chunk")
                redis.stop()
                redis.start()
                done = await client.until("done", wait_s=3 * WAIT_S)
                assert done["reason"] == "length"
                clients.wire.assert_history(session, await history(stack, session))
    finally:
        redis.stop()


async def test_adding_a_worker_adds_capacity(redis_server: Server) -> None:
    """Workers with one slot each: with one, two turns run one after the other; start a second and they overlap."""
    env = {"CHAT_WORKER_CONCURRENCY": "1", "CHAT_DEMO_TOKENS_PER_S": "100", "CHAT_DEMO_ANSWER_TOKENS": "150"}
    with isolated_stack(redis_server.url, env) as stack:
        async with Clients(stack) as clients:
            a, _ = await clients.open(new_session())
            b, _ = await clients.open(new_session())

            async def a_seq_at_b_first_chunk() -> tuple[int, int, int]:
                """Run a turn on a, then one on b; return where a's turn was when b's
                first chunk arrived (a's cursor), and a's first and last seq."""
                await a.send({"type": "chat", "prompt": "first"})
                first = (await a.until("chunk"))["seq"]
                await b.send({"type": "chat", "prompt": "second"})

                async def b_first_chunk() -> int:
                    await b.until("chunk", wait_s=3 * WAIT_S)
                    return a.last_seq  # read by the task below as frames arrive: where a's answer stands

                a_done, a_at_b = await asyncio.gather(a.until("done", wait_s=3 * WAIT_S), b_first_chunk())
                await b.until("done", wait_s=3 * WAIT_S)
                return a_at_b, first, a_done["seq"]

            a_at_b, _, a_last = await a_seq_at_b_first_chunk()
            assert a_at_b == a_last  # one worker: b's turn waited for a's slot, a's done came first
            stack.start_worker()
            a_at_b, a_first, a_last = await a_seq_at_b_first_chunk()
            # Two workers: b streamed while a still had most of its answer to go (counted in a's frames, not seconds).
            assert a_at_b - a_first < (a_last - a_first) // 2, (a_first, a_at_b, a_last)


async def test_a_full_worker_never_holds_a_request_another_could_start(redis_server: Server) -> None:
    """Two workers of two slots, four long turns asked for in quick succession (exactly the capacity):
    every turn starts at once; none waits in a full worker's hands while the other has room."""
    env = {"CHAT_WORKER_CONCURRENCY": "2", "CHAT_DEMO_TOKENS_PER_S": "5", "CHAT_DEMO_ANSWER_TOKENS": "1000"}
    with isolated_stack(redis_server.url, env) as stack:
        stack.start_worker()
        async with Clients(stack) as clients:
            for _ in range(3):  # each round, the requests reach idle workers' outstanding pulls anew
                opened = [(await clients.open(new_session()))[0] for _ in range(4)]
                for client in opened:  # the spacing is the variable: requests arrive one by one
                    await client.send({"type": "chat", "prompt": "a long one"})
                    await client.until("accepted")  # the request is queued before the next is sent
                firsts = await asyncio.gather(*(client.until("chunk", wait_s=WAIT_S) for client in opened))
                assert len(firsts) == 4
                for client in opened:
                    await client.send({"type": "stop"})
                    assert (await client.until("done"))["reason"] == "stopped"


async def test_a_worker_cut_off_from_redis_publishes_nothing_after_the_reaper(redis_server: Server) -> None:
    """A worker loses Redis (and so its lease) mid-turn while NATS and the buffer's Redis still work: it
    stops publishing before a reaper may end the turn, so the turn gets one done and no frame of it
    follows; once Redis is back the worker learns the turn is gone, and the next turn streams whole."""
    env = {"CHAT_LEASE_S": "1", "CHAT_REAP_INTERVAL_S": "0.1", "CHAT_DEMO_TOKENS_PER_S": "50", "CHAT_DEMO_ANSWER_TOKENS": "4000"}
    with isolated_stack(redis_server.url, env, worker=False) as stack:
        async with FaultProxy(*stack.redis_address()) as proxy:
            await stack.start_worker_through(proxy.port)
            async with Clients(stack) as clients:
                session = new_session()
                client, _ = await clients.open(session)
                await client.send({"type": "chat", "prompt": "cut off", "id": "a"})
                for _ in range(5):
                    await client.until("chunk")
                proxy.refuse = True
                proxy.cut_all()
                done = await client.until("done")  # Client checks every seq on the way
                assert (done["turn"], done["reason"]) == (1, "error")
                proxy.refuse = False
                await client.send({"type": "chat", "prompt": "after it", "id": "b"})
                assert (await client.until("accepted"))["turn"] == 2
                for _ in range(20):  # a stale frame of turn 1 would break the seq check or this one
                    assert (await client.until("chunk", wait_s=3 * WAIT_S))["turn"] == 2
                await client.send({"type": "stop"})
                assert (await client.until("done"))["turn"] == 2
                record = await history(stack, session)
                assert [t["turn"] for t in record["turns"]] == [1, 2]
                clients.wire.assert_history(session, record)


async def test_a_worker_cut_off_from_redis_still_shuts_down(redis_server: Server) -> None:
    """SIGTERM to a worker whose Redis is gone mid-turn: it cannot publish the turn's done (its lease is
    not trusted), so it gives up within its bounds and exits; a reaper ends the turn."""
    env = {"CHAT_LEASE_S": "1", "CHAT_REAP_INTERVAL_S": "0.1", "CHAT_DRAIN_TIMEOUT_S": "0.5",
           "CHAT_DEMO_TOKENS_PER_S": "50", "CHAT_DEMO_ANSWER_TOKENS": "4000"}
    with isolated_stack(redis_server.url, env, worker=False) as stack:
        async with FaultProxy(*stack.redis_address()) as proxy:
            worker = await stack.start_worker_through(proxy.port)
            async with Clients(stack) as clients:
                client, _ = await clients.open(new_session())
                await client.send({"type": "chat", "prompt": "cut off, then told to stop", "id": "a"})
                await client.until("chunk")
                proxy.refuse = True
                proxy.cut_all()
                # The reaper's done: the lease ran out, so the worker (still mid-turn, and unable to
                # learn that without Redis) no longer trusts it when told to stop.
                done = await client.until("done", wait_s=3 * WAIT_S)
                assert (done["turn"], done["reason"]) == (1, "error")
                worker.signal(signal.SIGTERM)
                assert worker.process is not None
                assert await asyncio.to_thread(worker.process.wait, 15 * TIMEOUT_FACTOR) in (0, -signal.SIGTERM)


async def test_a_frozen_idle_worker_does_not_keep_a_request(redis_server: Server) -> None:
    """A worker frozen while idle (SIGSTOP: its last pull still open on the server) may be handed a request
    it will not take; the request reaches the other worker within the request ack wait (5 s), not after
    the 30 s queue timeout."""
    env = {"CHAT_WORKER_CONCURRENCY": "4", "CHAT_DEMO_TOKENS_PER_S": "50", "CHAT_DEMO_ANSWER_TOKENS": "20"}
    with isolated_stack(redis_server.url, env) as stack:
        frozen = next(p for p in stack.processes if p.module == "services.llm_worker")
        stack.start_worker()
        async with Clients(stack) as clients:
            opened = [(await clients.open(new_session()))[0] for _ in range(4)]
            frozen.signal(signal.SIGSTOP)
            try:
                for client in opened:
                    await client.send({"type": "chat", "prompt": "anyone awake?"})
                dones = await asyncio.gather(*(client.until("done", wait_s=WAIT_S) for client in opened))
                assert [done["reason"] for done in dones] == ["length"] * 4
            finally:
                frozen.signal(signal.SIGCONT)

"""The whole system under load and faults, on real processes.

2 gateways behind a round-robin proxy, 3 workers, 2 buffers, real NATS and
Redis; 50 concurrent sessions of two turns each, with random pauses and
connection cuts (a reconnect lands on either gateway). During the run one
worker is killed, one gateway is killed and restarted, and NATS is restarted.
Afterwards every session saw every seq once, in order, with no gap, every
turn ended with a done, and every answer equals the stored history.
"""

from __future__ import annotations

import asyncio
import random
import signal
from dataclasses import dataclass, field

import httpx
import pytest

from devstack.servers import LocalNats, Server
from shared.backoff import Backoff
from shared.client import ChatClient, Disconnected, GaveUp
from shared.protocol import Accepted, Chunk, Done
from tests.faultproxy import FaultProxy
from tests.stack import Stack, new_session

SESSIONS = 50
TURNS = 2
ENV = {
    "CHAT_DEMO_TOKENS_PER_S": "30",
    "CHAT_DEMO_ANSWER_TOKENS": "90",  # three-second answers
    "CHAT_LEASE_S": "1.5",
    "CHAT_REAP_INTERVAL_S": "0.2",
    "CHAT_QUEUE_TIMEOUT_S": "60",
}


@dataclass
class SessionRun:
    session: str
    seqs: list[int] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)
    dones: dict[int, Done] = field(default_factory=dict)
    pauses: int = 0
    disconnects: int = 0


async def drive(index: int, url: str, rng: random.Random) -> SessionRun:
    run = SessionRun(session=new_session())
    client = ChatClient(
        url,
        session=run.session,
        backoff=Backoff(initial_s=0.05, cap_s=0.5, healthy_after_s=1.0),
        ping_interval_s=0.5,
        ping_timeout_s=3.0,
    )
    resumes: set[asyncio.Task[None]] = set()
    async with client:
        events = client.events()
        for number in range(TURNS):
            chat_id = await client.chat(f"session {index}, question {number + 1}")
            pause_after = rng.randint(2, 40) if rng.random() < 0.6 else None
            chunks = 0
            turn: int | None = None
            async for event in events:
                assert not isinstance(event, GaveUp), event
                if isinstance(event, Disconnected):
                    run.disconnects += 1
                if isinstance(event, (Chunk, Done)):
                    assert event.seq == len(run.seqs) + 1, f"{run.session}: seq {event.seq} after {len(run.seqs)}"
                    run.seqs.append(event.seq)
                if isinstance(event, Accepted) and event.id == chat_id:
                    turn = event.turn
                if isinstance(event, Chunk):
                    run.texts[event.turn] = run.texts.get(event.turn, "") + event.text
                    chunks += 1
                    if chunks == pause_after:
                        await client.pause()
                        run.pauses += 1
                        delay = rng.uniform(0.1, 0.5)
                        task = asyncio.create_task(_resume_later(client, delay))
                        resumes.add(task)
                        task.add_done_callback(resumes.discard)
                if isinstance(event, Done):
                    run.dones[event.turn] = event
                    if event.turn == turn:
                        break
        await asyncio.gather(*resumes)
    return run


async def _resume_later(client: ChatClient, delay: float) -> None:
    await asyncio.sleep(delay)  # a person's pause
    await client.resume()


@pytest.mark.timeout(300)
async def test_fifty_sessions_through_faults(redis_server: Server) -> None:
    """Exactly once, in order, gap-free, every turn done, answers equal history, through a worker kill, a gateway restart and a NATS restart."""
    nats = LocalNats()
    nats.start()
    rng = random.Random(6)
    try:
        with Stack(nats_url=nats.url, redis_url=redis_server.url, env=ENV) as stack:
            for _ in range(2):
                stack.start_buffer()
            workers = [stack.start_worker() for _ in range(3)]
            gateway_a, gateway_b = stack.start_gateway(), stack.start_gateway()
            ports = [int(g.env["CHAT_PORT"]) for g in (gateway_a, gateway_b)]
            async with FaultProxy("127.0.0.1", ports[0], ("127.0.0.1", ports[1])) as proxy:
                drivers = asyncio.gather(*(drive(i, proxy.url(), random.Random(i)) for i in range(SESSIONS)))

                async def chaos() -> None:
                    await asyncio.sleep(1.0)
                    workers[0].signal(signal.SIGKILL)
                    await asyncio.sleep(1.0)
                    gateway_a.signal(signal.SIGKILL)
                    await asyncio.sleep(1.0)
                    await asyncio.to_thread(gateway_a.start)
                    await asyncio.sleep(1.0)
                    await asyncio.to_thread(nats.stop)
                    await asyncio.to_thread(nats.start)
                    for _ in range(20):  # and connections cut at random, throughout
                        await asyncio.sleep(0.3)
                        proxy.cut_some(3, rng)

                chaos_task = asyncio.create_task(chaos())
                runs = await drivers
                await chaos_task
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[1]}") as http:
                for run in runs:
                    record = (await http.get(f"/api/sessions/{run.session}/history")).json()
                    assert record["active"] is None
                    assert sorted(run.dones) == [t["turn"] for t in record["turns"]] == list(range(1, TURNS + 1))
                    assert run.seqs[-1] == record["last_seq"]
                    for turn in record["turns"]:
                        assert run.texts.get(turn["turn"], "") == turn["answer"], (run.session, turn["turn"])
                        assert run.dones[turn["turn"]].reason == turn["reason"]
    finally:
        nats.stop()
    reasons = [d.reason for r in runs for d in r.dones.values()]
    assert all(reason in ("length", "error") for reason in reasons)
    assert 1 <= reasons.count("error") < len(reasons) // 2  # the killed worker's turns, and only those
    assert sum(r.pauses for r in runs) >= SESSIONS // 2
    assert sum(r.disconnects for r in runs) >= SESSIONS  # the gateway kill and NATS restart alone cut many

"""The whole system under load and faults, on real processes.

2 gateways behind a round-robin proxy, 3 workers, 2 buffers, real NATS and
Redis; 50 concurrent sessions of two turns each, with random pauses and
connection cuts (a reconnect lands on either gateway). During the run one
worker is killed, one gateway is killed and restarted, and NATS is restarted,
each when the run has delivered so much of its answers (not after so many
seconds). Every connection's raw frames go to one strict wire checker
(tests/wire.py): the client's events drop duplicates and reconnect on gaps,
so only the wire shows whether every seq came once, in order, with no gap,
whether anything came while paused, whether every turn ended with exactly
one done, and whether what was delivered equals the stored history.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from devstack.servers import LocalNats, Server
from shared.backoff import Backoff
from shared.client import ChatClient, Disconnected, GaveUp
from shared.protocol import Accepted, Chunk, Done
from tests.faultproxy import FaultProxy
from tests.stack import TIMEOUT_FACTOR, WAIT_S, Stack, new_session
from tests.wire import WireChecker

SESSIONS = 50
TURNS = 2
ANSWER_TOKENS = 90
ENV = {
    "CHAT_DEMO_TOKENS_PER_S": "30",
    "CHAT_DEMO_ANSWER_TOKENS": str(ANSWER_TOKENS),  # three-second answers
    "CHAT_LEASE_S": "1.5",
    "CHAT_REAP_INTERVAL_S": "0.2",
    "CHAT_QUEUE_TIMEOUT_S": "60",
}


class Progress:
    """How much of the answers the run has delivered, in model tokens, to time
    the faults by. Counted in tokens, not chunks: a worker that falls behind
    coalesces tokens into fewer chunks. The demo model's tokens are words, each
    after its whitespace, so a chunk carries ``len(text.split())`` of them."""

    def __init__(self) -> None:
        self.tokens = 0
        self.finished = False  # every driver is done: no more progress will come
        self.changed = asyncio.Event()

    def add(self, text: str) -> None:
        self.tokens += len(text.split())
        self.changed.set()

    def finish(self) -> None:
        self.finished = True
        self.changed.set()

    async def reached(self, tokens: int) -> bool:
        """Wait until ``tokens`` were delivered; False if the run ended first."""
        while self.tokens < tokens and not self.finished:
            self.changed.clear()
            await self.changed.wait()
        return self.tokens >= tokens


@dataclass
class SessionRun:
    session: str
    dones: dict[int, list[Done]] = field(default_factory=dict)  # every done the client passed on, per turn
    pauses: int = 0
    disconnects: int = 0


async def drive(index: int, url: str, rng: random.Random, checker: WireChecker, progress: Progress) -> SessionRun:
    """One session's two turns with a random pause; its client's wire goes to ``checker``."""
    run = SessionRun(session=new_session())
    client = ChatClient(
        url,
        session=run.session,
        backoff=Backoff(initial_s=0.05, cap_s=0.5, healthy_after_s=1.0),
        ping_interval_s=0.5,
        ping_timeout_s=3.0 * TIMEOUT_FACTOR,
        wire_tap=checker.tap(),
    )
    resumes: set[asyncio.Task[None]] = set()
    async with client:
        events = client.events()
        for number in range(TURNS):
            chat_id = await client.chat(f"session {index}, question {number + 1}")
            pause_after = rng.randint(2, 40) if rng.random() < 0.6 else None
            chunks = 0
            turn: int | None = None
            # The events only drive the pauses and tell when the turn is over; the checker judges the frames.
            async for event in events:
                assert not isinstance(event, GaveUp), event
                if isinstance(event, Disconnected):
                    run.disconnects += 1
                if isinstance(event, Accepted) and event.id == chat_id:
                    turn = event.turn
                if isinstance(event, Chunk):
                    progress.add(event.text)
                    chunks += 1
                    if chunks == pause_after:
                        await client.pause()
                        run.pauses += 1
                        task = asyncio.create_task(_resume_later(client, rng.uniform(0.1, 0.5)))
                        resumes.add(task)
                        task.add_done_callback(resumes.discard)
                if isinstance(event, Done):
                    run.dones.setdefault(event.turn, []).append(event)  # a second done is kept, to be counted
                    if event.turn == turn:
                        break
        await asyncio.gather(*resumes)
    return run


async def _resume_later(client: ChatClient, delay: float) -> None:
    await asyncio.sleep(delay)  # a person's pause: how long they read, not a wait for anything
    await client.resume()


@pytest.mark.timeout(300 * TIMEOUT_FACTOR)
async def test_fifty_sessions_through_faults(redis_server: Server) -> None:
    """Exactly once, in order, gap-free, nothing while paused, one done per turn, answers equal history,
    all on the raw wire, through a worker kill, a gateway restart, a NATS restart and random cuts."""
    nats = LocalNats()
    nats.start()
    checker = WireChecker()
    progress = Progress()
    rng = random.Random(6)
    faults: list[str] = []
    try:
        with Stack(nats_url=nats.url, redis_url=redis_server.url, env=ENV) as stack:
            for _ in range(2):
                stack.start_buffer()
            workers = [stack.start_worker() for _ in range(3)]
            gateway_a, gateway_b = stack.start_gateway(), stack.start_gateway()
            ports = [int(g.env["CHAT_PORT"]) for g in (gateway_a, gateway_b)]
            async with FaultProxy("127.0.0.1", ports[0], ("127.0.0.1", ports[1])) as proxy:

                async def at(tokens: int, name: str, fault: Callable[[], Awaitable[object]]) -> None:
                    if await progress.reached(tokens):
                        await fault()
                        faults.append(name)

                def restart_nats() -> None:
                    nats.stop()
                    nats.start()

                async def chaos() -> None:
                    # About 9,000 tokens in all (50 sessions, two turns of 90), less the killed worker's
                    # unfinished answers: every fault lands while many turns still stream.
                    await at(1000, "worker kill", lambda: asyncio.to_thread(workers[0].signal, signal.SIGKILL))
                    await at(2000, "gateway kill", lambda: asyncio.to_thread(gateway_a.signal, signal.SIGKILL))
                    await at(3000, "gateway start", lambda: asyncio.to_thread(gateway_a.start))
                    await at(4000, "nats restart", lambda: asyncio.to_thread(restart_nats))
                    for number in range(20):  # and connections cut at random, throughout the rest

                        async def cut() -> None:
                            proxy.cut_some(3, rng)

                        await at(4300 + 100 * number, "cut", cut)

                async def drivers() -> list[SessionRun]:
                    try:
                        return await asyncio.gather(
                            *(drive(i, proxy.url(), random.Random(i), checker, progress) for i in range(SESSIONS))
                        )
                    finally:
                        progress.finish()

                chaos_task = asyncio.create_task(chaos())
                runs = await drivers()
                await asyncio.wait_for(chaos_task, WAIT_S)
            assert faults == ["worker kill", "gateway kill", "gateway start", "nats restart"] + ["cut"] * 20
            checker.assert_clean()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[1]}") as http:
                for run in runs:
                    record = (await http.get(f"/api/sessions/{run.session}/history")).json()
                    assert [t["turn"] for t in record["turns"]] == list(range(1, TURNS + 1))
                    # Exactly one done per turn, counted from the events too (a second one is not overwritten).
                    assert {turn: len(dones) for turn, dones in run.dones.items()} == dict.fromkeys(range(1, TURNS + 1), 1), run.session
                    checker.assert_history(run.session, record)
                    checker.assert_ended(run.session)
    finally:
        nats.stop()
    reasons = [d.reason for r in runs for dones in r.dones.values() for d in dones]
    assert all(reason in ("length", "error") for reason in reasons)
    assert 1 <= reasons.count("error") < len(reasons) // 2  # the killed worker's turns, and only those
    assert sum(r.pauses for r in runs) >= SESSIONS // 2
    paused_on_wire = sum(1 for c in checker.connections for f in c.frames if f["type"] == "paused")
    assert paused_on_wire >= SESSIONS // 2  # the pauses reached the wire, where the checker held them to the contract
    assert sum(r.disconnects for r in runs) >= SESSIONS  # the gateway kill and NATS restart alone cut many

"""The Python client against real services through a fault proxy.

Every connection the client opens is fed, frame by frame as it came off the
wire, to the strict wire checker (tests/wire.py): the client's own events drop
duplicates and reconnect on gaps, so they would hide a server that sends
either. Each run ends with the checker clean and the text delivered on the
wire equal to the answers the session stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from devstack.servers import Server
from shared.backoff import Backoff
from shared.client import ChatClient, Connected, Disconnected, GaveUp, Reconnecting
from shared.protocol import Accepted, Chunk, Done
from tests.faultproxy import FaultProxy
from tests.stack import TIMEOUT_FACTOR, WAIT_S, Stack, history, isolated_stack, new_session
from tests.wire import WireChecker, WireTap

# Long streams: 1,000 tokens at 200 tokens/s, five seconds a turn.
LONG = {"CHAT_DEMO_TOKENS_PER_S": "200", "CHAT_DEMO_ANSWER_TOKENS": "1000"}


@pytest.fixture(scope="module")
def long_stack(redis_server: Server) -> Iterator[Stack]:
    with isolated_stack(redis_server.url, LONG) as stack:
        yield stack


@pytest.fixture
async def proxy(long_stack: Stack) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", long_stack.port) as running:
        yield running


class LiveTap(WireTap):
    """A wire tap that also tells when the client's current connection has its
    ``ready`` (``live`` is set), so a fault can be aimed at a served connection."""

    def __init__(self, checker: WireChecker) -> None:
        super().__init__(checker)
        self.live = asyncio.Event()

    def opened(self, url: str) -> None:
        self.live.clear()
        super().opened(url)

    def received(self, message: str | bytes) -> None:
        super().received(message)
        if self.connection is not None and self.connection.ready is not None:
            self.live.set()

    def closed(self) -> None:
        self.live.clear()
        super().closed()


def fast_client(url: str, wire_tap: WireTap, **kwargs: object) -> ChatClient:
    """Reconnects quickly and notices silence within a second (scaled); its wire goes to ``wire_tap``."""
    return ChatClient(
        url,
        backoff=Backoff(initial_s=0.02, cap_s=0.2, healthy_after_s=1.0),
        ping_interval_s=0.25,
        ping_timeout_s=1.0 * TIMEOUT_FACTOR,
        wire_tap=wire_tap,
        **kwargs,  # type: ignore[arg-type]
    )


@dataclass
class Transcript:
    """What a consumer saw of the client's events; the seqs and texts are the
    wire checker's to judge."""

    accepted: list[Accepted] = field(default_factory=list)
    disconnects: int = 0
    done: Done | None = None

    def take(self, event: object) -> None:
        if isinstance(event, Done):
            self.done = event
        elif isinstance(event, Accepted):
            self.accepted.append(event)
        elif isinstance(event, Disconnected):
            self.disconnects += 1
        elif isinstance(event, GaveUp):
            raise AssertionError(f"client gave up: {event.reason}")


async def until_connected(events: AsyncIterator[object], transcript: Transcript) -> None:
    """Consume events up to the next Connected."""
    while not isinstance(event := await anext(events), Connected):  # type: ignore[call-overload]
        transcript.take(event)


async def until_done(events: AsyncIterator[object], transcript: Transcript) -> None:
    """Consume events up to the next Done."""
    async with asyncio.timeout(6 * WAIT_S):
        async for event in events:  # type: ignore[attr-defined]
            transcript.take(event)
            if isinstance(event, Done):
                return


async def run_turn(client: ChatClient, prompt: str, transcript: Transcript, *, turn_started: asyncio.Event | None = None) -> Done:
    """Consume events until the done of the turn the prompt started."""
    await client.chat(prompt)
    async with asyncio.timeout(6 * WAIT_S):
        async for event in client.events():
            transcript.take(event)
            if isinstance(event, Chunk) and turn_started is not None:
                turn_started.set()
            if isinstance(event, Done):
                return event
    raise AssertionError("the client stopped before the turn's done")


async def test_fifty_random_cuts(long_stack: Stack, proxy: FaultProxy) -> None:
    """Open connections cut at 50 random moments over long streams: every seq once on the wire, texts equal history."""
    rng = random.Random(2026)
    session = new_session()
    wire = WireChecker()
    tap = LiveTap(wire)
    transcript = Transcript()
    started = asyncio.Event()

    async def cutter() -> tuple[int, int]:
        """Cut 50 connections; return how many cuts hit one, and how many of
        those had their ready (the others may land in the handshake)."""
        await started.wait()
        hits = served = 0
        for number in range(50):
            await proxy.next_connection()
            if number % 2:  # every other cut waits for the connection to be served
                await asyncio.wait_for(tap.live.wait(), WAIT_S)
            await asyncio.sleep(rng.uniform(0.02, 0.12))  # the random moment of the cut: no event to wait for
            cut = proxy.cut_all()
            hits += cut
            served += cut if number % 2 else 0
        return hits, served

    async with fast_client(proxy.url(), tap, session=session) as client:
        cutting = asyncio.create_task(cutter())
        turns = 0
        while not cutting.done() or turns == 0:
            done = await run_turn(client, f"survive the cuts, part {turns + 1}", transcript, turn_started=started)
            assert done.reason == "length"
            turns += 1
        hits, served = await cutting
    assert hits == 50
    assert served == 25
    assert transcript.disconnects >= served  # a cut during the handshake is a failed connect instead
    assert len([c for c in wire.connections if c.frames]) > served  # the checker saw every served connection
    record = await history(long_stack, session)
    assert len(record["turns"]) == turns
    wire.assert_history(session, record)


async def test_half_open_connection_is_detected(long_stack: Stack, proxy: FaultProxy) -> None:
    """Traffic black-holed without a close: the heartbeat notices, the client reconnects and completes."""
    session = new_session()
    wire = WireChecker()
    transcript = Transcript()
    started = asyncio.Event()

    async def blackhole() -> None:
        await started.wait()  # mid-stream: the turn has seconds to go
        assert proxy.blackhole_existing() == 1

    async with fast_client(proxy.url(), wire.tap(), session=session) as client:
        holing = asyncio.create_task(blackhole())
        done = await run_turn(client, "half open", transcript, turn_started=started)
        await holing
    assert done.reason == "length"
    assert transcript.disconnects >= 1
    assert proxy.connections >= 2
    wire.assert_history(session, await history(long_stack, session))


async def test_delayed_and_split_traffic(long_stack: Stack, proxy: FaultProxy) -> None:
    """Every read delayed and split into 7-byte writes: frames reassemble, every seq once."""
    proxy.delay_s = 0.002
    proxy.split_bytes = 7
    session = new_session()
    wire = WireChecker()
    transcript = Transcript()
    async with fast_client(proxy.url(), wire.tap(), session=session) as client:
        done = await run_turn(client, "slow and fragmented", transcript)
    assert done.reason == "length"
    wire.assert_history(session, await history(long_stack, session))


async def test_chat_sent_during_outage_starts_one_turn(long_stack: Stack, proxy: FaultProxy) -> None:
    """A chat sent while the gateway is unreachable goes out once on reconnect and starts one turn."""
    session = new_session()
    wire = WireChecker()
    transcript = Transcript()
    async with fast_client(proxy.url(), wire.tap(), session=session) as client:
        events = client.events()
        await until_connected(events, transcript)
        proxy.refuse = True
        proxy.cut_all()
        while not isinstance(event := await anext(events), Reconnecting):
            transcript.take(event)
        await client.chat("sent while offline")
        proxy.refuse = False
        await until_done(events, transcript)
    record = await history(long_stack, session)
    assert [t["prompt"] for t in record["turns"]] == ["sent while offline"]
    assert [a.turn for a in transcript.accepted] == [1]
    wire.assert_history(session, record)


async def test_chat_resent_after_cut_starts_one_turn(long_stack: Stack, proxy: FaultProxy) -> None:
    """A connection cut right after a chat is sent: the resend is deduplicated by id."""
    session = new_session()
    wire = WireChecker()
    transcript = Transcript()
    async with fast_client(proxy.url(), wire.tap(), session=session) as client:
        events = client.events()
        await until_connected(events, transcript)
        await client.chat("cut right after sending")
        proxy.cut_all()  # the accepted frame, if any, is lost with the connection
        await until_done(events, transcript)
    record = await history(long_stack, session)
    assert len(record["turns"]) == 1
    assert {a.turn for a in transcript.accepted} <= {1}
    wire.assert_history(session, record)


async def test_gives_up_on_policy_close(long_stack: Stack) -> None:
    """A refused handshake (400: bad session id) ends the client with GaveUp, no retries."""
    wire = WireChecker()
    async with ChatClient(f"ws://127.0.0.1:{long_stack.port}/ws", session="bad.id", wire_tap=wire.tap()) as client:
        events = [event async for event in client.events()]
    assert len(events) == 1 and isinstance(events[0], GaveUp)
    assert "HTTP 400" in events[0].reason
    assert wire.connections == []  # refused before the upgrade: no frame at all


async def test_gives_up_after_max_attempts(proxy: FaultProxy) -> None:
    """With the gateway unreachable, the client stops after max_attempts with a clear reason."""
    proxy.refuse = True
    wire = WireChecker()
    client = ChatClient(proxy.url(), backoff=Backoff(initial_s=0.01, cap_s=0.02, max_attempts=3), wire_tap=wire.tap())
    async with client:
        events = [event async for event in client.events()]
    assert [type(e) for e in events] == [Reconnecting, Reconnecting, Reconnecting, GaveUp]
    assert isinstance(events[-1], GaveUp) and "gave up after 3 attempts" in events[-1].reason
    assert wire.connections == []  # never connected


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def flood_stack(redis_server: Server) -> Iterator[Stack]:
    """A fast stream (4,000 tokens/s, 8,000 tokens, each its own frame: no
    frame-rate cap) behind a gateway with small send bounds."""
    env = {"CHAT_DEMO_TOKENS_PER_S": "4000", "CHAT_DEMO_ANSWER_TOKENS": "8000", "CHAT_FRAME_INTERVAL_MS": "0"}
    with isolated_stack(redis_server.url, env) as stack:
        stack.gateways[0].stop()
        stack.processes.remove(stack.gateways[0])
        stack.gateways.clear()
        stack.port = 0
        stack.start_gateway({"CHAT_SEND_QUEUE_FRAMES": "64", "CHAT_SEND_BUFFER_BYTES": "16384"})
        yield stack


async def slow_then_fast_reader(stack: Stack) -> tuple[int | None, int]:
    """Read slowly through a small socket until closed, then reconnect and read the rest,
    every frame of both connections fed to a wire checker.

    Returns the first connection's close code and the last seq it delivered.
    """
    session = new_session()
    wire = WireChecker()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", stack.port))
    first = wire.ws(session)
    async with connect(stack.ws_url(session=session), subprotocols=["chat.v1"], sock=sock, max_queue=4) as ws:  # type: ignore[list-item]
        first.feed(await ws.recv())
        await ws.send(json.dumps({"type": "chat", "prompt": "flood me"}))
        with contextlib.suppress(ConnectionClosed):
            while True:
                first.feed(await ws.recv())
                await asyncio.sleep(0.002)  # the slow reader itself: about 500 frames/s, slower than the stream
        first_code = ws.close_code
    assert first.cursor is not None
    # Then as fast as it can, resuming from its cursor as the contract says after
    # a 1013: on a loaded machine even this reader can fall behind a replay.
    cursor, done = first.cursor, False
    async with asyncio.timeout(3 * WAIT_S):
        while not done:
            again = wire.ws(session, cursor)
            async with connect(stack.ws_url(session=session, last_seq=cursor), subprotocols=["chat.v1"]) as ws:  # type: ignore[list-item]
                try:
                    while not done:
                        done = again.feed(await ws.recv())["type"] == "done"
                except ConnectionClosed:
                    assert ws.close_code == 1013, ws.close_code
            assert again.cursor is not None
            cursor = again.cursor
    wire.assert_history(session, await history(stack, session))
    return first_code, first.cursor


async def test_slow_reader_is_disconnected_and_catches_up(flood_stack: Stack) -> None:
    """Readers slower than the stream are closed with 1013, resume by last_seq, and the gateway's memory stays bounded."""
    pid = flood_stack.gateways[0].process.pid  # type: ignore[union-attr]
    before = rss_kib(pid)
    results = await asyncio.gather(*(slow_then_fast_reader(flood_stack) for _ in range(4)))
    grown_kib = rss_kib(pid) - before
    for code, first_last_seq in results:
        assert code == 1013
        assert first_last_seq < 8001  # closed mid-stream (8,000 chunks and the done)
    # Loose: four 8,000-frame streams (about 2 MB) went to readers that fell
    # behind; the gateway held at most its bounded queues for them.
    assert grown_kib < 20 * 1024, f"gateway grew by {grown_kib} KiB"

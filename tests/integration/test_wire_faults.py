"""The strict wire checker catches a faulty gateway through the real clients.

A :class:`~tests.wirefault.WireFaultProxy` between the client and a real
gateway breaks the contract one way per test (a skipped, repeated or
reordered chunk, a second done, a chunk after ``paused``, a wrong
``resumed.seq``, a replay that ignores ``last_seq``). Each fault is driven
through the test suite's raw :class:`~tests.stack.Client`, which must fail
with the right :class:`~tests.wire.WireViolation`, and through the Python
:class:`~shared.client.ChatClient` with a wire tap, whose checker must have
recorded it. The ChatClient drops duplicates and reconnects on gaps, so most
faults never reach its consumer, whose events look fine: the wire is where
to check. Some it passes on (a chunk after ``paused``, a second done that
then eats the next turn's first chunk), and a test reading only the text
misses those too. Without a fault the proxy is transparent and the checker
stays clean.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from devstack.servers import Server
from shared.backoff import Backoff
from shared.client import ChatClient, Disconnected
from shared.client.connection import Event
from shared.protocol import Chunk, Done, Paused, Resumed
from tests.stack import WAIT_S, Client, Clients, Stack, history, isolated_stack, new_session
from tests.wire import WireChecker, WireViolation
from tests.wirefault import Fault, FaultKind, WireFaultProxy

# Turns of 1.5 s (100 tokens/s, 150 tokens): a pause lands mid-turn. The raw
# client leaves a faulty turn generating, so the per-user limit is raised.
PACED = {"CHAT_DEMO_TOKENS_PER_S": "100", "CHAT_DEMO_ANSWER_TOKENS": "150", "CHAT_MAX_TURNS_PER_USER": "64"}


@pytest.fixture(scope="module")
def fault_stack(redis_server: Server) -> Iterator[Stack]:
    with isolated_stack(redis_server.url, PACED) as stack:
        yield stack


@dataclass(frozen=True)
class Case:
    faults: tuple[Fault, ...]
    match: str  # the violation the checker reports
    pause: bool = False  # the fault needs a pause and a resume mid-turn
    reconnect: bool = False  # the fault needs a connection resuming from a last_seq
    after_done: bool = False  # the fault follows the turn's done: a second turn reads it


SKIP = Fault(FaultKind.SKIP, seq=3)
CASES = {
    "skip": Case((SKIP,), r"a gap: seq 4 after 2"),
    "duplicate": Case((Fault(FaultKind.DUPLICATE, seq=3),), r"a duplicate or reordered seq 3 after 3"),
    "reorder": Case((Fault(FaultKind.REORDER, seq=3),), r"a gap: seq 4 after 2"),
    "double_done": Case((Fault(FaultKind.DOUBLE_DONE),), r"a duplicate or reordered seq (\d+) after \1\b", after_done=True),
    "double_done_next_seq": Case(
        (Fault(FaultKind.DOUBLE_DONE, next_seq=True),),
        r"a second done for turn 1: seq \d+ and \d+",
        after_done=True,
    ),
    "after_paused": Case((Fault(FaultKind.AFTER_PAUSED),), r"chunk seq (\d+) while paused at \d+", pause=True),
    "resume_mismatch": Case((Fault(FaultKind.RESUME_MISMATCH),), r"resumed at seq (\d+) after paused at \d+", pause=True),
    "ignore_last_seq": Case((Fault(FaultKind.IGNORE_LAST_SEQ),), r"a duplicate or reordered seq 1 after \d+", reconnect=True),
}


# The raw test client ------------------------------------------------------


async def raw_turn(client: Client, *, pause: bool = False) -> dict[str, Any]:
    """Run one turn (pausing after its second chunk and resuming on
    ``paused``, with ``pause``); return its done."""
    await client.send({"type": "chat", "prompt": "tell me about rivers", "id": uuid.uuid4().hex})
    accepted = await client.until("accepted")
    chunks = 0
    while True:
        frame = await client.recv()
        chunks += frame["type"] == "chunk"
        if pause and chunks == 2 and frame["type"] == "chunk":
            await client.send({"type": "pause"})
        elif frame["type"] == "paused":
            await client.send({"type": "resume"})
        elif frame["type"] == "done" and frame["turn"] == accepted["turn"]:
            return frame


async def test_raw_client_through_a_transparent_proxy(fault_stack: Stack) -> None:
    """The control: through the proxy without a fault, a turn paused and
    resumed, then a second on a connection resuming from its done, are clean."""
    async with WireFaultProxy(fault_stack.port) as proxy, Clients(fault_stack) as clients:
        session = new_session()
        client, _ = await clients.open(session, port=proxy.port)
        done = await raw_turn(client, pause=True)
        assert any(frame["type"] == "paused" for frame in client.frames)
        await client.ws.close()  # before the next turn's frames pile up unread on it
        client, _ = await clients.open(session, last_seq=done["seq"], port=proxy.port)
        await raw_turn(client)
        assert proxy.connections == 2 and proxy.fired == []
        clients.wire.assert_history(session, await history(fault_stack, session))


@pytest.mark.parametrize("name", CASES)
async def test_raw_client_fails_on_the_fault(fault_stack: Stack, name: str) -> None:
    """The test client's checker raises at the first frame of the fault."""
    case = CASES[name]
    session = new_session()
    clients = Clients(fault_stack)
    async with WireFaultProxy(fault_stack.port, *case.faults) as proxy:
        try:
            last_seq = None
            if case.reconnect:  # a first turn straight from the gateway, to resume after
                direct, _ = await clients.open(session)
                last_seq = (await raw_turn(direct))["seq"]
                await direct.ws.close()
            with pytest.raises(WireViolation, match=case.match):
                client, _ = await clients.open(session, last_seq=last_seq, port=proxy.port)
                await raw_turn(client, pause=case.pause)
                if case.after_done:
                    await raw_turn(client)
        finally:
            # Frames left unread after the violation would hold up a closing handshake.
            for opened in clients.opened:
                opened.ws.transport.abort()
    assert proxy.fired == [fault.kind for fault in case.faults]
    assert len(clients.wire.violations) == 1, clients.wire.violations


# The Python client ---------------------------------------------------------


def chat_client(proxy: WireFaultProxy, checker: WireChecker, **kwargs: Any) -> ChatClient:
    """A ChatClient through the proxy, its raw wire fed to ``checker``; it reconnects at once."""
    return ChatClient(proxy.url(), backoff=Backoff(initial_s=0.02, cap_s=0.2), wire_tap=checker.tap(), **kwargs)


async def consume_turn(client: ChatClient, prompt: str, *, pause: bool = False) -> list[Event]:
    """The events a consumer of ``turn()`` sees, pausing after the second
    chunk and resuming on ``paused`` with ``pause``."""
    events: list[Event] = []
    async with asyncio.timeout(3 * WAIT_S):
        async for event in client.turn(prompt):
            events.append(event)
            if pause and isinstance(event, Chunk) and len(frames(events)) == 2:
                await client.pause()
            elif isinstance(event, Paused):
                await client.resume()
    return events


def frames(events: list[Event]) -> list[Chunk | Done]:
    return [event for event in events if isinstance(event, (Chunk, Done))]


def text(events: list[Event]) -> str:
    return "".join(event.text for event in events if isinstance(event, Chunk))


def assert_looks_fine(events: list[Event], stored: dict[str, Any]) -> None:
    """What a test reading the client's events checks: the turn's seqs once
    each and in order, one done as stored, the text of the stored answer."""
    seqs = [frame.seq for frame in frames(events)]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    done = frames(events)[-1]
    assert isinstance(done, Done) and (done.seq, done.reason) == (stored["last_seq"], stored["reason"])
    assert text(events) == stored["answer"]


def assert_recorded(checker: WireChecker, match: str) -> re.Match[str]:
    """The tap recorded violations, the first one of the expected kind."""
    assert checker.violations, "the checker saw nothing wrong"
    found = re.search(match, checker.violations[0])
    assert found, checker.violations
    return found


async def test_chat_client_through_a_transparent_proxy(fault_stack: Stack) -> None:
    """The control: a ChatClient through the proxy, a paused turn, then a
    reconnect (a new client resuming from the done) and a second turn: clean."""
    checker = WireChecker()
    session = new_session()
    async with WireFaultProxy(fault_stack.port) as proxy:
        async with chat_client(proxy, checker, session=session) as client:
            first = await consume_turn(client, "one", pause=True)
            last_seq = client.last_seq
        async with chat_client(proxy, checker, session=session, last_seq=last_seq) as client:
            second = await consume_turn(client, "two")
    assert proxy.connections == 2 and proxy.fired == []
    assert any(isinstance(event, Paused) for event in first)
    stored = await history(fault_stack, session)
    checker.assert_clean()
    checker.assert_history(session, stored)
    assert_looks_fine(first, stored["turns"][0])
    assert_looks_fine(second, stored["turns"][1])


HIDDEN = {
    "skip": CASES["skip"],
    "duplicate": CASES["duplicate"],
    "reorder": CASES["reorder"],
    "double_done": CASES["double_done"],
    "ignore_last_seq": CASES["ignore_last_seq"],
    # The gap reconnect's replay starts at 0: the client drops what it had.
    "skip_then_ignore_last_seq": Case((SKIP, Fault(FaultKind.IGNORE_LAST_SEQ)), CASES["skip"].match),
}


@pytest.mark.parametrize("name", HIDDEN)
async def test_chat_client_hides_the_fault_the_wire_shows(fault_stack: Stack, name: str) -> None:
    """The ChatClient's consumer sees a perfect turn; only the wire shows the fault."""
    case = HIDDEN[name]
    checker = WireChecker()
    session = new_session()
    last_seq = 0
    if case.reconnect:  # a first turn straight from the gateway, to resume after
        async with Clients(fault_stack, checker) as clients:
            direct, _ = await clients.open(session)
            last_seq = (await raw_turn(direct))["seq"]
    async with WireFaultProxy(fault_stack.port, *case.faults) as proxy:
        async with chat_client(proxy, checker, session=session, last_seq=last_seq) as client:
            events = await consume_turn(client, "tell me about rivers")
            if case.after_done:
                events = await consume_turn(client, "and about lakes")
    assert proxy.fired == [fault.kind for fault in case.faults]
    stored = await history(fault_stack, session)
    assert_looks_fine(events, stored["turns"][-1])
    assert_recorded(checker, case.match)
    if FaultKind.IGNORE_LAST_SEQ in proxy.fired:
        assert any(re.search(CASES["ignore_last_seq"].match, v) for v in checker.violations), checker.violations
    gap = FaultKind.SKIP in proxy.fired or FaultKind.REORDER in proxy.fired
    assert sum(isinstance(event, Disconnected) for event in events) == gap  # the client mended a gap by reconnecting
    with pytest.raises(WireViolation):
        checker.assert_clean()


async def test_chat_client_passes_on_a_chunk_after_paused(fault_stack: Stack) -> None:
    """A chunk after ``paused`` reaches the consumer, whose text is still the
    stored answer: a test reading text misses a broken pause."""
    checker = WireChecker()
    session = new_session()
    async with WireFaultProxy(fault_stack.port, *CASES["after_paused"].faults) as proxy:
        async with chat_client(proxy, checker, session=session) as client:
            events = await consume_turn(client, "tell me about rivers", pause=True)
    assert proxy.fired == [FaultKind.AFTER_PAUSED]
    assert_looks_fine(events, (await history(fault_stack, session))["turns"][0])
    found = assert_recorded(checker, CASES["after_paused"].match)
    at = next(i for i, event in enumerate(events) if isinstance(event, Paused))
    late, resumed = events[at + 1 : at + 3]
    assert isinstance(late, Chunk) and late.seq == int(found[1]) and isinstance(resumed, Resumed), events[at : at + 3]


async def test_chat_client_passes_on_a_wrong_resumed_seq(fault_stack: Stack) -> None:
    """``resumed.seq`` differing from ``paused.seq`` reaches the consumer as is; its text is fine."""
    checker = WireChecker()
    session = new_session()
    async with WireFaultProxy(fault_stack.port, *CASES["resume_mismatch"].faults) as proxy:
        async with chat_client(proxy, checker, session=session) as client:
            events = await consume_turn(client, "tell me about rivers", pause=True)
    assert proxy.fired == [FaultKind.RESUME_MISMATCH]
    assert_looks_fine(events, (await history(fault_stack, session))["turns"][0])
    assert_recorded(checker, CASES["resume_mismatch"].match)
    paused = next(event for event in events if isinstance(event, Paused))
    resumed = next(event for event in events if isinstance(event, Resumed))
    assert resumed.seq == paused.seq + 1


async def test_chat_client_cannot_hide_a_second_done_at_the_next_seq(fault_stack: Stack) -> None:
    """A second done of turn 1, one seq on, takes the seq of turn 2's first
    chunk: the client drops that chunk as a duplicate. Both turns still end
    with a done and text, as a test reading events checks; only the stored
    answer, or the wire, shows that turn 2 lost its start."""
    checker = WireChecker()
    session = new_session()
    async with WireFaultProxy(fault_stack.port, *CASES["double_done_next_seq"].faults) as proxy:
        async with chat_client(proxy, checker, session=session) as client:
            first = await consume_turn(client, "one")
            second = await consume_turn(client, "two")
    assert proxy.fired == [FaultKind.DOUBLE_DONE]
    stored = await history(fault_stack, session)
    assert_looks_fine(first, stored["turns"][0])
    done = frames(second)[-1]
    assert isinstance(done, Done) and done.reason == stored["turns"][1]["reason"] and text(second)
    answer = stored["turns"][1]["answer"]
    assert answer.endswith(text(second)) and text(second) != answer  # its first chunk is gone
    assert frames(second)[0].seq == stored["turns"][0]["last_seq"] + 2
    assert_recorded(checker, CASES["double_done_next_seq"].match)
    assert len(checker.violations) == 1, checker.violations

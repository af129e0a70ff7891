"""The worker's frame-rate cap (CHAT_FRAME_INTERVAL_MS) and its asynchronous JetStream publishing,
end to end: a local OpenAI-compatible model server paces the deltas, real NATS/Redis carry the
frames, and every frame goes through the strict wire checker (``Clients``), which asserts seqs
contiguous, each once, and one done per turn.

The cap tests each start the worker they need (its cap) on a shared stack that has none of its own;
the publishing tests freeze or kill a NATS of their own mid-turn, the demo model keeping the worker's
publish window full.
"""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest

from devstack.processes import ServiceProcess
from devstack.servers import LocalNats, Server
from services.llm_worker.service import PUBLISH_ACK_TIMEOUT_S
from tests.fake_openai import FakeOpenAI, _delta, _event, serve_in_thread
from tests.stack import (
    WAIT_S,
    Client,
    Clients,
    Stack,
    history,
    isolated_stack,
    new_session,
    openai_env,
    restartable_stack,
)

FINISH = _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})


def drip_text(deltas: int) -> str:
    """The answer of ``[drip:N:MS]``: what its N deltas concatenate to."""
    return "".join(f"w{index} " for index in range(deltas))


class PacedModel(FakeOpenAI):
    """FakeOpenAI plus two paced answers:

    ``[drip:N:MS]`` N one-word deltas (``w0 ``, ``w1 ``…), one every MS milliseconds (at least), then the
    finish; ``[stepped]`` ``first `` at once, ``second `` once the test sets ``steps[0]``, the finish
    once it sets ``steps[1]``; each wait gives up after ``WAIT_S`` (a failed test leaves no thread behind).
    """

    def __init__(self) -> None:
        super().__init__()
        self.steps = [threading.Event(), threading.Event()]
        self.drip_s = 0.0  # how long the last drip took to send, seconds

    async def _stream(self, prompt: str) -> AsyncIterator[bytes]:
        if drip := re.search(r"\[drip:(\d+):(\d+)\]", prompt):
            count, gap_s = int(drip.group(1)), int(drip.group(2)) / 1000
            started = time.monotonic()
            for index in range(count):
                yield _delta(f"w{index} ")
                await asyncio.sleep(gap_s)
            self.drip_s = time.monotonic() - started
            yield FINISH
            yield b"data: [DONE]\n\n"
            return
        if "[stepped]" in prompt:
            yield _delta("first ")
            await asyncio.to_thread(self.steps[0].wait, WAIT_S)
            yield _delta("second ")
            await asyncio.to_thread(self.steps[1].wait, WAIT_S)
            yield FINISH
            yield b"data: [DONE]\n\n"
            return
        async for piece in super()._stream(prompt):
            yield piece


@pytest.fixture(scope="module")
def model() -> Iterator[tuple[PacedModel, str]]:
    fake = PacedModel()
    with serve_in_thread(fake.app) as url:
        yield fake, url


@pytest.fixture(scope="module")
def capless_stack(model: tuple[PacedModel, str], redis_server: Server) -> Iterator[Stack]:
    """Gateway and buffer on their own NATS, no worker: each test starts one with its cap."""
    with isolated_stack(redis_server.url, openai_env(model[1]), worker=False) as stack:
        yield stack


@contextmanager
def worker(stack: Stack, interval_ms: str) -> Iterator[ServiceProcess]:
    """The stack's only worker while the block runs, its cap ``interval_ms``."""
    process = stack.start_worker({"CHAT_FRAME_INTERVAL_MS": interval_ms})
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
async def cclients(capless_stack: Stack) -> AsyncIterator[Clients]:
    async with Clients(capless_stack) as opened:
        yield opened


async def chunks_of_turn(client: Client, prompt: str) -> tuple[list[str], dict[str, object]]:
    """Run a turn; its chunks' texts in order, and its done."""
    await client.send({"type": "chat", "prompt": prompt})
    accepted = await client.until("accepted")
    texts: list[str] = []
    while True:
        frame = await client.recv()
        if frame["type"] == "chunk":
            assert frame["turn"] == accepted["turn"]
            texts.append(frame["text"])
        elif frame["type"] == "done":
            return texts, frame


async def test_cap_coalesces_a_fast_stream(
    model: tuple[PacedModel, str], capless_stack: Stack, cclients: Clients
) -> None:
    """300 one-word deltas ~2 ms apart under a 50 ms cap leave as at most 60 chunks (about one per
    window): the text is exactly the deltas' concatenation, seqs contiguous, one done."""
    fake, _ = model
    session = new_session()
    with worker(capless_stack, "50"):
        client, _ = await cclients.open(session)
        texts, done = await chunks_of_turn(client, "[drip:300:2]")
    assert done["reason"] == "stop"
    assert "".join(texts) == drip_text(300)
    assert len(texts) <= 300 // 5, len(texts)
    # Frames are a window apart: no more than the stream's duration holds windows, plus the first
    # frame and the last (its text may wait up to a window past the model's last delta).
    assert len(texts) <= fake.drip_s / 0.050 + 2, (len(texts), fake.drip_s)
    cclients.wire.assert_history(session, await history(capless_stack, session))


async def test_cap_off_sends_every_delta_as_its_own_chunk(capless_stack: Stack, cclients: Clients) -> None:
    """With CHAT_FRAME_INTERVAL_MS=0 and deltas 50 ms apart (the worker never behind), each delta is one chunk."""
    session = new_session()
    with worker(capless_stack, "0"):
        client, _ = await cclients.open(session)
        texts, done = await chunks_of_turn(client, "[drip:20:50]")
    assert done["reason"] == "stop"
    assert texts == [f"w{index} " for index in range(20)]
    cclients.wire.assert_history(session, await history(capless_stack, session))


async def test_an_idle_streams_text_is_not_held(
    model: tuple[PacedModel, str], capless_stack: Stack, cclients: Clients
) -> None:
    """Under a 1,000 ms cap: the first text reaches the client while the model still holds the second
    (not kept for a window, nor for more text); text after an idle window leaves at once; the finish
    is not held for the window that text opened. Two chunks, one done."""
    fake, _ = model
    for step in fake.steps:
        step.clear()
    session = new_session()
    with worker(capless_stack, "1000"):
        client, _ = await cclients.open(session)
        await client.send({"type": "chat", "prompt": "[stepped]"})
        first = await client.until("chunk")
        assert first["text"] == "first " and not fake.steps[0].is_set()
        # The variable under test: the stream stays idle for more than a window.
        await asyncio.sleep(1.2)
        fake.steps[0].set()
        released = time.monotonic()
        second = await client.recv()
        # A frame held for the window would come 1 s after the release.
        assert second["type"] == "chunk" and second["text"] == "second ", second
        assert time.monotonic() - released < 0.8
        fake.steps[1].set()
        released = time.monotonic()
        done = await client.recv()
        # The finish follows "second " within its window: it must not wait for the window's end.
        assert done["type"] == "done" and done["reason"] == "stop", done
        assert time.monotonic() - released < 0.8
    cclients.wire.assert_history(session, await history(capless_stack, session))


async def test_stop_during_a_cap_wait_and_pause_resume(capless_stack: Stack, cclients: Clients) -> None:
    """Under a 1,000 ms cap a stop sent on the first chunk lands while the next text waits for the
    window: the turn ends stopped, no chunk after the first. Then a pause and resume mid-turn under
    the cap deliver the whole answer, exactly once, from the paused seq on."""
    session = new_session()
    with worker(capless_stack, "1000"):
        client, _ = await cclients.open(session)
        await client.send({"type": "chat", "prompt": "[drip:500:20]"})  # 10 s of text, a delta per 20 ms
        await client.until("chunk")
        await client.send({"type": "stop"})
        while (frame := await client.recv())["type"] != "done":
            assert frame["type"] != "chunk", f"a chunk after the stop: {frame}"
        assert frame["reason"] == "stopped"

        await client.send({"type": "chat", "prompt": "[drip:100:10]"})
        accepted = await client.until("accepted")
        await client.until("chunk")
        await client.send({"type": "pause"})
        paused = await client.until("paused")
        await client.send({"type": "resume"})
        resumed = await client.until("resumed")
        assert resumed["seq"] == paused["seq"]
        done = await client.until("done")
        assert done["reason"] == "stop"
        assert client.texts(accepted["turn"]) == drip_text(100)
    cclients.wire.assert_history(session, await history(capless_stack, session))


@pytest.fixture
async def restartable(redis_server: Server) -> AsyncIterator[tuple[LocalNats, Stack, Clients]]:
    """A stack on a NATS of its own that the test may restart or freeze, with the demo model as fast
    as JetStream takes frames and the cap off, so a turn keeps its publish window full."""
    env = {"CHAT_DEMO_TOKENS_PER_S": "5000", "CHAT_DEMO_ANSWER_TOKENS": "4000", "CHAT_FRAME_INTERVAL_MS": "0"}
    async with restartable_stack(redis_server.url, env) as running:
        yield running


def worker_of(stack: Stack) -> ServiceProcess:
    return next(p for p in stack.processes if p.module == "services.llm_worker")


async def freeze_until_an_ack_is_overdue(nats: LocalNats, worker: ServiceProcess) -> None:
    """SIGSTOP NATS mid-turn: the worker fills its publish window (64 frames unacknowledged) and, an
    ack timeout later, sends the oldest again; return once its log says so (NATS still frozen)."""
    assert nats.process is not None
    after = len(worker.lines)
    nats.process.send_signal(signal.SIGSTOP)
    try:
        await asyncio.to_thread(worker.wait_for_line, "publish not acknowledged", timeout_s=3 * WAIT_S, after=after)
    except BaseException:
        nats.process.send_signal(signal.SIGCONT)
        raise


async def test_a_nats_restart_with_the_window_full(restartable: tuple[LocalNats, Stack, Clients]) -> None:
    """NATS dies (frozen, then killed) with a full window of frames unacknowledged: their acks are lost
    for good. The worker sends them all again, and the turn delivers every seq once, in order, with
    one done (the checker), the answer whole, within one ack timeout of NATS's return (plus slack)."""
    nats, stack, clients = restartable
    session = new_session()
    client, _ = await clients.open(session)
    await client.send({"type": "chat", "prompt": "keep the window full"})
    await client.until("accepted")
    for _ in range(100):
        await client.until("chunk")
    await freeze_until_an_ack_is_overdue(nats, worker_of(stack))
    assert nats.process is not None
    nats.process.kill()  # what was in its buffers, and every ack owed, is lost
    nats.process.wait(10)
    nats.process = None
    nats.start()
    # Every lost frame is overdue one ack timeout after it was sent, all at about the same moment.
    async with asyncio.timeout(WAIT_S + 2 * PUBLISH_ACK_TIMEOUT_S):
        done = await client.until("done")
    assert done["reason"] == "length"
    clients.wire.assert_history(session, await history(stack, session))


async def test_late_acks_are_sent_again_and_stored_once(restartable: tuple[LocalNats, Stack, Clients]) -> None:
    """NATS freezes (SIGSTOP) with frames in flight: their acks are late, so the worker sends the oldest
    again with its message id; once NATS goes on, both copies reach JetStream, which keeps one. The turn
    delivers every seq once, in order, with one done (the checker), the answer whole."""
    nats, stack, clients = restartable
    assert nats.process is not None
    session = new_session()
    client, _ = await clients.open(session)
    await client.send({"type": "chat", "prompt": "keep the window full"})
    await client.until("accepted")
    for _ in range(100):
        await client.until("chunk")
    await freeze_until_an_ack_is_overdue(nats, worker_of(stack))
    nats.process.send_signal(signal.SIGCONT)
    done = await client.until("done", wait_s=3 * WAIT_S)
    assert done["reason"] == "length"
    clients.wire.assert_history(session, await history(stack, session))

"""Service processes: health endpoints, and a turn queued while no worker runs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from devstack.processes import ServiceProcess
from devstack.servers import Server, free_port
from tests.stack import WAIT_S, Clients, Stack, history, isolated_stack, new_session


@pytest.mark.parametrize("kind", ["buffer", "worker"])
async def test_health_endpoints(stack: Stack, kind: str) -> None:
    """Worker and buffer answer /healthz, /readyz and /metrics on CHAT_HEALTH_PORT."""
    port = free_port()
    start = stack.start_buffer if kind == "buffer" else stack.start_worker
    process = start({"CHAT_HEALTH_PORT": str(port)})
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            assert (await http.get("/readyz")).json() == {"ready": True, "nats": True, "redis": True}
            missing = await http.get("/nope")
            assert missing.status_code == 404 and missing.json()["code"] == "not_found"  # the documented shape
            metrics = await http.get("/metrics")
            assert metrics.status_code == 200
            assert ("chat_buffer_store_seconds" if kind == "buffer" else "chat_worker_publish_seconds") in metrics.text
    finally:
        process.stop()
        stack.processes.remove(process)


@pytest.fixture
async def workerless(redis_server: Server) -> AsyncIterator[tuple[Stack, Clients]]:
    """A stack on its own NATS with a gateway and a buffer but no worker yet."""
    with isolated_stack(redis_server.url, worker=False) as stack:
        async with Clients(stack) as clients:
            yield stack, clients


async def test_turn_waits_for_the_first_worker(workerless: tuple[Stack, Clients]) -> None:
    """A chat sent before any worker runs is kept and generated once one starts."""
    stack, clients = workerless
    session = new_session()
    client, _ = await clients.open(session)
    await client.send({"type": "chat", "prompt": "anyone there?", "id": "early"})
    accepted = await client.until("accepted")
    assert (await history(stack, session))["active"] == {"turn": accepted["turn"], "prompt": "anyone there?"}
    stack.start_worker()
    done = await client.until("done")
    assert done["reason"] in ("stop", "length")
    clients.wire.assert_history(session, await history(stack, session))


def any_line(processes: list[ServiceProcess], text: str, timeout_s: float = WAIT_S) -> None:
    """Until one of ``processes`` has written a line holding ``text``; RuntimeError past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        for process in processes:
            try:
                process.wait_for_line(text, timeout_s=0.1)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise


async def test_trace_id_joins_a_turn_across_services(stack: Stack, clients: Clients) -> None:
    """The gateway's trace id for a turn appears in the worker's and a buffer's log lines for it."""
    session = new_session()
    client, _ = await clients.open(session)
    await client.turn("trace me")
    clients.wire.assert_history(session, await history(stack, session))
    lines = [json.loads(line) for p in stack.processes for line in p.output().splitlines() if line.startswith("{")]
    queued = [e for e in lines if e.get("event") == "turn_queued" and e.get("session") == session]
    assert len(queued) == 1 and len(queued[0]["trace"]) == 16
    trace = queued[0]["trace"]
    # The buffer logs the turn's end before publishing it, but its output reaches
    # this process through a reader thread: wait for the line, from either buffer.
    buffers = [p for p in stack.processes if p.module == "services.buffer"]
    await asyncio.to_thread(any_line, buffers, trace)
    lines = [json.loads(line) for p in stack.processes for line in p.output().splitlines() if line.startswith("{")]
    services = {e["service"] for e in lines if e.get("trace") == trace}
    assert services == {"gateway", "llm_worker", "buffer"}
    assert "trace me" not in "".join(p.output() for p in stack.processes)  # no prompt text in logs


async def test_worker_and_buffer_metrics_move_with_a_turn(redis_server: Server) -> None:
    """Counters and stage histograms of the worker and the buffer move as a turn runs."""
    ports = {"worker": free_port(), "buffer": free_port()}
    with isolated_stack(redis_server.url, worker=False) as stack:
        stack.start_worker({"CHAT_HEALTH_PORT": str(ports["worker"])})
        stack.processes[0].stop()  # replace the stack's buffer with one that serves metrics
        stack.processes.pop(0)
        stack.start_buffer({"CHAT_HEALTH_PORT": str(ports["buffer"])})
        async with Clients(stack) as clients:
            session = new_session()
            client, _ = await clients.open(session)
            _, _, done = await client.turn("measure me")
            clients.wire.assert_history(session, await history(stack, session))
        async with httpx.AsyncClient() as http:
            worker = (await http.get(f"http://127.0.0.1:{ports['worker']}/metrics")).text
            buffer = (await http.get(f"http://127.0.0.1:{ports['buffer']}/metrics")).text
    assert "chat_worker_turns_started_total 1.0" in worker
    assert 'chat_worker_turns_finished_total{reason="length"} 1.0' in worker
    assert "chat_worker_first_token_seconds_count 1.0" in worker
    assert "chat_worker_queue_wait_seconds_count 1.0" in worker
    assert f"chat_worker_publish_seconds_count {float(done['seq'])}" in worker
    assert f"chat_buffer_frames_stored_total {float(done['seq'])}" in buffer
    assert "chat_buffer_store_seconds_count" in buffer and "chat_buffer_replays_total" in buffer
